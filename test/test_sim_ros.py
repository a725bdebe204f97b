"""Sim bridge over real DDS: the expert "policy node" closes the loop; chunk rows are timed by stamps."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mode_ros.sim  # noqa: F401  (headless GL backend before MuJoCo is imported)

pytest.importorskip("metaworld", reason="Meta-World not installed")

from ros_helpers import executable, wait_until  # noqa: E402

pytestmark = pytest.mark.ros
PERIOD_NS = 50_000_000  # 20 Hz


def _remaps():
    from mode_ros.sim.ros_eval import policy_remaps
    args = policy_remaps()
    return dict(r.split(":=") for r in args[1::2])


def test_bridge_with_expert_node_matches_direct_eval(ros_harness, start_node, tmp_path):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    from mode_ros.sim.evaluate import EvalConfig, ExpertPolicy, evaluate
    h = ros_harness
    imgs = h.collect(Image, "/metaworld/corner/image_raw", 50)
    clock = h.collect(Clock, "/clock", 50)
    summary = tmp_path / "summary.json"
    start_node(Path(sys.executable), extra_args=["-m", "mode_ros.sim.expert_node"], remap=_remaps())
    bridge = start_node(executable("metaworld_sim"), params={
        "tasks": "reach", "episodes": 2, "seed": 0, "cameras": "corner", "image_size": 32,
        "summary_path": str(summary), "startup_timeout_s": 60.0})
    try:
        wait_until(lambda: not bridge.alive, 90, "the bridge to finish its episodes", on_fail=bridge.tail)
        assert bridge.proc.returncode == 0, bridge.tail()
        s = json.loads(summary.read_text())
        ros_eps = [(r["success"], r["steps"], r["held_ticks"]) for r in s["tasks"]["reach-v3"]["episode_results"]]
        direct = evaluate(ExpertPolicy(), EvalConfig(tasks=["reach-v3"], episodes=2, seed=0), log=None)
        direct_eps = [(r["success"], r["steps"], 0) for r in direct["tasks"]["reach-v3"]["episode_results"]]
        assert ros_eps == direct_eps  # same layouts, same expert, lockstep: identical episodes
        assert s["mean_success"] == 1.0
        # images and /clock carry sim time on the 20 Hz grid that starts at 1.0 s
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in imgs.msgs()]
        assert len(stamps) > 10 and all((t - 10**9) % PERIOD_NS == 0 for t in stamps)
        assert stamps == sorted(stamps)
        assert imgs.msgs()[0].encoding == "rgb8" and imgs.msgs()[0].height == 32
        clocks = {m.clock.sec * 10**9 + m.clock.nanosec for m in clock.msgs()}
        assert set(stamps) <= clocks
    finally:
        h.drop(imgs, clock)


def test_bridge_executes_rows_by_stamp_and_holds_without_chunk(ros_harness, start_node, tmp_path):
    """Rows run at stamp + (first_index + i) * period: a newer chunk for an observation 2 ticks old starts
    at its row 2 (rows 0-1 are stale); a chunk for another goal is ignored; without rows the arm holds."""
    import numpy as np
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float32MultiArray, String

    from mode_ros.msg import ActionChunk
    h = ros_harness
    pub = h.node.create_publisher(ActionChunk, "/mode_policy/action_chunk", 10)
    states = h.collect(JointState, "/metaworld/joint_states", 10)
    actions = h.collect(Float32MultiArray, "/metaworld/action", 50)
    events = h.collect(String, "/metaworld/episode", QoSProfile(
        depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    bridge = start_node(executable("metaworld_sim"), params={
        "tasks": "reach", "episodes": 1, "cameras": "", "max_steps": 8, "action_timeout_s": 0.3,
        "startup_timeout_s": 60.0, "summary_path": str(tmp_path / "s.json")})
    try:
        wait_until(lambda: len(states) >= 1, 60, "the first joint state", on_fail=bridge.tail)
        h.wait_for_publishers(actions, 1, timeout=20)
        st = states.msgs()[0].header.stamp
        t0 = st.sec * 10**9 + st.nanosec
        assert t0 == 10**9

        def chunk(stamp_ns, rows, goal, seq):
            m = ActionChunk()
            m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp_ns, 10**9)
            m.control_period.nanosec = PERIOD_NS
            m.chunk_size, m.action_dim = len(rows), 4
            m.actions = [float(v) for v in np.asarray(rows, np.float32).reshape(-1)]
            m.sequence = m.tick = seq
            m.goal = goal
            return m
        goal = "reach the goal position"
        pub.publish(chunk(t0, [[0.9, 0.9, 0.9, 0.9]] * 10, "some other goal", 1))
        first = [[0.05, 0.0, 0.0, -0.5], [0.05, 0.0, 0.0, -0.4]]
        pub.publish(chunk(t0, first, goal, 2))  # ticks 0, 1
        wait_until(lambda: len(states) >= 3, 20, "the observation of tick 2", on_fail=bridge.tail)
        rows = [[0.1 * i, 0.0, 0.0, 0.1 * i] for i in range(6)]
        pub.publish(chunk(t0, rows, goal, 3))   # computed from tick 0, arrives at tick 2
        wait_until(lambda: not bridge.alive, 30, "the bridge to finish", on_fail=bridge.tail)
        got = np.array([m.data for m in actions.msgs()], np.float32)
        want = np.array(first + rows[2:] + [[0, 0, 0, 0.5], [0, 0, 0, 0.5]], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-6)
        wait_until(lambda: any(json.loads(m.data)["event"] == "end" for m in events.msgs()), 5, "end event")
        end = next(json.loads(m.data) for m in events.msgs() if json.loads(m.data)["event"] == "end")
        assert (end["steps"], end["held_ticks"], end["success"]) == (8, 2, False)
    finally:
        h.drop(pub, states, actions, events)
