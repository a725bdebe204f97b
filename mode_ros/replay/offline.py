"""Offline replay: the policy node's controller driven in bag time, ``MoDEPolicy`` called directly.

The node's control logic is :class:`~mode_ros.control.controller.ChunkController`, the one copy shared
with the node; here :class:`OfflineDriver` feeds it what the node's subscriptions would (image headers
checked on arrival, vectors, goals) and runs its inferences in bag time through
:class:`~mode_ros.control.virtual.VirtualTime`.

Inference timing: an inference requested at a tick reads the newest observation at that bag time and
its plan becomes available ``latency * rate`` bag seconds later, as it would for the live node at
``--rate``. ``latency`` (wall seconds) is, per ``--latency``: ``calibrated`` (default) the median of a
few inferences timed before the replay, fixed for the run (deterministic on a given machine);
``measured`` the wall time of each call (most faithful, jitter included); or a number. The node's
"expected latency" (used to request the next chunk early) is derived from the same values. With
``--latency 0`` every plan is ready before the next tick: the live result whenever the machine keeps
up (inference * rate < one control period) and the chunk is requested one tick ahead.

Divergences from the live node (documented, small): images are validated on arrival (header/size
checks, like the node's decoder) but decoded only when an inference uses them; a frame that passes the
check and still fails to decode makes that inference fail instead of being dropped on arrival.
"""
from __future__ import annotations

import re
import time

import numpy as np

from mode_ros.control.controller import ChunkController, Output
from mode_ros.control.virtual import VirtualTime
from mode_ros.data.images import ImageDecodeError, check_image, compressed_size, decode_compressed, decode_image
from mode_ros.replay.scoring import ChunkRecord
from mode_ros.ros.params import NodeParams

__all__ = ["OfflineDriver", "run_offline", "reason_detail", "chunk_record"]

NS = 1_000_000_000
IMAGE = "sensor_msgs/msg/Image"


class OfflineDriver:
    """Bag messages into the :class:`ChunkController` in bag time. ``policy=None``: no inference (the
    live replay's shadow, which only asks the gate why a tick may publish nothing). ``latency``: fixed
    seconds per inference, None = each call's wall time."""

    def __init__(self, p: NodeParams, camera_names, state_dim: int, chunk_size: int, action_dim: int,
                 policy=None, latency: float | None = None, rate: float = 1.0, initial_latency: float = 0.0):
        p.check_against_policy(chunk_size, action_dim, state_dim)   # as the node's configure
        self.vt = VirtualTime(rate=rate)
        check = getattr(policy, "goal_problem", None)
        self.ctl = ChunkController(p, camera_names, state_dim, chunk_size, action_dim, self.vt.clock,
                                   goal_check=check, initial_latency=initial_latency,
                                   state_model=getattr(policy, "state_model", None))
        self.vt.attach(self.ctl, None if policy is None else _decoding(policy.predict_chunk),
                       None if latency is None else (lambda wall: float(latency)))
        self.policy = policy

    def set_clock(self, t_ns: int) -> None:
        self.vt.set_clock(t_ns)

    def _kick(self, start: bool) -> None:
        if self.policy is not None:
            self.vt.kick(start)

    def on_image(self, cam: str, stamp_ns: int, msgtype: str, msg) -> None:
        try:
            if msgtype == IMAGE:
                check_image(msg.encoding, msg.height, msg.width, msg.step, len(msg.data))
            else:
                compressed_size(msg.format, msg.data)
        except ImageDecodeError as exc:
            self.ctl.reject_input(f"image_{cam}", f"camera {cam}: image rejected: {exc}", exc.reason)
            return
        self._kick(self.ctl.on_image(cam, stamp_ns, (msgtype, msg)))

    def on_state(self, stamp_ns: int, vec) -> None:
        self._kick(self.ctl.on_state(stamp_ns, vec))

    def set_goal(self, text: str) -> None:
        self._kick(self.ctl.set_goal(text, "goal")[1])

    def tick(self) -> tuple[Output | None, str, str]:
        """One control tick at the current bag time -> (output, reason key, reason message). A lockstep
        tick's own inference takes no time: it is served from it at once."""
        res = self.ctl.tick()
        if res.request and self.policy is not None:
            self.vt.start()
            if self.ctl.p.lockstep_inference and res.key == "lockstep_inference":
                out = self.vt.land()
                if out is not None:
                    return out, "published", ""
                return None, "no_plan", f"no plan for this tick ({self.ctl.last_failure or 'no chunk'})"
        return res.output, res.key, res.message

    def land(self, upto_ns: int) -> Output | None:
        """The inference in flight lands if done by ``upto_ns`` (the clock is still the node's last)."""
        return self.vt.land(upto_ns)


def _decoding(predict):
    """The policy call with the buffered (msgtype, msg) camera payloads decoded first."""
    def call(images, goal, **kw):
        try:
            decoded = [_decode(mt, m) for mt, m in images]
        except ImageDecodeError as exc:
            raise ValueError(f"image rejected: {exc}") from None
        return predict(decoded, goal, **kw)
    return call


def chunk_record(out: Output, period_ns: int) -> ChunkRecord:
    plan = out.plan
    return ChunkRecord(stamp_ns=int(plan.stamp), first_index=int(out.first_index), period_ns=period_ns,
                       actions=out.actions, sequence=int(plan.sequence), tick=out.tick, goal=plan.goal,
                       latency_s=float(plan.latency), tick_ns=int(out.tick_ns))


def _calibrate(policy, goal: str | None, runs: int = 5) -> float:
    """Median wall latency of a few inferences on blank inputs (after warm-up): one fixed latency for the
    whole offline run, so that its result does not depend on the jitter of individual calls."""
    imgs = [np.zeros((64, 64, 3), np.uint8) for _ in policy.camera_names]
    st = np.zeros(policy.state_dim, np.float32) if policy.state_dim else None
    known = list(getattr(policy, "known_goals", []) or [])
    g = goal or (known[0] if known else "calibration")
    lat = []
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            policy.predict_chunk(imgs, g, state=st, seed=0)
        except ValueError:
            return 0.0
        lat.append(time.perf_counter() - t0)
    return float(np.median(lat))


def _decode(msgtype: str, msg) -> np.ndarray:
    if msgtype == IMAGE:
        img = decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                           is_bigendian=bool(msg.is_bigendian))
    else:
        img = decode_compressed(msg.format, msg.data)
    return img if img.flags.writeable else img.copy()   # a view on the bag buffer: torch wants writable


def reason_detail(key: str, message: str) -> str:
    """A count key for a suppressed tick: the reason with numbers removed."""
    return f"{key}: " + re.sub(r"-?\d+(\.\d+)?", "#", message)[:100]


def run_offline(sess) -> None:
    """Replay ``sess.bag`` through :class:`OfflineDriver` + ``MoDEPolicy``; fills sess.scorer/ticks/extra
    (torch_threads applies for the replay only)."""
    from mode_ros.model.runtime import torch_threads

    with torch_threads(sess.p.torch_threads):
        _run_offline(sess)


def _run_offline(sess) -> None:
    from mode_ros.export.deploy import load_policy
    from mode_ros.replay.session import ReplayError, setup_session

    opts, p = sess.opts, sess.p
    if sess.model is None:
        raise ReplayError("offline replay needs --checkpoint")
    setup_session(sess)
    t0 = time.perf_counter()
    # as the node's configure: the same backend, steps and fast paths (an ONNX export replays as deployed)
    if opts.policy is not None:   # given by the caller (tests, tools): used as it is
        policy, described = opts.policy, type(opts.policy).__name__
    else:
        policy, described = load_policy(p)
    warm = float(policy.warmup()) if p.warmup else 0.0
    load_s = time.perf_counter() - t0
    if opts.latency == "calibrated":
        fixed = _calibrate(policy, sess.mapping.static_goal)
    else:
        fixed = None if opts.latency == "measured" else float(opts.latency)
    drv = OfflineDriver(p, policy.camera_names, policy.state_dim, policy.chunk_size, policy.action_dim,
                        policy=policy, latency=fixed, rate=opts.rate, initial_latency=warm if fixed is None else fixed)
    if sess.mapping.static_goal is not None:
        drv.set_goal(sess.mapping.static_goal)
    t_run = time.perf_counter()
    _replay_events(sess, drv, _ChunkWriter(sess, policy))
    sess.extra["run_wall_s"] = time.perf_counter() - t_run
    sess.scorer.finish(sess.last_ns)
    sess.close_writer()
    counters = drv.ctl.counters.snapshot()
    lat = np.array(drv.vt.walls)
    sess.extra["offline"] = {
        "latency_model": ("measured wall time of each inference x rate" if fixed is None else
                          f"{opts.latency}: {fixed:.4f} s per inference x rate {opts.rate:g}"),
        "model_load_and_warmup_s": round(load_s, 3),
        "inferences": int(counters.get("inferences", 0)),
        "inference_failures": int(counters.get("inference_failures", 0)),
        "inference_wall_s_total": round(float(lat.sum()), 3) if lat.size else 0.0,
        "device": str(getattr(policy, "device", "?")),
        "inference": described,
        "execution_strategy": drv.ctl.strategy.name,
        "counters": counters,
    }
    fails, refused = int(counters.get("inference_failures", 0)), int(counters.get("rejected.goal", 0))
    if fails:
        sess.problems.append(f"{fails} inference(s) failed (last: {drv.ctl.last_failure or 'see counters'})")
    if refused:
        sess.problems.append(f"{refused} goal(s) refused ({drv.ctl.last_failure or 'see counters'})")
    sess.problems += never_accepted(drv.ctl, counters)


def never_accepted(ctl, counters: dict) -> list[str]:
    """An input of which every message was rejected (a checkpoint whose state or cameras do not fit the
    bag): the replay published nothing for a reason the tick counts alone would hide."""
    out = []
    n = int(counters.get("rejected.joint_states", 0))
    if n and ctl.state is None and ctl.state_dim > 0:
        out.append(f"all {n} joint_states messages were rejected (the checkpoint's state_dim is {ctl.state_dim}; "
                   "see counters rejected.joint_states*)")
    for cam, buf in ctl.buffers.items():
        n = int(counters.get(f"rejected.image_{cam}", 0))
        if n and buf.received == 0:
            out.append(f"all {n} images of camera {cam} were rejected (see counters rejected.image_{cam}*)")
    return out


class _ChunkWriter:
    """ActionChunk messages of the replay into OUT/chunks (as the node would publish them)."""

    def __init__(self, sess, policy):
        from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE
        from mode_ros.replay.session import node_fqn

        self.writer, self.type = sess.open_writer(), ACTION_CHUNK_TYPE
        self.topic = node_fqn(sess.opts.node_name, sess.opts.namespace) + "/action_chunk"
        self.frame = sess.p.action_frame_id
        self.names = list(policy.action_names) if len(policy.action_names) == policy.action_dim else []

    def write(self, rec: ChunkRecord) -> None:
        T, w = self.writer.types, self.writer

        def duration(ns):
            return T["builtin_interfaces/msg/Duration"](sec=int(ns) // NS, nanosec=int(ns) % NS)
        msg = T[self.type](
            header=w.header(rec.stamp_ns, self.frame), control_period=duration(rec.period_ns),
            chunk_size=int(rec.actions.shape[0]), action_dim=int(rec.actions.shape[1]), action_names=self.names,
            actions=np.ascontiguousarray(rec.actions, dtype=np.float32).reshape(-1), first_index=rec.first_index,
            sequence=rec.sequence, tick=rec.tick, goal=rec.goal,
            inference_latency=duration(int(round(rec.latency_s * 1e9))))
        w.write(self.topic, self.type, msg, rec.tick_ns)


def _replay_events(sess, drv: OfflineDriver, out: _ChunkWriter) -> None:
    """The bag's events and the node's ticks (``schedule``) through the driver, in bag time."""
    from mode_ros.replay.session import schedule, timer_period_ns

    scorer, ticks = sess.scorer, sess.ticks
    period_ns = drv.ctl.period_ns
    unserved: list = []   # (key, message) of the last tick while it may still be served late

    def settle() -> None:
        for key, message in unserved:
            ticks.reasons[key] += 1
            ticks.details[reason_detail(key, message)] += 1
        unserved.clear()

    def publish(o: Output) -> None:
        rec = chunk_record(o, period_ns)
        ticks.published += 1
        scorer.add(rec)
        out.write(rec)

    def before(t_ns: int) -> None:
        # an inference that lands before this moment is adopted with the clock the node had then
        o = drv.land(t_ns)
        if o is not None:      # the last tick, served late from this plan
            unserved.clear()
            publish(o)

    for kind, x in schedule(sess.events(), timer_period_ns(sess.p.control_rate_hz)):
        before(x if kind != "event" else x.t)
        if kind == "clock":
            drv.set_clock(x)
        elif kind == "tick":
            settle()
            o, key, message = drv.tick()
            ticks.expected += 1
            scorer.trace_tick(x)
            if o is not None:
                publish(o)
            else:
                unserved.append((key, message))
        else:
            _feed(sess, drv, x)
            scorer.advance(x.t)
    before(2 ** 62)
    settle()


def _feed(sess, drv: OfflineDriver, ev) -> None:
    if ev.kind == "camera":
        drv.on_image(ev.cam, ev.stamp_ns, ev.msgtype, ev.msg)
    elif ev.kind == "goal":
        if sess.mapping.static_goal is None:
            drv.set_goal(ev.text)
    elif ev.kind == "state":
        drv.on_state(ev.stamp_ns, ev.vec)
    elif ev.kind == "action" and sess.scorer.rec is not None:
        sess.scorer.rec.add(ev.source, ev.stamp_ns, ev.vec)
