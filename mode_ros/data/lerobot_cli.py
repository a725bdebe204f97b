"""``mode-ros convert lerobot`` and ``mode-ros export lerobot`` (LeRobot v2.1/v3.0 datasets in, v3.0 out).

Only argparse here: pyarrow, av and h5py are imported when a command runs.
"""
from __future__ import annotations

import json
import sys

__all__ = ["register_convert", "register_export"]


def register_convert(sub) -> None:
    """Add ``lerobot`` to the ``mode-ros convert`` kinds."""
    p = sub.add_parser("lerobot", help="LeRobot dataset folders (v2.1 / v3.0) -> episodes",
                       description="Import local LeRobot dataset folders (nothing is downloaded) into the episode "
                                   "format. A JSON report (episodes/frames in and out, skipped episodes with reasons) "
                                   "is written beside --out (demos.hdf5 -> demos.report.json).")
    p.add_argument("datasets", nargs="+", metavar="DATASET_DIR", help="local LeRobot dataset folder(s) (v2.1 or v3.0)")
    p.add_argument("--out", required=True, metavar="OUT.hdf5", help="episode file to write")
    p.add_argument("--map", metavar="MAP.yaml", help="LeRobot keys -> cameras/state/action "
                   "(config/lerobot_map.example.yaml; default: every image/video feature is a camera, "
                   "observation.state the state, action the action)")
    p.add_argument("--instruction", help="fixed language goal instead of the dataset's task strings")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=_convert)


def register_export(sub) -> None:
    """Add ``lerobot`` to the ``mode-ros export`` kinds."""
    p = sub.add_parser("lerobot", help="episode files or rosbag2 bags -> a LeRobot v3.0 dataset",
                       description="Write episode files (.hdf5) and/or bags (converted with --topics through the "
                                   "bag converter) as one LeRobot v3.0 dataset folder: meta/info.json, stats.json, "
                                   "tasks.parquet, episodes/, data/ parquet and one mp4 per camera.")
    p.add_argument("inputs", nargs="+", metavar="EPISODES_OR_BAG",
                   help="episode HDF5 files, or bags (folder, .db3, .mcap; with --topics)")
    p.add_argument("--out", required=True, metavar="DATASET_DIR", help="LeRobot v3.0 dataset folder to write")
    p.add_argument("--topics", metavar="MAP.yaml",
                   help="topic map for bag inputs (config/bag_topics.example.yaml)")
    p.add_argument("--vcodec", default="h264", choices=["h264", "av1"], help="video codec (default h264)")
    p.add_argument("--pix-fmt", default="yuv420p", choices=["yuv420p", "yuv444p"],
                   help="yuv420p (default, LeRobot's) or yuv444p (full colour resolution, h264 only)")
    p.add_argument("--crf", type=int, default=18,
                   help="constant rate factor (lower = closer to the source; default 18)")
    p.add_argument("--robot-type", help="info.json robot_type")
    p.add_argument("--overwrite", action="store_true", help="replace DATASET_DIR if it is a LeRobot dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=_export)


def _convert(args) -> int:
    from .bag import report_path_for
    from .lerobot import LeRobotError
    from .lerobot_import import format_import_report, import_lerobot

    try:
        rep = import_lerobot(args.datasets, args.out, key_map=args.map, instruction=args.instruction,
                             overwrite=args.overwrite, progress=not args.quiet)
    except (LeRobotError, FileExistsError) as exc:
        print(f"mode-ros convert lerobot: {exc}", file=sys.stderr)
        return 2
    rp = report_path_for(args.out)
    rp.write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep, indent=1) if args.json else format_import_report(rep))
    print(f"report: {rp}", file=sys.stderr)
    t = rep["totals"]
    return 0 if t["episodes"] and not t["skipped"] else 1


def _export(args) -> int:
    from .lerobot import LeRobotError
    from .lerobot_export import export_lerobot, format_export_report
    from .topic_map import TopicMapError, load_topic_map

    try:
        tm = load_topic_map(args.topics) if args.topics else None
        rep = export_lerobot(args.inputs, args.out, topic_map=tm, vcodec=args.vcodec, crf=args.crf,
                             pix_fmt=args.pix_fmt, overwrite=args.overwrite, progress=not args.quiet,
                             robot_type=args.robot_type)
    except (LeRobotError, TopicMapError, FileExistsError, FileNotFoundError) as exc:
        print(f"mode-ros export lerobot: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1) if args.json else format_export_report(rep))
    return 0 if rep["episodes"] and not rep["skipped"] and not rep.get("bag_errors") else 1
