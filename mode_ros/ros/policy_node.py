"""The MoDE policy node: cameras + language goal in, ``mode_ros/ActionChunk`` out at the control rate.

A shell over ``MoDEPolicy`` (docs/CONTRACTS.md) and the one chunk controller
(:class:`mode_ros.control.controller.ChunkController`, ROS-free, shared with offline replay and sim
eval): the node holds the parameters (``params``), the lifecycle, the subscriptions (messages converted
to arrays: ``mode_ros.data.images``, ``convert``), the control timer, the inference thread, publishing
and /diagnostics. Everything between an input and a published chunk — stamps, camera sync, goal
validation, the tick grid, the freshness gate, late serving, lockstep, plan adoption, the execution
strategy (``execution_strategy``) and the safety step — is the controller's.

Lifecycle (rclpy.lifecycle): configure = read/validate parameters, load the checkpoint, warm up,
create subscriptions/publishers and the inference thread; activate = start the control timer;
deactivate = stop publishing; cleanup = release everything. With ``autostart`` (default) the node
configures and activates itself. Topics (relative to the node): ``~/image_<camera>`` (or
``~/image_<camera>/compressed``), ``~/goal``, ``~/joint_states`` (only for checkpoints with a state),
``~/action_chunk``, ``~/joint_trajectory`` (optional), ``/diagnostics``; service ``~/enable``.
"""
from __future__ import annotations

import array
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
from mode_ros.data.images import pixel_limit
from mode_ros.ros.convert import InputRejected, joint_state_vector
from mode_ros.ros.params import (NODE_NAME, PARAMS, NodeParams, ParameterError, state_selection, unknown_parameters,
                                 validate)
from mode_ros.control.controller import NS, ChunkController, Output
from mode_ros.control.stats import Counters, RateLimitedLog, RateMeter

_ROS_TYPES = {
    "bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
    "double": ParameterType.PARAMETER_DOUBLE, "string": ParameterType.PARAMETER_STRING,
    "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
    "string_array": ParameterType.PARAMETER_STRING_ARRAY,
}

# ~/goal has two subscriptions: transient-local (a goal latched before the node started) and volatile
# (`ros2 topic pub`, any default-QoS publisher); a latched goal arrives on both, the repeat is ignored
GOAL_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
GOAL_VOLATILE_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
# every ~/enable request is answered: the default service QoS (keep last 10) drops requests that
# arrive together beyond the 10th (issue 19: 10-12 of 60 simultaneous calls answered)
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)


def descriptor(spec) -> ParameterDescriptor:
    """ParameterDescriptor (type, description, range, constraints) of one entry of the table."""
    d = ParameterDescriptor(name=spec.name, type=_ROS_TYPES[spec.type], description=spec.description)
    # double parameters take any type from rclpy and are checked by params.validate: an integer
    # (`control_rate_hz: 30`) is accepted as a float, a string is refused naming the parameter
    d.dynamic_typing = spec.type in ("double", "double_array")
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


class PolicyNode(LifecycleNode):
    """See the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        self.lock = threading.RLock()  # the controller's lock too: a chunk is published under it (tick order)
        self._tick_timer = None
        self._infer_thread: threading.Thread | None = None
        self._entities: list[Any] = []
        self._chunk_pub = self._traj_pub = None
        self.ctl: ChunkController | None = None   # the control logic (mode_ros.control), from configure on
        super().__init__(node_name, **kwargs)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        # rclpy keeps the overrides of a params file / -p without a public accessor; a name no one
        # declared is a typo the node would otherwise ignore silently
        overrides = getattr(self, "_parameter_overrides", {})
        for line in unknown_parameters(overrides, [n for n in overrides if self.has_parameter(n)]):
            self.get_logger().warning(line)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.p = self._read_params()
        self._log = RateLimitedLog(self.p.log_throttle_period)
        self.counters = Counters()   # shared with the controller
        self.rate = RateMeter(self.p.stats_window)

        self.policy = None
        self.enabled = bool(self.p.start_enabled)   # ~/enable (kept across configure/cleanup)
        self.reason = "unconfigured"
        self.finalized = False   # set by the shutdown transition: main() then exits
        self._expected_latency = 0.0
        self._infer_stop = threading.Event()
        self._infer_request = threading.Event()

        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self.p.diagnostics_period, self._publish_diagnostics)
        self.create_service(SetBool, "~/enable", self._on_enable, qos_profile=SERVICE_QOS)
        if hasattr(self, "add_post_set_parameters_callback"):
            self.add_post_set_parameters_callback(self._apply_live_parameters)
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

    def _ctl_log(self, level: str, key: str | None, message: str) -> None:
        """The controller's log: rate-limited per key (None: always)."""
        if key is None:
            self._emit(level, message)
        else:
            self._ratelimited(key, level, message)

    def _reject(self, kind: str, message: str, reason: str = "") -> None:
        """An input was rejected: counted per kind (and reason) and logged, rate-limited per kind and reason."""
        self.ctl.reject_input(kind, message, reason)

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
                               f"{self.p.control_rate_hz:g} Hz, execution {self.ctl.strategy.name} (replan every "
                               f"{self.ctl.executor.replan_every}), predict_state {self.ctl.predict_state_status()}")
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        self.p = self._read_params()
        self._log.period = self.p.log_throttle_period
        if not self.p.checkpoint:
            raise ParameterError("checkpoint: not set (the checkpoint folder to load)")
        self.policy = self._load_policy()
        self.ctl = ChunkController(self.p, self.policy.camera_names, self.policy.state_dim, self.policy.chunk_size,
                                   self.policy.action_dim, clock=lambda: self.get_clock().now().nanoseconds,
                                   log=self._ctl_log, goal_check=self.policy.goal_problem,
                                   initial_latency=self._expected_latency, lock=self.lock, counters=self.counters,
                                   state_model=self.policy.state_model)
        self.ctl.set_enabled(self.enabled)
        self.ctl.set_active(False)
        self._resolve_names(self.policy)
        self.rate = RateMeter(self.p.stats_window)
        self._make_endpoints(self.policy)
        self._start_inference_thread()

    def _load_policy(self):
        """The checkpoint on the chosen backend, checked against the parameters, warmed up."""
        from mode_ros.export.deploy import load_policy

        policy, described = load_policy(self.p, log=_StdLogger(self.get_logger()))
        self.p.check_against_policy(policy.chunk_size, policy.action_dim, policy.state_dim)
        self._max_pixels = pixel_limit(policy.config.vision.image_size if policy.camera_names else None,
                                       self.p.max_image_pixels)
        self.get_logger().info(f"inference: {described}")
        if self.p.warmup:
            self._expected_latency = float(policy.warmup(runs=3))  # median of 3 calls
            try:  # build the text tower now, so that a new goal costs one encoding, not a model build
                policy.encode_goal(self.p.goal or "warm up")
            except ValueError as exc:
                self.get_logger().info(f"text encoder not available ({exc}): only the checkpoint's cached "
                                       f"goals can be used: {policy.known_goals}")
        return policy

    def _resolve_names(self, policy) -> None:
        """Joint names of the outputs and the joints of ~/joint_states that make the state vector."""
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

    def _make_endpoints(self, policy) -> None:
        """Outputs (lifecycle publishers: they only publish while active) and inputs."""
        from rclpy.event_handler import SubscriptionEventCallbacks

        self._chunk_pub = self.create_lifecycle_publisher(ActionChunk, "~/action_chunk", OUTPUT_QOS)
        if self.p.publish_joint_trajectory:
            self._traj_pub = self.create_lifecycle_publisher(JointTrajectory, "~/joint_trajectory", OUTPUT_QOS)
        for cam in policy.camera_names:
            if self.p.image_transport == "compressed":
                sub = self.create_subscription(CompressedImage, f"~/image_{cam}/compressed",
                                               lambda m, c=cam: self._on_compressed(c, m),
                                               qos_profile_sensor_data)
            else:
                sub = self.create_subscription(Image, f"~/image_{cam}", lambda m, c=cam: self._on_image(c, m),
                                               qos_profile_sensor_data)
            self._entities.append(sub)
        # a volatile publisher (ros2 topic pub) is served by the second subscription: no QoS warning here
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)
        self._entities.append(self.create_subscription(String, "~/goal", self._on_goal, GOAL_QOS,
                                                       event_callbacks=quiet))
        self._entities.append(self.create_subscription(String, "~/goal", self._on_goal, GOAL_VOLATILE_QOS))
        if policy.state_dim > 0:
            self._entities.append(self.create_subscription(JointState, "~/joint_states", self._on_joint_state,
                                                           qos_profile_sensor_data))

    def _start_inference_thread(self) -> None:
        self._infer_stop.clear()
        self._infer_request.clear()   # a wake-up left by the last cleanup is no request
        if self.p.lockstep_inference and not self.get_parameter("use_sim_time").value:
            self.get_logger().warning("lockstep_inference is on without use_sim_time: every tick that needs a "
                                      "new chunk publishes nothing until the inference lands (meant for a "
                                      "lockstep simulator)")
        self._infer_thread = threading.Thread(target=self._inference_loop, name="mode_ros_inference",
                                              daemon=True)
        self._infer_thread.start()

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.ctl.set_active(True)
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
        self.finalized = True   # main() answers this transition, then the process exits (a launch file sees it)
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_ticking()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_ticking(self) -> None:
        if self.ctl is not None:
            self.ctl.set_active(False)
        if self._tick_timer is not None:
            self.destroy_timer(self._tick_timer)
            self._tick_timer = None

    def _release(self, join_timeout: float = 30.0) -> None:
        if not hasattr(self, "_infer_stop"):  # the constructor failed early
            return
        self._infer_stop.set()
        self._infer_request.set()
        if self._infer_thread is not None:
            self._infer_thread.join(timeout=join_timeout)
            if self._infer_thread.is_alive():
                self.get_logger().warning(f"inference thread still running after {join_timeout:g} s: not waited for")
            self._infer_thread = None
        for e in self._entities:
            self.destroy_subscription(e)
        self._entities.clear()
        for pub in (self._chunk_pub, self._traj_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._chunk_pub = self._traj_pub = None
        self.policy = None
        self.ctl = None

    def destroy_node(self):
        # the process is ending (SIGINT, shutdown): an inference in flight is not waited for beyond a
        # moment (the thread is a daemon; its result would be dropped anyway). A lifecycle cleanup
        # waits up to 30 s, since the thread must be gone before the node is configured again.
        self._stop_ticking()
        self._release(join_timeout=2.0)
        return super().destroy_node()

    # ---- inputs -----------------------------------------------------------------------------------------
    @staticmethod
    def _stamp_ns(header) -> int:
        return int(header.stamp.sec) * NS + int(header.stamp.nanosec)

    def _start_inference(self, start: bool) -> None:
        """The controller claimed an inference (an input arrived for an unserved tick, a tick is due)."""
        if start:
            self._infer_request.set()

    def _on_image(self, cam: str, msg: Image) -> None:
        from mode_ros.data.images import ImageDecodeError, decode_image

        try:
            img = decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                               is_bigendian=bool(msg.is_bigendian), max_pixels=self._max_pixels)
        except ImageDecodeError as exc:
            self._reject(f"image_{cam}", f"camera {cam}: image rejected: {exc}", exc.reason)
            return
        self._start_inference(self.ctl.on_image(cam, self._stamp_ns(msg.header), img))

    def _on_compressed(self, cam: str, msg: CompressedImage) -> None:
        from mode_ros.data.images import ImageDecodeError, decode_compressed

        try:
            img = decode_compressed(msg.format, msg.data, max_pixels=self._max_pixels)
        except ImageDecodeError as exc:
            self._reject(f"image_{cam}", f"camera {cam}: compressed image rejected: {exc}", exc.reason)
            return
        self._start_inference(self.ctl.on_image(cam, self._stamp_ns(msg.header), img))

    def _on_joint_state(self, msg: JointState) -> None:
        n = self.policy.state_dim if self.policy is not None else 0
        try:
            vec32, by_name = joint_state_vector(msg, self.p.state_field, n, self.state_names,
                                                select_optional=self._state_names_recorded)
        except InputRejected as exc:
            self._reject("joint_states", f"{exc}; state_joint_names={self.state_names}", exc.reason)
            return
        if self.state_names and not by_name:
            self.get_logger().warning(
                f"joint_states has no joints {self.state_names} (the checkpoint's state names): using the first "
                f"values in message order; set state_joint_names to choose", once=True)
        self._start_inference(self.ctl.on_state(self._stamp_ns(msg.header), vec32))

    def _on_goal(self, msg: String) -> None:
        self._set_goal(msg.data, source="~/goal")

    def _set_goal(self, text: str, source: str) -> None:
        """A goal the checkpoint cannot use (empty, too long, not embeddable) is refused with one log line
        and stops the output (the previous goal is dropped); before configure it waits in self.p.goal."""
        if self.ctl is None:
            self.p.goal = text
            return
        self._start_inference(self.ctl.set_goal(text, source)[1])

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        changed = self.enabled != bool(request.data)
        self.enabled = bool(request.data)
        if self.ctl is not None:   # enabling may serve the tick a lockstep simulator waits on
            self._start_inference(self.ctl.set_enabled(self.enabled))
        response.success = True
        response.message = ("enabled" if self.enabled else "disabled") + ("" if changed else " (unchanged)")
        self.get_logger().info(f"~/enable: {response.message}")
        return response

    # ---- the control tick ---------------------------------------------------------------------------------
    def _on_tick(self, info=None) -> None:
        """One timer tick: the controller picks the grid point (a late callback stands for its scheduled
        time), gates, steps the plan and applies the safety step; the chunk is published under the lock."""
        ctl = self.ctl
        if ctl is None:
            return
        scheduled = info.expected_call_time.nanoseconds if info is not None else None
        with self.lock:
            res = ctl.tick(scheduled)
            if res.output is not None:
                self._publish(res.output)
        self._start_inference(res.request)

    def _publish(self, out: Output) -> None:
        period = 1.0 / self.p.control_rate_hz
        plan, actions = out.plan, out.actions
        msg = ActionChunk()
        msg.header.stamp = Time(sec=int(plan.stamp) // NS, nanosec=int(plan.stamp) % NS)
        msg.header.frame_id = self.p.action_frame_id
        msg.control_period = sec_to_duration(period)
        msg.chunk_size = int(actions.shape[0])
        msg.action_dim = int(actions.shape[1])
        msg.action_names = list(self.action_names)
        msg.actions = array.array("f", np.ascontiguousarray(actions, dtype=np.float32).tobytes())
        msg.first_index = int(out.first_index)
        msg.sequence = int(plan.sequence)
        msg.tick = int(out.tick)
        msg.goal = plan.goal
        msg.inference_latency = sec_to_duration(plan.latency)
        self._chunk_pub.publish(msg)
        self.rate.tick(time.monotonic())
        if self._traj_pub is not None:
            traj = JointTrajectory()
            traj.header.stamp = Time(sec=out.tick_ns // NS, nanosec=out.tick_ns % NS)
            traj.header.frame_id = self.p.action_frame_id
            traj.joint_names = list(self.joint_names)
            for j, row in enumerate(actions):
                pt = JointTrajectoryPoint()
                pt.positions = [float(v) for v in row]
                pt.time_from_start = sec_to_duration((j + 1) * period)
                traj.points.append(pt)
            self._traj_pub.publish(traj)

    # ---- inference thread ------------------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        while not self._infer_stop.is_set():
            if not self._infer_request.wait(timeout=0.2):
                continue
            self._infer_request.clear()
            ctl, policy = self.ctl, self.policy
            if self._infer_stop.is_set() or ctl is None or policy is None:
                continue
            ctl.infer(policy.predict_chunk, time.perf_counter, emit=self._publish)
            # lockstep_inference: the waiting tick's observation was incomplete, or the result was for an
            # old goal: go again if the tick can be served now
            self._start_inference(ctl.retry_due())

    # ---- diagnostics -----------------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        ctl = self.ctl
        periods = self.rate.periods()
        values = {
            "lifecycle_state": self._state_machine.current_state[1] if hasattr(self, "_state_machine") else "?",
            "enabled": self.enabled,
            "goal": self.p.goal,
            "checkpoint": self.p.checkpoint,
            "device": str(self.policy.device) if self.policy is not None else "",
            "control_rate_hz": self.p.control_rate_hz,
            "achieved_rate_hz": round(self.rate.rate(), 3),
            "period_jitter_ms": round(float(periods.std()) * 1e3, 3) if periods.size > 1 else 0.0,
        }
        if ctl is not None:
            values.update(ctl.diagnostics())   # goal, strategy, estimated d, latency, counters, reason
        reason = ctl.reason if ctl is not None and ctl.active and ctl.reason else self.reason
        last_failure = ctl.last_failure if ctl is not None else ""
        values["reason"] = reason
        st = DiagnosticStatus()
        st.name = f"{self.get_fully_qualified_name()}: MoDE policy"
        st.hardware_id = values["device"]
        if reason == "publishing":
            st.level, st.message = DiagnosticStatus.OK, "publishing"
        elif reason.startswith(("configure failed", "unsafe")) or last_failure:
            st.level, st.message = DiagnosticStatus.ERROR, last_failure or reason
        else:
            st.level, st.message = DiagnosticStatus.WARN, reason
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
        while rclpy.ok() and not node.finalized:   # spin(), until the shutdown transition
            executor.spin_once()
        if node.finalized:
            end = time.monotonic() + 0.5   # let the transition's response reach the caller
            while rclpy.ok() and time.monotonic() < end:
                executor.spin_once(timeout_sec=0.05)
            node.get_logger().info("finalized (shutdown transition): exiting")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
