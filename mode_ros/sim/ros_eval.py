"""``mode-ros sim eval --ros``: closed-loop evaluation through ROS 2 (real DDS, separate processes).

Starts the sim bridge (:mod:`mode_ros.sim.bridge_node`) and the policy node (``policy_node`` of the
colcon install, on ``--checkpoint``; or :mod:`mode_ros.sim.expert_node` with ``--expert``) as
subprocesses, exactly as on a robot: the policy node's inputs are remapped to the bridge's
``/metaworld/...`` topics and it runs on the bridge's ``/clock`` (``use_sim_time``). DDS stays on
this machine (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``), in a random private ``ROS_DOMAIN_ID``,
with logs in a temp ``ROS_LOG_DIR``. The bridge prints each episode's result as it finishes; the
report (same layout as the direct evaluation) is printed as a table and written as JSON.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mode_ros.ros.processes import installed_executable, node_command, stop_process_group

from . import topics as T
from .evaluate import EvalConfig, format_table
from .metaworld_env import CAMERA_ALIASES, DEFAULT_CAMERAS

POLICY_NODE = "/mode_policy"


def ros_environment(base: dict | None = None) -> dict:
    """The environment for every process that touches DDS: localhost only, private domain, temp logs."""
    env = dict(os.environ if base is None else base)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_STATIC_PEERS", None)
    env["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    env["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="mode_ros_sim_log_")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not env.get("MUJOCO_GL") and not env.get("DISPLAY"):
        env["MUJOCO_GL"] = "egl"
    return env


def policy_remaps(node: str = POLICY_NODE) -> list[str]:
    """Remap rules pointing the policy node's inputs at the bridge's topics (every camera slot alias)."""
    rules = [f"{node}/joint_states:={T.STATE_TOPIC}", f"{node}/goal:={T.GOAL_TOPIC}"]
    for slot, cam in sorted(CAMERA_ALIASES.items()):
        rules.append(f"{node}/image_{slot}:={T.image_topic(cam)}")
    out = []
    for r in rules:
        out += ["-r", r]
    return out


def checkpoint_cameras(checkpoint: str, default: list[str]) -> list[str]:
    """MuJoCo cameras the checkpoint's camera slots read ([] for a state-only policy)."""
    try:
        from mode_ros.model.checkpoint import checkpoint_config

        from .metaworld_env import camera_for
        return [camera_for(s) for s in checkpoint_config(checkpoint).camera_names]
    except Exception:  # noqa: BLE001 - unreadable/unknown: publish the default cameras
        return default


def _check_ros(env: dict) -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import rclpy, mode_ros.msg"], env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return ("rclpy or the generated mode_ros.msg is not importable: build the package (scripts/setup.sh) "
                f"and `source scripts/env.sh` first ({last})")
    return None


class _Proc:
    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path | None):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        out = open(log_path, "w") if log_path else None
        self._out = out
        self.p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                  start_new_session=True)

    def stop(self, timeout: float = 10.0) -> int | None:
        code = stop_process_group(self.p, timeout, grace=5.0)
        if self._out:
            self._out.close()
        return code

    def tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def evaluate_ros(args, cfg: EvalConfig, log=print) -> dict | None:
    env = ros_environment()
    err = _check_ros(env)
    if err:
        log(f"mode-ros sim eval --ros: {err}")
        return None
    work = Path(tempfile.mkdtemp(prefix="mode_ros_sim_eval_"))
    summary_path = work / "summary.json"
    rate = float(getattr(args, "rate", None) or 20.0)
    cameras = getattr(args, "cameras", None)
    if cameras is None:  # default: what the policy reads (none for a state-only checkpoint)
        cameras = list(DEFAULT_CAMERAS)
        if not getattr(args, "expert", False):
            cameras = checkpoint_cameras(args.checkpoint, cameras)
    bridge_cmd = node_command(
        installed_executable("metaworld_sim") or [sys.executable, "-m", "mode_ros.sim.bridge_node"],
        {"tasks": ",".join(cfg.tasks), "episodes": cfg.episodes, "seed": cfg.seed, "split": "eval",
         "max_steps": cfg.max_steps, "image_size": cfg.image_size, "cameras": ",".join(cameras),
         "control_rate_hz": rate, "summary_path": str(summary_path),
         "mode": getattr(args, "ros_mode", "lockstep"), "action_topic": f"{POLICY_NODE}/action_chunk"})
    policy_cmd, label = _policy_command(args, cfg, rate)
    log(f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']} ROS_LOG_DIR={env['ROS_LOG_DIR']} work={work}")
    t0 = time.monotonic()
    if not _run_pair(policy_cmd, bridge_cmd, env, work, summary_path, log):
        return None
    report = _ros_report(json.loads(summary_path.read_text()), label, cfg, rate, time.monotonic() - t0)
    log(format_table(report))
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(report, indent=2))
    return report


def _policy_command(args, cfg: EvalConfig, rate: float) -> tuple[list[str], str]:
    """The policy process (the installed policy_node on the checkpoint, or the scripted expert node), remapped
    onto the bridge's topics, and its label in the report."""
    if getattr(args, "expert", False):
        cmd = node_command([sys.executable, "-m", "mode_ros.sim.expert_node"],
                           {"control_rate_hz": rate, "noise": float(getattr(args, "noise", 0.0)),
                            "seed": cfg.policy_seed})
        return cmd + policy_remaps(), "scripted expert (ROS)"
    params = {"checkpoint": os.path.abspath(args.checkpoint), "use_sim_time": True, "control_rate_hz": rate,
              "device": getattr(args, "device", "auto"), "seed": cfg.policy_seed}
    if cfg.replan_every:
        params["replan_every"] = cfg.replan_every
    strategy = str(getattr(args, "strategy", "") or "")
    if strategy and "," not in strategy:   # --strategy S: the node's execution_strategy
        params["execution_strategy"] = strategy
    if getattr(args, "ros_mode", "lockstep") == "lockstep":
        # inference takes no sim time: each chunk comes from the observation of the tick it starts
        # at, so the result does not depend on this machine's speed
        params["lockstep_inference"] = True
    exe = installed_executable("policy_node") or [
        sys.executable, "-c", "import sys; from mode_ros.ros.policy_node import main; sys.exit(main())"]
    return node_command(exe, params) + policy_remaps(), f"MoDE {args.checkpoint} (ROS)"


def _run_pair(policy_cmd, bridge_cmd, env, work: Path, summary_path: Path, log) -> bool:
    """Run the policy and the bridge until the bridge ends; False (logged) when either failed."""
    policy = _Proc("policy", policy_cmd, env, work / "policy.log")
    bridge = None
    try:
        bridge = _Proc("bridge", bridge_cmd, env, None)  # its log (episode results) goes to the console
        while bridge.p.poll() is None:
            if policy.p.poll() is not None:
                log(f"policy process exited with code {policy.p.returncode}:\n{policy.tail()}")
                return False
            time.sleep(0.2)
        rc = bridge.p.returncode
    except KeyboardInterrupt:
        log("interrupted")
        return False
    finally:
        if bridge is not None:
            bridge.stop()
        policy.stop()
    if rc != 0 or not summary_path.exists():
        log(f"sim bridge failed (exit code {rc}); policy log tail:\n{policy.tail()}")
        return False
    return True


def _ros_report(summary: dict, label: str, cfg: EvalConfig, rate: float, seconds: float) -> dict:
    """The bridge's summary in the report format of the in-process evaluation (format_table reads both)."""
    report = {"label": label, "transport": "ros2", "config": {**cfg.__dict__, "control_rate_hz": rate},
              "split": "eval", "tasks": {}, "mean_success": summary["mean_success"],
              "seconds": seconds, "bridge": {k: v for k, v in summary.items() if k != "tasks"}}
    for task, v in summary["tasks"].items():
        succ = [r["steps"] for r in v["episode_results"] if r["success"]]
        rows: dict[str, int] = {}
        for r in v["episode_results"]:
            for i, n in r.get("rows_executed_by_index", {}).items():
                rows[i] = rows.get(i, 0) + n
        report["tasks"][task] = {**v, "mean_steps_success": sum(succ) / len(succ) if succ else None,
                                 "held_ticks": sum(r["held_ticks"] for r in v["episode_results"]),
                                 "rows_executed_by_index": dict(sorted(rows.items(), key=lambda kv: int(kv[0])))}
    return report
