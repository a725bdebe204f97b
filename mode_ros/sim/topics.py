"""Topic names and message types of the simulated robot (shared by the bag recorder and the ROS bridge).

The sim behaves like a robot driver: it publishes under ``/metaworld`` what a real robot publishes,
and the policy node is pointed at these topics by remapping, exactly as on a real robot.

| topic                                  | type                          | content                              |
|----------------------------------------|-------------------------------|--------------------------------------|
| /metaworld/<camera>/image_raw          | sensor_msgs/msg/Image (rgb8)  | one per camera, header.stamp = sim time, frame_id ``<camera>_optical_frame`` |
| /metaworld/joint_states                | sensor_msgs/msg/JointState    | name = STATE_NAMES (21), position = values, header.stamp = sim time |
| /metaworld/action                      | std_msgs/msg/Float32MultiArray| the action executed at that tick (dx, dy, dz, gripper), one dim labelled ``action`` |
| /metaworld/goal                        | std_msgs/msg/String           | the language instruction (reliable, transient local) |
| /metaworld/episode                     | std_msgs/msg/String           | JSON episode marker: {"event": "start"|"end", ...} |
| /clock (bridge only)                   | rosgraph_msgs/msg/Clock       | sim time |

``<camera>`` is the lower-case MuJoCo camera name: ``corner``, ``gripper_pov`` (gripperPOV), …
"""
from __future__ import annotations

from .metaworld_env import camera_topic_name

PREFIX = "/metaworld"
STATE_TOPIC = f"{PREFIX}/joint_states"
ACTION_TOPIC = f"{PREFIX}/action"
GOAL_TOPIC = f"{PREFIX}/goal"
EPISODE_TOPIC = f"{PREFIX}/episode"
CLOCK_TOPIC = "/clock"

IMAGE_TYPE = "sensor_msgs/msg/Image"
STATE_TYPE = "sensor_msgs/msg/JointState"
ACTION_TYPE = "std_msgs/msg/Float32MultiArray"
STRING_TYPE = "std_msgs/msg/String"


def image_topic(camera: str) -> str:
    """``corner`` -> ``/metaworld/corner/image_raw``; ``gripperPOV`` -> ``/metaworld/gripper_pov/image_raw``."""
    return f"{PREFIX}/{camera_topic_name(camera)}/image_raw"


def image_frame_id(camera: str) -> str:
    return f"{camera_topic_name(camera)}_optical_frame"
