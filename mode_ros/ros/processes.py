"""Stopping node subprocesses (ROS-free): one escalation used by replay, sim eval and the tests."""
from __future__ import annotations

import os
import signal
import subprocess


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
