"""The single ``mode-ros`` command. Each subcommand lives next to the code it drives.

A module listed in ``_SUBCOMMANDS`` exposes ``register(subparsers)``, which adds its parser(s) and
sets ``func`` (called with the parsed args, returns an exit code). Modules are imported lazily so
that ``mode-ros train`` never imports ROS and ``mode-ros info`` never imports rosbags.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that registers it
_SUBCOMMANDS = {
    "info": "mode_ros.model.cli",
    "bench": "mode_ros.model.cli",
    "check-reference": "mode_ros.model.cli",
    "init": "mode_ros.model.cli",
    "convert": "mode_ros.data.cli",
    "train": "mode_ros.train.cli",
    "replay": "mode_ros.ros.replay_cli",
    "sim": "mode_ros.sim.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mode-ros", description="MoDE diffusion policy: convert, train, inspect, replay, benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done = set()
    for name, module in _SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        if module in done:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a part not installed in this environment
            if only is not None:
                raise SystemExit(f"mode-ros {name}: unavailable ({exc})")
            continue
        mod.register(sub)
        done.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
