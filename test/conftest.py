"""Session-wide test set-up.

* DDS stays on this machine and in a private domain: ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a
  random ``ROS_DOMAIN_ID`` per run (also keeps parallel runs apart) and a temp ``ROS_LOG_DIR``. Set
  here, at import, before any test imports rclpy; child processes inherit them.
* Tests marked ``ros`` are skipped with the reason when rclpy or the generated ``mode_ros.msg``
  cannot be imported (run them through scripts/test.sh, which builds and sources the install).
* ``MODE_ROS_SHOW_NODE_LOGS=1`` prints the node logs also when tests pass.
* Fixtures: ``ros_harness`` (a spun rclpy node, session-wide), ``start_node`` (installed
  executables as subprocesses, stopped at teardown; their log is printed when a test fails).
"""
from __future__ import annotations

import gc
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# ---- environment for this process and every node it starts ----------------------------------------
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.pop("ROS_STATIC_PEERS", None)
os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
_LOG_DIR = tempfile.mkdtemp(prefix="mode_ros_test_log_")
os.environ["ROS_LOG_DIR"] = _LOG_DIR

TEST_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TEST_DIR))  # ros_helpers, also under --import-mode=importlib

from ros_helpers import Harness, NodeProcess  # noqa: E402


def _ros_unavailable() -> str | None:
    try:
        import rclpy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "no ROS here"
        return f"rclpy not importable ({exc}); run scripts/test.sh (it builds and sources the ROS install)"
    try:
        import mode_ros.msg  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return (f"mode_ros.msg not importable ({exc}): the colcon install is not first on PYTHONPATH "
                "(source scripts/env.sh and run pytest outside the source tree, or use scripts/test.sh)")
    return None


ROS_SKIP_REASON = _ros_unavailable()


def pytest_configure(config):
    config.addinivalue_line("markers", "ros: needs rclpy and the built mode_ros package (real DDS)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_report_header(config):
    import mode_ros

    return [f"mode_ros from {Path(mode_ros.__file__).parent}",
            f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} ROS_LOG_DIR={_LOG_DIR}"
            + (f"  (ROS tests skipped: {ROS_SKIP_REASON})" if ROS_SKIP_REASON else "")]


def pytest_collection_modifyitems(config, items):
    if ROS_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=ROS_SKIP_REASON)
    for item in items:
        if "ros" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(_LOG_DIR, ignore_errors=True)


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def rclpy_session():
    if ROS_SKIP_REASON:
        pytest.skip(ROS_SKIP_REASON)
    import rclpy

    rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


@pytest.fixture(scope="session")
def ros_harness(rclpy_session):
    # the objects made so far (torch, imported modules, earlier tests) move out of the collector's
    # view: a full collection of this process's ~0.5 M objects paused every thread (the camera feeds
    # of the DDS tests) for 150-270 ms on a 2-core machine
    gc.collect()
    gc.freeze()
    h = Harness()
    yield h
    h.close()


class _Starter:
    def __init__(self):
        self.procs: list[NodeProcess] = []

    def __call__(self, exe, **kw) -> NodeProcess:
        p = NodeProcess(exe, **kw).start()
        self.procs.append(p)
        return p

    def stop_all(self, failed: bool):
        show = failed or os.environ.get("MODE_ROS_SHOW_NODE_LOGS") == "1"
        for p in self.procs:
            rc = p.stop()
            if show:
                print(f"\n{p.tail(80)}\n(exit code {rc})")


@pytest.fixture
def start_node(request):
    """start_node(executable_path, params_file=..., params={...}, ...) -> running NodeProcess."""
    s = _Starter()
    yield s
    rep = getattr(request.node, "rep_call", None)
    s.stop_all(failed=bool(rep and rep.failed))


@pytest.fixture(scope="module")
def start_module_node(request):
    """Like start_node, shared by the tests of one module (stopped when the module is done)."""
    s = _Starter()
    yield s
    s.stop_all(failed=request.session.testsfailed > 0)
