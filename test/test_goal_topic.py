"""~/goal as a user sends it (issue 18 items 1-2), on a real policy_node with the bundled MT10 checkpoint
(state-only, cached instructions, no CLIP text weights):

* a goal latched by a transient-local publisher started BEFORE the node reaches it, and so does a goal
  from a default-QoS (volatile) publisher — what ``ros2 topic pub`` creates; chunks follow each;
* a goal the checkpoint cannot embed is refused when it arrives: one log line naming the known
  instructions, no chunks afterwards, a /diagnostics entry."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ros_helpers import executable, share_file, wait_until

pytestmark = pytest.mark.ros

NODE = "/goal_policy"
LATCHED, VOLATILE = "reach the goal position", "push the puck to the goal"


class StateFeed:
    """A 21-value JointState at 20 Hz (the bundled checkpoint's state, message order)."""

    def __init__(self, harness):
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import JointState

        self.h, self.JointState = harness, JointState
        self.pub = harness.node.create_publisher(JointState, f"{NODE}/joint_states", qos_profile_sensor_data)
        self.stop_ev = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_ev.is_set():
            js = self.JointState()
            js.header.stamp = self.h.node.get_clock().now().to_msg()
            js.position = [0.1] * 21
            self.pub.publish(js)
            self.stop_ev.wait(0.05)

    def close(self):
        self.stop_ev.set()
        self.thread.join(2)


def test_goals_from_latched_and_volatile_publishers_and_a_refused_goal(ros_harness, start_node):
    from diagnostic_msgs.msg import DiagnosticArray
    from std_msgs.msg import String

    import mode_ros
    from mode_ros.msg import ActionChunk
    from mode_ros.ros.policy_node import GOAL_QOS

    h = ros_harness
    latched = h.node.create_publisher(String, f"{NODE}/goal", GOAL_QOS)   # transient local, before the node
    latched.publish(String(data=LATCHED))
    chunks = h.collect(ActionChunk, f"{NODE}/action_chunk", 100)
    diags = h.collect(DiagnosticArray, "/diagnostics", 100)
    feed = StateFeed(h)
    bundled = Path(mode_ros.__file__).parent / "assets" / "metaworld_mt10"
    node = start_node(executable("policy_node"), params_file=share_file("config", "policy.yaml"), name="goal_policy",
                      params={"checkpoint": str(bundled), "device": "cpu", "control_rate_hz": 10.0,
                              "torch_threads": 1, "diagnostics_period": 0.2})
    volatile = None
    try:
        node.wait_for_output("active: publishing", timeout=180)
        wait_until(lambda: [m for m in chunks.msgs() if m.goal == LATCHED], 60, "a chunk for the latched goal",
                   on_fail=node.tail)
        volatile = h.node.create_publisher(String, f"{NODE}/goal", 10)       # as `ros2 topic pub` does
        h.wait_for_subscribers(volatile, 1)
        volatile.publish(String(data=VOLATILE))
        wait_until(lambda: [m for m in chunks.msgs() if m.goal == VOLATILE], 60, "a chunk for the volatile goal",
                   on_fail=node.tail)
        assert "incompatible QoS" not in node.output()

        volatile.publish(String(data="wave hello"))
        wait_until(lambda: "refused" in node.output(), 30, "the refusal log line", on_fail=node.tail)
        t_refused = time.monotonic()
        lines = [ln for ln in node.output().splitlines() if "wave hello" in ln]
        assert len(lines) == 1 and "refused" in lines[0] and repr(VOLATILE) in lines[0], lines   # known goals
        time.sleep(1.5)   # a measurement window: ten ticks
        after = [m for t, m in chunks.stamped() if t > t_refused + 0.3]
        assert after == [], [m.goal for m in after]

        def refused_entry():
            for arr in diags.msgs():
                for st in arr.status:
                    vals = {kv.key: kv.value for kv in st.values}
                    if st.name.startswith(NODE) and vals.get("goals_refused") == "1":
                        return st
            return None
        st = wait_until(refused_entry, 10, "goals_refused in /diagnostics")
        assert "goal refused" in st.message and "wave hello" not in [kv.value for kv in st.values if kv.key == "goal"]
        # predict_state is on (the bundled checkpoint ships its state model): while the plan ran, each request's
        # state was rolled forward over the ticks its inference took (at least one: its latency is > 0)
        entries = [{kv.key: kv.value for kv in s.values} for arr in diags.msgs() for s in arr.status
                   if s.name.startswith(NODE)]
        assert {e.get("predict_state") for e in entries} == {"on"}, {e.get("predict_state") for e in entries}
        assert max(int(e.get("predicted_ticks", 0)) for e in entries) >= 1
        assert sum("inference refused" in ln for ln in node.output().splitlines()) == 0
    finally:
        feed.close()
        h.drop(latched, chunks, diags, feed.pub, *([volatile] if volatile is not None else []))
