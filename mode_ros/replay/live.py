"""Live replay: the real ``policy_node`` over real DDS, driven by ``/clock`` from the bag.

The replayer is an rclpy node in its own context. It starts the installed ``policy_node`` as a
subprocess (``use_sim_time:=true``, ``--params-file`` + ``-p`` overrides, log in ``OUT/node.log``) or
attaches to a running one, waits until it is active and subscribed, then walks the same
:func:`~mode_ros.replay.session.schedule` as the offline mode in wall time scaled by ``--rate``:
``/clock`` values, camera/goal/state messages (raw CDR from the bag where nothing has to change),
and control ticks, where a shadow :class:`~mode_ros.replay.offline.OfflineDriver` (the node's controller, gates only, no
model) records why the node may not publish. Every ``ActionChunk`` (and ``/diagnostics``) the node
publishes is written to ``OUT/chunks`` with the bag time at which it arrived and scored.
"""
from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

from mode_ros.ros.processes import installed_executable, node_command, stop_process_group
from mode_ros.replay.scoring import ChunkRecord

__all__ = ["run_live"]

NS = 1_000_000_000
MIN_GAP_S = 0.002     # wall gap between a message and the next /clock (DDS delivers topics independently)
# default wall time after a tick's /clock before the next message: the node's tick callback and its
# inference thread (which reads the newest images and joint state) run first (ReplayOptions.tick_settle_s)


class _Node:
    """A started policy_node subprocess."""

    def __init__(self, cmd, log_path: Path):
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("RCUTILS_LOGGING_BUFFERED_STREAM", "0")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0):
        code = stop_process_group(self.proc, timeout)
        self._log.close()
        return code


def _executable() -> Path:
    path = installed_executable("policy_node")
    if path is None:
        raise FileNotFoundError("the installed executable lib/mode_ros/policy_node is missing (scripts/build.sh)")
    return path


class _Rx:
    """Messages the replayer receives, queued for the main thread with wall and bag receive times."""

    def __init__(self, clock_ref):
        self.q: queue.Queue = queue.Queue()
        self.clock_ref = clock_ref

    def cb(self, kind):
        def f(raw):
            self.q.put((kind, raw, time.monotonic(), self.clock_ref[0]))
        return f


def run_live(sess) -> None:
    from mode_ros.replay.session import ReplayError

    try:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
    except Exception as exc:  # noqa: BLE001
        raise ReplayError(f"live replay needs rclpy ({exc}); `source scripts/env.sh`, or use --offline") from None
    try:
        import mode_ros.msg  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise ReplayError(f"mode_ros.msg is not importable ({exc}): build with scripts/build.sh and "
                          "`source scripts/env.sh`, or use --offline") from None
    ctx = rclpy.Context()
    rclpy.init(args=[], context=ctx)
    node = rclpy.create_node("mode_ros_replay", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    spin = threading.Thread(target=_spin, args=(ex,), daemon=True, name="replay-spin")
    spin.start()
    proc = None
    try:
        proc = _run(sess, node)
    finally:
        if proc is not None:
            proc.stop()
        ex.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
        spin.join(2.0)


def _spin(ex):
    try:
        ex.spin()
    except Exception:  # noqa: BLE001 - shutdown races
        pass


def _call(node, srv_type, name, request, timeout):
    cli = node.create_client(srv_type, name)
    try:
        if not cli.wait_for_service(timeout_sec=timeout):
            return None
        fut = cli.call_async(request)
        t_end = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < t_end:
            time.sleep(0.01)
        return fut.result() if fut.done() else None
    finally:
        node.destroy_client(cli)


def _lifecycle_state(node, fqn, timeout=2.0) -> str | None:
    from lifecycle_msgs.srv import GetState

    r = _call(node, GetState, f"{fqn}/get_state", GetState.Request(), timeout)
    return None if r is None else r.current_state.label


def _get_params(node, fqn, names, timeout=10.0) -> dict:
    from rcl_interfaces.msg import ParameterType as PT
    from rcl_interfaces.srv import GetParameters

    r = _call(node, GetParameters, f"{fqn}/get_parameters", GetParameters.Request(names=names), timeout)
    if r is None:
        return {}
    out = {}
    for n, pv in zip(names, r.values):
        v = {PT.PARAMETER_BOOL: lambda: pv.bool_value, PT.PARAMETER_INTEGER: lambda: pv.integer_value,
             PT.PARAMETER_DOUBLE: lambda: pv.double_value, PT.PARAMETER_STRING: lambda: pv.string_value,
             PT.PARAMETER_DOUBLE_ARRAY: lambda: list(pv.double_array_value),
             PT.PARAMETER_STRING_ARRAY: lambda: list(pv.string_array_value)}.get(pv.type)
        if v is not None:
            out[n] = v()
    return out


def _wait(pred, timeout, period=0.05):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(period)
    return bool(pred())


def _run(sess, node):
    from mode_ros.replay.session import node_fqn

    fqn = node_fqn(sess.opts.node_name, sess.opts.namespace)
    proc = None
    if sess.opts.attach:
        _attach(sess, node, fqn)
    else:
        proc = _start_node(sess, node, fqn)
    try:
        _LiveReplay(sess, node, fqn, proc).run()
    except BaseException:
        if proc is not None:
            proc.stop()
        raise
    return proc


def _attach(sess, node, fqn) -> None:
    """--attach: take the running node's parameters (it must be active and on sim time)."""
    from mode_ros.ros.params import PARAMS, NodeParams
    from mode_ros.replay.session import ModelInfo, ReplayError, setup_session

    label = _lifecycle_state(node, fqn, timeout=10.0)
    if label is None:
        raise ReplayError(f"--attach: no node {fqn} answers (get_state); is it running in this ROS_DOMAIN_ID?")
    if label != "active":
        raise ReplayError(f"--attach: node {fqn} is {label!r}, not active")
    got = _get_params(node, fqn, [p.name for p in PARAMS] + ["use_sim_time"])
    if not got.pop("use_sim_time", False):
        raise ReplayError(f"--attach: node {fqn} does not run with use_sim_time:=true; replay drives /clock, "
                          "restart it with -p use_sim_time:=true")
    sess.params_values.update(got)
    sess.p = NodeParams.from_mapping(sess.params_values)
    if sess.model is None:
        sess.model = ModelInfo.from_checkpoint(sess.p.checkpoint)
    setup_session(sess)
    sess.notes.append("attached to a running node: its timer phase is unknown, so the per-tick accounting "
                      "(ticks without output) is approximate")


def _node_overrides(sess) -> dict:
    """The ``-p`` overrides of a node started here: the replay's checkpoint, sim time, the bag's transport."""
    opts = sess.opts
    overrides = {"checkpoint": sess.params_values["checkpoint"], "use_sim_time": True,
                 "image_transport": sess.mapping.transport, **opts.params}
    if "control_rate_hz" not in opts.params:
        overrides["control_rate_hz"] = float(sess.p.control_rate_hz)
    if opts.device:
        overrides["device"] = opts.device
    if sess.model.state_dim > 0:
        overrides["state_joint_names"] = [f"replay_state_{i}" for i in range(sess.model.state_dim)]
        overrides["state_field"] = "position"
    return overrides


def _start_node(sess, node, fqn) -> _Node:
    """Start the installed policy_node for this replay and wait until it is active."""
    from mode_ros.ros.params import NodeParams
    from mode_ros.replay.session import ReplayError, default_params_file, setup_session

    opts = sess.opts
    setup_session(sess)
    overrides = _node_overrides(sess)
    sess.params_values.update({k: v for k, v in overrides.items() if k != "use_sim_time"})
    sess.p = NodeParams.from_mapping(sess.params_values)
    pfile = opts.params_file or default_params_file()
    cmd = node_command(_executable(), overrides, opts.node_name, opts.namespace, params_file=pfile)
    proc = _Node(cmd, sess.out / "node.log")
    t0 = time.monotonic()
    try:   # from here on, whatever happens (a failed start, Ctrl-C, SIGTERM) stops the node we started
        while _lifecycle_state(node, fqn, timeout=1.0) != "active":
            if not proc.alive:
                raise ReplayError(f"policy_node exited (code {proc.proc.returncode}) during start-up:\n"
                                  f"{proc.tail()}")
            if "configure failed" in proc.tail(200):
                raise ReplayError(f"policy_node failed to configure:\n{proc.tail()}")
            if time.monotonic() - t0 > opts.start_timeout:
                raise ReplayError(f"policy_node not active after {opts.start_timeout:.0f} s:\n{proc.tail()}")
            time.sleep(0.2)
    except BaseException:
        proc.stop()
        raise
    sess.extra["node_start_s"] = round(time.monotonic() - t0, 2)
    return proc


# the node's /diagnostics values the report keeps (besides every suppressed.* and rejected.* count)
DIAG_KEYS = ("ticks_published", "ticks_suppressed", "stale", "inferences", "inference_failures", "dropped_results",
             "goals_refused", "execution_strategy", "estimated_d",
             "rejected", "images_received", "inference_latency_median_ms", "inference_latency_p99_ms",
             "achieved_rate_hz", "missed_ticks", "late_ticks_merged", "late_served", "reason", "last_failure")


class _LiveReplay:
    """One replay of the bag's schedule into a running node: publishes, paces, receives, accounts."""

    def __init__(self, sess, node, fqn: str, proc):
        from mode_ros.replay.offline import OfflineDriver
        from mode_ros.replay.session import timer_period_ns

        self.sess, self.node, self.fqn, self.proc = sess, node, fqn, proc
        self.p, self.m, self.model = sess.p, sess.mapping, sess.model
        self.P = timer_period_ns(self.p.control_rate_hz)
        self.clock_ref = [0]
        self._make_endpoints()
        self.writer = sess.open_writer()
        self.ts = self.writer.typestore
        self.shadow = OfflineDriver(self.p, self.model.camera_names, self.model.state_dim, self.model.chunk_size,
                                    self.model.action_dim, policy=None)
        self.pending_ticks: deque = deque()        # [tick_ns, shadow key, shadow message, matched]
        self.pub_wall: OrderedDict = OrderedDict()  # reference camera stamp -> wall time it was published
        self.ref_cam = self.model.camera_names[0] if self.model.camera_names else None
        self.diag_last: dict = {}   # the node's newest /diagnostics values (+ _stamp: bag time received)
        self.stats = {"chunks": 0, "unmatched_chunks": 0, "published_msgs": 0, "clock_msgs": 0, "late_s_max": 0.0,
                      "undecodable_chunks": 0, "malformed_chunks": 0}
        self.w0 = self.c0 = None
        self._state_layout()

    # -- set-up ------------------------------------------------------------------------------------------------
    def _make_endpoints(self) -> None:
        """Publishers of what the node reads and subscriptions to what it publishes; wait until connected."""
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CompressedImage, Image, JointState
        from std_msgs.msg import String

        from mode_ros.msg import ActionChunk

        node, fqn, sensor = self.node, self.fqn, qos_profile_sensor_data
        goal_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.clock_pub = node.create_publisher(Clock, "/clock", 10)
        compressed = self.m.transport == "compressed"
        self.cam_pubs = {cam: node.create_publisher(CompressedImage, f"{fqn}/image_{cam}/compressed", sensor)
                         if compressed else node.create_publisher(Image, f"{fqn}/image_{cam}", sensor)
                         for cam in self.model.camera_names}
        self.goal_pub = node.create_publisher(String, f"{fqn}/goal", goal_qos)
        self.state_pub = (node.create_publisher(JointState, f"{fqn}/joint_states", sensor)
                          if self.model.state_dim > 0 else None)
        self.rx = _Rx(self.clock_ref)
        self.chunk_sub = node.create_subscription(ActionChunk, f"{fqn}/action_chunk", self.rx.cb("chunk"),
                                                  QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE),
                                                  raw=True)
        self.diag_sub = node.create_subscription(DiagnosticArray, "/diagnostics", self.rx.cb("diag"), 100, raw=True)
        self._wait_connected()

    def _wait_connected(self, timeout: float = 30.0) -> None:
        from mode_ros.replay.session import ReplayError

        pubs = list(self.cam_pubs.values()) + [self.goal_pub] + ([self.state_pub] if self.state_pub else [])
        if _wait(lambda: all(pb.get_subscription_count() >= 1 for pb in pubs)
                 and self.chunk_sub.get_publisher_count() >= 1, timeout):
            return
        missing = [f"{self.fqn}/image_{c}" for c, pb in self.cam_pubs.items() if pb.get_subscription_count() < 1]
        if self.chunk_sub.get_publisher_count() < 1:
            missing.append(f"{self.fqn}/action_chunk (publisher)")
        raise ReplayError(f"the node is not connected to {missing} after {timeout:.0f} s (image_transport / names?)")

    def _state_layout(self) -> None:
        """The JointState the node is fed: the joints an attached node selects by (its state_joint_names or the
        checkpoint's state names), else replay_state_i (a node started here is told these names)."""
        from mode_ros.ros.convert import STATE_FIELDS
        from mode_ros.ros.params import state_selection

        self.fields = STATE_FIELDS[self.p.state_field]   # the JointState fields the node concatenates
        self.per = self.model.state_dim // len(self.fields) if self.model.state_dim else 0
        names = state_selection(self.p.state_joint_names, self.model.state_names, self.p.state_field,
                                self.model.state_dim)
        self.state_names = names if len(names) == self.per else [f"replay_state_{i}" for i in range(self.per)]

    # -- receiving ---------------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Record and score everything the node published since the last call."""
        while True:
            try:
                kind, raw, wall, clk = self.rx.q.get_nowait()
            except queue.Empty:
                return
            if kind == "chunk":
                self._on_chunk(raw, wall, clk)
            else:
                self._on_diagnostics(raw, clk)

    def _on_chunk(self, raw, wall: float, clk: int) -> None:
        from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE

        self.writer.write(f"{self.fqn}/action_chunk", ACTION_CHUNK_TYPE, raw, max(clk, 1))
        try:
            msg = self.ts.deserialize_cdr(raw, ACTION_CHUNK_TYPE)
        except Exception:  # noqa: BLE001
            self.stats["undecodable_chunks"] += 1
            return
        try:
            rec = ChunkRecord.from_message(msg, recv_wall=wall)
        except ValueError:
            self.stats["malformed_chunks"] += 1   # recorded, not scored
            return
        rec.obs_pub_wall = self.pub_wall.get(rec.stamp_ns)
        rec.tick_ns = self._match_tick(rec)
        self.stats["unmatched_chunks"] += rec.tick_ns is None
        self.stats["chunks"] += 1
        self.sess.ticks.published += 1
        self.sess.scorer.add(rec)

    def _on_diagnostics(self, raw, clk: int) -> None:
        self.writer.write("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", raw, max(clk, 1))
        try:
            msg = self.ts.deserialize_cdr(raw, "diagnostic_msgs/msg/DiagnosticArray")
        except Exception:  # noqa: BLE001
            return
        for s in msg.status:
            if s.name.startswith(self.fqn + ":"):
                vals = {kv.key: kv.value for kv in s.values}
                self.diag_last = {**vals, "_stamp": clk}

    def _match_tick(self, rec: ChunkRecord):
        """The pending tick this chunk answers (marked matched), or None."""
        slot0 = rec.slot_ns(0)
        for item in self.pending_ticks:
            g = item[0]
            if item[3]:
                continue
            if (slot0 - 1_000_000 <= g < slot0 + rec.period_ns - 1_000_000 if self.p.latency_compensation
                    else g >= rec.stamp_ns):
                item[3] = True
                return g
        return None

    def _resolve_ticks(self, upto_ns: int) -> None:
        """Ticks up to ``upto_ns`` that no chunk answered: count the shadow controller's reason."""
        from mode_ros.replay.offline import reason_detail

        ticks = self.sess.ticks
        while self.pending_ticks and self.pending_ticks[0][0] <= upto_ns:
            _, key, msg, matched = self.pending_ticks.popleft()
            if not matched:
                ticks.reasons[key] += 1
                ticks.details[reason_detail(key, msg)] += 1

    # -- publishing --------------------------------------------------------------------------------------------
    def _header(self, stamp_ns: int, frame: str = ""):
        T = self.ts.types
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
            sec=int(stamp_ns // NS), nanosec=int(stamp_ns % NS)), frame_id=frame)

    def _camera_bytes(self, ev) -> bytes:
        """The camera message as the node gets it: the bag's bytes, restamped, or decoded to raw rgb8."""
        import dataclasses

        from mode_ros.data.images import ImageDecodeError, decode_compressed
        from mode_ros.replay.session import COMPRESSED, IMAGE

        if not ev.rewritten:
            return bytes(ev.raw)
        msg, header = ev.msg, self._header(ev.stamp_ns, ev.msg.header.frame_id)
        if not (self.m.transport == "raw" and ev.msgtype == COMPRESSED):
            return bytes(self.ts.serialize_cdr(dataclasses.replace(msg, header=header), ev.msgtype))
        try:
            img = decode_compressed(msg.format, msg.data)
            data = np.ascontiguousarray(img).reshape(-1)
        except ImageDecodeError:
            img, data = np.zeros((1, 1, 3), np.uint8), np.zeros(0, np.uint8)  # the node rejects a broken frame
        out = self.ts.types[IMAGE](header=header, height=img.shape[0], width=img.shape[1], encoding="rgb8",
                                   is_bigendian=0, step=img.shape[1] * 3, data=data)
        return bytes(self.ts.serialize_cdr(out, IMAGE))

    def _state_bytes(self, ev) -> bytes:
        vec, per, kind = np.asarray(ev.vec, np.float64), self.per, "sensor_msgs/msg/JointState"
        parts = {f: vec[i * per:(i + 1) * per] for i, f in enumerate(self.fields)}
        js = self.ts.types[kind](header=self._header(ev.stamp_ns), name=self.state_names,
                                 position=parts.get("position", np.zeros(0)),
                                 velocity=parts.get("velocity", np.zeros(0)), effort=np.zeros(0))
        return bytes(self.ts.serialize_cdr(js, kind))

    def _publish(self, ev) -> None:
        if ev.kind == "camera":
            self.cam_pubs[ev.cam].publish(self._camera_bytes(ev))
            if ev.cam == self.ref_cam:
                self.pub_wall[ev.stamp_ns] = time.monotonic()
                if len(self.pub_wall) > 4000:
                    self.pub_wall.popitem(last=False)
        elif ev.kind == "goal":
            self.goal_pub.publish(bytes(ev.raw))
        elif ev.kind == "state" and self.state_pub is not None:
            self.state_pub.publish(self._state_bytes(ev))
        self.stats["published_msgs"] += 1

    def _pace(self, t_ns: int) -> None:
        """Wait (draining what arrives) until bag time ``t_ns`` is due in wall time at ``--rate``."""
        if self.w0 is None:
            self.w0, self.c0 = time.monotonic(), t_ns
        target = self.w0 + (t_ns - self.c0) / NS / float(self.sess.opts.rate)
        while True:
            self.drain()
            d = target - time.monotonic()
            if d <= 0:
                self.stats["late_s_max"] = max(self.stats["late_s_max"], -d)
                return
            time.sleep(min(d, 0.005))

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock
        from std_msgs.msg import String

        from mode_ros.replay.session import schedule

        sess, shadow, P = self.sess, self.shadow, self.P
        if self.m.static_goal is not None:
            self.goal_pub.publish(String(data=self.m.static_goal))
            shadow.set_goal(self.m.static_goal)
            time.sleep(0.5)   # reliable + transient local: let the node take it before the clock starts
        last_msg_wall = last_clock_wall = 0.0
        t_run = time.perf_counter()
        horizon = int(max(5.0, 20 * P / NS) * NS)   # ticks older than this (bag time) are accounted
        for kind, x in schedule(sess.events(), P):
            if kind == "clock":
                self._pace(x)
                time.sleep(max(0.0, last_msg_wall + MIN_GAP_S - time.monotonic()))
                self.clock_ref[0] = x
                self.clock_pub.publish(Clock(clock=Time(sec=int(x // NS), nanosec=int(x % NS))))
                last_clock_wall = time.monotonic() if x % P == 0 else 0.0
                self.stats["clock_msgs"] += 1
                shadow.set_clock(x)
            elif kind == "tick":
                sess.ticks.expected += 1
                sess.scorer.trace_tick(x)
                g = shadow.ctl.gate(shadow.ctl.now()) or shadow.ctl.no_plan_reason()
                self.pending_ticks.append([x, g[0], g[1], False])
                self._resolve_ticks(x - horizon)
            elif x.kind in ("camera", "goal", "state"):
                self._pace(x.t)
                time.sleep(max(0.0, last_clock_wall + sess.opts.tick_settle_s - time.monotonic()))
                self._publish(x)
                last_msg_wall = time.monotonic()
                self._shadow_event(x)
                sess.scorer.advance(x.t)
            else:
                if x.kind == "action" and sess.scorer.rec is not None:
                    sess.scorer.rec.add(x.source, x.stamp_ns, x.vec)
                sess.scorer.advance(x.t)
        self._drain_tail()
        sess.extra["run_wall_s"] = time.perf_counter() - t_run
        self._resolve_ticks(2 ** 62)
        sess.scorer.finish(sess.last_ns)
        sess.close_writer()
        self._report()
        self.node.destroy_subscription(self.chunk_sub)
        self.node.destroy_subscription(self.diag_sub)

    def _shadow_event(self, ev) -> None:
        if ev.kind == "camera":
            self.shadow.on_image(ev.cam, ev.stamp_ns, ev.msgtype, ev.msg)
        elif ev.kind == "goal":
            if self.m.static_goal is None:
                self.shadow.set_goal(ev.text)
        else:
            self.shadow.on_state(ev.stamp_ns, ev.vec)

    def _drain_tail(self) -> None:
        """The last chunks: wait until nothing new arrives for a while (bounded by --drain-s)."""
        t_end = time.monotonic() + self.sess.opts.drain_s
        quiet_since, n_seen = time.monotonic(), self.stats["chunks"]
        while time.monotonic() < t_end:
            self.drain()
            if self.stats["chunks"] != n_seen:
                n_seen, quiet_since = self.stats["chunks"], time.monotonic()
            if time.monotonic() - quiet_since > max(0.5, 3 * self.P / NS / float(self.sess.opts.rate)):
                break
            time.sleep(0.02)
        self.drain()

    # -- the report --------------------------------------------------------------------------------------------
    def _report(self) -> None:
        sess, stats, proc = self.sess, self.stats, self.proc
        sess.extra["live"] = {
            "node": self.fqn, "started": proc is not None, "node_alive_at_end": proc.alive if proc else None,
            "chunks_received": stats["chunks"], "chunks_not_matched_to_a_tick": stats["unmatched_chunks"],
            "messages_published": stats["published_msgs"], "clock_messages": stats["clock_msgs"],
            "max_lateness_s": round(stats["late_s_max"], 4),
            "chunks_undecodable": stats["undecodable_chunks"], "chunks_malformed": stats["malformed_chunks"],
        }
        for key, what in (("undecodable_chunks", "could not be decoded"),
                          ("malformed_chunks", "have an actions array that does not match chunk_size x action_dim")):
            if stats[key]:
                sess.problems.append(f"{stats[key]} ActionChunk message(s) from the node {what}: recorded in "
                                     "OUT/chunks, not scored")
        if self.diag_last:
            self._report_diagnostics(self.diag_last)
        if stats["late_s_max"] > self.P / NS:
            sess.notes.append(f"the replayer fell behind the requested rate by up to {stats['late_s_max']:.3f} s "
                              "(wall): lower --rate for exact timing")
        if proc is not None and not proc.alive:
            sess.problems.append(f"policy_node exited during the replay (code {proc.proc.returncode}); see node.log")

    def _report_diagnostics(self, last: dict) -> None:
        """The node's last /diagnostics values; its failed inferences and refused goals are problems."""
        sess = self.sess
        nd = {k: last.get(k) for k in DIAG_KEYS if k in last}
        nd.update({k: v for k, v in last.items() if k.startswith(("suppressed.", "rejected."))})
        nd["at_bag_time_s"] = round(last.get("_stamp", 0) / NS, 3)
        sess.extra["node_diagnostics"] = nd
        fails, refused = int(last.get("inference_failures", 0) or 0), int(last.get("goals_refused", 0) or 0)
        if fails:
            sess.problems.append(f"{fails} inference(s) failed in the node (last: "
                                 f"{last.get('last_failure') or 'see node.log'})")
        if refused:
            sess.problems.append(f"{refused} goal(s) refused by the node (see node.log)")
