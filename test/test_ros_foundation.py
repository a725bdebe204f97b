"""Issue 2, item 6: the message over real DDS between processes, and the installed executable reading
its parameters from a params file (the path `ros2 launch` uses)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml

from ros_helpers import executable, share_file, wait_until

pytestmark = pytest.mark.ros

TEST_DIR = Path(__file__).resolve().parent


def _full_chunk():
    from builtin_interfaces.msg import Duration, Time

    from mode_ros.msg import ActionChunk

    m = ActionChunk()
    m.header.stamp = Time(sec=1712345678, nanosec=987654321)
    m.header.frame_id = "tool0"
    m.control_period = Duration(sec=0, nanosec=66_666_667)
    m.chunk_size = 7
    m.action_dim = 5
    m.action_names = ["dx", "dy", "dz", "droll", "gripper"]
    m.actions = [math.sin(i) * 3.5 for i in range(35)]
    m.first_index = 3
    m.sequence = 2**40 + 17
    m.tick = 2**33 + 5
    m.goal = "öffne die Schublade — open the drawer 🚪"
    m.inference_latency = Duration(sec=0, nanosec=45_000_123)
    return m


def _fields(m) -> dict:
    import numpy as np

    out = {}
    for name in m.get_fields_and_field_types():
        v = getattr(m, name)
        if hasattr(v, "get_fields_and_field_types"):
            v = _fields(v)
        elif isinstance(v, np.ndarray) or hasattr(v, "tolist"):
            v = [float(x) for x in v]
        elif isinstance(v, list):
            v = list(v)
        out[name] = v
    return out


def test_action_chunk_round_trip_between_processes(ros_harness, start_node):
    from mode_ros.msg import ActionChunk

    echo = start_node(Path(sys.executable), extra_args=[str(TEST_DIR / "echo_node.py")])
    h = ros_harness
    pub = h.node.create_publisher(ActionChunk, "/chunk_echo/in", 10)
    got = h.collect(ActionChunk, "/chunk_echo/out", 10)
    try:
        h.wait_for_subscribers(pub, 1, timeout=20)
        h.wait_for_publishers(got, 1, timeout=20)
        sent = _full_chunk()
        pub.publish(sent)
        wait_until(lambda: len(got) >= 1, 10, "the echoed ActionChunk", on_fail=echo.tail)
        back = got.msgs()[0]
        a, b = _fields(sent), _fields(back)
        assert set(a) == {"header", "control_period", "chunk_size", "action_dim", "action_names", "actions",
                          "first_index", "sequence", "tick", "goal", "inference_latency"}
        import numpy as np

        np.testing.assert_array_equal(np.float32(a.pop("actions")), np.float32(b.pop("actions")))
        assert a == b
    finally:
        h.drop(pub, got)


def test_policy_node_reads_params_file(ros_harness, start_node, tmp_path):
    """The installed policy_node, started like `ros2 launch` does, takes its parameters from the file;
    `-p` overrides win over the file."""
    installed = share_file("config", "policy.yaml")
    doc = yaml.safe_load(installed.read_text())
    params = doc["/**"]["ros__parameters"]
    # a modified copy: the values below are not the defaults, so reading them back proves the file was used
    params.update({"control_rate_hz": 7.5, "replan_every": 3, "image_transport": "compressed",
                   "action_lower_bounds": [-1.0, -2.0, -3.0], "trajectory_joint_names": ["j1", "j2"],
                   "goal": "stack the blocks", "autostart": False})
    f = tmp_path / "policy.yaml"
    f.write_text(yaml.safe_dump(doc))
    node = start_node(executable("policy_node"), params_file=f, name="param_probe",
                      params={"device": "cpu"})
    names = list(params)
    got = ros_harness.get_parameters("/param_probe", names + ["device"], timeout=30)
    assert node.alive, node.tail()
    for k in names:
        if k == "device":
            continue
        assert got[k] == params[k], f"{k}: node has {got[k]!r}, file says {params[k]!r}"
    assert got["device"] == "cpu"  # -p beats the file


def test_installed_params_file_declares_every_parameter(ros_harness, start_node):
    """The unmodified installed config/policy.yaml: every key is a declared node parameter with that value."""
    installed = share_file("config", "policy.yaml")
    params = yaml.safe_load(installed.read_text())["/**"]["ros__parameters"]
    start_node(executable("policy_node"), params_file=installed, name="param_probe2",
               params={"autostart": False})
    declared = set(ros_harness.list_parameters("/param_probe2", timeout=30))
    assert set(params) - declared == set()
    got = ros_harness.get_parameters("/param_probe2", list(params))
    for k, v in params.items():
        if k == "autostart":
            continue
        assert got[k] == v, k
