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

from mode_ros.ros.processes import ros_arg_value, stop_process_group
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
    from ament_index_python.packages import get_package_prefix

    path = Path(get_package_prefix("mode_ros")) / "lib" / "mode_ros" / "policy_node"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"installed executable {path} missing (scripts/build.sh)")
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
    from mode_ros.ros.params import PARAMS, NodeParams
    from mode_ros.replay.session import ModelInfo, ReplayError, node_fqn, setup_session

    opts = sess.opts
    fqn = node_fqn(opts.node_name, opts.namespace)
    proc = None
    if opts.attach:
        label = _lifecycle_state(node, fqn, timeout=10.0)
        if label is None:
            raise ReplayError(f"--attach: no node {fqn} answers (get_state); is it running in this ROS_DOMAIN_ID?")
        if label != "active":
            raise ReplayError(f"--attach: node {fqn} is {label!r}, not active")
        got = _get_params(node, fqn, [p.name for p in PARAMS] + ["use_sim_time"])
        if not got.get("use_sim_time", False):
            raise ReplayError(f"--attach: node {fqn} does not run with use_sim_time:=true; replay drives /clock, "
                              "restart it with -p use_sim_time:=true")
        got.pop("use_sim_time", None)
        sess.params_values.update(got)
        sess.p = NodeParams.from_mapping(sess.params_values)
        if sess.model is None:
            sess.model = ModelInfo.from_checkpoint(sess.p.checkpoint)
        setup_session(sess)
        sess.notes.append("attached to a running node: its timer phase is unknown, so the per-tick accounting "
                          "(ticks without output) is approximate")
    else:
        setup_session(sess)
        overrides = {"checkpoint": sess.params_values["checkpoint"], "use_sim_time": True,
                     "image_transport": sess.mapping.transport}
        for k, v in opts.params.items():
            overrides[k] = v
        if "control_rate_hz" not in opts.params:
            overrides["control_rate_hz"] = float(sess.p.control_rate_hz)
        if opts.device:
            overrides["device"] = opts.device
        if sess.model.state_dim > 0:
            overrides["state_joint_names"] = [f"replay_state_{i}" for i in range(sess.model.state_dim)]
            overrides["state_field"] = "position"
        sess.params_values.update({k: v for k, v in overrides.items() if k != "use_sim_time"})
        sess.p = NodeParams.from_mapping(sess.params_values)
        from mode_ros.replay.session import default_params_file

        pfile = opts.params_file or default_params_file()
        cmd = [str(_executable()), "--ros-args"]
        if pfile:
            cmd += ["--params-file", str(pfile)]
        for k, v in overrides.items():
            cmd += ["-p", f"{k}:={ros_arg_value(v)}"]
        cmd += ["-r", f"__node:={opts.node_name}"]
        if opts.namespace.strip("/"):
            cmd += ["-r", f"__ns:=/{opts.namespace.strip('/')}"]
        proc = _Node(cmd, sess.out / "node.log")
        t0 = time.monotonic()
        try:   # from here on, whatever happens (a failed start, Ctrl-C, SIGTERM) stops the node we started
            while True:
                if not proc.alive:
                    raise ReplayError(f"policy_node exited (code {proc.proc.returncode}) during start-up:\n"
                                      f"{proc.tail()}")
                if _lifecycle_state(node, fqn, timeout=1.0) == "active":
                    break
                if "configure failed" in proc.tail(200):
                    raise ReplayError(f"policy_node failed to configure:\n{proc.tail()}")
                if time.monotonic() - t0 > opts.start_timeout:
                    raise ReplayError(f"policy_node not active after {opts.start_timeout:.0f} s:\n{proc.tail()}")
                time.sleep(0.2)
        except BaseException:
            proc.stop()
            raise
        sess.extra["node_start_s"] = round(time.monotonic() - t0, 2)
    try:
        _replay(sess, node, fqn, proc)
    except BaseException:
        if proc is not None:
            proc.stop()
        raise
    return proc


def _replay(sess, node, fqn, proc):
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import String

    from mode_ros.data.images import ImageDecodeError, decode_compressed
    from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE
    from mode_ros.msg import ActionChunk
    from mode_ros.ros.convert import STATE_FIELDS
    from mode_ros.ros.params import state_selection
    from mode_ros.replay.session import COMPRESSED, IMAGE, ReplayError, schedule, timer_period_ns
    from mode_ros.replay.offline import OfflineDriver, reason_detail

    opts, p, m, model = sess.opts, sess.p, sess.mapping, sess.model
    goal_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
    clock_pub = node.create_publisher(Clock, "/clock", 10)
    cam_pubs = {}
    for cam in model.camera_names:
        if m.transport == "compressed":
            cam_pubs[cam] = node.create_publisher(CompressedImage, f"{fqn}/image_{cam}/compressed",
                                                  qos_profile_sensor_data)
        else:
            cam_pubs[cam] = node.create_publisher(Image, f"{fqn}/image_{cam}", qos_profile_sensor_data)
    goal_pub = node.create_publisher(String, f"{fqn}/goal", goal_qos)
    state_pub = node.create_publisher(JointState, f"{fqn}/joint_states", qos_profile_sensor_data) \
        if model.state_dim > 0 else None
    clock_ref = [0]
    rx = _Rx(clock_ref)
    chunk_sub = node.create_subscription(ActionChunk, f"{fqn}/action_chunk", rx.cb("chunk"),
                                         QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE), raw=True)
    diag_sub = node.create_subscription(DiagnosticArray, "/diagnostics", rx.cb("diag"), 100, raw=True)
    # wait until the node is connected to everything we publish / read
    ok = _wait(lambda: all(pb.get_subscription_count() >= 1 for pb in cam_pubs.values())
               and chunk_sub.get_publisher_count() >= 1 and goal_pub.get_subscription_count() >= 1
               and (state_pub is None or state_pub.get_subscription_count() >= 1), 30.0)
    if not ok:
        missing = [f"{fqn}/image_{c}" for c, pb in cam_pubs.items() if pb.get_subscription_count() < 1]
        if chunk_sub.get_publisher_count() < 1:
            missing.append(f"{fqn}/action_chunk (publisher)")
        raise ReplayError(f"the node is not connected to {missing} after 30 s (image_transport / names?)")

    writer = sess.open_writer()
    ts = writer.typestore
    scorer, ticks = sess.scorer, sess.ticks
    shadow = OfflineDriver(p, model.camera_names, model.state_dim, model.chunk_size, model.action_dim, policy=None)
    P = timer_period_ns(p.control_rate_hz)
    chunk_topic = f"{fqn}/action_chunk"
    if m.static_goal is not None:
        goal_pub.publish(String(data=m.static_goal))
        shadow.set_goal(m.static_goal)
        time.sleep(0.5)   # reliable + transient local: let the node take it before the clock starts
    pending_ticks: deque = deque()     # [tick_ns, shadow key, shadow message, matched]
    pub_wall: OrderedDict = OrderedDict()   # reference camera stamp -> wall time it was published
    ref_cam = model.camera_names[0] if model.camera_names else None
    diag_last = {}
    diag_first = None
    stats = {"chunks": 0, "unmatched_chunks": 0, "published_msgs": 0, "clock_msgs": 0, "late_s_max": 0.0}

    def resolve_ticks(upto_ns):
        while pending_ticks and pending_ticks[0][0] <= upto_ns:
            g, key, msg, matched = pending_ticks.popleft()
            if matched:
                continue
            ticks.reasons[key] += 1
            ticks.details[reason_detail(key, msg)] += 1

    def match_tick(rec: ChunkRecord):
        slot0 = rec.slot_ns(0)
        for item in pending_ticks:
            g = item[0]
            if item[3]:
                continue
            if p.latency_compensation:
                if slot0 - 1_000_000 <= g < slot0 + rec.period_ns - 1_000_000:
                    item[3] = True
                    return g
            elif g >= rec.stamp_ns:
                item[3] = True
                return g
        return None

    def drain():
        nonlocal diag_first
        while True:
            try:
                kind, raw, wall, clk = rx.q.get_nowait()
            except queue.Empty:
                return
            if kind == "chunk":
                writer.write(chunk_topic, ACTION_CHUNK_TYPE, raw, max(clk, 1))
                try:
                    msg = ts.deserialize_cdr(raw, ACTION_CHUNK_TYPE)
                except Exception:  # noqa: BLE001
                    stats["undecodable_chunks"] = stats.get("undecodable_chunks", 0) + 1
                    continue
                n, a = int(msg.chunk_size), int(msg.action_dim)
                acts = np.asarray(msg.actions, dtype=np.float32)
                if acts.size != n * a or n == 0:
                    stats["malformed_chunks"] = stats.get("malformed_chunks", 0) + 1   # recorded, not scored
                    continue
                st = int(msg.header.stamp.sec) * NS + int(msg.header.stamp.nanosec)
                per = int(msg.control_period.sec) * NS + int(msg.control_period.nanosec)
                lat = int(msg.inference_latency.sec) + int(msg.inference_latency.nanosec) * 1e-9
                rec = ChunkRecord(stamp_ns=st, first_index=int(msg.first_index), period_ns=per,
                                  actions=acts.reshape(n, a), sequence=int(msg.sequence), tick=int(msg.tick),
                                  goal=str(msg.goal), latency_s=lat, recv_wall=wall,
                                  obs_pub_wall=pub_wall.get(st))
                rec.tick_ns = match_tick(rec)
                if rec.tick_ns is None:
                    stats["unmatched_chunks"] += 1
                stats["chunks"] += 1
                ticks.published += 1
                scorer.add(rec)
            else:
                writer.write("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", raw, max(clk, 1))
                try:
                    msg = ts.deserialize_cdr(raw, "diagnostic_msgs/msg/DiagnosticArray")
                except Exception:  # noqa: BLE001
                    continue
                for s in msg.status:
                    if s.name.startswith(fqn + ":"):
                        vals = {kv.key: kv.value for kv in s.values}
                        if diag_first is None:
                            diag_first = vals
                        diag_last.clear()
                        diag_last.update(vals)
                        diag_last["_stamp"] = clk

    state_msg_type = "sensor_msgs/msg/JointState"
    # the JointState the node is fed: the joints an attached node selects by (its state_joint_names or the
    # checkpoint's state names), else replay_state_i (a node started here is told these names)
    fields = STATE_FIELDS[p.state_field]   # the JointState fields the node concatenates
    per = model.state_dim // len(fields) if model.state_dim else 0
    state_names = state_selection(p.state_joint_names, model.state_names, p.state_field, model.state_dim)
    if len(state_names) != per:
        state_names = [f"replay_state_{i}" for i in range(per)]
    T = ts.types

    def header(stamp_ns, frame=""):
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
            sec=int(stamp_ns // NS), nanosec=int(stamp_ns % NS)), frame_id=frame)

    def publish_event(ev):
        if ev.kind == "camera":
            pub = cam_pubs[ev.cam]
            if not ev.rewritten:
                pub.publish(bytes(ev.raw))
            else:
                msg = ev.msg
                if m.transport == "raw" and ev.msgtype == COMPRESSED:
                    try:
                        img = decode_compressed(msg.format, msg.data)
                    except ImageDecodeError:
                        img = np.zeros((1, 1, 3), np.uint8)   # let the node reject a broken frame itself
                        data = np.zeros(0, np.uint8)
                    else:
                        data = np.ascontiguousarray(img).reshape(-1)
                    out = T[IMAGE](header=header(ev.stamp_ns, msg.header.frame_id), height=img.shape[0],
                                   width=img.shape[1], encoding="rgb8", is_bigendian=0, step=img.shape[1] * 3,
                                   data=data)
                    raw = ts.serialize_cdr(out, IMAGE)
                else:
                    import dataclasses

                    out = dataclasses.replace(msg, header=header(ev.stamp_ns, msg.header.frame_id))
                    raw = ts.serialize_cdr(out, ev.msgtype)
                pub.publish(bytes(raw))
            if ev.cam == ref_cam:
                pub_wall[ev.stamp_ns] = time.monotonic()
                if len(pub_wall) > 4000:
                    pub_wall.popitem(last=False)
        elif ev.kind == "goal":
            goal_pub.publish(bytes(ev.raw))
        elif ev.kind == "state" and state_pub is not None:
            vec = np.asarray(ev.vec, np.float64)
            parts = {f: vec[i * per:(i + 1) * per] for i, f in enumerate(fields)}
            js = T[state_msg_type](header=header(ev.stamp_ns), name=state_names,
                                   position=parts.get("position", np.zeros(0)),
                                   velocity=parts.get("velocity", np.zeros(0)), effort=np.zeros(0))
            state_pub.publish(bytes(ts.serialize_cdr(js, state_msg_type)))
        stats["published_msgs"] += 1

    rate = float(opts.rate)
    w0 = None
    c0 = None
    last_msg_wall = 0.0
    last_clock_wall = 0.0
    t_run = time.perf_counter()
    horizon = int(max(5.0, 20 * P / NS) * NS)   # ticks older than this (bag time) are accounted

    def pace(t_ns):
        nonlocal w0, c0
        if w0 is None:
            w0, c0 = time.monotonic(), t_ns
        target = w0 + (t_ns - c0) / NS / rate
        while True:
            drain()
            d = target - time.monotonic()
            if d <= 0:
                stats["late_s_max"] = max(stats["late_s_max"], -d)
                return
            time.sleep(min(d, 0.005))

    for kind, x in schedule(sess.events(), P):
        if kind == "clock":
            pace(x)
            gap = last_msg_wall + MIN_GAP_S - time.monotonic()
            if gap > 0:
                time.sleep(gap)
            clock_ref[0] = x
            clock_pub.publish(Clock(clock=Time(sec=int(x // NS), nanosec=int(x % NS))))
            last_clock_wall = time.monotonic() if x % P == 0 else 0.0
            stats["clock_msgs"] += 1
            shadow.set_clock(x)
        elif kind == "tick":
            ticks.expected += 1
            scorer.trace_tick(x)
            g = shadow.ctl.gate(shadow.ctl.now()) or shadow.ctl.no_plan_reason()
            pending_ticks.append([x, g[0], g[1], False])
            resolve_ticks(x - horizon)
        else:
            ev = x
            if ev.kind in ("camera", "goal", "state"):
                pace(ev.t)
                gap = last_clock_wall + opts.tick_settle_s - time.monotonic()
                if gap > 0:
                    time.sleep(gap)
                publish_event(ev)
                last_msg_wall = time.monotonic()
                if ev.kind == "camera":
                    shadow.on_image(ev.cam, ev.stamp_ns, ev.msgtype, ev.msg)
                elif ev.kind == "goal":
                    if m.static_goal is None:
                        shadow.set_goal(ev.text)
                else:
                    shadow.on_state(ev.stamp_ns, ev.vec)
            elif ev.kind == "action" and scorer.rec is not None:
                scorer.rec.add(ev.source, ev.stamp_ns, ev.vec)
            scorer.advance(ev.t)
    # the last chunks: wait until nothing new arrives for a while (bounded)
    t_end = time.monotonic() + opts.drain_s
    quiet_since = time.monotonic()
    n_seen = stats["chunks"]
    while time.monotonic() < t_end:
        drain()
        if stats["chunks"] != n_seen:
            n_seen, quiet_since = stats["chunks"], time.monotonic()
        if time.monotonic() - quiet_since > max(0.5, 3 * P / NS / rate):
            break
        time.sleep(0.02)
    drain()
    sess.extra["run_wall_s"] = time.perf_counter() - t_run
    resolve_ticks(2 ** 62)
    scorer.finish(sess.last_ns)
    sess.close_writer()
    node_alive = proc.alive if proc is not None else None
    sess.extra["live"] = {
        "node": fqn, "started": proc is not None, "node_alive_at_end": node_alive,
        "chunks_received": stats["chunks"], "chunks_not_matched_to_a_tick": stats["unmatched_chunks"],
        "messages_published": stats["published_msgs"], "clock_messages": stats["clock_msgs"],
        "max_lateness_s": round(stats["late_s_max"], 4),
        "chunks_undecodable": stats.get("undecodable_chunks", 0), "chunks_malformed": stats.get("malformed_chunks", 0),
    }
    for key, what in (("undecodable_chunks", "could not be decoded"),
                      ("malformed_chunks", "have an actions array that does not match chunk_size x action_dim")):
        if stats.get(key):
            sess.problems.append(f"{stats[key]} ActionChunk message(s) from the node {what}: recorded in "
                                 "OUT/chunks, not scored")
    if diag_last:
        keep = ("ticks_published", "ticks_suppressed", "stale", "inferences", "inference_failures", "dropped_results",
                "goals_refused", "execution_strategy", "estimated_d",
                "rejected", "images_received", "inference_latency_median_ms", "inference_latency_p99_ms",
                "achieved_rate_hz", "missed_ticks", "late_ticks_merged", "late_served", "reason", "last_failure")
        nd = {k: diag_last.get(k) for k in keep if k in diag_last}
        nd.update({k: v for k, v in diag_last.items() if k.startswith(("suppressed.", "rejected."))})
        nd["at_bag_time_s"] = round(diag_last.get("_stamp", 0) / NS, 3)
        sess.extra["node_diagnostics"] = nd
        fails, refused = int(diag_last.get("inference_failures", 0) or 0), int(diag_last.get("goals_refused", 0) or 0)
        if fails:
            sess.problems.append(f"{fails} inference(s) failed in the node (last: "
                                 f"{diag_last.get('last_failure') or 'see node.log'})")
        if refused:
            sess.problems.append(f"{refused} goal(s) refused by the node (see node.log)")
    if stats["late_s_max"] > P / NS:
        sess.notes.append(f"the replayer fell behind the requested rate by up to {stats['late_s_max']:.3f} s "
                          "(wall): lower --rate for exact timing")
    if proc is not None and not proc.alive:
        sess.problems.append(f"policy_node exited during the replay (code {proc.proc.returncode}); see node.log")
    node.destroy_subscription(chunk_sub)
    node.destroy_subscription(diag_sub)

