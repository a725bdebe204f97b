"""``mode-ros convert bag|hdf5``: recorded demonstrations -> the episode HDF5 format."""
from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert rosbag2 bags or LIBERO/robomimic HDF5 into episodes",
                              description="Convert recorded demonstrations into the episode HDF5 format "
                                          "(docs/DATA.md).")
    sub = p.add_subparsers(dest="convert_kind", metavar="{bag,hdf5,lerobot}")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    b = sub.add_parser("bag", help="rosbag2 (.db3/.mcap or bag directories) -> episodes",
                       description="Resample mapped topics onto one control-rate clock and write episodes. "
                                   "A JSON report (ticks, dropped ticks by reason, bad messages, stream rates) "
                                   "is written beside --out, suffix replaced (demos.hdf5 -> demos.report.json).")
    b.add_argument("bags", nargs="+", metavar="BAG", help="bag directory, .db3 or .mcap file (one or more)")
    b.add_argument("--topics", required=True, metavar="MAP.yaml", help="topic map (config/bag_topics.example.yaml)")
    b.add_argument("--out", required=True, metavar="OUT.hdf5", help="episode file to write")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    b.add_argument("--instruction", help="fixed language instruction (overrides the map's language)")
    b.add_argument("--control-rate-hz", type=float, help="override control_rate_hz of the map")
    b.add_argument("--tolerance-s", type=float, help="override tolerance_s of the map")
    b.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")
    b.add_argument("--json", action="store_true", help="print the full report as JSON")
    b.set_defaults(func=_bag)

    h = sub.add_parser("hdf5", help="LIBERO/robomimic HDF5 -> episodes",
                       description="Copy LIBERO/robomimic demos into the episode format (images chunked + gzip).")
    h.add_argument("inputs", nargs="+", metavar="IN.hdf5", help="LIBERO/robomimic HDF5 file(s)")
    h.add_argument("--out", required=True, metavar="OUT.hdf5", help="episode file to write")
    h.add_argument("--map", action="append", default=[], metavar="OBS_KEY=CAMERA",
                   help="obs key -> camera slot, repeatable (default: agentview_rgb=static, eye_in_hand_rgb=gripper "
                        "for LIBERO; agentview_image/robot0_eye_in_hand_image for robomimic)")
    h.add_argument("--state", action="append", default=[], metavar="OBS_KEY",
                   help="obs key copied as proprioceptive state, repeatable (e.g. joint_states)")
    h.add_argument("--actions-key", default="actions", help="dataset of each demo holding the actions (default actions)")
    h.add_argument("--language", help="instruction for every demo (default: attrs/problem_info/file name)")
    h.add_argument("--no-language-from-filename", action="store_true",
                   help="do not derive a missing instruction from the file name (such demos get an empty one)")
    h.add_argument("--flip", nargs="?", const="vertical", default="none", choices=["none", "vertical", "horizontal", "rot180"],
                   help="fix upside-down LIBERO renders (--flip = vertical)")
    h.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="resize frames while copying")
    h.add_argument("--control-rate-hz", type=float, help="default: env_args control_freq, else 20")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    h.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")
    h.set_defaults(func=_hdf5)

    from .lerobot_cli import register_convert   # argparse only; LeRobot datasets (lerobot_import.py)

    register_convert(sub)


def _out_is_dir(kind: str, out: str) -> bool:
    """--out names an existing folder: one line, before anything is read."""
    from pathlib import Path

    if not Path(out).is_dir():
        return False
    print(f"mode-ros convert {kind}: --out {out} is a directory (give the episode file to write, e.g. "
          f"{Path(out) / 'demos.hdf5'})", file=sys.stderr)
    return True


def _bag(args) -> int:
    from .bag import convert_bags, format_report
    from .topic_map import TopicMapError, load_topic_map

    if _out_is_dir("bag", args.out):
        return 2
    try:
        tm = load_topic_map(args.topics)
    except TopicMapError as exc:
        print(f"mode-ros convert bag: {exc}", file=sys.stderr)
        return 2
    if args.instruction:
        tm.language.instruction = args.instruction
    if args.control_rate_hz:
        tm.control_rate_hz = args.control_rate_hz
    if args.tolerance_s:
        tm.tolerance_s = args.tolerance_s
    try:
        report = convert_bags(args.bags, tm, args.out, overwrite=args.overwrite, progress=not args.quiet)
    except FileExistsError as exc:
        print(f"mode-ros convert bag: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if report.get("report_path"):
        print(f"report: {report['report_path']}", file=sys.stderr)
    if report["totals"]["episodes"] == 0:
        print("mode-ros convert bag: no episodes written", file=sys.stderr)
        return 1
    return 0


def _hdf5(args) -> int:
    from .hdf5_import import import_hdf5

    if _out_is_dir("hdf5", args.out):
        return 2
    cmap = None
    if args.map:
        cmap = {}
        for item in args.map:
            if "=" not in item:
                print(f"mode-ros convert hdf5: --map expects OBS_KEY=CAMERA, got {item!r}", file=sys.stderr)
                return 2
            k, v = item.split("=", 1)
            cmap[k.strip()] = v.strip()
    try:
        rep = import_hdf5(args.inputs, args.out, camera_map=cmap, state_keys=args.state, actions_key=args.actions_key,
                          language=args.language, language_from_file=not args.no_language_from_filename,
                          flip=args.flip, control_rate_hz=args.control_rate_hz, overwrite=args.overwrite,
                          progress=not args.quiet, resize=tuple(args.resize) if args.resize else None)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"mode-ros convert hdf5: {exc}", file=sys.stderr)
        return 2
    print(f"{rep['episodes']} episodes, {rep['frames']} frames -> {rep['output']} "
          f"(cameras {rep['camera_map']}, flip {rep['flip']}, {rep['control_rate_hz']} Hz)")
    for i in rep["inputs"]:
        for d, why in i["skipped"].items():
            print(f"  skipped {i['path']}:{d}: {why}")
    return 0 if rep["episodes"] else 1
