"""Node subprocesses (ROS-free): ``-p name:=value`` arguments and one stop escalation, used by
replay, sim eval and the tests."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any


def installed_executable(name: str) -> Path | None:
    """The executable ``name`` of the installed mode_ros package (as ``ros2 run mode_ros NAME`` finds it through
    the ament index), or None when the package is not installed or has no such executable."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    except ImportError:
        return None
    try:
        path = Path(get_package_prefix("mode_ros")) / "lib" / "mode_ros" / name
    except PackageNotFoundError:
        return None
    return path if os.access(path, os.X_OK) else None


def node_command(executable, params: dict, node_name: str | None = None, namespace: str = "",
                 params_file=None) -> list[str]:
    """``EXE --ros-args [--params-file F] -p name:=value ... [-r __node:=NAME] [-r __ns:=/NS]`` (the ``-p``
    values override the file's); ``executable`` is a path or the start of a command line (e.g.
    ``[python, -m, module]``)."""
    cmd = [str(x) for x in (executable if isinstance(executable, (list, tuple)) else [executable])] + ["--ros-args"]
    if params_file:
        cmd += ["--params-file", str(params_file)]
    for k, v in params.items():
        cmd += ["-p", f"{k}:={ros_arg_value(v)}"]
    if node_name:
        cmd += ["-r", f"__node:={node_name}"]
    if namespace.strip("/"):
        cmd += ["-r", f"__ns:=/{namespace.strip('/')}"]
    return cmd


def ros_arg_value(v: Any) -> str:
    """A parameter value for ``--ros-args -p name:=value`` (rcl parses it as YAML)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(ros_arg_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def stop_process_group(proc: subprocess.Popen, timeout: float = 10.0, grace: float = 3.0) -> int | None:
    """SIGINT (clean rclpy shutdown) to the process group, then SIGTERM, then SIGKILL; returns the
    exit code (None if it could not be stopped). The process must run in its own session."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()
