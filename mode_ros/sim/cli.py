"""``mode-ros sim record|eval``: Meta-World demonstrations as rosbag2, closed-loop evaluation."""
from __future__ import annotations

import argparse
import json
import sys


def _tasks(spec: str) -> list[str]:
    from .metaworld_env import resolve_tasks
    try:
        return resolve_tasks(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cams(spec: str) -> list[str]:
    from .metaworld_env import camera_for
    names = [c.strip() for c in spec.split(",") if c.strip()]
    try:
        return [camera_for(c) for c in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser("sim", help="Meta-World MT10 simulation: record demos as rosbag2, evaluate policies",
                              description="Meta-World MT10 simulation (MuJoCo, CPU rendering).")
    sub = p.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")

    r = sub.add_parser("record", help="record scripted-expert demonstrations as rosbag2 (one bag per episode)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--tasks", type=_tasks, default="all", help="'all' (MT10) or a comma list, e.g. reach,push")
    r.add_argument("--episodes-per-task", type=int, default=10, help="successful episodes to record per task")
    r.add_argument("--seed", type=int, default=0, help="training-layout seed (held-out eval layouts never overlap)")
    r.add_argument("--out", required=True, help="output folder (bags under OUT/<task>/)")
    r.add_argument("--image-size", type=int, default=64, help="square image size in pixels")
    r.add_argument("--cameras", type=_cams, default="corner,gripperPOV", help="MuJoCo cameras to record")
    r.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to expert actions")
    r.add_argument("--rate", type=float, default=20.0, help="control rate (Hz) = sim-clock ticks per env step")
    r.add_argument("--max-steps", type=int, default=500, help="episode step limit (<= 500)")
    r.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap", help="rosbag2 storage format")
    r.add_argument("--keep-failures", action="store_true", help="also write episodes the expert failed")
    r.add_argument("--max-attempts", type=int, default=None, help="attempts per task (unset: 2N+10)")
    r.add_argument("--post-success-steps", type=int, default=0, help="steps recorded after the first success")
    r.add_argument("--overwrite", action="store_true", help="replace existing bags of the same name")
    r.set_defaults(func=_cmd_record)

    e = sub.add_parser("eval", help="closed-loop success per task on held-out layouts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder, or 'bundled' (the MT10 checkpoint shipped in the "
                     "package, mode_ros/assets/metaworld_mt10)")
    src.add_argument("--expert", action="store_true", help="evaluate the scripted experts (baseline)")
    e.add_argument("--tasks", type=_tasks, default="all", help="'all' (MT10) or a comma list, e.g. reach,push")
    e.add_argument("--episodes", type=int, default=20, help="held-out episodes per task")
    e.add_argument("--seed", type=int, default=0, help="held-out layout seed (split 'eval')")
    e.add_argument("--replan-every", type=int, default=None, help="rows of each chunk executed before the next inference (unset: all)")
    e.add_argument("--max-steps", type=int, default=500, help="episode step limit (<= 500)")
    e.add_argument("--image-size", type=int, default=64, help="rendered image size (match the training data)")
    e.add_argument("--batch", type=int, default=0, help="episodes run side by side per task (0 = all)")
    e.add_argument("--device", default="auto", help="policy device: auto|cpu|cuda")
    e.add_argument("--noise", type=float, default=0.0, help="--expert only: action noise std")
    e.add_argument("--policy-seed", type=int, default=0, help="base seed of the diffusion sampler")
    e.add_argument("--steps", type=int, default=None,
                   help="DDIM denoising steps per chunk (unset: the checkpoint's; in-process policy, not --ros)")
    e.add_argument("--json", dest="json_path", default=None, help="write the report here")
    e.add_argument("--gif-dir", default=None, help="write one GIF (first episode) per task here")
    e.add_argument("--ros", action="store_true",
                   help="run through ROS 2: policy node + sim bridge as processes (needs the colcon build)")
    e.add_argument("--ros-mode", choices=["lockstep", "realtime"], default="lockstep",
                   help="--ros: the bridge waits for each action and the node computes each chunk from the "
                        "observation of the tick it starts at (lockstep: independent of machine speed), or "
                        "ticks are paced by the wall clock (realtime: like a robot)")
    e.add_argument("--rate", type=float, default=20.0, help="--ros: control rate (Hz) of bridge and policy node")
    e.add_argument("--cameras", type=_cams, default=None,
                   help="--ros: cameras the bridge publishes (unset: none for a checkpoint without cameras, "
                        "else corner,gripperPOV)")
    e.add_argument("--delay-ticks", default=None, metavar="D,D,...",
                   help="closed loop through the node's chunk controller in sim time with an injected inference "
                        "delay of d control ticks (the previous chunk keeps executing meanwhile), e.g. 0,2,4,5: "
                        "every --strategy x d on the same held-out episodes; reports success, steps to success and "
                        "the action change at chunk switches vs inside chunks (JSON with --json, and a table)")
    e.add_argument("--strategy", default="replan,rtc_replace,rtc_guidance,ensemble", metavar="S,S,...",
                   help="--delay-ticks: execution strategies (replan, open_loop, ensemble, rtc_replace, "
                        "rtc_guidance); replan and rtc re-plan every --replan-every rows (5 when unset), ensemble every "
                        "row; with --ros one strategy, set as the node's execution_strategy")
    e.add_argument("--rtc-hold-rows", type=int, default=None, metavar="N",
                   help="--delay-ticks, rtc_*: the node parameter rtc_hold_rows (soft-overlap rows holding the "
                        "plan's last action where the plan ends at the switch; 0: none; unset: as the node, 1)")
    e.add_argument("--rtc-decay", choices=["exp", "linear", "hard"], default=None,
                   help="--delay-ticks, rtc_*: the node parameter rtc_decay (overlap-row weights; hard: only the "
                        "frozen rows, for a prefix-trained checkpoint; unset: as the node, exp)")
    e.add_argument("--predict-state", choices=["auto", "always", "never"], default=None,
                   help="--delay-ticks: the node parameter predict_state (plan each chunk from the state rolled "
                        "forward over the delay with the checkpoint's state_model.json; unset: as the node, auto: "
                        "for policies without cameras)")
    e.add_argument("--weight-quant", choices=["none", "int8", "fp8"], default="none",
                   help="in-process policy: fused sampler with weight-only int8/fp8 experts (fp8: CUDA only)")
    e.set_defaults(func=_cmd_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _cmd_eval_delays(args, tasks) -> int:
    """--delay-ticks: every strategy x d through the chunk controller (mode_ros.sim.evaluate.evaluate_delays)."""
    from mode_ros.control.strategy import STRATEGIES

    from .evaluate import DelayEvalConfig, evaluate_delays
    if args.expert or args.ros:
        print("mode-ros sim eval --delay-ticks: needs --checkpoint and runs in process (no --expert, --ros)",
              file=sys.stderr)
        return 2
    try:
        delays = [int(x) for x in args.delay_ticks.split(",") if x.strip()]
    except ValueError:
        print(f"mode-ros sim eval: --delay-ticks {args.delay_ticks!r}: expected integers, e.g. 0,2,4,5", file=sys.stderr)
        return 2
    strategies = [x.strip() for x in args.strategy.split(",") if x.strip()]
    bad = [x for x in strategies if x not in STRATEGIES] + [str(d) for d in delays if d < 0]
    if bad or not delays or not strategies:
        print(f"mode-ros sim eval: bad --strategy/--delay-ticks value(s) {bad} (strategies: {', '.join(STRATEGIES)}; "
              "delays >= 0)", file=sys.stderr)
        return 2
    from mode_ros.model.policy import MoDEPolicy
    from mode_ros.model.runtime import torch_threads

    # one inference at a time; the cores are better left to the simulator (restored after the run)
    with torch_threads(1):
        policy = MoDEPolicy.from_pretrained(args.checkpoint, device=args.device, num_steps=args.steps)
        policy.warmup()
        cfg = DelayEvalConfig(tasks=tasks, episodes=args.episodes, seed=args.seed, delays=delays,
                              strategies=strategies, replan_every=args.replan_every or 5, rate_hz=args.rate,
                              max_steps=args.max_steps, image_size=args.image_size,
                              policy_seed=args.policy_seed, json_path=args.json_path,
                              rtc_hold_rows=args.rtc_hold_rows, rtc_decay=args.rtc_decay,
                              predict_state=args.predict_state)
        report = evaluate_delays(policy, cfg, label=f"MoDE {args.checkpoint}")
    fails = sum(r["inference_failures"] for r in report["results"].values())
    if fails:
        print(f"mode-ros sim eval: {fails} inference(s) failed (see the JSON)", file=sys.stderr)
    return 1 if fails else 0


def _cmd_record(args) -> int:
    from .record import RecordConfig, record
    cfg = RecordConfig(out=args.out, tasks=args.tasks if isinstance(args.tasks, list) else _tasks(args.tasks),
                       episodes_per_task=args.episodes_per_task, seed=args.seed, image_size=args.image_size,
                       cameras=args.cameras if isinstance(args.cameras, list) else _cams(args.cameras),
                       noise=args.noise, control_rate_hz=args.rate, max_steps=args.max_steps,
                       storage=args.storage, keep_failures=args.keep_failures, max_attempts=args.max_attempts,
                       post_success_steps=args.post_success_steps, overwrite=args.overwrite)
    summary = record(cfg)
    complete = all(v["recorded"] >= cfg.episodes_per_task for v in summary["tasks"].values())
    return 0 if complete else 1  # 1: some task has fewer successful demos than asked


def _cmd_eval(args) -> int:
    from mode_ros.model.checkpoint import resolve_checkpoint

    from .evaluate import EvalConfig, ExpertPolicy, evaluate
    if not args.expert:
        # resolved here ('bundled' -> its folder; CheckpointError: exit 2): with --ros the node would
        # load it, fail to configure and leave us waiting
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    tasks = args.tasks if isinstance(args.tasks, list) else _tasks(args.tasks)
    if args.delay_ticks is not None:
        return _cmd_eval_delays(args, tasks)
    cfg = EvalConfig(tasks=tasks, episodes=args.episodes, seed=args.seed, replan_every=args.replan_every,
                     max_steps=args.max_steps, image_size=args.image_size, batch=args.batch,
                     gif_dir=args.gif_dir, json_path=args.json_path, policy_seed=args.policy_seed)
    if args.ros:
        if args.steps:
            print("mode-ros sim eval: --steps is for the in-process policy (the node uses the checkpoint's)",
                  file=sys.stderr)
            return 2
        try:
            from .ros_eval import evaluate_ros
        except ImportError as exc:
            print(f"mode-ros sim eval --ros: unavailable ({exc})", file=sys.stderr)
            return 2
        report = evaluate_ros(args, cfg)
        return 0 if report is not None else 1
    if args.expert:
        policy, label = ExpertPolicy(noise=args.noise, seed=args.policy_seed), "scripted expert"
    else:
        from mode_ros.model.policy import MoDEPolicy
        policy = MoDEPolicy.from_pretrained(args.checkpoint, device=args.device, num_steps=args.steps)
        label = f"MoDE {args.checkpoint}" + (f" ({args.steps} steps)" if args.steps else "")
        if args.weight_quant != "none":
            import logging
            state = policy.enable_fast(fused=True, weight_quant=args.weight_quant, logger=logging.getLogger("mode_ros"))
            if state["weight_quant"] != args.weight_quant:
                raise SystemExit(f"--weight-quant {args.weight_quant}: not available here (see the warning above)")
            label += f" (experts {args.weight_quant})"
        if hasattr(policy, "warmup"):
            policy.warmup()
    report = evaluate(policy, cfg, label=label)
    if args.json_path:
        print(f"report: {args.json_path}")
    else:
        print(json.dumps({"mean_success": report["mean_success"],
                          "success": {t: v["success_rate"] for t, v in report["tasks"].items()}}))
    return 0
