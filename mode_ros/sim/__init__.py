"""Meta-World MT10 simulation: scripted-expert demos as rosbag2, closed-loop evaluation, ROS bridge.

Importing this package selects a headless MuJoCo GL backend (``MUJOCO_GL=egl``) unless one is set
or a display exists; MuJoCo reads it once, when it is first imported.
"""
import os as _os

if not _os.environ.get("MUJOCO_GL") and not _os.environ.get("DISPLAY"):
    _os.environ["MUJOCO_GL"] = "egl"
