"""mode_ros: the MoDE diffusion policy (Mixture-of-Denoising-Experts) for ROS 2 robots.

The ground floor (``mode_ros.model``, ``mode_ros.data``, ``mode_ros.train``) is plain PyTorch and
never imports ROS. The ROS 2 shell lives in ``mode_ros.ros`` and is only imported by the node
executables. ``mode_ros.msg`` (the generated ActionChunk message) exists only in a colcon install.
"""

__version__ = "0.1.0"
