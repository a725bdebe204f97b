"""``metaworld_sim``: a ROS 2 node that stands in for a robot, stepping Meta-World tasks.

It publishes what a robot driver publishes and executes what a controller receives, so the policy
node runs against it unchanged (its inputs remapped to these topics, ``use_sim_time: true``):

  publishes   /clock                               rosgraph_msgs/Clock (sim time; this node owns it)
              /metaworld/<camera>/image_raw        sensor_msgs/Image rgb8, header.stamp = sim time
              /metaworld/joint_states              sensor_msgs/JointState (21 named state values)
              /metaworld/goal                      std_msgs/String, reliable + transient local
              /metaworld/action                    std_msgs/Float32MultiArray, the action executed
              /metaworld/episode                   std_msgs/String JSON: start / end / summary events
                                                   (reliable + transient local, depth 1000)
  subscribes  action_topic (/mode_policy/action_chunk)   mode_ros/msg/ActionChunk

Timing: one control tick = one env step; sim time advances ``1 / control_rate_hz`` per tick (the
same clock as ``mode-ros sim record``). At tick ``k`` (sim time ``t``) the node publishes the
observation, then ``/clock = t``, then executes the action for ``t``: the row ``i`` of the newest
chunk (highest ``sequence``, then ``tick``) with ``header.stamp + (first_index + i) * control_period
== t`` (nearest tick). Rows before ``t`` are stale and skipped; chunks stamped before the episode
started, or answering another goal, are ignored. Without a row the arm holds (dx = dy = dz = 0,
gripper as last commanded) and the tick counts as ``held``.

Modes (parameter ``mode``):
  lockstep  (default) sim time stops until the policy's message for ``t`` arrives (a chunk whose row 0
            is meant for ``t``; a policy node publishes one per control tick), at most
            ``action_timeout_s`` wall seconds (then an earlier chunk's row for ``t`` is used, or the arm
            holds; the tick counts as ``late``), ``startup_timeout_s`` for the first row of the run,
            while the policy loads. With a policy that computes each chunk from the tick's own
            observation (the policy node's ``lockstep_inference``) results do not depend on the
            machine's speed.
  realtime  ticks are paced by the wall clock (``real_time_factor``); whatever row is there at the
            tick is executed, like a real robot.

Episodes: for each task of ``tasks``, ``episodes`` layouts ``0 … episodes-1`` of ``seed`` in
``split`` (default ``eval``: held-out layouts), until success or ``max_steps``. Between episodes sim
time jumps by ``episode_gap_s``. At the end a summary (per-task success) is logged, published and
written to ``summary_path`` (JSON) when set; the node exits when ``exit_when_done``.
"""
from __future__ import annotations

import array
import hashlib
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from . import topics as T
from .metaworld_env import (ACTION_DIM, DEFAULT_CAMERAS, MAX_EPISODE_STEPS, STATE_NAMES, MetaWorldSim,
                            camera_for, instruction_for, layout, resolve_tasks)

NODE_NAME = "metaworld_sim"
START_TIME_NS = 1_000_000_000


@dataclass
class _Chunk:
    stamp_ns: int
    period_ns: int
    first_index: int
    rows: np.ndarray        # [n, action_dim]
    sequence: int
    tick: int
    goal: str

    def row_for(self, t_ns: int) -> int | None:
        """Index into ``rows`` of the row meant for ``t_ns`` (None: the chunk does not cover it)."""
        if self.period_ns <= 0:
            return None
        k = int(round((t_ns - self.stamp_ns) / self.period_ns)) - self.first_index
        return k if 0 <= k < len(self.rows) else None


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _duration_ns(d) -> int:
    return int(d.sec) * 1_000_000_000 + int(d.nanosec)


class SimBridge(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        P = self.declare_parameter
        P("tasks", "reach-v3")                  # "all" or comma list
        P("episodes", 5)                        # per task
        P("seed", 0)
        P("split", "eval")                      # eval: held-out layouts; train: the recording layouts
        P("cameras", ",".join(DEFAULT_CAMERAS)) # MuJoCo cameras (comma list; "" = none)
        P("image_size", 64)
        P("control_rate_hz", 20.0)
        P("max_steps", MAX_EPISODE_STEPS)
        P("mode", "lockstep")                   # lockstep | realtime
        P("real_time_factor", 1.0)
        P("action_timeout_s", 5.0)
        P("startup_timeout_s", 300.0)
        P("episode_gap_s", 1.0)
        P("republish_period_s", 1.0)           # lockstep: re-send the waiting observation this often
        P("action_topic", "/mode_policy/action_chunk")
        P("summary_path", "")
        P("exit_when_done", True)
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        self.tasks = resolve_tasks(g("tasks"))
        self.episodes = int(g("episodes"))
        self.seed = int(g("seed"))
        self.split = str(g("split"))
        self.cameras = [camera_for(c.strip()) for c in str(g("cameras")).split(",") if c.strip()]
        self.image_size = int(g("image_size"))
        self.rate = float(g("control_rate_hz"))
        self.period_ns = int(round(1e9 / self.rate))
        self.max_steps = int(g("max_steps"))
        self.mode = str(g("mode"))
        if self.mode not in ("lockstep", "realtime"):
            raise ValueError(f"mode: must be lockstep or realtime, got {self.mode!r}")
        self.rtf = float(g("real_time_factor"))
        self.action_timeout = float(g("action_timeout_s"))
        self.startup_timeout = float(g("startup_timeout_s"))
        self.gap_ns = int(round(float(g("episode_gap_s")) * 1e9))
        self.republish = float(g("republish_period_s"))
        self.summary_path = str(g("summary_path"))
        self.exit_when_done = bool(g("exit_when_done"))
        layout(self.tasks[0], self.split, self.seed, 0)  # validates split and seed

        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import Float32MultiArray, MultiArrayDimension, String
        self._Clock, self._Image, self._JointState, self._String = Clock, Image, JointState, String
        self._F32, self._Dim = Float32MultiArray, MultiArrayDimension
        from mode_ros.msg import ActionChunk

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
        events = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
        self.pub_clock = self.create_publisher(Clock, T.CLOCK_TOPIC, reliable)
        self.pub_img = {c: self.create_publisher(Image, T.image_topic(c), reliable) for c in self.cameras}
        self.pub_state = self.create_publisher(JointState, T.STATE_TOPIC, reliable)
        self.pub_goal = self.create_publisher(String, T.GOAL_TOPIC, latched)
        self.pub_action = self.create_publisher(Float32MultiArray, T.ACTION_TOPIC, reliable)
        self.pub_episode = self.create_publisher(String, T.EPISODE_TOPIC, events)
        self.sub_chunk = self.create_subscription(ActionChunk, str(g("action_topic")), self._on_chunk, reliable)
        self._chunks: list[_Chunk] = []
        self._episode_start_ns = 0
        self._goal = ""
        self.t_ns = START_TIME_NS
        self._bad_chunks = 0
        self._late_ticks = 0     # lockstep: ticks whose own message did not come within the timeout
        self._got_first_row = False   # lockstep: the first row may take startup_timeout_s, later ones action_timeout_s

    # -- input ---------------------------------------------------------------------------------
    def _on_chunk(self, msg) -> None:
        n, a = int(msg.chunk_size), int(msg.action_dim)
        acts = np.asarray(msg.actions, dtype=np.float32)
        if a != ACTION_DIM or n < 1 or acts.size != n * a or not np.all(np.isfinite(acts)):
            self._bad_chunks += 1
            self.get_logger().warn(f"ignoring ActionChunk: chunk_size={n} action_dim={a} "
                                   f"len(actions)={acts.size} (expected action_dim {ACTION_DIM}, finite values)",
                                   throttle_duration_sec=2.0)
            return
        ch = _Chunk(_stamp_ns(msg.header.stamp), _duration_ns(msg.control_period), int(msg.first_index),
                    acts.reshape(n, a), int(msg.sequence), int(msg.tick), str(msg.goal))
        if ch.stamp_ns < self._episode_start_ns or (ch.goal and self._goal and ch.goal != self._goal):
            return  # computed for an earlier episode or another goal
        self._chunks.append(ch)
        if len(self._chunks) > 64:
            del self._chunks[:-64]

    def _row(self, t_ns: int, fresh: bool = False) -> tuple[np.ndarray, int] | None:
        """The row for ``t_ns`` of the newest chunk covering it, and first_index + k: how many control
        periods after its observation it is executed (its index in the model's chunk when the policy
        compensates latency, as the policy node does by default). ``fresh``:
        only from a chunk whose row 0 is meant for ``t_ns`` (the policy's message for this tick)."""
        best = None
        for ch in self._chunks:
            k = ch.row_for(t_ns)
            if fresh and k != 0:
                continue
            if k is not None and (best is None or (ch.sequence, ch.tick) >= (best[0].sequence, best[0].tick)):
                best = (ch, k)
        # chunks that end before t can go
        self._chunks = [c for c in self._chunks
                        if c.stamp_ns + (c.first_index + len(c.rows) - 1) * c.period_ns >= t_ns]
        return None if best is None else (best[0].rows[best[1]], best[0].first_index + best[1])

    # -- output --------------------------------------------------------------------------------
    def _time_msg(self, t_ns: int):
        from builtin_interfaces.msg import Time
        return Time(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000)

    def _publish_observation(self, obs, t_ns: int) -> None:
        stamp = self._time_msg(t_ns)
        for cam, pub in self.pub_img.items():
            img = obs.images[cam]
            m = self._Image()
            m.header.stamp = stamp
            m.header.frame_id = T.image_frame_id(cam)
            m.height, m.width = int(img.shape[0]), int(img.shape[1])
            m.encoding, m.is_bigendian, m.step = "rgb8", 0, int(img.shape[1]) * 3
            m.data = array.array("B", img.tobytes())
            pub.publish(m)
        js = self._JointState()
        js.header.stamp = stamp
        js.name = list(STATE_NAMES)
        js.position = [float(v) for v in obs.state]
        self.pub_state.publish(js)
        clock = self._Clock()
        clock.clock = stamp
        self.pub_clock.publish(clock)

    def _publish_action(self, a: np.ndarray) -> None:
        m = self._F32()
        m.layout.dim = [self._Dim(label="action", size=ACTION_DIM, stride=ACTION_DIM)]
        m.data = [float(v) for v in a]
        self.pub_action.publish(m)

    def _event(self, payload: dict) -> None:
        self.pub_episode.publish(self._String(data=json.dumps(payload)))

    # -- main loop -----------------------------------------------------------------------------
    def spin_for(self, executor, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                executor.spin_once(timeout_sec=0.0)
                return
            executor.spin_once(timeout_sec=min(left, 0.05))

    def _wait_row(self, executor, t_ns: int, timeout: float, obs=None) -> tuple[np.ndarray, int] | None:
        """Spin until the policy's message for ``t_ns`` is there (a chunk whose row 0 is meant for it:
        a policy node publishes one per control tick), or ``timeout``: then the row for ``t_ns`` of an
        earlier chunk, if any (the tick counts as late). Re-sends ``obs`` meanwhile, so an observation
        lost before the policy's subscriptions matched cannot stall the loop. Waiting for the tick's own
        message, not for any row covering it, keeps sim time from running ahead of the policy while it
        computes: what is executed then depends only on what was observed, not on the machine's speed."""
        now = time.monotonic()
        end, resend = now + timeout, now + self.republish
        while True:
            row = self._row(t_ns, fresh=True)
            if row is not None or not rclpy.ok():
                return row
            now = time.monotonic()
            if now >= end:
                self._late_ticks += 1
                return self._row(t_ns)
            if obs is not None and self.republish > 0 and now >= resend:
                self._publish_observation(obs, t_ns)
                resend = now + self.republish
            executor.spin_once(timeout_sec=min(end - now, 0.02))

    def run(self, executor) -> dict:
        summary = {"tasks": {}, "mode": self.mode, "split": self.split, "seed": self.seed,
                   "control_rate_hz": self.rate, "episodes_per_task": self.episodes}
        t_run = time.monotonic()
        self._wait_for_policy(executor)
        for task in self.tasks:
            goal = instruction_for(task)
            results = []
            sim = MetaWorldSim(task, cameras=self.cameras, image_size=self.image_size, max_steps=self.max_steps)
            try:
                for e in range(self.episodes):
                    if not rclpy.ok():
                        break
                    results.append(self._run_episode(executor, sim, task, goal, e))
                    self.t_ns += self.gap_ns
                    self.pub_clock.publish(self._Clock(clock=self._time_msg(self.t_ns)))
            finally:
                sim.close()
            n, s = len(results), sum(r["success"] for r in results)
            summary["tasks"][task] = {"instruction": goal, "episodes": n, "successes": s,
                                      "success_rate": s / n if n else 0.0, "episode_results": results}
            self.get_logger().info(f"{task}: success {s}/{n}")
        rates = [v["success_rate"] for v in summary["tasks"].values()]
        summary["mean_success"] = float(np.mean(rates)) if rates else 0.0
        summary["wall_s"] = round(time.monotonic() - t_run, 3)
        summary["bad_chunks"] = self._bad_chunks
        self._report(summary)
        return summary

    def _wait_for_policy(self, executor) -> None:
        t0, topic = time.monotonic(), self.sub_chunk.topic_name
        while self.count_publishers(topic) == 0 and rclpy.ok():
            if time.monotonic() - t0 > self.startup_timeout:
                raise RuntimeError(f"no publisher on {topic} after {self.startup_timeout} s")
            executor.spin_once(timeout_sec=0.1)
        self.get_logger().info(f"policy found on {topic} after {time.monotonic() - t0:.1f} s; "
                               f"{len(self.tasks)} task(s) x {self.episodes} episode(s), {self.mode}")

    def _run_episode(self, executor, sim, task: str, goal: str, e: int) -> dict:
        """One held-out layout until success or max_steps: observation out, the action in effect back, a step."""
        lay = layout(task, self.split, self.seed, e)
        obs = sim.reset_layout(lay)
        self._episode_start_ns = self.t_ns
        self._goal = goal
        self._chunks.clear()
        self.pub_goal.publish(self._String(data=goal))
        self._event({"event": "start", "task": task, "instruction": goal, "episode": e,
                     "layout": lay.as_dict(), "stamp_ns": self.t_ns})
        held, late0 = 0, self._late_ticks
        rows_at: dict[int, int] = {}      # executed rows by their index in the model's chunk
        digest = hashlib.sha1()           # of every executed action (run-to-run identity)
        last = np.zeros(ACTION_DIM, np.float32)
        t_wall0 = time.monotonic()
        k, success = 0, False
        while rclpy.ok():
            self._publish_observation(obs, self.t_ns)
            row = self._next_row(executor, obs, t_wall0, k)
            if row is None:
                held += 1
                action = np.array([0.0, 0.0, 0.0, last[3]], np.float32)   # hold still, keep the gripper
            else:
                action = np.clip(np.asarray(row[0], np.float32), -1.0, 1.0)
                rows_at[row[1]] = rows_at.get(row[1], 0) + 1
            last = action
            digest.update(action.tobytes())
            res = sim.step(action)
            self._publish_action(action)
            obs = res.obs
            self.t_ns += self.period_ns
            k += 1
            if res.done:
                success = res.success
                break
        r = {"episode": e, "layout": lay.as_dict(), "success": bool(success), "steps": sim.steps,
             "held_ticks": held, "late_ticks": self._late_ticks - late0, "wall_s": round(time.monotonic() - t_wall0, 3),
             "rows_executed_by_index": {str(i): rows_at[i] for i in sorted(rows_at)},
             "actions_sha1": digest.hexdigest()}
        self._event({"event": "end", "task": task, **r})
        self.get_logger().info(f"{task} episode {e}: {'SUCCESS' if success else 'failure'} after {sim.steps} steps"
                               f" ({held} held ticks, {r['wall_s']:.1f} s)")
        return r

    def _next_row(self, executor, obs, t_wall0: float, k: int):
        """The policy's (action, row index) for this tick, or None: lockstep waits for it; realtime waits
        until the tick's wall time and takes what is in effect."""
        if self.mode != "lockstep":
            self.spin_for(executor, max(0.0, t_wall0 + (k + 1) * (1.0 / self.rate) / self.rtf - time.monotonic()))
            return self._row(self.t_ns)
        row = self._wait_row(executor, self.t_ns,
                             self.action_timeout if self._got_first_row else self.startup_timeout, obs)
        if row is None and not self._got_first_row:
            raise RuntimeError(f"no usable ActionChunk within startup_timeout_s={self.startup_timeout} s on "
                               f"{self.sub_chunk.topic_name} ({self._bad_chunks} rejected); is the policy node "
                               "running with use_sim_time and its inputs remapped to /metaworld?")
        self._got_first_row = self._got_first_row or row is not None
        return row

    def _report(self, summary: dict) -> None:
        self._event({"event": "summary", **{k: v for k, v in summary.items() if k != "tasks"},
                     "success": {t: v["success_rate"] for t, v in summary["tasks"].items()}})
        lines = [f"{t:26s} {v['successes']:3d}/{v['episodes']:<3d} = {v['success_rate']:.2f}"
                 for t, v in summary["tasks"].items()]
        self.get_logger().info("summary (success per task):\n" + "\n".join(lines)
                               + f"\nmean {summary['mean_success']:.3f}")
        if self.summary_path:
            with open(self.summary_path, "w") as f:
                json.dump(summary, f, indent=2)


def main(args=None) -> int:
    rclpy.init(args=sys.argv if args is None else args)
    node = None
    rc = 0
    try:
        node = SimBridge()
        from rclpy.executors import SingleThreadedExecutor
        ex = SingleThreadedExecutor()
        ex.add_node(node)
        node.run(ex)
        if not node.exit_when_done:
            ex.spin()
        else:
            # let late subscribers of the transient-local events catch up briefly
            node.spin_for(ex, 0.2)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        rc = 130
    except Exception as exc:  # noqa: BLE001 - a clear one-line reason, then the traceback in the log
        if node is not None:
            node.get_logger().fatal(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
