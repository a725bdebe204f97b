"""Helpers for tests that talk to real nodes over real DDS (imported by conftest and ROS tests).

* :class:`Harness` — an rclpy node spun in a background thread, with waits on *matched counts* and
  predicates (never fixed sleeps), parameter reads and lifecycle calls.
* :class:`NodeProcess` — an installed executable started as a subprocess with
  ``--ros-args --params-file ... -p name:=value``, with its log captured and a reliable stop
  (SIGINT to its process group, then SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from mode_ros.ros.processes import ros_arg_value, stop_process_group

PACKAGE = "mode_ros"


def wait_until(pred: Callable[[], Any], timeout: float, what: str = "condition", period: float = 0.01,
               on_fail: Callable[[], str] | None = None):
    """Poll ``pred`` until it returns a truthy value (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            extra = ("\n" + on_fail()) if on_fail else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}{extra}")
        time.sleep(period)


def package_prefix() -> Path:
    from ament_index_python.packages import get_package_prefix

    return Path(get_package_prefix(PACKAGE))


def executable(name: str) -> Path:
    path = package_prefix() / "lib" / PACKAGE / name
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"installed executable {path} missing or not executable")
    return path


def share_file(*parts: str) -> Path:
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE), *parts)


class NodeProcess:
    """One installed executable running as a subprocess."""

    def __init__(self, exe: str | Path, *, params_file: str | Path | None = None,
                 params: dict[str, Any] | None = None, name: str | None = None,
                 namespace: str | None = None, remap: dict[str, str] | None = None,
                 extra_args: Iterable[str] = (), env: dict[str, str] | None = None,
                 log_dir: str | Path | None = None, python: str | None = None):
        exe = Path(exe)
        self.cmd = ([python] if python else []) + [str(exe)]
        ros = ["--ros-args"]
        if params_file is not None:
            ros += ["--params-file", str(params_file)]
        for k, v in (params or {}).items():
            ros += ["-p", f"{k}:={ros_arg_value(v)}"]
        if name:
            ros += ["-r", f"__node:={name}"]
        if namespace:
            ros += ["-r", f"__ns:={namespace}"]
        for a, b in (remap or {}).items():
            ros += ["-r", f"{a}:={b}"]
        self.cmd += list(extra_args) + ros
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("RCUTILS_LOGGING_BUFFERED_STREAM", "0")
        log_dir = Path(log_dir or self.env.get("ROS_LOG_DIR") or "/tmp")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{exe.name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "NodeProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        lines = self.output().splitlines()
        return f"--- last {min(n, len(lines))} lines of {' '.join(self.cmd[:2])} ---\n" + "\n".join(lines[-n:])

    def wait_for_output(self, text: str, timeout: float) -> None:
        wait_until(lambda: text in self.output() or not self.alive, timeout, f"{text!r} in node output",
                   on_fail=self.tail)
        if text not in self.output():
            raise AssertionError(f"process exited (rc={self.proc.returncode}) before printing {text!r}\n"
                                 + self.tail())

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (clean rclpy shutdown), then SIGTERM, then SIGKILL, to the whole process group."""
        if self.proc is None:
            return None
        code = stop_process_group(self.proc, timeout)
        self._log.close()
        return code


class Collector:
    """Messages received on one subscription, with their receive times (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: list[tuple[float, Any]] = []
        self.sub = None

    def __call__(self, msg):
        with self.lock:
            self.items.append((time.monotonic(), msg))

    def msgs(self) -> list:
        with self.lock:
            return [m for _, m in self.items]

    def stamped(self) -> list[tuple[float, Any]]:
        with self.lock:
            return list(self.items)

    def clear(self):
        with self.lock:
            self.items.clear()

    def __len__(self):
        with self.lock:
            return len(self.items)


def param_value(pv) -> Any:
    """rcl_interfaces/ParameterValue -> Python value."""
    from rcl_interfaces.msg import ParameterType as T

    return {
        T.PARAMETER_NOT_SET: lambda: None,
        T.PARAMETER_BOOL: lambda: pv.bool_value,
        T.PARAMETER_INTEGER: lambda: pv.integer_value,
        T.PARAMETER_DOUBLE: lambda: pv.double_value,
        T.PARAMETER_STRING: lambda: pv.string_value,
        T.PARAMETER_BYTE_ARRAY: lambda: list(pv.byte_array_value),
        T.PARAMETER_BOOL_ARRAY: lambda: list(pv.bool_array_value),
        T.PARAMETER_INTEGER_ARRAY: lambda: list(pv.integer_array_value),
        T.PARAMETER_DOUBLE_ARRAY: lambda: list(pv.double_array_value),
        T.PARAMETER_STRING_ARRAY: lambda: list(pv.string_array_value),
    }[pv.type]()


class Harness:
    """A test-side rclpy node spun by its own executor thread."""

    def __init__(self, name: str = "mode_ros_test_harness"):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.node = rclpy.create_node(name)
        # single-threaded: rclpy's MultiThreadedExecutor (< 10.0.4, ros2/rclpy#1452) re-queues callbacks
        # that have not started yet and its spin loop then holds the GIL; on 2 cores that stalled this
        # process (the camera feed of the node tests) for up to 2 s
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._closing = False
        self.spin_errors: list[str] = []
        self._thread = threading.Thread(target=self._spin, daemon=True, name="harness-spin")
        self._thread.start()

    def _spin(self):
        """Spin until closed. The harness lives for the whole session: an exception out of the
        executor (e.g. a subscription destroyed by ``drop`` while the executor was taking from it)
        is recorded and spinning goes on, instead of silently leaving every later test without
        callbacks."""
        import rclpy
        from rclpy.executors import ExternalShutdownException

        while not self._closing and rclpy.ok():
            try:
                self.executor.spin()
                return
            except ExternalShutdownException:
                return
            except Exception as exc:  # noqa: BLE001
                if self._closing:
                    return
                self.spin_errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)

    def close(self):
        self._closing = True
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self._thread.join(2.0)

    # --- entities ----------------------------------------------------------------------------------
    def collect(self, msg_type, topic: str, qos=10) -> Collector:
        c = Collector()
        c.sub = self.node.create_subscription(msg_type, topic, c, qos)
        return c

    def drop(self, *entities):
        for e in entities:
            e = getattr(e, "sub", e)
            if e is None:
                continue
            if hasattr(e, "publish"):
                self.node.destroy_publisher(e)
            elif hasattr(e, "call_async"):
                self.node.destroy_client(e)
            else:
                self.node.destroy_subscription(e)

    def wait_for_subscribers(self, pub, n: int = 1, timeout: float = 10.0):
        wait_until(lambda: pub.get_subscription_count() >= n, timeout,
                   f"{n} subscriber(s) on {pub.topic_name}")

    def wait_for_publishers(self, sub, n: int = 1, timeout: float = 10.0):
        sub = getattr(sub, "sub", sub)
        wait_until(lambda: sub.get_publisher_count() >= n, timeout, f"{n} publisher(s) on {sub.topic_name}")

    def call(self, srv_type, name: str, request, timeout: float = 10.0):
        cli = self.node.create_client(srv_type, name)
        try:
            if not cli.wait_for_service(timeout_sec=timeout):
                raise AssertionError(f"service {name} not available after {timeout} s")
            fut = cli.call_async(request)
            wait_until(fut.done, timeout, f"response of {name}")
            return fut.result()
        finally:
            self.node.destroy_client(cli)

    # --- parameters / lifecycle ----------------------------------------------------------------------
    def get_parameters(self, node_fqn: str, names: list[str], timeout: float = 10.0) -> dict[str, Any]:
        from rcl_interfaces.srv import GetParameters

        res = self.call(GetParameters, f"{node_fqn}/get_parameters", GetParameters.Request(names=names), timeout)
        return {n: param_value(v) for n, v in zip(names, res.values)}

    def list_parameters(self, node_fqn: str, timeout: float = 10.0) -> list[str]:
        from rcl_interfaces.srv import ListParameters

        res = self.call(ListParameters, f"{node_fqn}/list_parameters", ListParameters.Request(), timeout)
        return list(res.result.names)

    def set_parameters(self, node_fqn: str, values: dict[str, Any], timeout: float = 10.0):
        """Returns the list of SetParametersResult."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        return list(self.call(SetParameters, f"{node_fqn}/set_parameters", req, timeout).results)

    def lifecycle_state(self, node_fqn: str, timeout: float = 10.0) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"{node_fqn}/get_state", GetState.Request(), timeout).current_state.label

    def lifecycle_transition(self, node_fqn: str, transition_label: str, timeout: float = 60.0) -> bool:
        """Trigger a transition by label (configure, activate, deactivate, cleanup, shutdown)."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP,
               "shutdown": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN}
        req = ChangeState.Request()
        req.transition.id = ids[transition_label]
        return bool(self.call(ChangeState, f"{node_fqn}/change_state", req, timeout).success)
