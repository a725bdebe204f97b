"""``mode-ros export KIND``: hand a checkpoint or recordings to another runtime or toolchain.

Each kind lives next to the code it drives and exposes ``register_export(subparsers)``; modules are
imported when the parser is built, so they must not import heavy libraries at module level.
"""
from __future__ import annotations

import importlib

# kind -> module with register_export(subparsers)
_KINDS = {
    "onnx": "mode_ros.export.onnx_cli",
    "lerobot": "mode_ros.data.lerobot_cli",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint (ONNX) or recordings (LeRobot dataset)",
                              description="Export a checkpoint for another runtime or recordings for "
                                          "another toolchain.")
    sub = p.add_subparsers(dest="export_kind", metavar="{" + ",".join(_KINDS) + "}")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    for module in _KINDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:   # a part not installed in this environment
            continue
        mod.register_export(sub)
