"""The chunk controller: the one copy of the policy node's control logic (ROS-free, clock injected).

Driven by the ROS node (:mod:`mode_ros.ros.policy_node`: wall or sim clock, an inference thread), by
offline bag replay and by ``mode-ros sim eval`` (:class:`~mode_ros.control.virtual.VirtualTime`: bag or
sim time, inference results landing after a modelled latency). It owns:

* the inputs: stamps admitted or refused (zero stamp -> receive time, future stamps), camera frames per
  camera (:class:`~mode_ros.control.sync.StampBuffer`), the state, the goal (validated; a goal the
  policy cannot embed is refused), enable/active flags, clock jumps back (a simulator reset: every
  buffered input, the plan and a running inference are dropped);
* the tick grid: a late timer callback stands for its grid point, missed points are counted, two
  callbacks for one point are merged;
* the freshness gate (:func:`~mode_ros.control.safety.output_gate`), serving (late serving of an
  unserved tick, lockstep inference), plan adoption through the execution strategy
  (:mod:`mode_ros.control.strategy`) and the safety step (:class:`~mode_ros.control.safety.ActionSafety`);
* inference requests: :meth:`ChunkController.prepare` gives the observation (synchronised camera set,
  state, goal, seed, prefix for real-time chunking; with ``predict_state`` the state rolled forward by the
  policy's state model over the rows that run before the chunk lands, whose row 0 is then that tick),
  :meth:`ChunkController.finish` adopts its result.

Every public method takes the controller's lock, so a node may call it from its timer and its
inference thread. Times: the clock gives int nanoseconds; stamps travel as int ns; seconds are
computed as ``sec + nanosec * 1e-9`` (as a ROS node does), so live and offline runs agree to the bit.
Logging goes through an injected ``log(level, key, message)`` (``key`` groups rate-limited messages;
None = always), counters through :class:`~mode_ros.control.stats.Counters`.
"""
from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from mode_ros.control.execution import Plan, Step, observation_seed, tick_window
from mode_ros.control.safety import ActionSafety, NonFiniteActionError, output_gate
from mode_ros.control.stats import Counters, WindowStats
from mode_ros.control.strategy import ExecutionStrategy, make_strategy, rows_before
from mode_ros.control.sync import StampBuffer, has_observation_in, match_stamps

__all__ = ["ChunkController", "ControlParams", "Output", "TickResult", "Request", "sec_of", "NS"]

NS = 1_000_000_000


def sec_of(t_ns: int) -> float:
    """Seconds of an int-ns time exactly as a ROS node computes them from a stamp (sec + nanosec*1e-9)."""
    return int(t_ns // NS) + int(t_ns % NS) * 1e-9


class ControlParams(Protocol):
    """The parameters the controller reads (``mode_ros.ros.params.NodeParams`` has them all); read at use,
    so live parameter changes apply at once."""
    control_rate_hz: float
    replan_every: int
    latency_compensation: bool
    temporal_ensembling: bool
    ensembling_decay: float
    execution_strategy: str
    rtc_hold_rows: int
    rtc_decay: str
    predict_state: str
    serve_late_ticks: bool
    lockstep_inference: bool
    max_observation_age: float
    camera_sync_tolerance: float
    sync_queue_size: int
    action_lower_bounds: list
    action_upper_bounds: list
    max_action_delta: list
    seed: int
    start_enabled: bool
    max_goal_length: int
    stats_window: int


@dataclass
class Output:
    """One tick's chunk after the safety step: ``actions[0]`` is for the tick at ``tick_ns``."""
    actions: np.ndarray        # [n, A] float32
    first_index: int           # control periods from the plan's observation stamp to the tick (the row + lead)
    plan: Plan                 # sequence, goal, latency, stamp (int ns of the observation)
    tick_ns: int
    tick: int                  # 1, 2, ... per published tick
    late: bool = False         # served after its tick (serve_late_ticks / lockstep_inference)


@dataclass
class TickResult:
    output: Output | None
    key: str = "published"     # why nothing was published (suppressed.<key>) or "published"
    message: str = ""
    request: bool = False      # the shell must start an inference now (prepare -> predict -> finish)


@dataclass
class Request:
    """What one inference needs: the inputs of one observation, the seed and (RTC) the prefix."""
    images: list               # camera payloads in camera order (whatever the shell buffered)
    state: np.ndarray | None
    goal: str
    stamp_ns: int              # the observation's stamp (the chunk header)
    obs_time: float            # seconds: row 0's slot (lockstep: the tick)
    generation: int
    seed: int | None
    prefix: Any = None         # mode_ros.model.inpainting.ChunkPrefix | None
    requested_at: float = 0.0
    lead: int = 0              # predict_state: periods from the observation's stamp to row 0

    def call(self, predict: Callable) -> np.ndarray:
        """``predict(images, goal, state=, seed=[, prefix=])`` (the MoDEPolicy.predict_chunk signature)."""
        if self.prefix is None:
            return predict(self.images, self.goal, state=self.state, seed=self.seed)
        return predict(self.images, self.goal, state=self.state, seed=self.seed, prefix=self.prefix)


def _no_log(level: str, key: str | None, message: str) -> None:
    pass


class ChunkController:
    """See the module docstring. ``goal_check(text)`` returns why a goal cannot be used, or None."""

    def __init__(self, p: ControlParams, camera_names, state_dim: int, chunk_size: int, action_dim: int,
                 clock: Callable[[], int], log: Callable[[str, str | None, str], None] | None = None,
                 goal_check: Callable[[str], str | None] | None = None, initial_latency: float = 0.0,
                 lock=None, counters: Counters | None = None, state_model=None):
        self.p = p
        # predict_state: the policy's StateModel (mode_ros.model.state_model), or None
        self.state_model = state_model
        self.clock = clock
        self.log = log or _no_log
        self.goal_check = goal_check
        self.lock = lock if lock is not None else threading.RLock()   # the node shares its own
        self.camera_names = list(camera_names)
        self.state_dim, self.chunk_size, self.action_dim = int(state_dim), int(chunk_size), int(action_dim)
        self.period = 1.0 / p.control_rate_hz
        self.period_ns = int(round(self.period * 1e9))
        self.strategy: ExecutionStrategy = make_strategy(
            self.strategy_name(p), p.replan_every, p.latency_compensation, p.ensembling_decay,
            p.rtc_hold_rows, p.rtc_decay)
        self.executor = self.strategy.executor(self.chunk_size, self.action_dim, self.period)
        self.safety = ActionSafety(self.action_dim, p.action_lower_bounds, p.action_upper_bounds, p.max_action_delta)
        self.buffers = {c: StampBuffer(p.sync_queue_size) for c in self.camera_names}
        self.counters = counters if counters is not None else Counters()
        self.latency = WindowStats(p.stats_window)   # modelled latency (wall on the node), seconds
        self.expected_latency = float(initial_latency)
        self.state: tuple[float, np.ndarray, float] | None = None   # (stamp s, vector, receive time s)
        self.state_prev_stamp: float | None = None
        self.state_history: deque[tuple[float, np.ndarray]] = deque()   # (stamp s, vector) of the last 2 periods
        self.last_lead = 0                              # predict_state: periods from the last request's observation to row 0
        self.goal, self.goal_generation = "", 0
        self.enabled, self.active = bool(p.start_enabled), True
        self.reason, self.last_failure = "", ""
        self.sequence = self.tick_count = 0
        self.last_tick_ns = -1
        self.inflight = False
        self.unserved: tuple[int, bool] | None = None   # (tick ns, stepped) of the last tick, not served yet
        self.sync_tick: int | None = None               # lockstep: the tick whose own observation is needed
        self.sync_retry = False
        self._clock_high: float | None = None
        self._zero_stamp_warned: set[str] = set()
        if getattr(p, "goal", ""):
            self.set_goal(p.goal, source="parameter goal")

    @staticmethod
    def strategy_name(p) -> str:
        """``execution_strategy``; ``temporal_ensembling: true`` with the default ``replan`` is ``ensemble``."""
        name = getattr(p, "execution_strategy", "replan")
        return "ensemble" if name == "replan" and p.temporal_ensembling else name

    # ---- small helpers ------------------------------------------------------------------------------
    def now(self) -> float:
        return sec_of(self.clock())

    @property
    def serve_late(self) -> bool:
        return self.p.serve_late_ticks or self.p.lockstep_inference

    @property
    def estimated_d(self) -> int | None:
        """RTC: rows fixed in the last request (None before one); else the expected latency in ticks."""
        d = getattr(self.strategy, "last_d", None)
        if d is not None:
            return d
        return int(np.ceil(self.expected_latency / self.period - 1e-6)) if self.expected_latency > 0 else 0

    def _reject(self, kind: str, message: str) -> None:
        self.counters.inc(f"rejected.{kind}")
        self.log("warning", f"rejected.{kind}:" + re.sub(r"[\d.]+", "#", message)[:80], message)

    def _suppress(self, key: str, message: str, level: str = "warning") -> TickResult:
        self.counters.inc(f"suppressed.{key}")
        self.reason = message
        self.log(level, f"suppressed.{key}", f"not publishing: {message}")
        return TickResult(None, key, message)

    # ---- clock ----------------------------------------------------------------------------------------
    def _check_clock(self, now: float) -> None:
        """The clock went back by more than a period (simulator reset, bag played again): every buffered
        input, the state, the plan and a running inference (its result would answer the old timeline)
        are dropped."""
        high = self._clock_high
        self._clock_high = now if high is None else max(high, now)
        if high is None or high - now <= self.period:
            return
        self._clock_high = now
        for b in self.buffers.values():
            b.clear()
        self.state = self.state_prev_stamp = None
        self.state_history.clear()
        self.executor.reset()
        self.unserved = None
        self.goal_generation += 1
        self.counters.inc("clock_jumps_back")
        self.log("warning", None, f"clock jumped back {high - now:.3f} s (to {now:.3f} s): buffered images, "
                                  "state and plan dropped")

    def _admit(self, key: str, stamp_ns: int) -> tuple[float, int, float] | None:
        """(stamp s, stamp ns, receive time s) of an input; a zero stamp becomes the receive time (logged
        once), a stamp further ahead than max_observation_age is refused."""
        now_ns = self.clock()
        recv = sec_of(now_ns)
        self._check_clock(recv)
        if stamp_ns == 0:
            if key not in self._zero_stamp_warned:
                self._zero_stamp_warned.add(key)
                self.log("warning", None, f"{key}: header stamp is zero; using the receive time instead")
            return recv, now_ns, recv
        t = sec_of(stamp_ns)
        if t - recv > self.p.max_observation_age:
            self._reject(f"{key}.future_stamp", f"{key}: header stamp is {t - recv:.3f} s in the future "
                                                "(clock mismatch? use_sim_time?)")
            return None
        return t, int(stamp_ns), recv

    # ---- inputs ---------------------------------------------------------------------------------------
    def on_image(self, cam: str, stamp_ns: int, payload: Any) -> bool:
        """A camera frame (payload: whatever the shell passes to the policy later). True: start an
        inference now (an unserved tick can be served)."""
        with self.lock:
            st = self._admit(f"image_{cam}", stamp_ns)
            if st is None:
                return False
            dropped = self.buffers[cam].add(st[0], (st[1], payload), recv=st[2], now=st[2])
            if dropped:
                self.counters.inc(f"dropped_future_frames.{cam}", dropped)
                self.log("warning", f"future_{cam}", f"camera {cam}: {dropped} frame(s) stamped ahead of the clock "
                         "dropped once a frame stamped on time arrived (a stamp glitch would stay the newest)")
            return self._kick()

    def reject_input(self, kind: str, message: str, reason: str = "") -> None:
        """The shell refused an input (undecodable image, malformed JointState): counted (also per
        ``reason``, as ``rejected.<kind>:<reason>``) and logged."""
        with self.lock:
            if reason:
                self.counters.inc(f"rejected.{kind}:{reason}")
            self._reject(kind, message)

    def on_state(self, stamp_ns: int, vec) -> bool:
        """The state vector (already selected from the message). True: start an inference now."""
        with self.lock:
            st = self._admit("joint_states", stamp_ns)
            if st is None:
                return False
            vec = np.asarray(vec, dtype=np.float64).reshape(-1)
            if vec.shape != (self.state_dim,):
                self._reject("joint_states", f"joint_states rejected: state has {vec.size} values, the checkpoint "
                                             f"needs {self.state_dim}")
                return False
            with np.errstate(over="ignore"):
                vec32 = vec.astype(np.float32)
            if not np.isfinite(vec32).all():
                self._reject("joint_states", "joint_states rejected: contains NaN or Inf (or a value beyond float32)")
                return False
            if self.state is not None and st[0] < self.state[0]:
                self._reject("joint_states", f"joint_states rejected: stamp {st[0]:.3f} s is older than the newest "
                                             f"state ({self.state[0]:.3f} s): out of order")
                return False
            self.state_prev_stamp = None if self.state is None else self.state[0]
            self.state = (st[0], vec32, st[2])
            self.state_history.append((st[0], vec32))
            while self.state_history[0][0] < st[0] - 2 * self.period:   # predict_state needs one period back
                self.state_history.popleft()
            return self._kick()

    def goal_problem(self, clean: str) -> str:
        if not clean:
            return "empty goal"
        if len(clean) > self.p.max_goal_length:
            return f"goal of {len(clean)} characters exceeds max_goal_length {self.p.max_goal_length}"
        return (self.goal_check(clean) or "") if self.goal_check is not None else ""

    def set_goal(self, text: str, source: str = "goal") -> tuple[str, bool]:
        """A new goal -> (refusal reason or "", start an inference now). A refused goal stops the output
        (the previous goal is dropped: continuing the previous task is not what was asked)."""
        clean = " ".join(str(text).split())
        problem = self.goal_problem(clean) if clean != self.goal else ""
        with self.lock:
            if problem:
                self.goal = ""
                self.goal_generation += 1
                self.executor.reset()
                self.counters.inc("rejected.goal")
                self.last_failure = self.reason = f"goal refused: {problem}"
                self.log("error", None, f"{source}: goal {clean[:200]!r} refused: {problem}; output stopped until a "
                                        "valid goal arrives")
                return problem, False
            if clean == self.goal:
                return "", False
            self.goal = clean
            self.goal_generation += 1
            self.executor.reset()   # the old plan is discarded; the next chunk answers the new goal
            if self.last_failure.startswith("goal refused"):
                self.last_failure = ""
            self.log("info", None, f"new goal from {source}: {clean[:200]!r}")
            return "", self._kick()

    def set_enabled(self, flag: bool) -> bool:
        """~/enable. Disabling drops the plan and the rate limiter's memory. True: start an inference now."""
        with self.lock:
            self.enabled = bool(flag)
            if not self.enabled:
                self.executor.reset()
                self.safety.reset()
                return False
            return self._kick()

    def set_active(self, flag: bool) -> None:
        """Lifecycle activate (plan and rate limiter start afresh) / deactivate (plan dropped)."""
        with self.lock:
            self.active = bool(flag)
            self.executor.reset()
            if self.active:
                self.safety.reset()

    # ---- the tick ------------------------------------------------------------------------------------
    def gate(self, now: float, as_received_by_now: bool = True) -> tuple[str, str] | None:
        """Why nothing may be published at ``now`` (key, message), or None; inputs count as received by
        ``now`` unless ``as_received_by_now`` is False (serving a past tick from inputs that came after)."""
        state_stamp = None if self.state is None else self.state[0]
        if as_received_by_now and self.state is not None and self.state[2] > now:
            state_stamp = self.state_prev_stamp
        rb = now if as_received_by_now else None
        return output_gate(self.enabled, self.goal, {c: b.latest_stamp(received_by=rb) for c, b in self.buffers.items()},
                           state_stamp, self.state_dim > 0, now, self.p.max_observation_age)

    def _grid_point(self, now_ns: int, scheduled_ns: int | None) -> int:
        """A timer callback that ran late stands for the newest grid point not after now."""
        if scheduled_ns is None or scheduled_ns <= 0 or now_ns <= scheduled_ns:
            return now_ns
        missed = (now_ns - scheduled_ns) // self.period_ns
        if missed and self.last_tick_ns >= 0:
            self.counters.inc("missed_ticks", int(missed))
        return scheduled_ns + missed * self.period_ns

    def tick(self, scheduled_ns: int | None = None) -> TickResult:
        """One control tick at the clock's now (``scheduled_ns``: the timer's scheduled call time)."""
        with self.lock:
            now_ns = self.clock()
            self._check_clock(sec_of(now_ns))
            tick_ns = self._grid_point(now_ns, scheduled_ns)
            if tick_ns == self.last_tick_ns:   # a late callback after the next one was due: handled already
                self.counters.inc("late_ticks_merged")
                return TickResult(None, "merged", "late tick merged")
            self.last_tick_ns, self.unserved = tick_ns, None
            if not self.active:
                return TickResult(None, "inactive", "inactive")
            return self._tick(tick_ns, sec_of(tick_ns))

    def _tick(self, tick_ns: int, now: float) -> TickResult:
        gate = self.gate(now)
        if gate is not None:
            # the plan is dropped; the rate limiter keeps the last action the robot received
            self.executor.reset()
            if self.serve_late and (gate[0] != "disabled" or self.p.lockstep_inference):
                self.unserved = (tick_ns, False)   # (lockstep: ~/enable true serves it)
            return self._suppress(*gate, level="info" if gate[0] in ("disabled", "no_goal") else "warning")
        if self.p.lockstep_inference and self.executor.chunk_due(now):
            # this tick waits for a chunk computed from its own observation, then is served from row 0
            self.unserved, self.sync_tick = (tick_ns, False), tick_ns
            if self.inflight or not self._tick_observation_ready(now):
                return self._suppress("lockstep_wait", "waiting for the observation of this tick "
                                                       "(lockstep_inference)", level="info")
            self.inflight = True
            return TickResult(None, "lockstep_inference", "inference on this tick's observation", request=True)
        request = False
        if not self.p.lockstep_inference and not self.inflight and \
                self.executor.needs_replan(now, self.expected_latency):
            self.inflight = request = True
        step = self.executor.step(now)
        if step is None:
            why = self.last_failure or "waiting for the first chunk"
            res = self._suppress("no_plan", f"no plan for this tick ({why})",
                                 level="warning" if self.last_failure else "info")
            if self.serve_late:
                self.unserved = (tick_ns, True)
            res.request = request
            return res
        out = self._output(step, tick_ns)
        if out is None:
            return TickResult(None, "unsafe", self.reason, request=request)
        return TickResult(out, request=request)

    def _output(self, step: Step, tick_ns: int, late: bool = False) -> Output | None:
        """Safety step, then the tick's output (None: unsafe actions dropped, plan discarded)."""
        try:
            actions = self.safety.apply(step.actions)
        except (NonFiniteActionError, ValueError) as exc:
            self.executor.reset()
            self._suppress("unsafe", f"unsafe actions dropped: {exc}", level="error")
            return None
        self.tick_count += 1
        self.counters.inc("published")
        if late:
            self.counters.inc("late_served")
        self.reason = "publishing"
        return Output(actions, int(step.first_index), step.plan, int(tick_ns), self.tick_count, late)

    def _tick_observation_ready(self, t: float) -> bool:
        """lockstep: every input has a message of the tick at ``t`` (stamped within half a period)."""
        st = self.state
        return has_observation_in(self.buffers, None if st is None else st[0], self.state_dim > 0,
                                  *tick_window(t, self.period))

    # ---- late serving -----------------------------------------------------------------------------------
    def _kick(self) -> bool:
        """An input arrived: if the last tick went unserved for want of it and could be served now,
        claim the inference (True: the shell starts it)."""
        if self.unserved is None or self.inflight or not self.active:
            return False
        t = sec_of(self.unserved[0])
        if self.gate(t, as_received_by_now=False) is not None:
            return False
        if self.p.lockstep_inference:
            if not self._tick_observation_ready(t):
                return False
            self.sync_tick = self.unserved[0]
        self.inflight = True
        return True

    def _serve_unserved(self) -> Output | None:
        """A plan was adopted: the last tick, if it went unserved and the next one is not due yet, is
        served now (stamped and stepped for that tick). Lockstep: only from its own observation."""
        u = self.unserved
        if u is None or not self.active:
            return None
        tick_ns, stepped = u
        if self.clock() - tick_ns >= self.period_ns:
            self.unserved = None          # the next tick is due: it serves itself
            return None
        t = sec_of(tick_ns)
        if self.gate(t, as_received_by_now=False) is not None:
            return None
        newest = self.executor.newest
        if self.p.lockstep_inference:
            lo, hi = tick_window(t, self.period)
            if newest is None or newest.obs_time > hi:
                return None
            if newest.obs_time <= lo and not stepped:
                self.sync_retry = True    # the waiting tick asks for its own observation
                return None
        elif newest is None or newest.obs_time > t + 1e-6:
            return None                   # a plan from an observation after the tick serves the next one
        step = self.executor.restep(t) if stepped else self.executor.step(t)
        self.unserved = (tick_ns, True) if step is None else None
        return None if step is None else self._output(step, tick_ns, late=True)

    # ---- inference ----------------------------------------------------------------------------------
    def _snapshots(self, at_ns: int | None) -> dict:
        snaps = {c: b.snapshot() for c, b in self.buffers.items()}
        if at_ns is not None:   # frames stamped after the tick's window are not its observation
            hi = tick_window(sec_of(at_ns), self.period)[1]
            snaps = {c: [e for e in v if e[0] <= hi] for c, v in snaps.items()}
        return snaps

    def _camera_set(self, now: float, snaps: dict):
        """(images, stamp s, stamp ns) of the newest synchronised camera set, or the reason for none."""
        idx = match_stamps({c: [s for s, _ in v] for c, v in snaps.items()}, self.p.camera_sync_tolerance)
        if idx is None:
            latest = ", ".join(f"{c}@{v[-1][0]:.3f}" if v else f"{c}: none" for c, v in snaps.items())
            self.counters.inc("rejected.unsynchronised")
            return (f"no set of camera images within camera_sync_tolerance {self.p.camera_sync_tolerance:g} s "
                    f"(latest: {latest})")
        ref = next(iter(snaps))
        oldest = min(snaps[c][idx[c]][0] for c in snaps)
        if now - oldest > self.p.max_observation_age:
            return f"newest synchronised observation is {now - oldest:.3f} s old (stale)"
        return [snaps[c][idx[c]][1][1] for c in snaps], snaps[ref][idx[ref]][0], snaps[ref][idx[ref]][1][0]

    def _observation(self, now: float, at_ns: int | None) -> Request | str:
        if not self.goal:
            return "no goal"
        if at_ns is not None and not self._tick_observation_ready(sec_of(at_ns)):
            return f"waiting for the observation of the tick at {sec_of(at_ns):.3f} s (lockstep_inference)"
        snaps = self._snapshots(at_ns)
        if snaps:
            cams = self._camera_set(now, snaps)
            if isinstance(cams, str):
                return cams
            images, stamp, stamp_ns = cams
        else:   # no cameras: the observation time is now (lockstep: the tick's)
            stamp_ns = self.clock() if at_ns is None else int(at_ns)
            images, stamp = [], sec_of(stamp_ns)
        state = None
        if self.state_dim > 0:
            if self.state is None:
                return "no joint_states yet"
            state = self.state[1]
        obs_time = stamp if at_ns is None else sec_of(at_ns)   # lockstep: rows count from the tick
        return Request(images, state, self.goal, int(stamp_ns), obs_time, self.goal_generation,
                       observation_seed(self.p.seed, int(stamp_ns)), requested_at=now)

    def prepare(self) -> Request | str:
        """The inference the shell was told to start: its request, or why there is none (the claim on
        the inference is released then)."""
        with self.lock:
            now = self.now()
            at = self.sync_tick if self.p.lockstep_inference else None
            req = self._observation(now, at)
            self.sync_retry = at is not None and isinstance(req, str) and req.startswith("waiting")
            if isinstance(req, str):
                self.inflight = False
                if self.sync_retry:
                    self.counters.inc("lockstep_observation_waits")
                else:
                    self.last_failure = req
                    self.log("warning", "observation", f"no inference: {req}")
                return req
            if not self.p.lockstep_inference:
                self._predict_state(req, now + self.expected_latency)
            req.prefix = self.strategy.prefix(self.executor, req.obs_time, now + self.expected_latency)
            return req

    def predict_state_status(self) -> str:
        """``predict_state`` as /diagnostics shows it: on, or off and why."""
        mode = self.p.predict_state
        if mode == "never":
            return "off (predict_state never)"
        if self.state_model is None:
            return "off (the checkpoint has no state model)" if self.state_dim else "off (the policy takes no state)"
        if mode == "auto" and self.camera_names:
            return "off (auto: a camera policy's images cannot be rolled forward with its state)"
        return "off (lockstep_inference)" if self.p.lockstep_inference else "on"

    def _predict_state(self, req: Request, land: float) -> None:
        """predict_state: the request's state rolled forward over the rows of the current plan that run
        from the state's stamp until its chunk lands at ``land`` (a state fresher than the camera images
        is rolled over fewer rows); the chunk's row 0 is then the slot it lands in (``req.lead`` periods
        after the observation). Without a plan, or a state one period before the newest, the state is
        used as observed."""
        self.last_lead = 0
        if self.predict_state_status() != "on" or req.state is None:
            return
        plan = self.executor.newest
        d = rows_before(req.obs_time, land, self.period)
        if plan is None or d == 0:
            return
        t_state = self.state[0]
        prev = self.state_before(t_state)
        if prev is None:
            self.counters.inc("state_prediction_skipped")
            self.log("warning", "predict_state", "predict_state: no state one control period before the newest; "
                                                 "the chunk is planned from the state as observed")
            return
        off = self.executor.slot_index(plan, t_state)
        rows = plan.actions[off:off + rows_before(t_state, land, self.period)]
        if len(rows):
            rows = self.safety.apply(rows, commit=False)   # what the robot will be sent
        req.state = self.state_model.predict(req.state, prev, rows)
        req.obs_time += d * self.period
        req.lead = self.last_lead = d

    def state_before(self, stamp: float) -> np.ndarray | None:
        """The state stamped one control period before ``stamp`` (within half a period), or None."""
        best = min(self.state_history, key=lambda e: abs(stamp - self.period - e[0]), default=None)
        if best is None or abs(stamp - self.period - best[0]) > 0.5 * self.period:
            return None
        return best[1]

    def finish(self, req: Request, actions=None, latency: float = 0.0, error: str = "",
               wall: float | None = None) -> Output | None:
        """The inference for ``req`` ended (``actions``, or ``error``: why it failed). ``latency``: the
        seconds it counts for (wall time on the node, the modelled latency offline; ``wall`` the time it
        really took, reported in the chunk). Returns the unserved tick's output when the plan serves it."""
        with self.lock:
            self.inflight = False
            if error:
                return self._failed(error)
            self.latency.add(latency)
            self.counters.inc("inferences")
            actions = np.asarray(actions, dtype=np.float32)
            if actions.shape != (self.chunk_size, self.action_dim) or not np.isfinite(actions).all():
                return self._failed(f"inference produced an invalid chunk (shape {actions.shape}, "
                                    f"{int((~np.isfinite(actions)).sum())} non-finite values): dropped")
            lat = self.latency.values()
            self.expected_latency = float(np.percentile(lat, 90)) if lat.size >= 5 else float(lat.max())
            if req.generation != self.goal_generation or not self.active:
                self.counters.inc("dropped_results")   # goal changed (or clock jumped, deactivated) meanwhile
                self.sync_retry = self.p.lockstep_inference
                return None
            self.sequence += 1
            plan = Plan(actions=actions, obs_time=req.obs_time, ready_time=req.requested_at + latency,
                        sequence=self.sequence, goal=req.goal, latency=latency if wall is None else wall,
                        stamp=req.stamp_ns, lead=req.lead)
            self.executor.add(plan, self.now())
            self.last_failure = ""
            return self._serve_unserved() if self.serve_late else None

    def _failed(self, message: str) -> None:
        self.last_failure = message
        self.counters.inc("inference_failures")
        self.log("error", "inference", message)
        return None

    def retry_due(self) -> bool:
        """After an inference ended (lockstep): claim another one if the waiting tick can be served now."""
        with self.lock:
            return self.sync_retry and self._kick()

    def infer(self, predict: Callable, timer: Callable[[], float],
              emit: Callable[[Output], None] | None = None) -> Output | None:
        """prepare -> ``req.call(predict)`` (outside the lock) -> finish, timed with ``timer`` (seconds).
        A ValueError of the policy (a goal it cannot embed, a bad image or state) is a refused inference.
        ``emit`` publishes the late-served output under the lock (chunks leave in tick order)."""
        req = self.prepare()
        if isinstance(req, str):
            return None
        t0 = timer()
        error, actions = "", None
        try:
            actions = req.call(predict)
        except ValueError as exc:
            error = f"inference refused: {exc}"
        except Exception as exc:  # noqa: BLE001 - the caller's thread must survive anything
            error = f"inference failed: {type(exc).__name__}: {exc}"
        latency = timer() - t0
        with self.lock:
            out = self.finish(req, actions, latency, error)
            if out is not None and emit is not None:
                emit(out)
        return out

    def no_plan_reason(self) -> tuple[str, str]:
        """Why a tick whose gate passed may publish nothing (live replay's account of the node's ticks)."""
        with self.lock:
            snaps = self._snapshots(None)
            if snaps and match_stamps({c: [s for s, _ in v] for c, v in snaps.items()},
                                      self.p.camera_sync_tolerance) is None:
                return "no_plan", "no plan for this tick (cameras not synchronised within camera_sync_tolerance)"
            return "no_plan", "no plan for this tick (waiting for an inference, or the tick was missed)"

    # ---- diagnostics ----------------------------------------------------------------------------------
    def diagnostics(self) -> dict:
        """Values for /diagnostics (the node adds lifecycle, device, rates)."""
        with self.lock:
            c = self.counters.snapshot()
            lat = self.latency
            d = self.estimated_d
            values = {
                "enabled": self.enabled, "goal": self.goal,
                "execution_strategy": self.strategy.name,
                "estimated_d": "" if d is None else d,
                "predict_state": self.predict_state_status(), "predicted_ticks": self.last_lead,
                "state_prediction_skipped": c.get("state_prediction_skipped", 0),
                "expected_latency_ms": round(self.expected_latency * 1e3, 2),
                "inference_latency_median_ms": round(lat.median() * 1e3, 2) if len(lat) else "",
                "inference_latency_p99_ms": round(lat.percentile(99) * 1e3, 2) if len(lat) else "",
                "inferences": c.get("inferences", 0), "inference_failures": c.get("inference_failures", 0),
                "ticks_published": c.get("published", 0), "late_served": c.get("late_served", 0),
                "late_ticks_merged": c.get("late_ticks_merged", 0), "missed_ticks": c.get("missed_ticks", 0),
                "ticks_suppressed": sum(v for k, v in c.items() if k.startswith("suppressed.")),
                "stale": c.get("suppressed.stale", 0), "dropped_results": c.get("dropped_results", 0),
                "lockstep_observation_waits": c.get("lockstep_observation_waits", 0),
                "goals_refused": c.get("rejected.goal", 0),
                "images_received": sum(b.received for b in self.buffers.values()),
                # per-reason counters (rejected.<kind>:<reason>) refine rejected.<kind>: counted once
                "rejected": sum(v for k, v in c.items() if k.startswith("rejected.") and ":" not in k),
                "reason": self.reason, "last_failure": self.last_failure,
            }
            values.update({k: v for k, v in c.items() if k.startswith(("rejected.", "suppressed."))})
            return values
