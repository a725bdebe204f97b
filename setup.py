"""pip install of the mode_ros Python package (core library + ``mode-ros`` command), no ROS needed.

On a ROS 2 system the same package is built by colcon through CMakeLists.txt (ament_cmake), which
also generates the ActionChunk message. See README.md.
"""
from setuptools import find_packages, setup

setup(
    name="mode_ros",
    version="0.1.0",
    description="MoDE (Mixture-of-Denoising-Experts) diffusion policy for ROS 2 robots",
    packages=find_packages(include=["mode_ros", "mode_ros.*"]),
    package_data={"mode_ros": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "torch>=2.2",
        "torchvision>=0.17",
        "safetensors>=0.4",
        "pyyaml>=6",
    ],
    extras_require={
        "clip": ["open-clip-torch>=2.24"],
        "data": ["h5py>=3.10", "rosbags>=0.10", "pillow>=10", "tqdm>=4.66"],
        "train": ["h5py>=3.10", "rosbags>=0.10", "pillow>=10", "tensorboard>=2.15", "tqdm>=4.66",
                  "matplotlib>=3.8"],
        "sim": ["metaworld==3.1.1", "mujoco", "packaging"],
    },
    entry_points={"console_scripts": ["mode-ros=mode_ros.cli:main"]},
)
