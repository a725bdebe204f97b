"""Record scripted-expert demonstrations of Meta-World tasks as rosbag2 files (ROS-free: ``rosbags``).

Layout on disk (one bag per episode, so a bag is one demonstration and bags can be mixed freely)::

    OUT/
      record_summary.json                 per-task attempts/successes/steps, settings, timings
      metaworld_topics.yaml               the topic map for ``mode-ros convert bag`` (cameras as recorded)
      <task>/<task>_s<seed>_l<index>/     one rosbag2 (metadata.yaml + .mcap, or .db3) per episode

Topics and types: see :mod:`mode_ros.sim.topics`. Timing: one control tick = one env step
(12.5 ms of MuJoCo physics); the sim clock advances ``1 / control_rate_hz`` (default 20 Hz, 50 ms)
per tick, like a robot driver whose controller runs at that rate. Each bag starts at sim time
``START_TIME_S`` (1.0 s; 0 would read as "unset" to many ROS tools). At tick ``k`` (time
``t_k = 1.0 + k / rate``) the bag holds the observation taken *before* the action (every camera
image, the JointState) and the action executed at that tick, all with header stamp = bag log time
= ``t_k``. The goal (std_msgs/String, offered as reliable + transient local) and an episode start
marker are written once at ``t_0``; the end marker (JSON with ``success`` and ``steps``) at the time
of the observation that followed the last action. The final observation itself is not written (it
has no action).

Only successful episodes are written unless ``keep_failures``: the recorder walks the training
layouts ``index = 0, 1, 2, …`` of ``seed`` (see :mod:`mode_ros.sim.metaworld_env`) until it has
``episodes_per_task`` successes or ``max_attempts`` episodes.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import topics as T
from .metaworld_env import (ACTION_NAMES, DEFAULT_CAMERAS, MAX_EPISODE_STEPS, MT10, STATE_NAMES,
                            MetaWorldSim, ScriptedExpert, camera_for, camera_topic_name, instruction_for,
                            layout, run_expert_episode)

START_TIME_S = 1.0
#: Model camera slot (in the topic map / the trained checkpoint) for each MuJoCo camera.
SLOT_FOR_CAMERA = {"corner": "static", "gripperPOV": "gripper"}
#: obs/<key> of the state in the converted episodes.
STATE_KEY = "state"


@dataclass
class RecordConfig:
    out: str
    tasks: list[str] = field(default_factory=lambda: list(MT10))
    episodes_per_task: int = 10
    seed: int = 0
    image_size: int = 64
    cameras: list[str] = field(default_factory=lambda: list(DEFAULT_CAMERAS))
    noise: float = 0.0
    control_rate_hz: float = 20.0
    max_steps: int = MAX_EPISODE_STEPS
    storage: str = "mcap"            # "mcap" or "sqlite3"
    keep_failures: bool = False
    max_attempts: int | None = None  # per task; default 2 * episodes_per_task + 10
    post_success_steps: int = 0      # keep acting this many steps after the first success
    overwrite: bool = False


def slot_for_camera(camera: str) -> str:
    return SLOT_FOR_CAMERA.get(camera, camera_topic_name(camera))


def topic_map(cameras: Sequence[str] = DEFAULT_CAMERAS, control_rate_hz: float = 20.0) -> dict:
    """The topic map (``mode-ros convert bag --topics``, mode_ros.data.topic_map) for these bags."""
    cams = [camera_for(c) for c in cameras]
    return {
        "control_rate_hz": float(control_rate_hz),
        "time_source": "header",
        "tolerance_s": round(0.5 / control_rate_hz, 6),
        "min_ticks": 5,
        "cameras": {slot_for_camera(c): {"topic": T.image_topic(c)} for c in cams},
        "language": {"topic": T.GOAL_TOPIC},
        "action": {"topic": T.ACTION_TOPIC, "dim": len(ACTION_NAMES), "names": list(ACTION_NAMES)},
        "state": {"topic": T.STATE_TOPIC, "field": "position", "joints": list(STATE_NAMES), "key": STATE_KEY},
        "split": {"by": "bag"},
    }


def topic_map_yaml(cameras: Sequence[str] = DEFAULT_CAMERAS, control_rate_hz: float = 20.0) -> str:
    import yaml
    head = ("# Topic map for Meta-World bags recorded by `mode-ros sim record` (mode_ros/sim/record.py):\n"
            "#   mode-ros convert bag OUT/*/* --topics config/metaworld_topics.yaml --out demos.hdf5\n"
            "# One bag = one episode (split by bag). Every message of tick k carries header stamp = bag time =\n"
            "# sim time 1.0 s + k / control_rate_hz, so the tolerance is half a tick.\n"
            "# cameras: model slot -> sensor_msgs/Image rgb8 ('static' = MuJoCo 'corner', rotated upright;\n"
            "#   'gripper' = 'gripperPOV'). action: std_msgs/Float32MultiArray [dx, dy, dz, gripper] in [-1, 1]\n"
            "#   (no header: bag time). state: sensor_msgs/JointState, position = the 21 named values.\n")
    return head + yaml.safe_dump(topic_map(cameras, control_rate_hz), sort_keys=False, width=120)


# ------------------------------------------------------------------------------------------------
# rosbag2 writing
# ------------------------------------------------------------------------------------------------
class _Msgs:
    """Builds and CDR-serialises the messages with a rosbags typestore."""

    def __init__(self):
        from rosbags.typesys import Stores, get_typestore
        self.ts = get_typestore(Stores.ROS2_KILTED)
        t = self.ts.types
        self.Time = t["builtin_interfaces/msg/Time"]
        self.Header = t["std_msgs/msg/Header"]
        self.Image = t["sensor_msgs/msg/Image"]
        self.JointState = t["sensor_msgs/msg/JointState"]
        self.F32 = t["std_msgs/msg/Float32MultiArray"]
        self.Layout = t["std_msgs/msg/MultiArrayLayout"]
        self.Dim = t["std_msgs/msg/MultiArrayDimension"]
        self.String = t["std_msgs/msg/String"]

    def header(self, ns: int, frame_id: str = ""):
        return self.Header(stamp=self.Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000), frame_id=frame_id)

    def image(self, ns: int, frame_id: str, img: np.ndarray) -> bytes:
        h, w = img.shape[:2]
        msg = self.Image(header=self.header(ns, frame_id), height=h, width=w, encoding="rgb8", is_bigendian=0,
                         step=3 * w, data=np.ascontiguousarray(img, dtype=np.uint8).reshape(-1))
        return self.ts.serialize_cdr(msg, T.IMAGE_TYPE)

    def joint_state(self, ns: int, names: list[str], values: np.ndarray) -> bytes:
        msg = self.JointState(header=self.header(ns), name=names,
                              position=np.asarray(values, dtype=np.float64),
                              velocity=np.zeros(0, np.float64), effort=np.zeros(0, np.float64))
        return self.ts.serialize_cdr(msg, T.STATE_TYPE)

    def action(self, values: np.ndarray) -> bytes:
        v = np.asarray(values, dtype=np.float32).reshape(-1)
        lay = self.Layout(dim=[self.Dim(label="action", size=v.size, stride=v.size)], data_offset=0)
        return self.ts.serialize_cdr(self.F32(layout=lay, data=v), T.ACTION_TYPE)

    def string(self, text: str) -> bytes:
        return self.ts.serialize_cdr(self.String(data=text), T.STRING_TYPE)


def _latched_qos():
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    zero = QosTime(sec=0, nsec=0)
    return [Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                durability=QosDurability.TRANSIENT_LOCAL, deadline=zero, lifespan=zero,
                liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
                avoid_ros_namespace_conventions=False)]


def write_episode_bag(path: Path, msgs: _Msgs, episode: dict, cameras: Sequence[str], instruction: str,
                      marker: dict, control_rate_hz: float, storage: str = "mcap") -> int:
    """Write one recorded episode (from :func:`run_expert_episode`) as a rosbag2; returns #messages."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    period_ns = int(round(1e9 / control_rate_hz))
    start_ns = int(round(START_TIME_S * 1e9))
    n = 0
    with Writer(path, version=9, storage_plugin=plugin) as w:
        c_goal = w.add_connection(T.GOAL_TOPIC, T.STRING_TYPE, typestore=msgs.ts,
                                  offered_qos_profiles=_latched_qos())
        c_ep = w.add_connection(T.EPISODE_TOPIC, T.STRING_TYPE, typestore=msgs.ts)
        c_img = {c: w.add_connection(T.image_topic(c), T.IMAGE_TYPE, typestore=msgs.ts) for c in cameras}
        c_state = w.add_connection(T.STATE_TOPIC, T.STATE_TYPE, typestore=msgs.ts)
        c_act = w.add_connection(T.ACTION_TOPIC, T.ACTION_TYPE, typestore=msgs.ts)
        frames = {c: T.image_frame_id(c) for c in cameras}
        w.write(c_goal, start_ns, msgs.string(instruction))
        w.write(c_ep, start_ns, msgs.string(json.dumps({"event": "start", **marker})))
        n += 2
        for k, (obs, act) in enumerate(zip(episode["observations"], episode["actions"])):
            ns = start_ns + k * period_ns
            for c in cameras:
                w.write(c_img[c], ns, msgs.image(ns, frames[c], obs.images[c]))
            w.write(c_state, ns, msgs.joint_state(ns, STATE_NAMES, obs.state))
            w.write(c_act, ns, msgs.action(act))
            n += len(cameras) + 2
        end_ns = start_ns + len(episode["actions"]) * period_ns
        w.write(c_ep, end_ns, msgs.string(json.dumps(
            {"event": "end", **marker, "success": bool(episode["success"]), "steps": int(episode["steps"]),
             "success_step": episode["success_step"]})))
        n += 1
    return n


# ------------------------------------------------------------------------------------------------
def record(cfg: RecordConfig, log: Callable[[str], None] = print) -> dict:
    """Run the experts and write the bags; returns (and writes) the summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cameras = [camera_for(c) for c in cfg.cameras]
    if cfg.storage not in ("mcap", "sqlite3"):
        raise ValueError(f"storage must be mcap or sqlite3, got {cfg.storage!r}")
    if cfg.control_rate_hz <= 0:
        raise ValueError("control_rate_hz must be > 0")
    (out / "metaworld_topics.yaml").write_text(topic_map_yaml(cameras, cfg.control_rate_hz))
    summary: dict = {"config": asdict(cfg), "topics": topic_map(cameras, cfg.control_rate_hz), "tasks": {}}
    t_all = time.perf_counter()
    tot_steps = 0
    msgs = _Msgs()
    for task in cfg.tasks:
        summary["tasks"][task], task_steps = _record_task(cfg, task, out, cameras, msgs, log)
        tot_steps += task_steps
    wall = time.perf_counter() - t_all
    att = sum(v["attempts"] for v in summary["tasks"].values())
    suc = sum(v["successes"] for v in summary["tasks"].values())
    summary["total"] = {"attempts": att, "successes": suc, "expert_success_rate": suc / att if att else 0.0,
                        "recorded": sum(v["recorded"] for v in summary["tasks"].values()),
                        "env_steps": int(tot_steps), "seconds": wall,
                        "steps_per_s": tot_steps / wall if wall > 0 else 0.0}
    (out / "record_summary.json").write_text(json.dumps(summary, indent=2))
    log(f"total: {summary['total']['recorded']} bags in {out}  expert success {suc}/{att}"
        f"  {summary['total']['steps_per_s']:.0f} env steps/s (rendering {len(cameras)} x {cfg.image_size}px)")
    return summary


def _record_task(cfg: RecordConfig, task: str, out: Path, cameras, msgs, log) -> tuple[dict, int]:
    """The expert on the task's training layouts until ``episodes_per_task`` bags are written (or the attempts
    run out): the task's summary and the environment steps it took."""
    task_i = MT10.index(task)   # noise seeded per (seed, task, layout): the place in MT10, not in --tasks
    task_dir = out / task
    max_attempts = cfg.max_attempts or (2 * cfg.episodes_per_task + 10)
    instruction = instruction_for(task)
    attempts = successes = written = steps_written = task_steps = index = 0
    lengths, bags = [], []
    t_task = time.perf_counter()
    sim = MetaWorldSim(task, cameras=cameras, image_size=cfg.image_size, max_steps=cfg.max_steps)
    try:
        while written < cfg.episodes_per_task and attempts < max_attempts:
            lay = layout(task, "train", cfg.seed, index)
            index += 1
            bag = task_dir / f"{task}_s{cfg.seed:03d}_l{lay.index:05d}"
            if bag.exists():
                if not cfg.overwrite:
                    raise FileExistsError(f"{bag} exists (use another --out or --overwrite)")
                shutil.rmtree(bag)
            expert = ScriptedExpert(task, noise=cfg.noise, rng=np.random.default_rng([cfg.seed, task_i, lay.index]))
            ep = run_expert_episode(sim, expert, lay, render=True, post_success_steps=cfg.post_success_steps)
            attempts += 1
            task_steps += ep["steps"]
            if ep["success"]:
                successes += 1
                lengths.append(ep["success_step"])
            if not (ep["success"] or cfg.keep_failures):
                log(f"  {task} layout {lay.index}: expert failed in {ep['steps']} steps (not recorded)")
                continue
            task_dir.mkdir(parents=True, exist_ok=True)
            marker = {"task": task, "instruction": instruction, "layout": lay.as_dict(),
                      "noise": cfg.noise, "control_rate_hz": cfg.control_rate_hz}
            write_episode_bag(bag, msgs, ep, cameras, instruction, marker, cfg.control_rate_hz, cfg.storage)
            written += 1
            steps_written += len(ep["actions"])
            bags.append(str(bag.relative_to(out)))
    finally:
        sim.close()
    dt = time.perf_counter() - t_task
    rate = successes / attempts if attempts else 0.0
    log(f"{task:26s} recorded {written}/{cfg.episodes_per_task}  expert success {successes}/{attempts}"
        f" ({rate:.2f})  {steps_written} steps  {task_steps / dt:.0f} steps/s")
    if written < cfg.episodes_per_task:
        log(f"  warning: only {written} successful episodes of {task} after {attempts} attempts")
    return {"instruction": instruction, "attempts": attempts, "successes": successes,
            "expert_success_rate": rate, "recorded": written, "recorded_steps": steps_written,
            "mean_success_step": float(np.mean(lengths)) if lengths else None,
            "seconds": dt, "steps_per_s": task_steps / dt if dt > 0 else 0.0, "bags": bags}, task_steps
