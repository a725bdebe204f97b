"""``mode-ros sim`` expert node: the Meta-World scripted experts behind the policy node's topics.

A stand-in for the MoDE policy node with the same interface (node ``mode_policy``; inputs
``~/joint_states`` and ``~/goal``, output ``~/action_chunk``), so the ROS evaluation path
(sim bridge, DDS, chunk timing) can be checked and the expert baseline measured over ROS without a
checkpoint. For every JointState it publishes a one-row ActionChunk stamped with the state's stamp.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from .metaworld_env import ACTION_NAMES, STATE_NAMES, ScriptedExpert, task_for_instruction


class ExpertNode(Node):
    def __init__(self, **kwargs):
        super().__init__("mode_policy", **kwargs)
        self.declare_parameter("control_rate_hz", 20.0)
        self.declare_parameter("noise", 0.0)
        self.declare_parameter("seed", 0)
        self.period_ns = int(round(1e9 / float(self.get_parameter("control_rate_hz").value)))
        self.noise = float(self.get_parameter("noise").value)
        self.rng = np.random.default_rng(int(self.get_parameter("seed").value))
        from mode_ros.msg import ActionChunk
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        self._ActionChunk = ActionChunk
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub = self.create_publisher(ActionChunk, "~/action_chunk", reliable)
        self.create_subscription(String, "~/goal", self._on_goal, latched)
        self.create_subscription(JointState, "~/joint_states", self._on_state, reliable)
        self.goal = ""
        self.expert: ScriptedExpert | None = None
        self.sequence = 0
        self._last_state = None

    def _on_goal(self, msg) -> None:
        try:
            task = task_for_instruction(msg.data)
        except KeyError:
            self.get_logger().error(f"no scripted expert for the goal {msg.data!r}")
            self.goal, self.expert = msg.data, None
            return
        if msg.data != self.goal or self.expert is None:
            self.expert = ScriptedExpert(task, noise=self.noise, rng=self.rng)
        self.goal = msg.data
        if self._last_state is not None:  # a state that arrived before its goal: answer it now
            self._on_state(self._last_state)

    def _on_state(self, msg) -> None:
        self._last_state = msg
        if self.expert is None:
            return
        pos = dict(zip(msg.name, msg.position))
        try:
            state = np.array([pos[n] for n in STATE_NAMES], np.float64)
        except KeyError as exc:
            self.get_logger().error(f"joint_states lacks {exc}", throttle_duration_sec=2.0)
            return
        t0 = time.perf_counter()
        a = self.expert.act_from_state(state)
        lat = int((time.perf_counter() - t0) * 1e9)
        self.sequence += 1
        m = self._ActionChunk()
        m.header.stamp = msg.header.stamp
        m.control_period.sec, m.control_period.nanosec = divmod(self.period_ns, 1_000_000_000)
        m.chunk_size, m.action_dim = 1, len(a)
        m.action_names = list(ACTION_NAMES)
        m.actions = [float(v) for v in a]
        m.first_index = 0
        m.sequence = m.tick = self.sequence
        m.goal = self.goal
        m.inference_latency.sec, m.inference_latency.nanosec = divmod(lat, 1_000_000_000)
        self.pub.publish(m)


def main(args=None) -> int:
    rclpy.init(args=sys.argv if args is None else args)
    node = ExpertNode()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
