"""Offline replay: the policy node's tick logic emulated in bag time, ``MoDEPolicy`` called directly.

:class:`NodeEmulator` mirrors ``mode_ros.ros.policy_node.PolicyNode`` method by method (``_stamp``,
``_on_image``, ``_set_goal``, ``_on_joint_state``, ``_gate``, ``_on_tick``, ``_observation``,
``_infer_once``) and uses the very same ROS-free pieces: :class:`~mode_ros.ros.execution.ChunkExecutor`
(which row to execute, latency skipping, re-planning, ensembling), :class:`~mode_ros.ros.safety.ActionSafety`,
:class:`~mode_ros.ros.sync.StampBuffer` + :func:`~mode_ros.ros.sync.match_stamps` and the image decoders of
:mod:`mode_ros.data.images`. Times are float seconds computed the same way as the node's.

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
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from mode_ros.data.images import ImageDecodeError, check_image, compressed_size, decode_compressed, decode_image
from mode_ros.ros.execution import ChunkExecutor, Plan, observation_seed, tick_window
from mode_ros.ros.params import NodeParams
from mode_ros.ros.safety import ActionSafety, NonFiniteActionError, output_gate
from mode_ros.replay.scoring import ChunkRecord
from mode_ros.ros.sync import StampBuffer, has_observation_in, match_stamps

__all__ = ["NodeEmulator", "run_offline", "reason_detail"]

NS = 1_000_000_000
IMAGE = "sensor_msgs/msg/Image"


def _stamp_sec(stamp_ns: int) -> float:
    """builtin_interfaces/Time -> seconds exactly as the node computes it (sec + nanosec * 1e-9)."""
    return int(stamp_ns // NS) + int(stamp_ns % NS) * 1e-9


@dataclass
class _Pending:
    done_ns: int           # bag time the plan becomes available
    plan: Plan | None
    generation: int
    latency: float
    failure: str = ""


class NodeEmulator:
    """The policy node's logic in bag time. ``policy=None``: gates only (the live replay's shadow)."""

    def __init__(self, p: NodeParams, camera_names, state_dim: int, chunk_size: int, action_dim: int,
                 policy=None, latency: float | None = None, rate: float = 1.0, initial_latency: float = 0.0):
        p.check_against_policy(chunk_size, action_dim, state_dim)   # as the node's configure
        self.p = p
        self.policy = policy
        self.state_dim = int(state_dim)
        self.period = 1.0 / p.control_rate_hz
        self.period_ns = int(round(self.period * 1e9))          # ActionChunk.control_period
        self.executor_ = ChunkExecutor(chunk_size, action_dim, self.period, p.replan_every,
                                       p.latency_compensation, p.temporal_ensembling, p.ensembling_decay)
        self.safety = ActionSafety(action_dim, p.action_lower_bounds, p.action_upper_bounds, p.max_action_delta)
        self.buffers = {c: StampBuffer(p.sync_queue_size) for c in camera_names}
        self.state: tuple[float, np.ndarray] | None = None
        self.goal = ""
        self.goal_generation = 0
        self.enabled = bool(p.start_enabled)
        self.counters: Counter = Counter()
        self.last_failure = ""
        self.reason = ""
        self.sequence = 0
        self.tick_count = 0
        self.latencies: list[float] = []
        self._lat_window: deque = deque(maxlen=p.stats_window)
        self._expected_latency = float(initial_latency)
        self.fixed_latency = latency
        self.rate = float(rate)
        self.clock_ns = 0
        self.inflight: _Pending | None = None
        self.unserved: tuple[int, bool] | None = None   # PolicyNode._unserved: (tick ns, stepped)
        if p.goal:
            self.set_goal(p.goal)

    # ---- clock ----------------------------------------------------------------------------------------
    def set_clock(self, t_ns: int) -> None:
        if t_ns > self.clock_ns:
            self.clock_ns = int(t_ns)

    def now(self) -> float:
        return self.clock_ns * 1e-9

    # ---- inputs (PolicyNode._stamp / _on_image / _on_compressed / _set_goal / _on_joint_state) ---------
    def _stamp(self, key: str, stamp_ns: int) -> tuple[float, int] | None:
        if stamp_ns == 0:
            return self.now(), self.clock_ns
        t = _stamp_sec(stamp_ns)
        if t - self.now() > self.p.max_observation_age:
            self.counters[f"rejected.{key}.future_stamp"] += 1
            return None
        return t, int(stamp_ns)

    def on_image(self, cam: str, stamp_ns: int, msgtype: str, msg) -> None:
        st = self._stamp(f"image_{cam}", stamp_ns)
        if st is None:
            return
        try:
            if msgtype == IMAGE:
                check_image(msg.encoding, msg.height, msg.width, msg.step, len(msg.data))
            else:
                compressed_size(msg.format, msg.data)
        except ImageDecodeError as exc:
            self.counters[f"rejected.image_{cam}"] += 1
            self.counters[f"rejected.image_{cam}:{exc.reason}"] += 1
            return
        dropped = self.buffers[cam].add(st[0], (st[1], (msgtype, msg)), now=self.now())
        if dropped:
            self.counters[f"dropped_future_frames.{cam}"] += dropped
        self._kick()

    def set_goal(self, text: str) -> None:
        clean = " ".join(str(text).split())
        if not clean or len(clean) > self.p.max_goal_length:
            self.goal = ""
            self.goal_generation += 1
            self.executor_.reset()
            self.counters["rejected.goal"] += 1
            return
        if clean == self.goal:
            return
        self.goal = clean
        self.goal_generation += 1
        self.executor_.reset()
        self._kick()

    def on_state(self, stamp_ns: int, vec: np.ndarray) -> None:
        st = self._stamp("joint_states", stamp_ns)
        if st is None:
            return
        vec = np.asarray(vec, dtype=np.float64)
        if vec.shape != (self.state_dim,):
            self.counters["rejected.joint_states"] += 1
            return
        with np.errstate(over="ignore"):
            vec32 = vec.astype(np.float32)
        if not np.isfinite(vec32).all() or (self.state is not None and st[0] < self.state[0]):
            self.counters["rejected.joint_states"] += 1   # non-finite (in float32) or out of order
            return
        self.state = (st[0], vec32)
        self._kick()

    # ---- the control tick (PolicyNode._gate / _on_tick) ------------------------------------------------
    def gate(self, now: float) -> tuple[str, str] | None:
        return output_gate(self.enabled, self.goal, {c: b.latest_stamp() for c, b in self.buffers.items()},
                           None if self.state is None else self.state[0], self.state_dim > 0,
                           now, self.p.max_observation_age)

    def _suppress(self, key: str, message: str) -> tuple[None, str, str]:
        self.counters[f"suppressed.{key}"] += 1
        self.reason = message
        return None, key, message

    def tick(self):
        """One control tick at the current clock -> (ChunkRecord | None, reason key, reason message)."""
        now = self.now()
        self.unserved = None
        gate = self.gate(now)
        if gate is not None:
            self.executor_.reset()   # the rate limiter keeps the last action (as the node)
            if self._serve_late and (gate[0] != "disabled" or self.p.lockstep_inference):
                self.unserved = (self.clock_ns, False)
            return self._suppress(*gate)
        if self.p.lockstep_inference and self.policy is not None and self.executor_.chunk_due(now):
            return self._lockstep_tick(now)
        if not self.p.lockstep_inference and self.inflight is None and self.policy is not None and \
                self.executor_.needs_replan(now, self._expected_latency):
            self._request(now)
        step = self.executor_.step(now)
        if step is None:
            why = self.last_failure or "waiting for the first chunk"
            if self._serve_late:
                self.unserved = (self.clock_ns, True)
            return self._suppress("no_plan", f"no plan for this tick ({why})")
        return self._publish_step(step, self.clock_ns)

    @property
    def _serve_late(self) -> bool:
        return self.p.serve_late_ticks or self.p.lockstep_inference

    def _tick_observation_ready(self, t: float) -> bool:
        return has_observation_in(self.buffers, None if self.state is None else self.state[0], self.state_dim > 0,
                                  *tick_window(t, self.period))

    def _lockstep_tick(self, now: float):
        """PolicyNode with lockstep_inference: a tick that needs a new chunk is served from row 0 of an
        inference on its own observation (stamped within half a period of the tick), which takes no
        time, through the late-serving path as in the node; until that observation is there the tick
        waits (unserved; its arrival serves it)."""
        self.unserved = (self.clock_ns, False)
        if not self._tick_observation_ready(now):
            return self._suppress("lockstep_wait", "waiting for the observation of this tick (lockstep_inference)")
        self.inflight = None
        self._request(now, at=self.clock_ns)
        rec = self.complete()
        if rec is None:
            return self._suppress("no_plan", f"no plan for this tick ({self.last_failure or 'no chunk'})")
        return rec, "published", ""

    def _publish_step(self, step, tick_ns: int) -> tuple[ChunkRecord | None, str, str]:
        """PolicyNode._publish_step: safety filter, then the chunk of the tick at ``tick_ns``."""
        try:
            actions = self.safety.apply(step.actions)
        except (NonFiniteActionError, ValueError) as exc:
            self.executor_.reset()
            return self._suppress("unsafe", f"unsafe actions dropped: {exc}")
        self.tick_count += 1
        self.counters["published"] += 1
        self.reason = "publishing"
        plan = step.plan
        rec = ChunkRecord(stamp_ns=int(plan.stamp), first_index=int(step.first_index), period_ns=self.period_ns,
                          actions=actions, sequence=int(plan.sequence), tick=self.tick_count, goal=plan.goal,
                          latency_s=float(plan.latency), tick_ns=int(tick_ns))
        return rec, "published", ""

    # ---- late service of an unserved tick (PolicyNode._kick_unserved / _serve_unserved) -----------------
    def _kick(self) -> None:
        if self.unserved is None or self.inflight is not None or self.policy is None:
            return
        t = _stamp_sec(self.unserved[0])
        if self.gate(t) is not None:
            return
        if self.p.lockstep_inference:   # the tick's own observation, at no cost in time
            if self._tick_observation_ready(t):
                self._request(self.now(), at=self.unserved[0])
            return
        self._request(self.now())

    def serve_unserved(self) -> ChunkRecord | None:
        u = self.unserved
        if u is None:
            return None
        tick_ns, stepped = u
        if self.clock_ns - tick_ns >= self.period_ns:
            self.unserved = None
            return None
        t = _stamp_sec(tick_ns)
        if self.gate(t) is not None:
            return None
        newest = self.executor_.newest
        if self.p.lockstep_inference:
            lo, hi = tick_window(t, self.period)
            if newest is None or not lo < newest.obs_time <= hi:
                return None
        elif newest is None or newest.obs_time > t + 1e-6:
            return None
        step = self.executor_.restep(t) if stepped else self.executor_.step(t)
        self.unserved = (tick_ns, True) if step is None else None
        if step is None:
            return None
        rec = self._publish_step(step, tick_ns)[0]
        if rec is not None:
            self.counters["late_served"] += 1
        return rec

    # ---- inference (PolicyNode._observation / _infer_once) ---------------------------------------------
    def _observation(self, now: float, at: int | None = None):
        goal, gen, state = self.goal, self.goal_generation, self.state
        if not goal:
            return "no goal"
        snaps = {c: b.snapshot() for c, b in self.buffers.items()}
        if at is not None:   # lockstep_inference: the tick's own observation (ready was checked)
            hi = tick_window(_stamp_sec(at), self.period)[1]
            snaps = {c: [e for e in v if e[0] <= hi] for c, v in snaps.items()}
        if not snaps:
            t_ns = self.clock_ns if at is None else int(at)
            return [], _stamp_sec(t_ns), t_ns, None, goal, gen
        idx = match_stamps({c: [s for s, _ in v] for c, v in snaps.items()}, self.p.camera_sync_tolerance)
        if idx is None:
            latest = ", ".join(f"{c}@{v[-1][0]:.3f}" if v else f"{c}: none" for c, v in snaps.items())
            self.counters["rejected.unsynchronised"] += 1
            return (f"no set of camera images within camera_sync_tolerance "
                    f"{self.p.camera_sync_tolerance:g} s (latest: {latest})")
        ref = next(iter(snaps))
        stamp_sec = snaps[ref][idx[ref]][0]
        stamp_ns = snaps[ref][idx[ref]][1][0]
        payloads = [snaps[c][idx[c]][1][1] for c in snaps]
        oldest = min(snaps[c][idx[c]][0] for c in snaps)
        if now - oldest > self.p.max_observation_age:
            return f"newest synchronised observation is {now - oldest:.3f} s old (stale)"
        st = None
        if self.state_dim > 0:
            if state is None:
                return "no joint_states yet"
            st = state[1]
        return payloads, stamp_sec, stamp_ns, st, goal, gen

    def _request(self, now: float, at: int | None = None) -> None:
        """An inference on the newest observation (``at``: on the observation of the tick at ``at`` ns,
        lockstep_inference, taking no time)."""
        obs = self._observation(now, at)
        if isinstance(obs, str):
            self.last_failure = obs
            return
        payloads, stamp_sec, stamp_ns, state, goal, gen = obs
        try:
            images = [_decode(mt, m) for mt, m in payloads]
        except ImageDecodeError as exc:
            self.last_failure = f"inference refused: image rejected: {exc}"
            self.counters["inference_failures"] += 1
            return
        seed = observation_seed(self.p.seed, stamp_ns)
        t0 = time.perf_counter()
        try:
            actions = self.policy.predict_chunk(images, goal, state=state, seed=seed)
        except ValueError as exc:
            self.last_failure = f"inference refused: {exc}"
            self.counters["inference_failures"] += 1
            return
        wall = time.perf_counter() - t0
        latency = wall if self.fixed_latency is None else float(self.fixed_latency)
        self.latencies.append(wall)
        self._lat_window.append(latency)
        self.counters["inferences"] += 1
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.executor_.chunk_size, self.executor_.action_dim) or not np.isfinite(actions).all():
            self.last_failure = (f"inference produced an invalid chunk (shape {actions.shape}, "
                                 f"{int((~np.isfinite(actions)).sum())} non-finite values): dropped")
            self.counters["inference_failures"] += 1
            return
        lat = np.array(self._lat_window)
        self._expected_latency = float(np.percentile(lat, 90)) if lat.size >= 5 else float(lat.max())
        plan = Plan(actions=actions, obs_time=stamp_sec if at is None else _stamp_sec(at),  # (node: rows from the tick)
                    ready_time=now + latency, sequence=0, goal=goal,
                    latency=wall, stamp=stamp_ns)
        done = self.clock_ns + (0 if at is not None else int(round(latency * self.rate * 1e9)))
        self.inflight = _Pending(done, plan, gen, latency)

    def complete(self) -> ChunkRecord | None:
        """The in-flight inference finishes now (the clock is the last value the node saw). Returns the
        record of the unserved tick it serves late (serve_late_ticks), if any."""
        pend, self.inflight = self.inflight, None
        if pend is None or pend.plan is None:
            return None
        if pend.generation != self.goal_generation:
            self.counters["dropped_results"] += 1
            return None
        self.sequence += 1
        pend.plan.sequence = self.sequence
        self.executor_.add(pend.plan, self.now())
        self.last_failure = ""
        return self.serve_unserved() if self._serve_late else None


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
    """Replay ``sess.bag`` through :class:`NodeEmulator` + ``MoDEPolicy``; fills sess.scorer/ticks/extra."""
    import torch

    from mode_ros.model.policy import MoDEPolicy
    from mode_ros.replay.session import ReplayError, node_fqn, schedule, setup_session, timer_period_ns

    opts, p = sess.opts, sess.p
    if sess.model is None:
        raise ReplayError("offline replay needs --checkpoint")
    setup_session(sess)
    if p.torch_threads > 0:
        torch.set_num_threads(p.torch_threads)
    t0 = time.perf_counter()
    dtype = None if p.dtype == "auto" else p.dtype
    policy = opts.policy or MoDEPolicy.from_pretrained(p.checkpoint, device=p.device, dtype=dtype)
    warm = float(policy.warmup()) if p.warmup else 0.0
    load_s = time.perf_counter() - t0
    if opts.latency == "calibrated":
        fixed = _calibrate(policy, sess.mapping.static_goal)
    else:
        fixed = None if opts.latency == "measured" else float(opts.latency)
    emu = NodeEmulator(p, policy.camera_names, policy.state_dim, policy.chunk_size, policy.action_dim,
                       policy=policy, latency=fixed, rate=opts.rate,
                       initial_latency=warm if fixed is None else fixed)
    if sess.mapping.static_goal is not None:
        emu.set_goal(sess.mapping.static_goal)
    writer = sess.open_writer()
    from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE

    topic = node_fqn(opts.node_name, opts.namespace) + "/action_chunk"
    T = writer.types
    scorer, ticks = sess.scorer, sess.ticks
    P = timer_period_ns(p.control_rate_hz)
    t_run = time.perf_counter()

    def write_chunk(rec: ChunkRecord) -> None:
        msg = T[ACTION_CHUNK_TYPE](
            header=writer.header(rec.stamp_ns, p.action_frame_id),
            control_period=T["builtin_interfaces/msg/Duration"](sec=rec.period_ns // NS, nanosec=rec.period_ns % NS),
            chunk_size=int(rec.actions.shape[0]), action_dim=int(rec.actions.shape[1]),
            action_names=list(policy.action_names) if len(policy.action_names) == policy.action_dim else [],
            actions=np.ascontiguousarray(rec.actions, dtype=np.float32).reshape(-1), first_index=rec.first_index,
            sequence=rec.sequence, tick=rec.tick, goal=rec.goal,
            inference_latency=T["builtin_interfaces/msg/Duration"](
                sec=int(rec.latency_s), nanosec=int(round((rec.latency_s % 1) * 1e9)) % NS))
        writer.write(topic, ACTION_CHUNK_TYPE, msg, rec.tick_ns)

    unserved: list = []   # (key, message) of the last tick while it may still be served late

    def settle() -> None:
        for key, message in unserved:
            ticks.reasons[key] += 1
            ticks.details[reason_detail(key, message)] += 1
        unserved.clear()

    def publish(rec: ChunkRecord) -> None:
        ticks.published += 1
        scorer.add(rec)
        write_chunk(rec)

    def before(t_ns: int) -> None:
        # an inference that finishes before this moment is added with the clock the node had then
        if emu.inflight is not None and emu.inflight.done_ns <= t_ns:
            rec = emu.complete()
            if rec is not None:      # the last tick, served late from this plan
                unserved.clear()
                publish(rec)

    read_ns = None
    for kind, x in schedule(sess.events(), P):
        t_item = x if kind != "event" else x.t
        before(t_item)
        if kind == "clock":
            emu.set_clock(x)
        elif kind == "tick":
            settle()
            rec, key, message = emu.tick()
            ticks.expected += 1
            scorer.trace_tick(x)
            if rec is not None:
                publish(rec)
            else:
                unserved.append((key, message))
        else:
            ev = x
            read_ns = ev.t
            if ev.kind == "camera":
                emu.on_image(ev.cam, ev.stamp_ns, ev.msgtype, ev.msg)
            elif ev.kind == "goal":
                if sess.mapping.static_goal is None:
                    emu.set_goal(ev.text)
            elif ev.kind == "state":
                emu.on_state(ev.stamp_ns, ev.vec)
            elif ev.kind == "action" and scorer.rec is not None:
                scorer.rec.add(ev.source, ev.stamp_ns, ev.vec)
            if read_ns is not None:
                scorer.advance(read_ns)
    before(2 ** 62)
    settle()
    sess.extra["run_wall_s"] = time.perf_counter() - t_run
    scorer.finish(sess.last_ns)
    sess.close_writer()
    lat = np.array(emu.latencies)
    sess.extra["offline"] = {
        "latency_model": ("measured wall time of each inference x rate" if fixed is None else
                          f"{opts.latency}: {fixed:.4f} s per inference x rate {opts.rate:g}"),
        "model_load_and_warmup_s": round(load_s, 3),
        "inferences": int(emu.counters.get("inferences", 0)),
        "inference_wall_s_total": round(float(lat.sum()), 3) if lat.size else 0.0,
        "device": str(getattr(policy, "device", "?")),
        "counters": dict(emu.counters),
    }
