"""Faults refused at the door by the installed policy_node (issue 19): integer/string/unknown parameters,
bomb-header and truncated images, malformed JointStates (reason counters in /diagnostics), non-finite
weights failing configure, 60 simultaneous ~/enable calls all answered, and the process exiting with 0
after the ``shutdown`` lifecycle transition. One node process serves the tests of the module that need a
configured node (they run in file order; the last one shuts it down)."""
from __future__ import annotations

import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from ros_helpers import executable, wait_until

pytestmark = pytest.mark.ros

NODE = "/mode_policy"
STATE_NAMES = ["j0", "j1", "j2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "init", "--preset", "tiny", "--out", str(out),
                        "--cameras", "static", "--action-dim", "3", "--state-dim", "3", "--goals", "open the drawer"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def node(ckpt, start_module_node, tmp_path_factory):
    """The node started from a params file with an integer for a double and a misspelt name."""
    params = tmp_path_factory.mktemp("params") / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    control_rate_hz: 30\n    chekpoint: /nowhere\n"
                      "    action_lower_bounds: [-1]\n")
    n = start_module_node(executable("policy_node"), params_file=params,
                          params={"checkpoint": str(ckpt), "device": "cpu", "image_transport": "compressed",
                                  "torch_threads": 1, "log_throttle_period": 0.0})
    n.wait_for_output("active: publishing", timeout=180)
    return n


def diag_values(h, timeout=10.0) -> dict:
    from diagnostic_msgs.msg import DiagnosticArray

    d = h.collect(DiagnosticArray, "/diagnostics", 10)
    try:
        got = wait_until(lambda: [s for a in d.msgs() for s in a.status if NODE in s.name], timeout, "diagnostics")
        return {v.key: v.value for v in got[-1].values}
    finally:
        h.drop(d)


def wait_counter(h, node, key, n=1, timeout=15.0) -> dict:
    return wait_until(lambda: (lambda kv: kv if int(kv.get(key, 0)) >= n else None)(diag_values(h)), timeout,
                      f"{key} >= {n} in /diagnostics", on_fail=node.tail)


def test_integer_for_double_accepted_and_unknown_name_warned(node, ros_harness):
    out = node.output()
    assert "unknown parameter 'chekpoint' given to the node, ignored; did you mean 'checkpoint'?" in out
    assert "30 Hz" in out      # configured with control_rate_hz 30 (an integer in the file)
    vals = ros_harness.get_parameters(NODE, ["control_rate_hz", "action_lower_bounds"])
    assert vals["control_rate_hz"] == 30 and vals["action_lower_bounds"] == [-1]
    res = ros_harness.set_parameters(NODE, {"max_observation_age": "0,2"})
    assert not res[0].successful and res[0].reason.startswith("max_observation_age: expected double")


def test_bad_images_rejected_with_reason_counters(node, ros_harness):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header

    from mode_ros.data.images import encode_compressed

    h = ros_harness
    small = bytearray(encode_compressed(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8), "jpeg"))
    i = small.index(b"\xff\xc0")
    bomb = bytearray(small)
    bomb[i + 5:i + 9] = struct.pack(">HH", 8000, 12000)    # 639-byte-class JPEG claiming 12000x8000
    grey = bytearray(small)
    grey[i + 5:i + 9] = struct.pack(">HH", 2000, 1000)     # claims more pixels than its data holds (< limit)
    pub = h.node.create_publisher(CompressedImage, f"{NODE}/image_static/compressed", qos_profile_sensor_data)
    try:
        h.wait_for_subscribers(pub)

        def publish_all_and_check():   # sensor-data QoS is best effort: a sample may be lost, so resend
            stamp = h.node.get_clock().now().to_msg()
            for fmt, data in (("jpeg", bomb), ("jpeg", grey), ("bmp", small)):
                pub.publish(CompressedImage(header=Header(stamp=stamp), format=fmt, data=bytes(data)))
            v = diag_values(h)
            return v if all(int(v.get(f"rejected.image_static:{r}", 0)) >= 1
                            for r in ("too_large", "truncated", "unsupported_format")) else None
        kv = wait_until(publish_all_and_check, 20, "image reason counters", period=0.2, on_fail=node.tail)
        assert int(kv["rejected.image_static"]) >= 3
    finally:
        h.drop(pub)
    assert "12000x8000 = 96000000 pixels, above the limit of 2304000" in node.output()
    assert node.alive


def test_malformed_joint_states_rejected_with_reason_counters(node, ros_harness):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import JointState

    h = ros_harness
    pub = h.node.create_publisher(JointState, f"{NODE}/joint_states", qos_profile_sensor_data)
    try:
        h.wait_for_subscribers(pub)

        def publish_both_and_check():   # sensor-data QoS is best effort: a sample may be lost, so resend
            for names, pos in ((["a", "b", "c", "d"], [0.1] * 6), (["a", "b", "a"], [0.1, 0.2, 0.3])):
                js = JointState(name=names, position=pos)
                js.header.stamp = h.node.get_clock().now().to_msg()
                pub.publish(js)
            v = diag_values(h)
            return all(int(v.get(f"rejected.joint_states:{r}", 0)) >= 1 for r in ("length_mismatch", "duplicate_names"))
        wait_until(publish_both_and_check, 20, "joint_states reason counters", period=0.2, on_fail=node.tail)
    finally:
        h.drop(pub)
    out = node.output()
    assert "4 names but 6 position values" in out and "duplicated joint names ['a']" in out


def test_sixty_simultaneous_enable_calls_all_answered(node, ros_harness):
    from rclpy.qos import QoSProfile, HistoryPolicy, ReliabilityPolicy
    from std_srvs.srv import SetBool

    h = ros_harness
    qos = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
    cli = h.node.create_client(SetBool, f"{NODE}/enable", qos_profile=qos)
    try:
        assert cli.wait_for_service(timeout_sec=10)
        futs = [cli.call_async(SetBool.Request(data=bool(i % 2))) for i in range(60)]
        wait_until(lambda: all(f.done() for f in futs), 20,
                   "responses to 60 simultaneous ~/enable calls", on_fail=lambda: f"{sum(f.done() for f in futs)} "
                   "of 60 answered\n" + node.tail())
        assert all(f.result().success for f in futs)
    finally:
        h.drop(cli)
    h.call(SetBool, f"{NODE}/enable", SetBool.Request(data=True))


def test_shutdown_transition_exits_the_process_with_0(node, ros_harness):
    from lifecycle_msgs.srv import ChangeState, GetAvailableTransitions

    h = ros_harness
    # as `ros2 lifecycle set /mode_policy shutdown` does: the available transition labelled shutdown
    avail = h.call(GetAvailableTransitions, f"{NODE}/get_available_transitions", GetAvailableTransitions.Request())
    tr = next(t.transition for t in avail.available_transitions if t.transition.label == "shutdown")
    res = h.call(ChangeState, f"{NODE}/change_state", ChangeState.Request(transition=tr), timeout=30)
    assert res.success
    wait_until(lambda: not node.alive, 15, "the node process to exit after shutdown", on_fail=node.tail)
    assert node.proc.returncode == 0, node.tail()
    assert "finalized (shutdown transition): exiting" in node.output()


def test_string_for_a_double_refuses_to_start(start_node):
    t0 = time.monotonic()
    p = start_node(executable("policy_node"), params={"control_rate_hz": "fast", "autostart": False})
    wait_until(lambda: not p.alive, 60, "the node to refuse to start", on_fail=p.tail)
    assert p.proc.returncode == 2
    assert "cannot start: ParameterError: control_rate_hz: expected double, got 'fast'" in p.output(), p.tail()
    assert time.monotonic() - t0 < 60


def test_non_finite_weights_fail_configure(ckpt, tmp_path, start_node, ros_harness):
    import torch

    from mode_ros.model.policy import MoDEPolicy

    pol = MoDEPolicy.from_pretrained(ckpt)
    with torch.no_grad():
        pol.denoiser.out.weight.fill_(float("nan"))
    bad = pol.save_pretrained(tmp_path / "nan_ckpt")
    p = start_node(executable("policy_node"), name="mode_policy_nan",
                   params={"checkpoint": str(bad), "device": "cpu", "torch_threads": 1})
    p.wait_for_output("configure failed", timeout=180)
    assert "configure failed: model.safetensors: the warm-up chunk is not finite" in p.output(), p.tail()
    assert ros_harness.lifecycle_state("/mode_policy_nan") == "unconfigured"
    assert "active: publishing" not in p.output()
