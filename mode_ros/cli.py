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
    "fit-state-model": "mode_ros.train.cli",
    "replay": "mode_ros.replay.cli",
    "sim": "mode_ros.sim.cli",
    "export": "mode_ros.export.cli",
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


def _terminate(signum, frame):
    # SIGTERM (timeout, systemd, a supervisor) runs the same clean-up as Ctrl-C: the finally blocks stop
    # the policy node / sim processes this command started (they run in their own process groups)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import os
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"mode-ros {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        # a wrong path, preset, config value…: one line naming it (MODE_ROS_DEBUG=1 for the traceback)
        if os.environ.get("MODE_ROS_DEBUG"):
            raise
        print(f"mode-ros {args.command}: {type(exc).__name__}: {exc} (MODE_ROS_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)   # in-process callers (tests, scripts) get theirs back


if __name__ == "__main__":
    raise SystemExit(main())
