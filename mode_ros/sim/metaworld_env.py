"""Meta-World MT10 for mode_ros: tasks, instructions, layouts, a fast renderer, state, scripted experts.

ROS-free (no rclpy here). Everything the recorder, the direct evaluator and the ROS bridge share.

Facts this module relies on (Meta-World 3.1.1, MuJoCo 3.3, measured on this machine):
  * ``metaworld.MT1(task, seed=s).train_tasks`` holds 50 fixed layouts (object + goal positions) per
    seed; ``env.set_task(t); env.reset()`` applies one; ``reset(seed=...)`` is ignored.
  * Observation: 39-d float64. ``obs[0:3]`` hand (end-effector) xyz, ``obs[3]`` gripper opening
    (0 closed … 1 open), ``obs[4:7]`` object 1 xyz, ``obs[7:11]`` object 1 quaternion, ``obs[11:18]``
    object 2 xyz + quaternion (zeros when the task has one object), ``obs[18:36]`` the same 18 values
    of the previous step (frame stacking), ``obs[36:39]`` goal xyz.
  * Action: 4-d in [-1, 1]: hand displacement dx, dy, dz (x 1 cm) and the gripper effort.
  * One env step = 5 MuJoCo steps of 2.5 ms = 12.5 ms of physics; an episode is at most 500 steps;
    success = ``info["success"]`` at any step within the limit.
  * The scripted experts (``metaworld.policies.ENV_POLICY_MAP``) read only ``obs[0:18]`` and
    ``obs[36:39]``, may modify their input (pass a copy), and can return values outside [-1, 1].

Layout split (training vs held-out evaluation)
---------------------------------------------
A layout is addressed by ``(split, seed, index)`` and resolved to
``MT1(task, seed=mt1_seed).train_tasks[index % 50]`` with
``mt1_seed = SPLIT_BASE[split] + seed * SEED_STRIDE + index // 50``:
  * ``train`` (recording demonstrations): SPLIT_BASE 0, so MT1 seeds 0 … 9_999_999;
  * ``eval``  (held-out evaluation):       SPLIT_BASE 10_000_000, so MT1 seeds ≥ 10_000_000.
``SEED_STRIDE`` = 1000, so one seed addresses 50 000 layouts before touching the next seed's range,
and any ``seed < 10_000`` in one split never reuses an MT1 seed of the other split. Layouts are
continuous random vectors, so layouts from different MT1 seeds differ (a test checks it).

The state vector given to the policy (``STATE_NAMES``, 21-d) is ``obs[0:18]`` + ``obs[36:39]``:
hand xyz, gripper opening, object 1 xyz + quaternion, object 2 xyz + quaternion, goal xyz. The
previous-frame copy is left out. The experts need nothing else, so an expert can run as a "policy"
from this state alone (see :func:`raw_obs_from_state`).
"""
from __future__ import annotations

import os
import pickle
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

# Headless rendering: MuJoCo picks its GL backend when it is first imported. EGL works on a CPU
# machine with Debian's libegl1 + libgl1-mesa-dri (Mesa llvmpipe) and on NVIDIA GPUs; osmesa
# (libosmesa6) is the fallback. A value already set by the user wins.
if not os.environ.get("MUJOCO_GL") and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"

import numpy as np

# --------------------------------------------------------------------------------------------
# Tasks and instructions
# --------------------------------------------------------------------------------------------
#: MT10 task names (Meta-World v3) -> the language instruction given to the policy.
MT10_TASKS: dict[str, str] = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button down from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
MT10: list[str] = list(MT10_TASKS)

#: Names of the 21 state dimensions (JointState.name in the bags and on the bridge).
STATE_NAMES: list[str] = [
    "hand_x", "hand_y", "hand_z", "gripper_open",
    "obj1_x", "obj1_y", "obj1_z", "obj1_q0", "obj1_q1", "obj1_q2", "obj1_q3",
    "obj2_x", "obj2_y", "obj2_z", "obj2_q0", "obj2_q1", "obj2_q2", "obj2_q3",
    "goal_x", "goal_y", "goal_z",
]
STATE_DIM = len(STATE_NAMES)
#: Indices of the state dims in the 39-d Meta-World observation.
STATE_OBS_INDEX = np.r_[0:18, 36:39]
#: The 4 action dims (Meta-World units: [-1, 1]).
ACTION_NAMES: list[str] = ["dx", "dy", "dz", "gripper"]
ACTION_DIM = 4
MAX_EPISODE_STEPS = 500
PHYSICS_DT = 0.0125  # seconds of MuJoCo time per env step (frame_skip 5 x 2.5 ms)

#: MuJoCo cameras of the Sawyer scene.
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
#: These cameras render upside down; the renderer rotates them by 180 degrees.
ROTATE_180 = frozenset({"corner", "corner2", "corner3", "corner4"})
DEFAULT_CAMERAS = ("corner", "gripperPOV")
#: Model camera slot names (as written by config/metaworld_topics.yaml) -> MuJoCo camera.
CAMERA_ALIASES = {"static": "corner", "gripper": "gripperPOV", "gripper_pov": "gripperPOV",
                  "wrist": "gripperPOV", **{c: c for c in CAMERAS}}

SPLIT_BASE = {"train": 0, "eval": 10_000_000}
SEED_STRIDE = 1000
LAYOUTS_PER_SEED = 50


def resolve_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"all"``/None -> MT10; ``"reach,push-v3"`` -> ["reach-v3", "push-v3"] (``-v3`` optional)."""
    if spec is None or spec == "all" or spec == ["all"]:
        return list(MT10)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if not name.endswith("-v3"):
            name += "-v3"
        if name not in MT10_TASKS:
            raise ValueError(f"unknown task {raw!r}; MT10 tasks: {', '.join(MT10)}")
        out.append(name)
    if not out:
        raise ValueError("no task given")
    return out


def instruction_for(task: str) -> str:
    return MT10_TASKS[task]


def task_for_instruction(text: str) -> str:
    for task, instr in MT10_TASKS.items():
        if instr == text.strip():
            return task
    raise KeyError(f"no MT10 task has the instruction {text!r}")


def camera_for(slot: str) -> str:
    """MuJoCo camera for a model camera slot name (``static`` -> ``corner``, ``gripper`` -> ``gripperPOV``)."""
    try:
        return CAMERA_ALIASES[slot]
    except KeyError:
        raise ValueError(f"no Meta-World camera for {slot!r}; known: {sorted(CAMERA_ALIASES)}") from None


def camera_topic_name(camera: str) -> str:
    """ROS-friendly lower-case name of a MuJoCo camera (``gripperPOV`` -> ``gripper_pov``)."""
    out = []
    for i, ch in enumerate(camera):
        if ch.isupper() and i > 0 and not camera[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def state_from_obs(obs: np.ndarray) -> np.ndarray:
    """21-d float32 policy state from the 39-d observation."""
    return np.asarray(obs, dtype=np.float64)[STATE_OBS_INDEX].astype(np.float32)


def raw_obs_from_state(state: np.ndarray) -> np.ndarray:
    """39-d observation the experts accept, rebuilt from the 21-d state (previous frame := current)."""
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    if s.shape[0] != STATE_DIM:
        raise ValueError(f"state must have {STATE_DIM} values, got {s.shape[0]}")
    return np.concatenate([s[:18], s[:18], s[18:21]])


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    task: str
    split: str
    seed: int
    index: int
    mt1_seed: int
    mt1_index: int

    def as_dict(self) -> dict:
        return {"task": self.task, "split": self.split, "seed": self.seed, "index": self.index,
                "mt1_seed": self.mt1_seed, "mt1_index": self.mt1_index}


def layout(task: str, split: str, seed: int, index: int) -> Layout:
    if split not in SPLIT_BASE:
        raise ValueError(f"split must be one of {list(SPLIT_BASE)}, got {split!r}")
    if not 0 <= seed < SPLIT_BASE["eval"] // SEED_STRIDE:
        raise ValueError(f"seed must be in [0, {SPLIT_BASE['eval'] // SEED_STRIDE}), got {seed}")
    if not 0 <= index < SEED_STRIDE * LAYOUTS_PER_SEED:
        raise ValueError(f"layout index must be in [0, {SEED_STRIDE * LAYOUTS_PER_SEED}), got {index}")
    return Layout(task, split, int(seed), int(index),
                  SPLIT_BASE[split] + seed * SEED_STRIDE + index // LAYOUTS_PER_SEED,
                  index % LAYOUTS_PER_SEED)


@lru_cache(maxsize=64)
def _mt1_tasks(task: str, mt1_seed: int) -> tuple:
    import metaworld
    return tuple(metaworld.MT1(task, seed=mt1_seed).train_tasks)


def metaworld_task(lay: Layout):
    """The ``metaworld.Task`` (object/goal layout) for a :class:`Layout` (cached per MT1 seed)."""
    return _mt1_tasks(lay.task, lay.mt1_seed)[lay.mt1_index]


def layout_vector(lay: Layout) -> np.ndarray:
    """The random vector (object and goal positions) that defines the layout."""
    return np.asarray(pickle.loads(metaworld_task(lay).data)["rand_vec"], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_LLVM_PRELOADED = False


def preload_llvm_libraries() -> None:
    """Load Triton's ``libtriton.so`` (private LLVM inside) before the first GL context is made.

    With ``MUJOCO_GL=egl``/``osmesa`` on a CPU, Mesa's llvmpipe dlopens the system ``libLLVM-1x.so``
    into the global symbol scope. Triton's ``libtriton.so`` embeds another LLVM whose symbols are
    exported too; loaded *after* Mesa (torchvision -> torch._dynamo -> triton), its LLVM references
    bind to Mesa's LLVM and its static initialisers segfault the process. Loaded *before* the GL
    context (here, ``RTLD_LOCAL``), it binds to its own copy and Mesa's later load is harmless; a
    later ``import triton`` reuses the already loaded library. Costs ~20 ms (an mmap); a no-op
    without Triton. ``MODE_ROS_NO_TRITON_PRELOAD=1`` turns it off.
    """
    global _LLVM_PRELOADED
    if _LLVM_PRELOADED or os.environ.get("MODE_ROS_NO_TRITON_PRELOAD"):
        return
    _LLVM_PRELOADED = True
    import sys
    if "triton._C.libtriton" in sys.modules:
        return
    try:
        import ctypes
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec is None or not spec.submodule_search_locations:
            return
        for loc in spec.submodule_search_locations:
            lib = os.path.join(loc, "_C", "libtriton.so")
            if os.path.isfile(lib):
                ctypes.CDLL(lib, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2))
                return
    except Exception as exc:  # noqa: BLE001 - never fatal: worst case is the old behaviour
        warnings.warn(f"could not preload Triton before the GL context: {exc}", RuntimeWarning)


class FastRenderer:
    """Off-screen RGB renderer: shadows, reflections and MSAA off; ``size`` x ``size`` uint8 frames.

    The default gymnasium path (MSAA x4, shadows, reflections) takes ~75-100 ms per 96 px frame
    on this CPU; this takes ~5-10 ms. ``corner*`` cameras are rotated by 180 degrees.
    """

    def __init__(self, model, size: int = 64, cameras: Sequence[str] = DEFAULT_CAMERAS):
        import mujoco
        from mujoco import gl_context
        if (getattr(gl_context.GLContext, "__module__", "") == "mujoco.glfw" and not os.environ.get("DISPLAY")):
            raise RuntimeError("MuJoCo was imported with the GLFW backend and there is no display: set "
                               "MUJOCO_GL=egl (or osmesa) in the environment, or import mode_ros.sim before "
                               "mujoco/metaworld")
        for cam in cameras:
            if cam not in CAMERAS:
                raise ValueError(f"unknown camera {cam!r}; Meta-World cameras: {', '.join(CAMERAS)}")
        self.cameras = list(cameras)
        self.size = int(size)
        preload_llvm_libraries()  # before the first GL context (see there: Mesa/Triton LLVM clash)
        model.vis.quality.offsamples = 0  # MSAA off (the renderer's framebuffer reads it)
        # the off-screen buffer must hold the frame
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.size)
        self._renderer = mujoco.Renderer(model, self.size, self.size)
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0

    def render(self, data, camera: str) -> np.ndarray:
        self._renderer.update_scene(data, camera=camera)
        img = self._renderer.render()
        if camera in ROTATE_180:
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img, dtype=np.uint8)

    def render_all(self, data) -> dict[str, np.ndarray]:
        return {cam: self.render(data, cam) for cam in self.cameras}

    def close(self) -> None:
        r, self._renderer = getattr(self, "_renderer", None), None
        if r is not None:
            try:
                r.close()
            except Exception:  # noqa: BLE001 - GL teardown at exit is best effort
                pass


# --------------------------------------------------------------------------------------------
# Environment wrapper
# --------------------------------------------------------------------------------------------
@dataclass
class SimObservation:
    images: dict[str, np.ndarray]   # MuJoCo camera name -> HxWx3 uint8 RGB
    state: np.ndarray               # (21,) float32, STATE_NAMES order
    raw: np.ndarray                 # (39,) float64 Meta-World observation
    step: int                       # env steps taken in this episode


@dataclass
class StepResult:
    obs: SimObservation
    success: bool     # info["success"] at this step
    done: bool        # success or the step limit reached
    info: dict = field(default_factory=dict)


class MetaWorldSim:
    """One Meta-World task: choose a layout, reset, step, render, success.

    ``cameras`` are MuJoCo camera names (``()`` renders nothing); ``max_steps`` <= 500.
    """

    def __init__(self, task: str, cameras: Sequence[str] = DEFAULT_CAMERAS, image_size: int = 64,
                 max_steps: int = MAX_EPISODE_STEPS):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"unknown Meta-World task {task!r}")
        if not 1 <= max_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_steps must be in [1, {MAX_EPISODE_STEPS}], got {max_steps}")
        self.task = task
        self.instruction = MT10_TASKS.get(task, task.replace("-v3", "").replace("-", " "))
        self.max_steps = int(max_steps)
        # MT10 uses the fully observable variant (goal visible in obs[36:39]); set_task applies it.
        self.env = ALL_V3_ENVIRONMENTS[task]()
        self.cameras = [camera_for(c) for c in cameras]
        self.image_size = int(image_size)
        self.renderer = FastRenderer(self.env.model, image_size, self.cameras) if self.cameras else None
        self.layout: Layout | None = None
        self.steps = 0
        self.succeeded = False
        self._obs: np.ndarray | None = None

    # -- episode -------------------------------------------------------------------------------
    def reset(self, split: str = "train", seed: int = 0, index: int = 0, render: bool = True) -> SimObservation:
        return self.reset_layout(layout(self.task, split, seed, index), render=render)

    def reset_layout(self, lay: Layout, render: bool = True) -> SimObservation:
        if lay.task != self.task:
            raise ValueError(f"layout is for {lay.task}, this sim runs {self.task}")
        self.env.set_task(metaworld_task(lay))
        obs, _ = self.env.reset()
        self.layout, self.steps, self.succeeded = lay, 0, False
        self._obs = obs
        return self.observation(render)

    def step(self, action, render: bool = True) -> StepResult:
        if self._obs is None:
            raise RuntimeError("reset() first")
        if self.steps >= self.max_steps:
            raise RuntimeError(f"episode over ({self.max_steps} steps): reset() first")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if a.shape[0] != ACTION_DIM or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be {ACTION_DIM} finite values, got {action!r}")
        obs, _reward, _term, _trunc, info = self.env.step(a.astype(np.float32))
        self._obs = obs
        self.steps += 1
        success = bool(info.get("success", 0.0))
        self.succeeded = self.succeeded or success
        return StepResult(self.observation(render), success, success or self.steps >= self.max_steps, info)

    def observation(self, render: bool = True) -> SimObservation:
        images = self.render() if (render and self.renderer is not None) else {}
        return SimObservation(images, state_from_obs(self._obs), self._obs.copy(), self.steps)

    def render(self, cameras: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        if self.renderer is None:
            return {}
        if cameras is None:
            return self.renderer.render_all(self.env.data)
        return {c: self.renderer.render(self.env.data, camera_for(c)) for c in cameras}

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        try:
            self.env.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# Scripted experts
# --------------------------------------------------------------------------------------------
class ScriptedExpert:
    """Meta-World's hand-written policy for ``task``, clipped to [-1, 1], with optional noise.

    ``noise`` is the std of Gaussian noise added to the clipped action (then clipped again),
    drawn from ``rng`` (a ``numpy.random.Generator``; pass a seeded one for reproducible demos).
    """

    def __init__(self, task: str, noise: float = 0.0, rng: np.random.Generator | None = None):
        from metaworld.policies import ENV_POLICY_MAP
        if task not in ENV_POLICY_MAP:
            raise ValueError(f"no scripted expert for {task!r}")
        self.task = task
        self.policy = ENV_POLICY_MAP[task]()
        self.noise = float(noise)
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def act(self, raw_obs: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # "Constant(s) may be too high. Environments clip response to [-1, 1]" - we clip.
            warnings.simplefilter("ignore", UserWarning)
            a = np.asarray(self.policy.get_action(np.array(raw_obs, dtype=np.float64, copy=True)),
                           dtype=np.float64)
        a = np.clip(a, -1.0, 1.0)
        if self.noise > 0:
            a = np.clip(a + self.rng.normal(0.0, self.noise, size=a.shape), -1.0, 1.0)
        return a.astype(np.float32)

    def act_from_state(self, state: np.ndarray) -> np.ndarray:
        return self.act(raw_obs_from_state(state))


def run_expert_episode(sim: MetaWorldSim, expert: ScriptedExpert, lay: Layout,
                       render: bool = True, post_success_steps: int = 0) -> dict[str, Any]:
    """One expert episode; returns observations (before each action), actions and success."""
    obs = sim.reset_layout(lay, render=render)
    observations, actions = [], []
    success_step = None
    t0 = time.perf_counter()
    while sim.steps < sim.max_steps:
        a = expert.act(obs.raw)
        observations.append(obs)
        actions.append(a)
        res = sim.step(a, render=render)
        obs = res.obs
        if res.success and success_step is None:
            success_step = sim.steps
        if success_step is not None and sim.steps >= success_step + post_success_steps:
            break
    return {"observations": observations, "actions": np.stack(actions), "success": success_step is not None,
            "success_step": success_step, "steps": sim.steps, "final": obs,
            "seconds": time.perf_counter() - t0}

