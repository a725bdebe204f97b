"""The policy node's parameters: one table with type, default, range and description (ROS-free).

The node declares every entry with a ``ParameterDescriptor`` built from this table, ``config/policy.yaml``
documents the same defaults (a test keeps both equal), and :func:`validate` is the one check used at
start-up, on ``ros2 param set`` and on configure, so an invalid value is refused with a message naming
the parameter.

Array parameters cannot be empty in a ROS parameter file (the rcl YAML parser turns ``[]`` into
"not set"), so "no bounds" is written ``[-.inf]``/``[.inf]`` and "no names" ``[""]``; a list of length
1 is broadcast to every action dimension.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from mode_ros.control.strategy import DEFAULT_DECAY, DEFAULT_HOLD_ROWS

__all__ = ["ParamSpec", "PARAMS", "PARAMS_BY_NAME", "NodeParams", "ParameterError", "validate", "unknown_parameters",
           "render_yaml", "broadcast"]

NODE_NAME = "mode_policy"


class ParameterError(ValueError):
    """A parameter value is invalid; the message starts with the parameter's name."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str                      # bool | int | double | string | double_array | string_array
    default: Any
    description: str
    min: float | None = None       # numeric range (inclusive), for int/double
    max: float | None = None
    choices: tuple[str, ...] = ()  # allowed strings (exact) for string parameters
    pattern: str | None = None     # alternative to choices: a regular expression to fullmatch
    live: bool = False             # True: takes effect at once; False: read on configure


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("checkpoint", "string", "",
              "Checkpoint folder (config.yaml, model.safetensors, normalization.json, goal_embeddings), or "
              "'bundled' (the MT10 checkpoint in the package). Required: configure fails without it."),
    ParamSpec("device", "string", "auto",
              "Torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
              pattern=r"auto|cpu|cuda(:\d+)?"),
    ParamSpec("dtype", "string", "auto",
              "Inference dtype: auto (the checkpoint's choice for the device), float32, float16, bfloat16.",
              choices=("auto", "float32", "float16", "bfloat16")),
    ParamSpec("fast_inference", "string", "auto",
              "Inference speed-ups: auto (CUDA: fused kernels + torch.compile + whole-chunk CUDA graph; "
              "CPU: off), off, fused, compiled, graph (fused + CUDA graph, no compile). Each falls back "
              "with a logged reason.", choices=("auto", "off", "fused", "compiled", "graph")),
    ParamSpec("weight_quant", "string", "none",
              "Weight-only quantisation of the experts (fused sampler, one scale per output row): none, "
              "int8 (CPU: int8 matmul kernel; paper-size model 1.4x faster than fp32, normalised actions "
              "within 2e-3 of fp32: docs/measurements/cpu_int8), fp8 (CUDA only). The full-precision experts "
              "are then released (the experts are held once, quantised), except for execution_strategy "
              "rtc_guidance, which differentiates through them. Falls back to unquantised with a logged "
              "reason.", choices=("none", "int8", "fp8")),
    ParamSpec("gpu_kernels", "string", "torch",
              "Kernels of the fused sampler: torch (cuBLAS / Inductor) or triton (this package's small-batch "
              "Triton kernels: q/k norms + causal attention in one kernel, split-K projections, the experts' "
              "up-projection with SwiGLU and gates fused, int8/fp8 widened in-kernel: seven kernels per layer "
              "and step, never torch.compiled (fast_inference compiled acts as graph); CUDA only, falls back to "
              "torch with a logged reason; compare both with scripts/gpu_measure.py before choosing); "
              "triton_pdl: the same kernels launched with programmatic dependent launch (sm_90+: each kernel "
              "is scheduled while the previous one runs and streams its weights into L2 before waiting on "
              "it; falls back to triton with a logged reason). auto: on CUDA, measure torch, triton and "
              "triton_pdl at configure (whole chunks, after checking each one's actions against the plain "
              "sampler) and keep the fastest, logging every figure; on a CPU, torch.",
              choices=("torch", "triton", "triton_pdl", "auto")),
    ParamSpec("sampling_steps", "int", 0,
              "DDIM steps per chunk; 0: the checkpoint's (diffusion.num_steps). Fewer steps cost proportionally "
              "less (the bundled MT10 checkpoint: success 0.99 / 0.98 / 0.975 / 0.99 at 10 / 5 / 3 / 2 steps on "
              "held-out layouts, docs/measurements/onnx). With inference_backend onnx it must be 0 or the "
              "export's steps.", min=0, max=1000),
    ParamSpec("inference_backend", "string", "torch",
              "What computes a chunk: torch (the PyTorch policy, with fast_inference / gpu_kernels) or onnx "
              "(the checkpoint's ONNX export in onnx_model run by onnxruntime: same goal embedding, inputs, "
              "seeded noise, safety and diagnostics; fast_inference, weight_quant and gpu_kernels unused; the "
              "export's step count is used). Configure fails, naming the file, when the export is unreadable, "
              "was changed, or belongs to another checkpoint or layout.", choices=("torch", "onnx")),
    ParamSpec("onnx_model", "string", "",
              "inference_backend onnx: the folder written by `mode-ros export onnx CHECKPOINT --out DIR` from "
              "this node's checkpoint (model.onnx + export.json)."),
    ParamSpec("onnx_threads", "int", 0,
              "inference_backend onnx on the CPU: onnxruntime's intra-op threads. 0: calibrated at configure "
              "- a chunk is timed with 1, 2, 4... threads up to torch_threads (0: the CPUs this process may "
              "use) and the fastest count is kept (on a small graph one thread can beat two: docs/measurements/"
              "onnx); N > 0: exactly N.", min=0, max=1024),
    ParamSpec("goal", "string", "",
              "Initial language goal, used until one arrives on ~/goal (empty: wait for ~/goal).",
              live=True),
    ParamSpec("control_rate_hz", "double", 10.0,
              "Rate of ActionChunk messages (one per control tick); also the period between chunk rows.",
              min=0.1, max=1000.0),
    ParamSpec("replan_every", "int", 0,
              "Compute a new chunk every N ticks (1..chunk_size); 0 = chunk_size (open-loop execution "
              "of whole chunks, as in the MoDE paper).", min=0, max=10000),
    ParamSpec("serve_late_ticks", "bool", True,
              "When a control tick published nothing (no plan yet, or an input missing at the tick) and an "
              "inference result lands before the next tick, publish that tick at once, stamped and stepped "
              "for it. A lockstep simulator (sim time advances only after an action) needs this; on a robot "
              "the first chunk after start, a goal change or a gap goes out up to one period sooner."),
    ParamSpec("lockstep_inference", "bool", False,
              "Simulation with a lockstep clock only (the simulator stops sim time until it has an action for "
              "the tick): at a tick where a new chunk is due (no plan yet, or the plan reached replan_every), "
              "publish nothing until an inference on that tick's own observation (images and state stamped "
              "within half a period of the tick) has landed, then serve the tick from row 0 of it (rows count "
              "from the tick). Inference then takes "
              "no sim time, so closed-loop results do not depend on the machine's speed (with seed >= 0 a "
              "run is repeatable). On a robot, or a simulator that runs on, this stops the output for every "
              "inference: leave false."),
    ParamSpec("latency_compensation", "bool", True,
              "Skip the rows of a new chunk that its inference latency already overtook (row i is meant "
              "for observation stamp + i * period). false: a chunk starts at row 0 when it is adopted, "
              "i.e. its rows are executed late; ActionChunk.first_index still gives the tick's time "
              "(stamp + first_index * period), no longer the row's index in the model's chunk."),
    ParamSpec("temporal_ensembling", "bool", False,
              "Average the rows of all overlapping chunks that cover a control tick (ACT-style "
              "exponential weights, older chunks weigh more); best with replan_every: 1."),
    ParamSpec("ensembling_decay", "double", 0.01,
              "Temporal ensembling weight decay m in w_i = exp(-m * i), i = 0 for the oldest chunk.",
              min=0.0, max=100.0),
    ParamSpec("execution_strategy", "string", "replan",
              "How consecutive chunks are executed (mode_ros.control.strategy): replan (re-plan every "
              "replan_every rows, rows overtaken by the inference latency skipped), open_loop (whole chunks), "
              "ensemble (temporal ensembling; also chosen by temporal_ensembling: true), rtc_replace / "
              "rtc_guidance (real-time chunking: the next chunk is inpainted over the rows of the current plan "
              "that run before it lands, d estimated from the inference latency; d and the strategy are in "
              "/diagnostics).", choices=("replan", "open_loop", "ensemble", "rtc_replace", "rtc_guidance")),
    ParamSpec("rtc_hold_rows", "int", DEFAULT_HOLD_ROWS,
              "rtc_*: soft-overlap rows kept after the d frozen ones even where the current plan ends before "
              "them (its last row is held there, with decaying weight): without them a chunk that lands "
              "when the plan has run out (d >= chunk_size - replan_every) is planned with no pull toward "
              "what the robot does at the switch. 0: only the plan's own rows.", min=0, max=1000),
    ParamSpec("rtc_decay", "string", DEFAULT_DECAY,
              "rtc_*: weights of the overlap rows after the d frozen ones: exp (decaying, Black et al. 2025), "
              "linear, or hard (only the frozen rows are imposed: for a checkpoint trained with prefix "
              "conditioning, diffusion.prefix_prob > 0, which continues its given rows itself).",
              choices=("exp", "linear", "hard")),
    ParamSpec("predict_state", "string", "auto",
              "Roll the observed state forward over the rows of the current plan that run while the next "
              "chunk is computed (the checkpoint's state_model.json, a linear model fitted on the training "
              "episodes), plan the chunk from the state at the tick it lands and execute it from its row 0 "
              "there. auto: for a policy without cameras (its observation is the state: bundled MT10 at d = 5 "
              "ticks of delay, success 0.935 -> 0.985), not for a camera policy (its images cannot be rolled "
              "forward with the state: MT6 images at d = 5, 0.858 -> 0.775); always; never "
              "(docs/measurements/rtc/state_prediction). No effect without a state model, a state, a current "
              "plan or a delay, or with lockstep_inference; ActionChunk.first_index still counts from the "
              "observation's stamp.", choices=("auto", "always", "never")),
    ParamSpec("max_observation_age", "double", 0.5,
              "Seconds (node clock, so use_sim_time works): a camera or state older than this stops the "
              "output until fresh data arrives.", min=0.001, max=3600.0, live=True),
    ParamSpec("camera_sync_tolerance", "double", 0.02,
              "Seconds: images of different cameras belong to one observation when each camera's header "
              "stamp differs from the first camera's by at most this.", min=0.0, max=10.0, live=True),
    ParamSpec("sync_queue_size", "int", 10,
              "Recent images kept per camera for stamp matching.", min=1, max=1000),
    ParamSpec("image_transport", "string", "raw",
              "raw: sensor_msgs/Image on ~/image_<camera>; compressed: sensor_msgs/CompressedImage on "
              "~/image_<camera>/compressed.", choices=("raw", "compressed")),
    ParamSpec("max_image_pixels", "int", 0,
              "Largest camera image (width x height) accepted; a larger one is rejected from its header, before "
              "decoding (rejected.image_<camera>:too_large). 0 = 64 x the checkpoint's image size, at least "
              "1920 x 1200.", min=0, max=2**31 - 1),
    ParamSpec("action_lower_bounds", "double_array", [-math.inf],
              "Per-dimension lower bounds (robot units); one value applies to all dimensions; "
              "[-.inf] = unbounded."),
    ParamSpec("action_upper_bounds", "double_array", [math.inf],
              "Per-dimension upper bounds (robot units); one value applies to all dimensions; "
              "[.inf] = unbounded."),
    ParamSpec("max_action_delta", "double_array", [math.inf],
              "Per-dimension rate limit: largest change between consecutive actions (per tick); "
              "one value applies to all dimensions; [.inf] = no limit. The last published action is "
              "kept through ticks that publish nothing (the first action after a gap is limited "
              "relative to it) and forgotten on activate and on ~/enable false."),
    ParamSpec("action_frame_id", "string", "",
              "header.frame_id of the published ActionChunk / JointTrajectory."),
    ParamSpec("state_joint_names", "string_array", [""],
              "Joints of ~/joint_states forming the state vector, in order (used only when the "
              "checkpoint takes a state); [\"\"] = the joint names the checkpoint records (the trainer "
              "keeps the converter's) unless state_field is position_velocity or a message lacks them, "
              "else the first state_dim joints in message order."),
    ParamSpec("state_field", "string", "position",
              "JointState field(s) forming the state: position, velocity or position_velocity.",
              choices=("position", "velocity", "position_velocity")),
    ParamSpec("publish_joint_trajectory", "bool", False,
              "Also publish the plan as trajectory_msgs/JointTrajectory on ~/joint_trajectory "
              "(for a joint_trajectory_controller)."),
    ParamSpec("trajectory_joint_names", "string_array", [""],
              "Joint names of the JointTrajectory, one per action dimension; [\"\"] = the checkpoint's "
              "action_names (or a0, a1, ...)."),
    ParamSpec("seed", "int", -1,
              "Seed of the diffusion sampler noise; -1 = random. >= 0: each inference's noise is drawn from this "
              "seed and its observation's stamp (repeatable: the same observation gets the same noise, "
              "live and in offline replay, and each observation its own; without cameras the observation "
              "time is when the inference was requested, or the tick with lockstep_inference).",
              min=-1, max=2**31 - 1),
    ParamSpec("autostart", "bool", True,
              "Configure and activate the lifecycle node at start-up (false: wait for a lifecycle "
              "manager / `ros2 lifecycle set`)."),
    ParamSpec("start_enabled", "bool", True,
              "Output enabled after activation; toggle with the ~/enable service (std_srvs/SetBool)."),
    ParamSpec("warmup", "bool", True,
              "Build the expert cache and run one inference during configure, so the first chunk is as "
              "fast as the rest."),
    ParamSpec("torch_threads", "int", 0,
              "torch.set_num_threads for inference on the CPU; 0 = torch's default.", min=0, max=1024),
    ParamSpec("max_goal_length", "int", 1000,
              "Goals longer than this many characters are rejected.", min=1, max=1000000),
    ParamSpec("diagnostics_period", "double", 1.0,
              "Seconds between /diagnostics messages.", min=0.05, max=3600.0),
    ParamSpec("log_throttle_period", "double", 2.0,
              "Seconds: each kind of rejected input is logged at most once per period (with a count "
              "of the suppressed repeats).", min=0.0, max=3600.0, live=True),
    ParamSpec("stats_window", "int", 200,
              "Inference latencies / tick times kept for the statistics in /diagnostics.",
              min=2, max=100000),
)
PARAMS_BY_NAME = {p.name: p for p in PARAMS}

_PY_TYPES = {"bool": bool, "int": int, "double": float, "string": str}


def _type_error(spec: ParamSpec, value: Any) -> ParameterError:
    return ParameterError(f"{spec.name}: expected {spec.type}, got {value!r} ({type(value).__name__})")


def validate(name: str, value: Any) -> Any:
    """Check one value and return it normalised (lists as lists, ints as floats for doubles).

    Raises :class:`ParameterError` whose message starts with the parameter name.
    """
    spec = PARAMS_BY_NAME.get(name)
    if spec is None:
        raise ParameterError(f"{name}: unknown parameter (known: {', '.join(sorted(PARAMS_BY_NAME))})")
    if spec.type.endswith("_array"):
        if value is None:                        # `[]` in a params file arrives as "not set"
            value = list(spec.default)
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _type_error(spec, value)
        value = list(value)
        if not value:
            value = list(spec.default)
        if spec.type == "double_array":
            try:
                value = [float(v) for v in value]
            except (TypeError, ValueError):
                raise _type_error(spec, value) from None
            if any(math.isnan(v) for v in value):
                raise ParameterError(f"{name}: NaN is not allowed ({value})")
        else:
            if not all(isinstance(v, str) for v in value):
                raise _type_error(spec, value)
        return value
    py = _PY_TYPES[spec.type]
    if spec.type == "double" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, py) or (py is int and isinstance(value, bool)):
        raise _type_error(spec, value)
    if spec.type in ("int", "double"):
        if isinstance(value, float) and not math.isfinite(value):
            raise ParameterError(f"{name}: must be finite, got {value}")
        if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
            raise ParameterError(f"{name}: {value} is out of range [{spec.min}, {spec.max}]")
    if spec.type == "string":
        if spec.choices and value not in spec.choices:
            raise ParameterError(f"{name}: {value!r} is not one of {', '.join(spec.choices)}")
        if spec.pattern and not re.fullmatch(spec.pattern, value):
            raise ParameterError(f"{name}: {value!r} does not match {spec.pattern}")
    return value


@dataclass
class NodeParams:
    """All parameter values, validated. ``from_mapping`` fills defaults for missing keys."""
    checkpoint: str = ""
    device: str = "auto"
    dtype: str = "auto"
    fast_inference: str = "auto"
    weight_quant: str = "none"
    gpu_kernels: str = "torch"
    sampling_steps: int = 0
    inference_backend: str = "torch"
    onnx_model: str = ""
    onnx_threads: int = 0
    goal: str = ""
    control_rate_hz: float = 10.0
    replan_every: int = 0
    serve_late_ticks: bool = True
    lockstep_inference: bool = False
    latency_compensation: bool = True
    temporal_ensembling: bool = False
    ensembling_decay: float = 0.01
    execution_strategy: str = "replan"
    rtc_hold_rows: int = DEFAULT_HOLD_ROWS
    rtc_decay: str = DEFAULT_DECAY
    predict_state: str = "auto"
    max_observation_age: float = 0.5
    camera_sync_tolerance: float = 0.02
    sync_queue_size: int = 10
    image_transport: str = "raw"
    max_image_pixels: int = 0
    action_lower_bounds: list = field(default_factory=lambda: [-math.inf])
    action_upper_bounds: list = field(default_factory=lambda: [math.inf])
    max_action_delta: list = field(default_factory=lambda: [math.inf])
    action_frame_id: str = ""
    state_joint_names: list = field(default_factory=lambda: [""])
    state_field: str = "position"
    publish_joint_trajectory: bool = False
    trajectory_joint_names: list = field(default_factory=lambda: [""])
    seed: int = -1
    autostart: bool = True
    start_enabled: bool = True
    warmup: bool = True
    torch_threads: int = 0
    max_goal_length: int = 1000
    diagnostics_period: float = 1.0
    log_throttle_period: float = 2.0
    stats_window: int = 200

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "NodeParams":
        unknown = set(values) - set(PARAMS_BY_NAME)
        if unknown:
            raise ParameterError(f"{sorted(unknown)[0]}: unknown parameter")
        out = {}
        for spec in PARAMS:
            out[spec.name] = validate(spec.name, values.get(spec.name, spec.default))
        return cls(**out)

    def check_against_policy(self, chunk_size: int, action_dim: int, state_dim: int = 0) -> None:
        """Cross-checks that need the loaded checkpoint (raises ParameterError)."""
        if self.replan_every > chunk_size:
            raise ParameterError(f"replan_every: {self.replan_every} > chunk_size {chunk_size} of the checkpoint")
        for name in ("action_lower_bounds", "action_upper_bounds", "max_action_delta"):
            v = getattr(self, name)
            if len(v) not in (1, action_dim):
                raise ParameterError(f"{name}: has {len(v)} values, need 1 or action_dim = {action_dim}")
        lo = broadcast(self.action_lower_bounds, action_dim)
        hi = broadcast(self.action_upper_bounds, action_dim)
        bad = [i for i in range(action_dim) if not lo[i] <= hi[i]]
        if bad:
            raise ParameterError(f"action_lower_bounds: lower > upper bound in dimension(s) {bad}")
        # an infinite bound on the wrong side leaves no finite action to publish
        bad = [i for i in range(action_dim) if lo[i] == math.inf or hi[i] == -math.inf]
        if bad:
            raise ParameterError(f"action_lower_bounds / action_upper_bounds: .inf lower or -.inf upper bound in "
                                 f"dimension(s) {bad} (no finite action is within them)")
        if state_dim > 0:
            per = state_dim // (2 if self.state_field == "position_velocity" else 1)
            if self.state_field == "position_velocity" and state_dim % 2:
                raise ParameterError(f"state_field: position_velocity needs an even state_dim, the checkpoint's "
                                     f"is {state_dim}")
            names = [n for n in self.state_joint_names if n]
            if names and len(names) != per:
                raise ParameterError(f"state_joint_names: has {len(names)} names, the checkpoint's state_dim "
                                     f"{state_dim} ({self.state_field}) needs {per}")
        if any(d <= 0 for d in self.max_action_delta):
            raise ParameterError(f"max_action_delta: values must be > 0 (use .inf for no limit), got "
                                 f"{self.max_action_delta}")
        names = [n for n in self.trajectory_joint_names if n]
        if self.publish_joint_trajectory and names and len(names) != action_dim:
            raise ParameterError(f"trajectory_joint_names: has {len(names)} names, need action_dim = {action_dim}")


def state_selection(param_names, checkpoint_names, state_field: str, state_dim: int) -> list:
    """The joint names the node picks its state by from ~/joint_states, in order; [] = the first values
    in message order. ``state_joint_names`` wins; unset, a checkpoint that records its state's names
    (the trainer stores the converter's joint names) selects by them, unless the state is
    ``position_velocity`` (the converter reads one JointState field, so its names are per value)."""
    names = [n for n in (param_names or []) if n]
    if names or state_dim <= 0:
        return names
    ck = [str(n) for n in (checkpoint_names or [])]
    if state_field != "position_velocity" and len(ck) == state_dim and all(ck) and len(set(ck)) == len(ck):
        return ck
    return []


def unknown_parameters(given, known) -> list[str]:
    """One warning per parameter name in ``given`` (the overrides of a params file or ``-p``) that is not
    in ``known``, naming the closest known name (a typo like ``chekpoint`` is otherwise ignored)."""
    import difflib

    known = sorted(set(known))
    out = []
    for name in sorted(set(given) - set(known)):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        out.append(f"unknown parameter {name!r} given to the node, ignored{hint}")
    return out


def broadcast(values: list, n: int) -> list:
    """A length-1 list repeated to n entries; other lists unchanged."""
    return list(values) * n if len(values) == 1 else list(values)


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        return repr(v)
    if isinstance(v, str):
        return '""' if v == "" else ('"' + v.replace('"', '\\"') + '"')
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return str(v)


def render_yaml(node_name: str = NODE_NAME) -> str:
    """config/policy.yaml as generated from the table (a test compares the file with this)."""
    import textwrap

    lines = [
        "# Parameters of the mode_ros policy node (executable `policy_node`, node name `mode_policy`).",
        "# Every parameter with its default. Generated from mode_ros/ros/params.py; tests keep both equal.",
        "# Parameters marked (live) take effect at once; the others are read when the lifecycle node is",
        "# configured (ros2 lifecycle set /mode_policy cleanup, then configure, to apply changes).",
        "# `/**` matches the node under any name/namespace, so launch remappings do not break it.",
        "/**:",
        "  ros__parameters:",
    ]
    for spec in PARAMS:
        desc = spec.description + (" (live)" if spec.live else "")
        rng = ""
        if spec.min is not None or spec.max is not None:
            rng = f" Range [{spec.min:g}, {spec.max:g}]."
        for ln in textwrap.wrap(desc + rng, 96):
            lines.append(f"    # {ln}")
        lines.append(f"    {spec.name}: {_yaml_value(spec.default)}")
    return "\n".join(lines) + "\n"


def _check_dataclass_matches_table() -> None:
    names = [f.name for f in fields(NodeParams)]
    assert names == [p.name for p in PARAMS], "NodeParams fields and PARAMS differ"


_check_dataclass_matches_table()
