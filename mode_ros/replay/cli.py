"""``mode-ros replay``: replay recorded bags through the policy node (or offline) and score it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Replay rosbag2 bags (.db3/.mcap/bag folders) through the policy and score the chunks it publishes
against the actions recorded in the bag (the topic map's action mapping, as in `mode-ros convert bag`).

live (default): starts the installed policy_node with use_sim_time:=true (or --attach to a running
one), publishes the bag's cameras + goal (+ state) on the node's topics with the recorded timing
scaled by --rate and /clock from the bag, records every ActionChunk into OUT/chunks (rosbag2).
--offline: the same messages go straight to MoDEPolicy through the node's own decoding, chunk
execution and safety code, in bag time, without DDS (fast; many bags).

Writes OUT/report.json (per-dimension MAE/RMSE of the executed action and of whole chunks, error per
chunk step, gripper sign accuracy, latency, ticks without output and why, problems) and plots
actions.png, error_per_step.png, latency.png. Exit code 0: clean, 1: finished with problems
(listed in the report), 2: could not run.
The real-ROS equivalent: `ros2 bag play --clock BAG` + `ros2 launch mode_ros policy.launch.py
use_sim_time:=true ...` (README, "Replaying bags").
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="replay bags through the policy node (or --offline) and score it",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bags", nargs="+", metavar="BAG", help="bag folder, .db3 or .mcap (several: one report each)")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint folder, or 'bundled' (the MT10 checkpoint "
                   "shipped in the package); required unless --attach")
    p.add_argument("--topics", metavar="MAP.yaml",
                   help="topic map of `mode-ros convert bag` (cameras, language, action[, state]); default: "
                        "guessed from the bag (…/image_<camera>, …/goal, …/action)")
    p.add_argument("--rate", type=_positive, default=1.0,
                   help="playback speed (live: wall pacing; offline: scales the emulated inference latency)")
    p.add_argument("--out", metavar="DIR", help="output folder (default replay_out/<bag name>)")
    p.add_argument("--offline", action="store_true", help="no DDS: MoDEPolicy in-process, node logic emulated")
    p.add_argument("--score", metavar="CHUNKS_BAG", dest="score_chunks",
                   help="no policy run: score the ActionChunks recorded in CHUNKS_BAG (e.g. `ros2 bag record` "
                        "of a node fed by `ros2 bag play --clock BAG`) against BAG's recorded actions")
    p.add_argument("--attach", action="store_true",
                   help="use the running node NAMESPACE/NODE_NAME (must have use_sim_time:=true)")
    p.add_argument("--node-name", default="mode_policy", help="name of the policy node started or attached to")
    p.add_argument("--namespace", default="", help="its namespace (default: none)")
    p.add_argument("--params-file", metavar="YAML", help="node parameters (default: the installed config/policy.yaml)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="node parameter override, repeatable (e.g. -p replan_every=1 -p seed=0)")
    p.add_argument("--device", help="torch device for the policy (node parameter `device`)")
    p.add_argument("--goal", help="fixed language goal instead of the bag's language topic / the map's instruction")
    p.add_argument("--gripper-dims", metavar="I,J", help="action dims scored by sign (default: the checkpoint's "
                                                         "gripper_dims)")
    p.add_argument("--gripper-thresholds", metavar="X,Y",
                   help="sign thresholds per gripper dim (default: the checkpoint's normalisation centre, else 0)")
    p.add_argument("--latency", default="calibrated",
                   help="offline: inference latency in wall seconds: 'calibrated' (default: median of a few "
                        "timed inferences, fixed for the run), 'measured' (each call's own time) or a number; "
                        "a plan is ready latency x rate bag seconds after its tick (0: by the next tick)")
    p.add_argument("--tick-settle", type=float, default=0.015, metavar="S",
                   help="live: wall seconds after each control tick before the next bag message is published, so "
                        "the node's tick and inference thread see the inputs of that tick (0: pure recorded timing)")
    p.add_argument("--duration", type=_positive, metavar="S", help="replay only the first S seconds of each bag")
    p.add_argument("--storage", choices=["sqlite3", "mcap"], help="format of OUT/chunks (default: the input's)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the node to be active")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of the summary")
    p.set_defaults(func=main)


def _positive(text: str) -> float:
    """argparse type: a number > 0 (a negative --duration is a usage error, not a TypeError later)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _ints(text):
    return None if text is None else [int(x) for x in str(text).split(",") if x.strip()]


def _floats(text):
    return None if text is None else [float(x) for x in str(text).split(",") if x.strip()]


def main(args) -> int:
    from mode_ros.replay.runner import format_summary, run_replay
    from mode_ros.replay.session import ReplayError, ReplayOptions, parse_value

    params = {}
    for item in args.param:
        if "=" not in item:
            print(f"mode-ros replay: -p expects NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        k = k.strip().removesuffix(":")   # the node's ROS form name:=value works too
        params[k] = parse_value(v)
    reports = []
    worst = 0
    multi = len(args.bags) > 1
    base = Path(args.out) if args.out else None
    for bag in args.bags:
        out = None
        if base is not None:
            out = base / Path(bag).name.replace(".", "_") if multi else base
        try:
            opts = ReplayOptions(bag=Path(bag), checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                                 topics=args.topics, rate=args.rate, out=out, offline=args.offline,
                                 attach=args.attach, node_name=args.node_name, namespace=args.namespace,
                                 params_file=args.params_file, params=dict(params), goal=args.goal,
                                 gripper_dims=_ints(args.gripper_dims),
                                 gripper_thresholds=_floats(args.gripper_thresholds), latency=args.latency,
                                 device=args.device, progress=not args.quiet and not args.json,
                                 overwrite=args.overwrite, storage=args.storage, start_timeout=args.start_timeout,
                                 duration=args.duration, tick_settle_s=args.tick_settle,
                                 score_chunks=Path(args.score_chunks) if args.score_chunks else None)
            rep = run_replay(opts)
        except ReplayError as exc:
            print(f"mode-ros replay: {bag}: {exc}", file=sys.stderr)
            worst = 2
            reports.append({"bag": str(bag), "ok": False, "error": str(exc)})
            continue
        reports.append(rep)
        if not rep.get("ok"):
            worst = max(worst, 1)
        if not args.json:
            print(format_summary(rep))
    if args.json:
        print(json.dumps(reports if multi else reports[0], indent=1))
    if multi and base is not None:
        base.mkdir(parents=True, exist_ok=True)
        (base / "summary.json").write_text(json.dumps([_short(r) for r in reports], indent=1))
    return worst


def _short(rep: dict) -> dict:
    s = rep.get("scores") or {}
    return {"bag": rep.get("bag"), "ok": rep.get("ok"), "error": rep.get("error"),
            "first_action_mae": (s.get("first_action") or {}).get("mae_mean"),
            "chunk_mae": (s.get("chunk") or {}).get("mae_mean"),
            "ticks": rep.get("ticks"), "report": (rep.get("outputs") or {}).get("report")}
