"""Message definitions the converter needs beyond the stock ROS 2 typestore (ROS-free).

``ACTION_CHUNK_MSG`` is a verbatim copy of ``msg/ActionChunk.msg`` (a test keeps the two equal), so
the converter can decode ``mode_ros/msg/ActionChunk`` from bags without a ROS install or the colcon
share dir (it works when mode_ros is only pip-installed).
"""
from __future__ import annotations

import os
from pathlib import Path

ACTION_CHUNK_TYPE = "mode_ros/msg/ActionChunk"

ACTION_CHUNK_MSG = (
    '# One chunk of future actions computed by the MoDE policy from one observation.\n'
    '#\n'
    '# Row i of `actions` is the action to execute at time header.stamp + (first_index + i) * control_period\n'
    '# ... measured from the observation. Consumers execute row 0 now (the node already skipped the rows\n'
    '# that inference latency overtook) and the following rows at the control period.\n'
    '\n'
    '# stamp: time of the OBSERVATION (camera image) the chunk was computed from, not the publish time;\n'
    '# frame_id: the frame the actions are expressed in (free text, from the `action_frame_id` parameter).\n'
    'std_msgs/Header header\n'
    '\n'
    '# Time between two consecutive rows of `actions` (1 / control_rate_hz).\n'
    'builtin_interfaces/Duration control_period\n'
    '\n'
    "# Number of rows (future control steps) in `actions`. Can be less than the model's chunk length\n"
    '# when rows overtaken by latency or already executed were dropped.\n'
    'uint32 chunk_size\n'
    '\n'
    '# Number of action dimensions (columns).\n'
    'uint32 action_dim\n'
    '\n'
    '# Optional names of the action dimensions, empty or exactly action_dim entries (e.g. "dx", "gripper").\n'
    'string[] action_names\n'
    '\n'
    "# Row-major chunk_size x action_dim actions, in the robot's units (de-normalised), already clipped\n"
    '# to the configured bounds. Never contains NaN or Inf.\n'
    'float32[] actions\n'
    '\n'
    '# Control periods from the observation to row 0: row 0 is for the tick at header.stamp + first_index *\n'
    "# control_period. With latency_compensation (the default) this is also row 0's index in the chunk the\n"
    '# model produced (k > 0 when k rows were overtaken by inference latency or already executed); without\n'
    '# it a chunk is executed from its row 0 on arrival, i.e. late, and first_index only gives the time.\n'
    'uint32 first_index\n'
    '\n'
    '# Strictly increasing number of the model inference that produced this chunk (starts at 1).\n'
    'uint64 sequence\n'
    '\n'
    '# Strictly increasing number of this message (one per control tick).\n'
    'uint64 tick\n'
    '\n'
    '# The language goal (instruction) this chunk answers.\n'
    'string goal\n'
    '\n'
    '# Wall-clock time the model took to compute the chunk (observation in -> actions out).\n'
    'builtin_interfaces/Duration inference_latency\n'
)


def action_chunk_msg_text() -> str:
    """The ActionChunk definition: the source tree's ``msg/ActionChunk.msg`` when running from a
    checkout, else an installed ``share/mode_ros/msg/ActionChunk.msg`` (colcon), else the copy above."""
    here = Path(__file__).resolve().parents[2] / "msg" / "ActionChunk.msg"
    candidates = [here]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / "mode_ros" / "msg" / "ActionChunk.msg")
    for path in candidates:
        try:
            return path.read_text()
        except OSError:
            continue
    return ACTION_CHUNK_MSG


def make_typestore(extra_msgdefs: dict[str, str] | None = None):
    """A rosbags typestore with the ROS 2 Kilted (Jazzy-compatible) types plus ActionChunk.

    ``extra_msgdefs`` maps ``pkg/msg/Type`` -> ``.msg`` text (e.g. definitions embedded in a bag);
    they override the stock definitions of the same name.
    """
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    base = get_typestore(Stores.ROS2_KILTED)
    types = dict(base.fielddefs)
    types.update(get_types_from_msg(action_chunk_msg_text(), ACTION_CHUNK_TYPE))
    for name, text in (extra_msgdefs or {}).items():
        types.update(get_types_from_msg(text, name))
    store = get_typestore(Stores.EMPTY)
    store.register(types)
    return store
