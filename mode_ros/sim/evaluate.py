"""Closed-loop evaluation on Meta-World without DDS: any object with the policy API drives the sim.

The policy API is the one of docs/CONTRACTS.md (``camera_names``, ``state_dim``, ``chunk_size``,
``predict_chunk(images, goal_text, state, seed)`` and, when present, ``predict_chunk_batch``).
Per task, ``episodes`` held-out layouts (split ``eval`` of :mod:`mode_ros.sim.metaworld_env`,
layout indices ``0 … episodes-1`` of ``seed``) run until success or ``max_steps``, each under the node's
chunk controller (:class:`mode_ros.control.controller.ChunkController`) in sim time: :func:`evaluate`
in lockstep (each chunk from the observation of the tick it starts at, its first ``replan_every`` rows
executed, each clipped to [-1, 1]; the same episodes as the policy node in lockstep over ROS 2), and
:func:`evaluate_delays` with an injected inference delay per execution strategy. Episodes of one task
run side by side (``batch`` environments), their inferences in one batched call per tick.

:class:`ExpertPolicy` puts the scripted experts behind the same API (chunk of 1 row, computed from
the 21-d state alone), so the expert baseline is measured by this same loop.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .metaworld_env import (ACTION_DIM, ACTION_NAMES, MAX_EPISODE_STEPS, MT10, MT10_TASKS, STATE_DIM,
                            STATE_NAMES, MetaWorldSim, ScriptedExpert, camera_for, instruction_for, layout,
                            task_for_instruction)


class ExpertPolicy:
    """The Meta-World scripted experts with the MoDE policy API (state-only, chunk of 1 action)."""

    camera_names: list[str] = []
    chunk_size = 1
    action_dim = ACTION_DIM
    state_dim = STATE_DIM
    action_names = list(ACTION_NAMES)
    known_goals = list(MT10_TASKS.values())

    def __init__(self, noise: float = 0.0, seed: int = 0):
        self.noise = float(noise)
        self._rng = np.random.default_rng(seed)
        self._experts: dict[str, ScriptedExpert] = {}

    def _expert(self, goal_text: str) -> ScriptedExpert:
        try:
            task = task_for_instruction(goal_text)
        except KeyError as exc:
            raise ValueError(str(exc)) from None
        if task not in self._experts:
            self._experts[task] = ScriptedExpert(task, noise=self.noise, rng=self._rng)
        return self._experts[task]

    def encode_goal(self, text: str) -> np.ndarray:
        self._expert(text)
        return np.zeros(512, np.float32)

    def predict_chunk(self, images, goal_text: str, state=None, seed=None) -> np.ndarray:
        if state is None:
            raise ValueError("the scripted expert needs the 21-d state")
        return self._expert(goal_text).act_from_state(np.asarray(state))[None, :]

    def predict_chunk_batch(self, images, goal_texts, states=None, seed=None) -> np.ndarray:
        if states is None:
            raise ValueError("the scripted expert needs the 21-d state")
        return np.stack([self.predict_chunk(None, g, s) for g, s in zip(goal_texts, states)])

    def warmup(self) -> None:
        pass


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(MT10))
    episodes: int = 20
    seed: int = 0
    replan_every: int | None = None  # rows executed per chunk; None -> the whole chunk
    max_steps: int = MAX_EPISODE_STEPS
    image_size: int = 64
    batch: int = 0                   # environments run side by side per task; 0 -> all episodes
    gif_dir: str | None = None       # one GIF (first episode) per task when set
    gif_cameras: list[str] = field(default_factory=lambda: ["corner"])
    gif_size: int = 128
    json_path: str | None = None
    policy_seed: int = 0             # base seed of the policy's sampler (per call: derived)


def _policy_cameras(policy) -> list[str]:
    return [camera_for(c) for c in (getattr(policy, "camera_names", None) or [])]


def _gif_frame(images: dict[str, np.ndarray], cams: Sequence[str], size: int) -> np.ndarray:
    from PIL import Image
    tiles = [np.asarray(Image.fromarray(images[c]).resize((size, size), Image.NEAREST)) for c in cams if c in images]
    return np.concatenate(tiles, axis=1)


def _save_gif(path: Path, frames: list[np.ndarray], fps: float = 20.0) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    ims = [Image.fromarray(f) for f in frames[::2]] or [Image.fromarray(frames[0])]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(2000 / fps), loop=0)


def state_indices(policy) -> np.ndarray | slice:
    """Which of the 21 Meta-World state values the policy takes: all of them (state_dim 21), or the
    ones its checkpoint names (``config.state_names``, e.g. a proprioception-only policy trained on
    ``hand_x, hand_y, hand_z, gripper_open``)."""
    state_dim = int(getattr(policy, "state_dim", 0) or 0)
    names = list(getattr(getattr(policy, "config", None), "state_names", None) or [])
    if state_dim == 0:
        return slice(0, 0)
    if len(names) == state_dim:
        unknown = [n for n in names if n not in STATE_NAMES]
        if unknown:
            raise ValueError(f"the policy's state names {unknown} are not Meta-World state values "
                             f"(known: {list(STATE_NAMES)})")
        return np.array([STATE_NAMES.index(n) for n in names])
    if state_dim == STATE_DIM:
        return slice(None)
    raise ValueError(f"policy.state_dim is {state_dim}; the Meta-World state has {STATE_DIM} values (a policy "
                     f"trained on some of them must name them: config.state_names)")


def evaluate_task(policy, task: str, cfg: EvalConfig, task_index: int = 0,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``cfg.episodes`` held-out episodes of ``task`` through the node's chunk controller in lockstep (each
    chunk computed from the observation of the tick it starts at, taking no sim time; its first
    ``replan_every`` rows executed), ``cfg.batch`` episodes side by side."""
    chunk = int(getattr(policy, "chunk_size", 1))
    replan = max(1, min(cfg.replan_every or chunk, chunk))
    dcfg = DelayEvalConfig(tasks=[task], episodes=cfg.episodes, seed=cfg.seed, delays=[0], strategies=["replan"],
                           replan_every=replan, max_steps=cfg.max_steps, image_size=cfg.image_size,
                           policy_seed=cfg.policy_seed, lockstep=True)
    batch = cfg.batch if cfg.batch > 0 else cfg.episodes
    results, frames = [], []
    t0 = time.perf_counter()
    for start in range(0, cfg.episodes, batch):
        idx = list(range(start, min(cfg.episodes, start + batch)))
        gif = list(cfg.gif_cameras) if cfg.gif_dir and idx[0] == 0 else []
        eps = run_delay_episodes(policy, task, idx, "replan", 0, dcfg, task_index, gif_cameras=gif, gif_size=cfg.gif_size)
        frames += eps[0].pop("frames", [])
        for i, ep in zip(idx, eps):
            results.append({"layout": layout(task, "eval", cfg.seed, i).as_dict(), **ep})
            if log:
                log(f"  {task} episode {i}: {'success' if ep['success'] else 'failure'} after {ep['steps']} steps")
    n_succ = sum(r["success"] for r in results)
    t_policy = float(sum(r["inference_wall_s"] for r in results))
    out = {"instruction": instruction_for(task), "episodes": len(results), "successes": n_succ,
           "success_rate": n_succ / len(results) if results else 0.0,
           "mean_steps_success": float(np.mean([r["steps"] for r in results if r["success"]])) if n_succ else None,
           "replan_every": replan, "policy_calls": int(sum(r["inferences"] for r in results)),
           "policy_seconds": t_policy, "sim_seconds": time.perf_counter() - t0 - t_policy,
           "episode_results": [{k: r[k] for k in ("layout", "success", "steps")} for r in results]}
    if frames:
        gif_path = Path(cfg.gif_dir) / f"{task}.gif"
        _save_gif(gif_path, frames)
        out["gif"] = str(gif_path)
    return out


def evaluate(policy, cfg: EvalConfig, log: Callable[[str], None] | None = print, label: str = "policy") -> dict:
    """Evaluate ``policy`` on ``cfg.tasks``; returns the report (also written to ``cfg.json_path``)."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {"label": label, "config": asdict(cfg), "split": "eval", "tasks": {}}
    for ti, task in enumerate(cfg.tasks):
        t_task = time.perf_counter()
        r = evaluate_task(policy, task, cfg, task_index=ti, log=None)
        r["seconds"] = time.perf_counter() - t_task
        report["tasks"][task] = r
        if log:
            log(f"{task:26s} success {r['successes']:3d}/{r['episodes']:<3d} = {r['success_rate']:.2f}"
                f"   ({r['seconds']:.1f} s)")
    rates = [v["success_rate"] for v in report["tasks"].values()]
    report["mean_success"] = float(np.mean(rates)) if rates else 0.0
    report["seconds"] = time.perf_counter() - t0
    if log:
        log(format_table(report))
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict) -> str:
    lines = [f"{'task':26s} {'success':>8s} {'episodes':>9s} {'mean steps':>11s}", "-" * 57]
    for task, r in report["tasks"].items():
        ms = r.get("mean_steps_success")
        lines.append(f"{task:26s} {r['success_rate']:8.2f} {r['episodes']:9d} {ms if ms is None else round(ms, 1)!s:>11s}")
    lines.append("-" * 57)
    lines.append(f"{'mean (' + report.get('label', 'policy') + ')':26s} {report['mean_success']:8.2f}")
    return "\n".join(lines)


# ---- closed loop through the chunk controller with an injected inference delay -------------------------
@dataclass
class DelayEvalConfig:
    """``mode-ros sim eval --delay-ticks …``: every (strategy, d) pair runs the same held-out episodes
    through :class:`~mode_ros.control.controller.ChunkController` in sim time; an inference requested at
    a tick lands ``d`` ticks later while the previous plan keeps executing (d = 0: before the next tick)."""
    tasks: list[str] = field(default_factory=lambda: list(MT10))
    episodes: int = 5
    seed: int = 0
    delays: list[int] = field(default_factory=lambda: [0, 2, 4, 5])
    strategies: list[str] = field(default_factory=lambda: ["replan", "rtc_replace", "rtc_guidance", "ensemble"])
    replan_every: int = 5            # rows per chunk for replan / rtc (ensemble: 1)
    rate_hz: float = 20.0            # the sim's control rate (one env step per tick)
    max_steps: int = MAX_EPISODE_STEPS
    image_size: int = 64
    policy_seed: int = 0
    json_path: str | None = None
    lockstep: bool = False           # every chunk from the observation of its first tick, taking no sim time
    rtc_hold_rows: int | None = None  # the node parameter of that name (rtc_*; None: its default)
    rtc_decay: str | None = None      # the node parameter of that name (rtc_*; None: its default)
    predict_state: str | None = None   # the node parameter of that name (None: its default)


def _controller(policy, strategy: str, d: int, cfg: DelayEvalConfig, goal: str):
    """A ChunkController + VirtualTime for one episode: inference takes ``d`` ticks of sim time."""
    from mode_ros.control.controller import ChunkController
    from mode_ros.control.virtual import VirtualTime
    from mode_ros.ros.params import NodeParams

    period = 1.0 / cfg.rate_hz
    p = NodeParams.from_mapping({
        "checkpoint": "sim", "control_rate_hz": cfg.rate_hz, "goal": goal, "seed": cfg.policy_seed,
        "replan_every": 1 if strategy == "ensemble" else min(cfg.replan_every, policy.chunk_size),
        "execution_strategy": strategy, "max_observation_age": 3600.0, "lockstep_inference": cfg.lockstep,
        **{k: v for k, v in (("rtc_hold_rows", cfg.rtc_hold_rows), ("rtc_decay", cfg.rtc_decay),
                             ("predict_state", cfg.predict_state)) if v is not None}})
    vt = VirtualTime()
    ctl = ChunkController(p, list(getattr(policy, "camera_names", []) or []), policy.state_dim, policy.chunk_size,
                          policy.action_dim, vt.clock, initial_latency=d * period,
                          state_model=getattr(policy, "state_model", None))
    vt.attach(ctl, policy.predict_chunk, latency=lambda wall: d * period)
    return ctl, vt


class _Episode:
    """One held-out episode under its own controller, stepped tick by tick (see run_delay_episodes)."""

    def __init__(self, policy, task: str, index: int, strategy: str, d: int, cfg: DelayEvalConfig, task_index: int,
                 gif_cameras=(), gif_size: int = 128):
        cams = _policy_cameras(policy)
        self.gif = [c for c in gif_cameras]
        self.gif_size, self.frames = gif_size, []
        self.sim = MetaWorldSim(task, cameras=cams + [c for c in self.gif if c not in cams], image_size=cfg.image_size,
                                max_steps=cfg.max_steps)
        self.ctl, self.vt = _controller(policy, strategy, d, cfg, instruction_for(task))
        self.t0 = (1 + task_index * 100_000 + index * 100) * 1_000_000_000   # stamps (and noise) per episode
        self.obs = self.sim.reset("eval", cfg.seed, index)
        self._frame()
        self.prev = None              # (action, plan sequence) executed at the previous tick
        self.switch, self.inside, self.idle = [], [], 0
        self.result = None
        self.cpu = 0.0                # CPU seconds of this episode's inferences (its share of a batch)

    def tick(self, k: int, cams, pick, names) -> int:
        """Inputs and tick at step k (a result due by then lands first); returns the tick time."""
        t = self.t0 + k * self.ctl.period_ns
        self.vt.set_clock(t)
        self.vt.land(t)
        for c, name in zip(cams, names):
            self.ctl.on_image(name, t, self.obs.images[c])
        if self.ctl.state_dim:
            self.ctl.on_state(t, self.obs.state[pick])
        self.res = self.ctl.tick()
        return t

    def act(self, t: int) -> bool:
        """Execute this tick's action (a result landing now, d = 0, serves the tick late); True: done."""
        out = self.res.output or self.vt.land(t)
        if out is None:
            action, self.idle, self.prev = np.zeros(ACTION_DIM, np.float32), self.idle + 1, None
        else:
            action = np.clip(out.actions[0], -1.0, 1.0)
            if self.prev is not None:
                same = out.plan.sequence == self.prev[1]
                (self.inside if same else self.switch).append(float(np.linalg.norm(action - self.prev[0])))
            self.prev = (action, out.plan.sequence)
        self.result = self.sim.step(action)
        self.obs = self.result.obs
        self._frame()
        return self.result.done

    def _frame(self) -> None:
        if self.gif:
            self.frames.append(_gif_frame(self.obs.images, self.gif, self.gif_size))

    def summary(self) -> dict:
        vt, ctl = self.vt, self.ctl
        return {"success": bool(self.result is not None and self.result.success), "steps": int(self.sim.steps),
                "switch_changes": self.switch, "inside_changes": self.inside, "ticks_without_action": self.idle,
                "inferences": len(vt.walls), "inference_wall_s": float(np.sum(vt.walls)) if vt.walls else 0.0,
                "inference_cpu_s": self.cpu,
                "estimated_d": ctl.estimated_d, "inference_failures": ctl.counters.get("inference_failures"),
                "predict_state": ctl.predict_state_status(), "predicted_ticks": ctl.last_lead,
                **({"frames": self.frames} if self.gif else {})}


def _infer_batch(policy, episodes: list) -> None:
    """The inferences the episodes' controllers claimed this tick, in one batched call when possible."""
    reqs = [(e, e.vt.request()) for e in episodes if e.vt.claimed]
    reqs = [(e, r) for e, r in reqs if r is not None]
    if not reqs:
        return
    c0 = time.process_time()
    try:
        _call_batch(policy, reqs)
    finally:
        cpu = (time.process_time() - c0) / len(reqs)
        for e, _ in reqs:
            e.cpu += cpu


def _call_batch(policy, reqs: list) -> None:
    batch_fn = getattr(policy, "predict_chunk_batch", None)
    if batch_fn is None or len(reqs) == 1:
        for e, r in reqs:
            t0 = time.perf_counter()
            try:
                e.vt.submit(r, r.call(policy.predict_chunk), wall=time.perf_counter() - t0)
            except ValueError as exc:
                e.vt.submit(r, error=f"inference refused: {exc}")
        return
    images = [np.stack([r.images[c] for _, r in reqs]) for c in range(len(reqs[0][1].images))] or None
    states = np.stack([r.state for _, r in reqs]) if reqs[0][1].state is not None else None
    prefixes = [r.prefix for _, r in reqs]
    t0 = time.perf_counter()
    try:
        kw = {"prefixes": prefixes} if any(p is not None for p in prefixes) else {}   # RTC only
        out = np.asarray(batch_fn(images, [r.goal for _, r in reqs], states, seed=reqs[0][1].seed, **kw))
    except ValueError as exc:
        for e, r in reqs:
            e.vt.submit(r, error=f"inference refused: {exc}")
        return
    wall = (time.perf_counter() - t0) / len(reqs)   # per chunk
    for (e, r), actions in zip(reqs, out):
        e.vt.submit(r, actions, wall=wall)


def run_delay_episodes(policy, task: str, indices: Sequence[int], strategy: str, d: int, cfg: DelayEvalConfig,
                       task_index: int = 0, gif_cameras=(), gif_size: int = 128) -> list[dict]:
    """Held-out episodes of one task side by side (one controller each, one batched policy call per
    tick); per episode: success, steps, the executed actions' changes at chunk switches (the newest plan
    changed) and inside chunks, ticks without an action (before the first chunk lands)."""
    cams, pick = _policy_cameras(policy), state_indices(policy)
    names = list(getattr(policy, "camera_names", []) or [])
    episodes = [_Episode(policy, task, i, strategy, d, cfg, task_index, gif_cameras if j == 0 else (), gif_size)
                for j, i in enumerate(indices)]
    try:
        active = list(episodes)
        for k in range(cfg.max_steps):
            times = [e.tick(k, cams, pick, names) for e in active]
            _infer_batch(policy, active)
            active = [e for e, t in zip(active, times) if not e.act(t)]
            if not active:
                break
        return [e.summary() for e in episodes]
    finally:
        for e in episodes:
            e.sim.close()


def run_delay_episode(policy, task: str, index: int, strategy: str, d: int, cfg: DelayEvalConfig,
                      task_index: int = 0) -> dict:
    """One held-out episode (:func:`run_delay_episodes` with one index)."""
    return run_delay_episodes(policy, task, [index], strategy, d, cfg, task_index)[0]


def _summarise(episodes: list[dict]) -> dict:
    succ = [e for e in episodes if e["success"]]
    sw = [x for e in episodes for x in e["switch_changes"]]
    ins = [x for e in episodes for x in e["inside_changes"]]
    n_inf = sum(e["inferences"] for e in episodes)
    return {"episodes": len(episodes), "success_rate": len(succ) / len(episodes) if episodes else 0.0,
            "mean_steps_success": float(np.mean([e["steps"] for e in succ])) if succ else None,
            "switch_change": float(np.mean(sw)) if sw else None, "inside_change": float(np.mean(ins)) if ins else None,
            "switch_over_inside": float(np.mean(sw) / np.mean(ins)) if sw and ins and np.mean(ins) > 0 else None,
            "ms_per_chunk": 1e3 * sum(e["inference_wall_s"] for e in episodes) / n_inf if n_inf else None,
            "cpu_ms_per_chunk": 1e3 * sum(e["inference_cpu_s"] for e in episodes) / n_inf if n_inf else None,
            "ticks_without_action": int(sum(e["ticks_without_action"] for e in episodes)),
            "predict_state": episodes[0]["predict_state"] if episodes else "",
            "inference_failures": int(sum(e["inference_failures"] for e in episodes))}


def evaluate_delays(policy, cfg: DelayEvalConfig, log: Callable[[str], None] | None = print,
                    label: str = "policy") -> dict:
    """Every strategy x delay on ``cfg.tasks`` x ``cfg.episodes``; the report (JSON at cfg.json_path)
    has per-task and pooled figures. The JSON is rewritten after every (strategy, d) so a long run that
    is stopped keeps what it measured."""
    report: dict[str, Any] = {"label": label, "config": asdict(cfg), "results": {}}
    t_start = time.perf_counter()
    for strategy in cfg.strategies:
        for d in cfg.delays:
            eps_by_task = {}
            for ti, task in enumerate(cfg.tasks):   # the JSON after every task: a stopped run keeps its part
                eps_by_task[task] = run_delay_episodes(policy, task, range(cfg.episodes), strategy, d, cfg, ti)
                pooled = _summarise([e for v in eps_by_task.values() for e in v])
                pooled["tasks"] = {t: _summarise(v) for t, v in eps_by_task.items()}
                pooled["complete"] = len(eps_by_task) == len(cfg.tasks)
                report["results"][f"{strategy}@{d}"] = {"strategy": strategy, "d": d, **pooled}
                report["seconds"] = time.perf_counter() - t_start
                if cfg.json_path:
                    Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
                    Path(cfg.json_path).write_text(json.dumps(report, indent=1))
            if log:
                log(f"{strategy:13s} d={d}: success {pooled['success_rate']:.3f}  steps "
                    f"{pooled['mean_steps_success'] or float('nan'):.1f}  switch/inside "
                    f"{pooled['switch_over_inside'] or float('nan'):.2f}  ({report['seconds']:.0f} s)")
    if log:
        log(format_delay_table(report))
    return report


def format_delay_table(report: dict) -> str:
    head = (f"{'strategy':13s} {'d':>2s} {'success':>8s} {'steps':>7s} {'switch':>7s} {'inside':>7s} "
            f"{'sw/in':>6s} {'cpu ms/chunk':>12s} {'idle':>5s}  predict_state")
    lines = [head, "-" * len(head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    for r in report["results"].values():
        part = "" if r.get("complete", True) else f"  ({len(r['tasks'])} tasks)"
        lines.append(f"{r['strategy']:13s} {r['d']:2d} {r['success_rate']:8.3f} {f(r['mean_steps_success'], '7.1f')} "
                     f"{f(r['switch_change'], '7.4f')} {f(r['inside_change'], '7.4f')} "
                     f"{f(r['switch_over_inside'], '6.2f')} {f(r.get('cpu_ms_per_chunk'), '12.1f')} "
                     f"{r['ticks_without_action']:5d}  {r.get('predict_state', '')}{part}")
    return "\n".join(lines)
