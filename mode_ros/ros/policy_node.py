"""The MoDE policy node: cameras + language goal in, ``mode_ros/ActionChunk`` out at the control rate.

A thin shell over ``MoDEPolicy`` (docs/CONTRACTS.md): messages are converted to arrays
(``mode_ros.data.images``), the policy computes chunks in its own thread, and the pure logic lives in
ROS-free modules shared with replay: ``execution`` (which row to publish at each tick, latency
skipping, re-planning, temporal ensembling), ``safety`` (finite check, bounds, rate limit), ``sync``
(multi-camera stamp matching), ``stats`` (latency/rate statistics, rate-limited logs), ``params``
(the parameter table).

Lifecycle (rclpy.lifecycle): configure = read/validate parameters, load the checkpoint, warm up,
create subscriptions/publishers and the inference thread; activate = start the control timer;
deactivate = stop publishing; cleanup = release everything. With ``autostart`` (default) the node
configures and activates itself. Topics (relative to the node): ``~/image_<camera>`` (or
``~/image_<camera>/compressed``), ``~/goal``, ``~/joint_states`` (only for checkpoints with a state),
``~/action_chunk``, ``~/joint_trajectory`` (optional), ``/diagnostics``; service ``~/enable``.
"""
from __future__ import annotations

import array
import math
import re
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
import rclpy.time
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from mode_ros.msg import ActionChunk
from mode_ros.ros.execution import ChunkExecutor, Plan, observation_seed, tick_window
from mode_ros.ros.params import NODE_NAME, PARAMS, NodeParams, ParameterError, state_selection, validate
from mode_ros.ros.safety import ActionSafety, NonFiniteActionError, output_gate
from mode_ros.ros.stats import Counters, RateLimitedLog, RateMeter, WindowStats
from mode_ros.ros.sync import StampBuffer, has_observation_in, match_stamps

_ROS_TYPES = {
    "bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
    "double": ParameterType.PARAMETER_DOUBLE, "string": ParameterType.PARAMETER_STRING,
    "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
    "string_array": ParameterType.PARAMETER_STRING_ARRAY,
}

GOAL_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
OUTPUT_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)


def descriptor(spec) -> ParameterDescriptor:
    """ParameterDescriptor (type, description, range, constraints) of one entry of the table."""
    d = ParameterDescriptor(name=spec.name, type=_ROS_TYPES[spec.type], description=spec.description)
    extra = []
    if spec.choices:
        extra.append("one of: " + ", ".join(spec.choices))
    if spec.pattern:
        extra.append("pattern: " + spec.pattern)
    extra.append("applies at once" if spec.live else "read on configure")
    d.additional_constraints = "; ".join(extra)
    if spec.type == "int" and spec.min is not None:
        d.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max), step=0)]
    elif spec.type == "double" and spec.min is not None:
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.min), to_value=float(spec.max),
                                                     step=0.0)]
    return d


def stamp_to_sec(t) -> float:
    return t.sec + t.nanosec * 1e-9


def sec_to_duration(s: float) -> Duration:
    ns = max(0, int(round(s * 1e9)))
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _with_timer_info(fn):
    """Wrap a timer callback ``fn(info)`` so that rclpy hands it the ``TimerInfo`` (scheduled and actual
    call time): rclpy passes it only to a parameter annotated with the class itself, and with
    ``from __future__ import annotations`` an annotation is a string. Without TimerInfo (older rclpy)
    ``fn()`` is called and the tick is the clock's now."""
    try:
        from rclpy.timer import TimerInfo
    except ImportError:
        return fn

    def cb(info):
        return fn(info)
    cb.__annotations__ = {"info": TimerInfo}
    return cb

class _StdLogger:
    """logging-style .warning() / .info() for the policy's fallbacks and choices, routed to the rclpy
    logger (enable_fast logs a skipped torch.compile with .info: without it, the AttributeError was
    taken for a failure of the fused sampler and gpu_kernels triton fell back to the eager sampler)."""

    def __init__(self, logger):
        self._l = logger

    def warning(self, msg, *args):
        self._l.warning(msg % args if args else msg)

    def info(self, msg, *args):
        self._l.info(msg % args if args else msg)


class _Observation:
    __slots__ = ("images", "stamp", "stamp_sec", "state", "goal", "generation")


class PolicyNode(LifecycleNode):
    """See the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        self.lock = threading.RLock()  # executor, goal, enabled, plan state
        self._tick_timer = None
        self._infer_thread: threading.Thread | None = None
        self._entities: list[Any] = []
        self._chunk_pub = self._traj_pub = None
        self.executor_: ChunkExecutor | None = None
        super().__init__(node_name, **kwargs)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.p = self._read_params()
        self._log = RateLimitedLog(self.p.log_throttle_period)
        self.counters = Counters()
        self.latency = WindowStats(self.p.stats_window)
        self.rate = RateMeter(self.p.stats_window)

        self.policy = None
        self.safety: ActionSafety | None = None
        self.enabled = bool(self.p.start_enabled)
        self.goal = ""
        self.goal_generation = 0
        self.active = False
        self.buffers: dict[str, StampBuffer] = {}
        self.state: tuple[float, np.ndarray, float] | None = None   # (stamp, vector, receive time)
        self._state_prev_stamp: float | None = None   # stamp of the state before it (_gate at a past tick)
        self.reason = "unconfigured"
        self.last_failure = ""
        self.sequence = 0
        self.tick_count = 0
        self._last_tick_ns = -1
        self._expected_latency = 0.0
        self._zero_stamp_warned: set[str] = set()
        self._clock_high: float | None = None   # the latest node clock reading seen (see _check_clock)

        self._infer_stop = threading.Event()
        self._infer_request = threading.Event()
        self._inflight = False
        # the last tick, when it published nothing and may still be served (serve_late_ticks):
        # (its scheduled time, whether the executor already stepped it)
        self._unserved: tuple[Any, bool] | None = None
        # lockstep_inference: the tick (rclpy Time) whose own observation the next inference must use
        self._sync_tick = None
        self._sync_retry = False   # the last inference must be retried (observation incomplete, goal changed)

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self.p.diagnostics_period, self._publish_diagnostics)
        self.create_service(SetBool, "~/enable", self._on_enable)
        if hasattr(self, "add_post_set_parameters_callback"):
            self.add_post_set_parameters_callback(self._apply_live_parameters)
        if self.p.goal:
            self._set_goal(self.p.goal, source="parameter goal")
        if self.p.autostart:
            self._autostart_timer = self.create_timer(0.0, self._autostart)

    # ---- parameters ---------------------------------------------------------------------------------
    def _read_params(self) -> NodeParams:
        return NodeParams.from_mapping({s.name: self.get_parameter(s.name).value for s in PARAMS})

    def _validate_parameters(self, params) -> SetParametersResult:
        for prm in params:
            if prm.name not in {s.name for s in PARAMS}:
                continue  # use_sim_time etc.
            try:
                validate(prm.name, prm.value)
            except ParameterError as exc:
                self.get_logger().error(f"refused parameter: {exc}")
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_live_parameters(self, params) -> None:
        for prm in params:
            spec = next((s for s in PARAMS if s.name == prm.name), None)
            if spec is None or not spec.live:
                continue
            value = validate(prm.name, prm.value)
            setattr(self.p, prm.name, value)
            if prm.name == "log_throttle_period":
                self._log.period = value
            elif prm.name == "goal":
                self._set_goal(value, source="parameter goal")

    # ---- logging helpers ------------------------------------------------------------------------------
    def _emit(self, level: str, message: str) -> None:
        # one call site per severity: rclpy refuses a call site whose severity changes between calls
        lg = self.get_logger()
        if level == "error":
            lg.error(message)
        elif level == "warning":
            lg.warning(message)
        else:
            lg.info(message)

    def _ratelimited(self, key: str, level: str, message: str) -> None:
        self._log(key, lambda m: self._emit(level, m), message)

    def _reject(self, kind: str, message: str) -> None:
        """An input was rejected: count it per kind and log it, rate-limited per kind of input and
        reason (numbers ignored), so a flood of one bad input cannot hide a different problem."""
        self.counters.inc(f"rejected.{kind}")
        key = f"rejected.{kind}:" + re.sub(r"[\d.]+", "#", message)[:80]
        self._ratelimited(key, "warning", message)

    def _suppress(self, key: str, message: str, level: str = "warning") -> None:
        """A tick published nothing: count it, remember why, log (rate-limited per reason)."""
        self.counters.inc(f"suppressed.{key}")
        self.reason = message
        self._ratelimited(f"suppressed.{key}", level, f"not publishing: {message}")

    # ---- lifecycle ------------------------------------------------------------------------------------
    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        t0 = time.perf_counter()
        try:
            self._configure()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the node unconfigured, with the reason
            self.get_logger().error(f"configure failed: {exc}")
            self.reason = f"configure failed: {exc}"
            self._release()
            return TransitionCallbackReturn.FAILURE
        self.reason = "configured"
        self.get_logger().info(f"configured in {time.perf_counter() - t0:.1f} s: cameras "
                               f"{self.policy.camera_names}, chunk {self.policy.chunk_size}x"
                               f"{self.policy.action_dim}, state_dim {self.policy.state_dim}, "
                               f"{self.p.control_rate_hz:g} Hz, replan every {self.executor_.replan_every}")
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        self.p = self._read_params()
        self._log.period = self.p.log_throttle_period
        if not self.p.checkpoint:
            raise ParameterError("checkpoint: not set (the checkpoint folder to load)")
        import torch

        from mode_ros.model.policy import MoDEPolicy

        if self.p.torch_threads > 0:
            torch.set_num_threads(self.p.torch_threads)
        dtype = None if self.p.dtype == "auto" else self.p.dtype
        policy = MoDEPolicy.from_pretrained(self.p.checkpoint, device=self.p.device, dtype=dtype)
        self.p.check_against_policy(policy.chunk_size, policy.action_dim, policy.state_dim)
        self.policy = policy
        mode = self.p.fast_inference
        if mode == "auto":
            mode = "compiled" if policy.device.type == "cuda" else "off"
        kernels = self.p.gpu_kernels
        if kernels == "auto" and policy.device.type != "cuda":
            kernels = "torch"
        if mode != "off" or self.p.weight_quant != "none" or kernels != "torch":
            base = {"fused": True, "compile": mode == "compiled", "graph": mode in ("compiled", "graph"),
                    "weight_quant": self.p.weight_quant}
            options = {"torch": {"attention": None, "gemm": "torch", "pdl": False},
                       "triton": {"attention": "triton", "gemm": "triton", "pdl": False},
                       "triton_pdl": {"attention": "triton", "gemm": "triton", "pdl": True}}
            if kernels == "auto":   # measure on this GPU, keep the fastest correct one
                names = list(options)
                sel = policy.select_fast([{**base, **options[n]} for n in names], logger=_StdLogger(self.get_logger()))
                active = sel["active"]
                self.get_logger().info(f"gpu_kernels auto: chosen {names[sel['chosen']] if sel['chosen'] is not None else 'none (fast paths off)'}")
            else:
                active = policy.enable_fast(logger=_StdLogger(self.get_logger()), **base, **options[kernels])
            self.get_logger().info(f"fast inference: {active}")
        if self.p.warmup:
            self._expected_latency = float(policy.warmup(runs=3))  # median of 3 calls
            try:  # build the text tower now, so that a new goal costs one encoding, not a model build
                policy.encode_goal(self.goal or "warm up")
            except ValueError as exc:
                self.get_logger().info(f"text encoder not available ({exc}): only the checkpoint's cached "
                                       f"goals can be used: {policy.known_goals}")
        period = 1.0 / self.p.control_rate_hz
        self.executor_ = ChunkExecutor(policy.chunk_size, policy.action_dim, period, self.p.replan_every,
                                       self.p.latency_compensation, self.p.temporal_ensembling,
                                       self.p.ensembling_decay)
        self.safety = ActionSafety(policy.action_dim, self.p.action_lower_bounds, self.p.action_upper_bounds,
                                   self.p.max_action_delta)
        names = [n for n in self.p.trajectory_joint_names if n]
        self.joint_names = names or (policy.action_names if len(policy.action_names) == policy.action_dim
                                     else [f"a{i}" for i in range(policy.action_dim)])
        self.action_names = policy.action_names if len(policy.action_names) == policy.action_dim else []
        self.state_names = state_selection(self.p.state_joint_names, policy.config.state_names,
                                           self.p.state_field, policy.state_dim)
        # names the checkpoint recorded (not the parameter): a JointState without them (a checkpoint
        # trained from an array topic, say) falls back to message order, as before names were recorded
        self._state_names_recorded = bool(self.state_names) and not [n for n in self.p.state_joint_names if n]
        if self._state_names_recorded:
            self.get_logger().info(f"state: joints {self.state_names} of ~/joint_states, as recorded in the "
                                   f"checkpoint (set state_joint_names to choose others)")
        self.latency = WindowStats(self.p.stats_window)
        self.rate = RateMeter(self.p.stats_window)

        # outputs (lifecycle publishers: they only publish while active)
        self._chunk_pub = self.create_lifecycle_publisher(ActionChunk, "~/action_chunk", OUTPUT_QOS)
        if self.p.publish_joint_trajectory:
            self._traj_pub = self.create_lifecycle_publisher(JointTrajectory, "~/joint_trajectory", OUTPUT_QOS)
        # inputs
        self.buffers = {c: StampBuffer(self.p.sync_queue_size) for c in policy.camera_names}
        for cam in policy.camera_names:
            if self.p.image_transport == "compressed":
                sub = self.create_subscription(CompressedImage, f"~/image_{cam}/compressed",
                                               lambda m, c=cam: self._on_compressed(c, m),
                                               qos_profile_sensor_data)
            else:
                sub = self.create_subscription(Image, f"~/image_{cam}", lambda m, c=cam: self._on_image(c, m),
                                               qos_profile_sensor_data)
            self._entities.append(sub)
        self._entities.append(self.create_subscription(String, "~/goal", self._on_goal, GOAL_QOS))
        if policy.state_dim > 0:
            self._entities.append(self.create_subscription(JointState, "~/joint_states", self._on_joint_state,
                                                           qos_profile_sensor_data))
        self._infer_stop.clear()
        self._inflight = False   # a request cut short by the last cleanup must not block this run
        self._sync_tick, self._sync_retry = None, False
        if self.p.lockstep_inference and not self.get_parameter("use_sim_time").value:
            self.get_logger().warning("lockstep_inference is on without use_sim_time: every tick that needs a "
                                      "new chunk publishes nothing until the inference lands (meant for a "
                                      "lockstep simulator)")
        self._infer_thread = threading.Thread(target=self._inference_loop, name="mode_ros_inference",
                                              daemon=True)
        self._infer_thread.start()

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self.lock:
            self.executor_.reset()
            self.safety.reset()
            self.active = True
        self.rate.reset()
        self._tick_timer = self.create_timer(1.0 / self.p.control_rate_hz, _with_timer_info(self._on_tick))
        self.reason = "active"
        self.get_logger().info("active: publishing ~/action_chunk" + ("" if self.enabled else
                                                                      " (disabled: call ~/enable)"))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_ticking()
        self.reason = "inactive"
        self.get_logger().info("inactive: output stopped")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_ticking()
        self._release()
        self.reason = "unconfigured"
        self.get_logger().info("cleaned up: policy released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_ticking()
        self._release()
        self.reason = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_ticking()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_ticking(self) -> None:
        with self.lock:
            self.active = False
            if self.executor_ is not None:
                self.executor_.reset()
        if self._tick_timer is not None:
            self.destroy_timer(self._tick_timer)
            self._tick_timer = None

    def _release(self) -> None:
        if not hasattr(self, "_infer_stop"):  # the constructor failed early
            return
        self._infer_stop.set()
        self._infer_request.set()
        if self._infer_thread is not None:
            self._infer_thread.join(timeout=30.0)
            self._infer_thread = None
        for e in self._entities:
            self.destroy_subscription(e)
        self._entities.clear()
        for pub in (self._chunk_pub, self._traj_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._chunk_pub = self._traj_pub = None
        self.buffers = {}
        self.state = None
        self._state_prev_stamp = None
        self._inflight = False
        self.policy = None
        self.executor_ = None
        self.safety = None

    def destroy_node(self):
        self._stop_ticking()
        self._release()
        return super().destroy_node()

    # ---- inputs -----------------------------------------------------------------------------------------
    def _stamp(self, key: str, header) -> tuple[float, Time, float] | None:
        """(seconds, original stamp, receive time in seconds) of a message; a zero stamp is replaced
        by the receive time (logged once); a stamp further in the future than max_observation_age is
        rejected."""
        now = self.get_clock().now()
        recv = now.nanoseconds * 1e-9
        self._check_clock(recv)
        t = stamp_to_sec(header.stamp)
        if t == 0.0:
            if key not in self._zero_stamp_warned:
                self._zero_stamp_warned.add(key)
                self.get_logger().warning(f"{key}: header stamp is zero; using the receive time instead")
            return recv, now.to_msg(), recv
        ahead = t - recv
        if ahead > self.p.max_observation_age:
            self._reject(f"{key}.future_stamp", f"{key}: header stamp is {ahead:.3f} s in the future "
                                                f"(clock mismatch? use_sim_time?)")
            return None
        return t, header.stamp, recv

    def _check_clock(self, now: float) -> None:
        """The node's clock went back by more than a control period (a simulator reset, a bag played
        again with use_sim_time): every buffered input belongs to the old timeline (its stamps would
        look fresh for as long as the jump) — drop them, the state and the plan, and log it."""
        with self.lock:
            high = self._clock_high
            self._clock_high = now if high is None else max(high, now)
            if high is None or high - now <= 1.0 / self.p.control_rate_hz:
                return
            self._clock_high = now
            for b in self.buffers.values():
                b.clear()
            self.state = None
            self._state_prev_stamp = None
            if self.executor_ is not None:
                self.executor_.reset()
            self._unserved = None
            # an inference already running answers an observation of the old timeline: its chunk (stamped
            # in the "future" of the new clock) would hold row 0 until the clock caught up; drop it
            self.goal_generation += 1
        self.counters.inc("clock_jumps_back")
        self.get_logger().warning(f"clock jumped back {high - now:.3f} s (to {now:.3f} s): buffered images, "
                                  "state and plan dropped")

    def _on_image(self, cam: str, msg: Image) -> None:
        from mode_ros.data.images import ImageDecodeError, decode_image

        st = self._stamp(f"image_{cam}", msg.header)
        if st is None:
            return
        try:
            img = decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                               is_bigendian=bool(msg.is_bigendian))
        except ImageDecodeError as exc:
            self._reject(f"image_{cam}", f"camera {cam}: image rejected: {exc}")
            return
        self._buffer_image(cam, st, img)

    def _on_compressed(self, cam: str, msg: CompressedImage) -> None:
        from mode_ros.data.images import ImageDecodeError, decode_compressed

        st = self._stamp(f"image_{cam}", msg.header)
        if st is None:
            return
        try:
            img = decode_compressed(msg.format, msg.data)
        except ImageDecodeError as exc:
            self._reject(f"image_{cam}", f"camera {cam}: compressed image rejected: {exc}")
            return
        self._buffer_image(cam, st, img)

    def _buffer_image(self, cam: str, st, img) -> None:
        dropped = self.buffers[cam].add(st[0], (st[1], img), recv=st[2], now=st[2])
        if dropped:
            self.counters.inc(f"dropped_future_frames.{cam}", dropped)
            self._ratelimited(f"future_{cam}", "warning",
                              f"camera {cam}: {dropped} frame(s) stamped ahead of the node clock dropped once a "
                              "frame stamped on time arrived (a stamp glitch would otherwise stay the newest)")
        self._kick_unserved()

    def _on_joint_state(self, msg: JointState) -> None:
        st = self._stamp("joint_states", msg.header)
        if st is None:
            return
        n = self.policy.state_dim if self.policy is not None else 0
        fields = {"position": ["position"], "velocity": ["velocity"],
                  "position_velocity": ["position", "velocity"]}[self.p.state_field]
        per = n // len(fields)
        try:
            names = list(msg.name)
            by_name = bool(self.state_names) and (not self._state_names_recorded
                                                  or set(self.state_names) <= set(names))
            if by_name:
                idx = [names.index(j) for j in self.state_names]
            else:
                if self.state_names:
                    self.get_logger().warning(
                        f"joint_states has no joints {self.state_names} (the checkpoint's state names): using "
                        f"the first {per} values in message order; set state_joint_names to choose", once=True)
                idx = list(range(per))
            parts = []
            for f in fields:
                vals = np.asarray(getattr(msg, f), dtype=np.float64)
                parts.append(vals[idx])
            vec = np.concatenate(parts)
        except ValueError as exc:
            self._reject("joint_states", f"joint_states rejected: joint missing ({exc}); "
                                         f"state_joint_names={self.state_names}")
            return
        except IndexError:
            self._reject("joint_states", f"joint_states rejected: fewer values than needed for state_dim {n} "
                                         f"({self.p.state_field})")
            return
        if vec.shape != (n,):
            self._reject("joint_states", f"joint_states rejected: state has {vec.size} values, the checkpoint "
                                         f"needs {n}")
            return
        with np.errstate(over="ignore"):
            vec32 = vec.astype(np.float32)
        if not np.isfinite(vec32).all():
            self._reject("joint_states", "joint_states rejected: contains NaN or Inf (or a value beyond float32)")
            return
        with self.lock:
            if self.state is not None and st[0] < self.state[0]:
                newest = self.state[0]
            else:
                newest = None
                self._state_prev_stamp = None if self.state is None else self.state[0]
                self.state = (st[0], vec32, st[2])
        if newest is not None:
            self._reject("joint_states", f"joint_states rejected: stamp {st[0]:.3f} s is older than the newest "
                                         f"state ({newest:.3f} s): out of order")
            return
        self._kick_unserved()

    def _on_goal(self, msg: String) -> None:
        self._set_goal(msg.data, source="~/goal")

    def _set_goal(self, text: str, source: str) -> None:
        clean = " ".join(str(text).split())
        with self.lock:
            if not clean:
                reason = "empty goal"
            elif len(clean) > self.p.max_goal_length:
                reason = f"goal of {len(clean)} characters exceeds max_goal_length {self.p.max_goal_length}"
            else:
                reason = ""
            if reason:
                # a rejected goal stops the output: continuing the previous task is not what was asked
                self.goal = ""
                self.goal_generation += 1
                if self.executor_ is not None:
                    self.executor_.reset()
                self._reject("goal", f"{source}: {reason}; output stopped until a valid goal arrives")
                return
            if clean == self.goal:
                return
            self.goal = clean
            self.goal_generation += 1
            if self.executor_ is not None:
                self.executor_.reset()  # the old plan is discarded; the next chunk answers the new goal
        self.get_logger().info(f"new goal from {source}: {clean[:200]!r}")
        self._kick_unserved()

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self.lock:
            changed = self.enabled != bool(request.data)
            self.enabled = bool(request.data)
            if not self.enabled and self.executor_ is not None:
                self.executor_.reset()
                self.safety.reset()
        if self.enabled:
            self._kick_unserved()   # lockstep_inference: the tick the simulator waits on
        response.success = True
        response.message = ("enabled" if self.enabled else "disabled") + ("" if changed else " (unchanged)")
        self.get_logger().info(f"~/enable: {response.message}")
        return response

    # ---- the control tick ---------------------------------------------------------------------------------
    def _gate(self, now: float, as_received_by_now: bool = True) -> tuple[str, str] | None:
        """Why nothing may be published at ``now``: (key, message), or None. Inputs count as they
        had been received by ``now`` (a late tick callback), unless ``as_received_by_now`` is False
        (serving a past tick late from inputs that arrived after it)."""
        state_stamp = None if self.state is None else self.state[0]
        if as_received_by_now and self.state is not None and self.state[2] > now:
            state_stamp = self._state_prev_stamp   # the newest state had not arrived by then
        rb = now if as_received_by_now else None
        return output_gate(self.enabled, self.goal,
                           {c: b.latest_stamp(received_by=rb) for c, b in self.buffers.items()},
                           state_stamp, self.policy.state_dim > 0, now, self.p.max_observation_age)

    def _on_tick(self, info=None) -> None:
        # A tick stands for a point of the timer's grid, not for the moment its callback got a thread:
        # when it runs late (the executor thread waited for the GIL while the inference thread ran;
        # with sim time the next /clock may have come first) it chooses its row and judges its inputs
        # (as received by then) for the newest grid point not after now, as if on time. If that point
        # was handled already (two late callbacks), the second one is merged below.
        now_t = self.get_clock().now()
        self._check_clock(now_t.nanoseconds * 1e-9)
        if info is not None:
            sched = info.expected_call_time.nanoseconds
            late = now_t.nanoseconds - sched
            if sched > 0 and late > 0:
                period_ns = round(1e9 / self.p.control_rate_hz)
                missed = late // period_ns   # grid points skipped (callback late or clock jumped): no chunk
                if missed and self._last_tick_ns >= 0:
                    self.counters.inc("missed_ticks", int(missed))
                now_t = rclpy.time.Time(nanoseconds=sched + missed * period_ns, clock_type=now_t.clock_type)
        now = now_t.nanoseconds * 1e-9
        with self.lock:
            if now_t.nanoseconds == self._last_tick_ns:
                # a timer callback that ran late, after the next one was already due (sim time: the
                # next /clock came first): the tick at this clock reading has been handled; a second
                # chunk for the same instant would only duplicate it
                self.counters.inc("late_ticks_merged")
                return
            self._last_tick_ns = now_t.nanoseconds
            self._unserved = None
            if not self.active or self.executor_ is None:
                return
            gate = self._gate(now)
            if gate is not None:
                # the plan is dropped; the rate limiter keeps the last action the robot received, so the
                # first action after the gap is limited relative to it (reset only on activate/disable)
                self.executor_.reset()
                self._suppress(*gate, level="info" if gate[0] in ("disabled", "no_goal") else "warning")
                if self._serve_late and (gate[0] != "disabled" or self.p.lockstep_inference):
                    self._unserved = (now_t, False)   # (lockstep: ~/enable true serves it)
                return
            if self.p.lockstep_inference and self.executor_.chunk_due(now):
                # lockstep simulation: this tick waits for a chunk computed from its own observation
                # (sim time stands still meanwhile), then _serve_unserved publishes it from row 0
                self._unserved = (now_t, False)
                self._sync_tick = now_t
                if not self._inflight and self._tick_observation_ready(now):
                    self._inflight = True
                    self._infer_request.set()
                return
            if (not self.p.lockstep_inference and not self._inflight
                    and self.executor_.needs_replan(now, self._expected_latency)):
                self._inflight = True
                self._infer_request.set()
            step = self.executor_.step(now)
            if step is None:
                why = self.last_failure or "waiting for the first chunk"
                self._suppress("no_plan", f"no plan for this tick ({why})",
                               level="warning" if self.last_failure else "info")
                if self._serve_late:
                    self._unserved = (now_t, True)
                return
            self._publish_step(now_t, step)

    @property
    def _serve_late(self) -> bool:
        return self.p.serve_late_ticks or self.p.lockstep_inference

    def _tick_observation_ready(self, t: float) -> bool:
        """lockstep_inference: every input needed has a message of the tick at ``t`` (stamped within
        half a period of it: its own observation, which a lockstep simulator publishes with the clock)."""
        st = self.state
        return has_observation_in(self.buffers, None if st is None else st[0],
                                  self.policy is not None and self.policy.state_dim > 0,
                                  *tick_window(t, 1.0 / self.p.control_rate_hz))

    def _kick_unserved(self) -> None:
        """An input arrived: if the last tick went unserved for want of it and could now be served,
        request the inference (serve_late_ticks; a lockstep simulator waits for exactly this)."""
        if self._unserved is None or self._inflight:
            return
        with self.lock:
            if self._unserved is None or self._inflight or not self.active or self.executor_ is None:
                return
            t = self._unserved[0].nanoseconds * 1e-9
            if self._gate(t, as_received_by_now=False) is not None:
                return
            if self.p.lockstep_inference:
                if not self._tick_observation_ready(t):
                    return
                self._sync_tick = self._unserved[0]
            self._inflight = True
            self._infer_request.set()

    def _serve_unserved(self) -> None:
        """A plan was added: publish the last tick now if it went unserved and the next one is not
        due yet (stamped and stepped for that tick: the same rows, safety and message as on time).
        lockstep_inference: only from a plan of that tick's own observation; a plan of an earlier tick
        (the simulator moved on while it was computed) is kept and the tick asks for its own."""
        with self.lock:
            u = self._unserved
            if u is None or not self.active or self.executor_ is None:
                return
            tick_t, stepped = u
            if self.get_clock().now().nanoseconds - tick_t.nanoseconds >= 1e9 / self.p.control_rate_hz:
                self._unserved = None          # the next tick is due: it serves itself
                return
            t = tick_t.nanoseconds * 1e-9
            if self._gate(t, as_received_by_now=False) is not None:
                return
            newest = self.executor_.newest
            if self.p.lockstep_inference:
                lo, hi = tick_window(t, 1.0 / self.p.control_rate_hz)
                if newest is None or newest.obs_time > hi:
                    return
                if newest.obs_time <= lo and not stepped:
                    self._sync_retry = True   # the inference loop asks for this tick's own observation
                    return
            elif newest is None or newest.obs_time > t + 1e-6:
                return   # a plan from an observation taken after the tick: it serves the next tick
            step = self.executor_.restep(t) if stepped else self.executor_.step(t)
            self._unserved = (tick_t, True) if step is None else None
            if step is not None and self._publish_step(tick_t, step):
                self.counters.inc("late_served")

    def _publish_step(self, tick_t, step) -> bool:
        """Safety filter, then publish ``step`` as the chunk of the tick at ``tick_t`` (called under
        the lock by the timer and by the late-serving inference thread, so that chunks leave in tick
        order). False when the actions were unsafe (dropped, plan discarded)."""
        try:
            actions = self.safety.apply(step.actions)
        except (NonFiniteActionError, ValueError) as exc:
            self.executor_.reset()
            self._suppress("unsafe", f"unsafe actions dropped: {exc}", level="error")
            return False
        self.tick_count += 1
        self._publish(tick_t, step, actions, self.tick_count)
        self.rate.tick(time.monotonic())
        self.counters.inc("published")
        self.reason = "publishing"
        return True

    def _publish(self, now_t, step, actions: np.ndarray, tick: int) -> None:
        period = 1.0 / self.p.control_rate_hz
        plan = step.plan
        msg = ActionChunk()
        msg.header.stamp = plan.stamp
        msg.header.frame_id = self.p.action_frame_id
        msg.control_period = sec_to_duration(period)
        msg.chunk_size = int(actions.shape[0])
        msg.action_dim = int(actions.shape[1])
        msg.action_names = list(self.action_names)
        msg.actions = array.array("f", np.ascontiguousarray(actions, dtype=np.float32).tobytes())
        msg.first_index = int(step.first_index)
        msg.sequence = int(plan.sequence)
        msg.tick = int(tick)
        msg.goal = plan.goal
        msg.inference_latency = sec_to_duration(plan.latency)
        self._chunk_pub.publish(msg)
        if self._traj_pub is not None:
            traj = JointTrajectory()
            traj.header.stamp = now_t.to_msg()
            traj.header.frame_id = self.p.action_frame_id
            traj.joint_names = list(self.joint_names)
            for j, row in enumerate(actions):
                pt = JointTrajectoryPoint()
                pt.positions = [float(v) for v in row]
                pt.time_from_start = sec_to_duration((j + 1) * period)
                traj.points.append(pt)
            self._traj_pub.publish(traj)

    # ---- inference thread ------------------------------------------------------------------------------------
    def _observation(self, now: float, at=None) -> _Observation | str:
        """The newest complete observation, or the reason why there is none. With ``at`` (a tick's
        rclpy Time, lockstep_inference) the observation of that tick: stamped within half a period of it."""
        with self.lock:
            goal, gen = self.goal, self.goal_generation
            state = self.state
        if not goal:
            return "no goal"
        if at is not None and not self._tick_observation_ready(at.nanoseconds * 1e-9):
            return f"waiting for the observation of the tick at {at.nanoseconds * 1e-9:.3f} s (lockstep_inference)"
        snaps = {c: b.snapshot() for c, b in self.buffers.items()}
        if at is not None:   # frames stamped after the tick's window are not its observation
            hi = tick_window(at.nanoseconds * 1e-9, 1.0 / self.p.control_rate_hz)[1]
            snaps = {c: [e for e in v if e[0] <= hi] for c, v in snaps.items()}
        if not snaps:
            # a checkpoint without cameras: the observation time is now (lockstep: the tick's)
            obs = _Observation()
            if at is not None:
                obs.images, obs.stamp_sec, obs.stamp = [], at.nanoseconds * 1e-9, at.to_msg()
            else:
                obs.images, obs.stamp_sec, obs.stamp = [], now, self.get_clock().now().to_msg()
        else:
            idx = match_stamps({c: [s for s, _ in v] for c, v in snaps.items()}, self.p.camera_sync_tolerance)
            if idx is None:
                latest = ", ".join(f"{c}@{v[-1][0]:.3f}" if v else f"{c}: none" for c, v in snaps.items())
                self.counters.inc("rejected.unsynchronised")
                return (f"no set of camera images within camera_sync_tolerance "
                        f"{self.p.camera_sync_tolerance:g} s (latest: {latest})")
            ref = next(iter(snaps))
            obs = _Observation()
            obs.stamp_sec = snaps[ref][idx[ref]][0]
            obs.stamp = snaps[ref][idx[ref]][1][0]
            obs.images = [snaps[c][idx[c]][1][1] for c in snaps]
            oldest = min(snaps[c][idx[c]][0] for c in snaps)
            if now - oldest > self.p.max_observation_age:
                return f"newest synchronised observation is {now - oldest:.3f} s old (stale)"
        obs.state = None
        if self.policy.state_dim > 0:
            if state is None:
                return "no joint_states yet"
            obs.state = state[1]
        obs.goal, obs.generation = goal, gen
        return obs

    def _inference_loop(self) -> None:
        while not self._infer_stop.is_set():
            if not self._infer_request.wait(timeout=0.2):
                continue
            self._infer_request.clear()
            if self._infer_stop.is_set():
                break
            try:
                self._infer_once()
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                self.last_failure = f"inference failed: {type(exc).__name__}: {exc}"
                self.counters.inc("inference_failures")
                self._ratelimited("inference", "error", self.last_failure)
            finally:
                with self.lock:
                    self._inflight = False
            if self._sync_retry:
                # lockstep_inference: the tick's observation was not complete when this inference looked
                # (if the rest arrived meanwhile, its kick found this one in flight), or the result was
                # dropped for a new goal: go again if the waiting tick can be served now
                self._kick_unserved()

    def _infer_once(self) -> None:
        policy = self.policy
        if policy is None:
            return
        now = self.get_clock().now().nanoseconds * 1e-9
        at = self._sync_tick if self.p.lockstep_inference else None
        obs = self._observation(now, at)
        self._sync_retry = at is not None and isinstance(obs, str) and obs.startswith("waiting")
        if self._sync_retry:
            self.counters.inc("lockstep_observation_waits")
            return
        if isinstance(obs, str):
            self.last_failure = obs
            self._ratelimited("observation", "warning", f"no inference: {obs}")
            return
        seed = observation_seed(self.p.seed, int(obs.stamp.sec) * 1_000_000_000 + int(obs.stamp.nanosec))
        t0 = time.perf_counter()
        try:
            actions = policy.predict_chunk(obs.images, obs.goal, state=obs.state, seed=seed)
        except ValueError as exc:  # GoalError, bad image/state: the policy names the problem
            self.last_failure = f"inference refused: {exc}"
            self.counters.inc("inference_failures")
            self._ratelimited("inference", "error", self.last_failure)
            return
        latency = time.perf_counter() - t0
        self.latency.add(latency)
        self.counters.inc("inferences")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (policy.chunk_size, policy.action_dim) or not np.isfinite(actions).all():
            self.last_failure = (f"inference produced an invalid chunk (shape {actions.shape}, "
                                 f"{int((~np.isfinite(actions)).sum())} non-finite values): dropped")
            self.counters.inc("inference_failures")
            self._ratelimited("inference", "error", self.last_failure)
            return
        q = self.latency.percentile(90) if len(self.latency) >= 5 else max(self.latency.values())
        with self.lock:
            self._expected_latency = q
            if obs.generation != self.goal_generation or not self.active or self.executor_ is None:
                self.counters.inc("dropped_results")  # goal changed (or deactivated) meanwhile
                # lockstep_inference: the waiting tick needs an inference for the new goal
                self._sync_retry = self.p.lockstep_inference
                return
            self.sequence += 1
            # lockstep_inference: the chunk's rows count from the tick it was computed for (its observation
            # is stamped within half a period of it), so they fall on the ticks
            obs_time = obs.stamp_sec if at is None else at.nanoseconds * 1e-9
            plan = Plan(actions=actions, obs_time=obs_time, ready_time=now + latency,
                        sequence=self.sequence, goal=obs.goal, latency=latency, stamp=obs.stamp)
            self.executor_.add(plan, self.get_clock().now().nanoseconds * 1e-9)
            self.last_failure = ""
        if self._serve_late:
            self._serve_unserved()

    # ---- diagnostics -----------------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        c = self.counters.snapshot()
        state = self._state_machine.current_state[1] if hasattr(self, "_state_machine") else "?"
        lat = self.latency
        periods = self.rate.periods()
        values = {
            "lifecycle_state": state,
            "enabled": self.enabled,
            "goal": self.goal,
            "checkpoint": self.p.checkpoint,
            "device": str(self.policy.device) if self.policy is not None else "",
            "control_rate_hz": self.p.control_rate_hz,
            "achieved_rate_hz": round(self.rate.rate(), 3),
            "period_jitter_ms": round(float(periods.std()) * 1e3, 3) if periods.size > 1 else 0.0,
            "inference_latency_median_ms": round(lat.median() * 1e3, 2) if len(lat) else "",
            "inference_latency_p99_ms": round(lat.percentile(99) * 1e3, 2) if len(lat) else "",
            "inferences": c.get("inferences", 0),
            "inference_failures": c.get("inference_failures", 0),
            "ticks_published": c.get("published", 0),
            "late_served": c.get("late_served", 0),
            "late_ticks_merged": c.get("late_ticks_merged", 0),
            "missed_ticks": c.get("missed_ticks", 0),
            "ticks_suppressed": sum(v for k, v in c.items() if k.startswith("suppressed.")),
            "stale": c.get("suppressed.stale", 0),
            "dropped_results": c.get("dropped_results", 0),
            "lockstep_observation_waits": c.get("lockstep_observation_waits", 0),
            "images_received": sum(b.received for b in self.buffers.values()),
            "rejected": sum(v for k, v in c.items() if k.startswith("rejected.")),
            "reason": self.reason,
            "last_failure": self.last_failure,
        }
        values.update({k: v for k, v in c.items() if k.startswith(("rejected.", "suppressed."))})
        st = DiagnosticStatus()
        st.name = f"{self.get_fully_qualified_name()}: MoDE policy"
        st.hardware_id = values["device"]
        if self.reason == "publishing":
            st.level, st.message = DiagnosticStatus.OK, "publishing"
        elif self.reason.startswith(("configure failed", "unsafe")) or self.last_failure:
            st.level, st.message = DiagnosticStatus.ERROR, self.last_failure or self.reason
        else:
            st.level, st.message = DiagnosticStatus.WARN, self.reason
        st.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [st]
        self._diag_pub.publish(arr)


def main(args=None) -> int:
    # The inference thread runs Python (torch dispatch) most of the time; a shorter GIL switch interval
    # (default 5 ms) lets the control tick run closer to its due time.
    sys.setswitchinterval(0.001)
    rclpy.init(args=sys.argv if args is None else args)
    try:
        node = PolicyNode()
    except Exception as exc:  # noqa: BLE001 - e.g. an invalid parameter in the params file
        print(f"[mode_ros policy_node] cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        try:
            rclpy.try_shutdown()
        except Exception:  # noqa: BLE001 - a half-built node may fail to destroy; we exit anyway
            pass
        return 2
    # One executor thread: every callback is short (the inference has its own thread). rclpy's
    # MultiThreadedExecutor (before rclpy 10.0.4, ros2/rclpy#1452) re-yields a callback that is queued
    # but not started yet, so its spin thread loops holding the GIL; measured with latency_bench
    # (tiny checkpoint, 10 Hz, replan every tick, 2 cores): output jitter 1.7-6.5 ms std -> 0.2-0.4 ms,
    # inference p99 41-65 ms -> 33 ms.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
