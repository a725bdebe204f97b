"""Integration tests of the installed policy_node (issue 5): a real node process, a real tiny checkpoint
made by `mode-ros init`, real DDS. One node process is shared by the tests of this module (they run
in file order and each one re-establishes what it needs)."""
from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ros_helpers import executable, share_file, wait_until

pytestmark = pytest.mark.ros

NODE = "/mode_policy"
CAMERAS = ("static", "gripper")
GOALS = ("open the drawer", "push the button")
RATE = 10.0
MAX_AGE = 0.5
LOW, HIGH = -0.5, 0.5
ACTION_DIM, STATE_DIM, CHUNK = 7, 3, 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "init", "--preset", "tiny", "--out", str(out),
                        "--cameras", ",".join(CAMERAS), "--action-dim", str(ACTION_DIM),
                        "--state-dim", str(STATE_DIM), "--goals", ";".join(GOALS)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class Feed:
    """Publishes both cameras (same stamp) and joint states at 30 Hz from a thread; remembers the
    stamps it published. ``cameras`` selects which cameras are fed; ``offset`` shifts one camera's
    stamps (unsynchronised cameras)."""

    def __init__(self, harness, hz: float = 30.0):
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image, JointState

        self.h = harness
        self.Image, self.JointState = Image, JointState
        self.pubs = {c: harness.node.create_publisher(Image, f"{NODE}/image_{c}", qos_profile_sensor_data)
                     for c in CAMERAS}
        self.state_pub = harness.node.create_publisher(JointState, f"{NODE}/joint_states", qos_profile_sensor_data)
        self.period = 1.0 / hz
        self.cameras = set(CAMERAS)
        self.offset = {c: 0.0 for c in CAMERAS}
        self.state_value: float = 0.1
        self.sent: dict[tuple[int, int], float] = {}   # stamp -> monotonic publish time (static camera)
        self.last_pub: dict[str, float] = {}
        self.pub_times: list[float] = []             # monotonic time of every feed round
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        rng = np.random.default_rng(0)
        self.frames = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8).tobytes() for _ in range(4)]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def image(self, stamp, i=0, **over):
        m = self.Image()
        m.header.stamp = stamp
        m.height, m.width, m.encoding, m.step = 24, 32, "rgb8", 32 * 3
        m.data = self.frames[i % len(self.frames)]
        for k, v in over.items():
            setattr(m, k, v)
        return m

    def _run(self):
        from rclpy.time import Time

        i = 0
        while not self.stop_ev.is_set():
            now = self.h.node.get_clock().now()
            with self.lock:
                cams = set(self.cameras)
                offs = dict(self.offset)
                sv = self.state_value
            for c in cams:
                st = Time(nanoseconds=now.nanoseconds + int(offs[c] * 1e9)).to_msg()
                self.pubs[c].publish(self.image(st, i))
                self.last_pub[c] = time.monotonic()
                if c == "static":
                    self.sent[(st.sec, st.nanosec)] = time.monotonic()
            js = self.JointState()
            js.header.stamp = now.to_msg()
            js.name = ["j0", "j1", "j2"]
            js.position = [sv, 0.2, 0.3]
            self.state_pub.publish(js)
            self.pub_times.append(time.monotonic())
            i += 1
            self.stop_ev.wait(self.period)

    def longest_gap(self, seconds: float) -> float:
        """Longest pause between feed rounds during the last ``seconds`` (a stalled test process
        starves the node of images; the node then rightly stops publishing)."""
        t1 = time.monotonic()
        pt = [t for t in list(self.pub_times) if t >= t1 - seconds - 0.5] + [t1]
        return float(np.diff(pt).max()) if len(pt) > 1 else float("inf")

    def set(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, v)

    def close(self):
        self.stop_ev.set()
        self.thread.join(2)


@pytest.fixture(scope="module")
def rig(ckpt, ros_harness, start_module_node, tmp_path_factory):
    """Goal published BEFORE the node starts (transient local), camera/state feed, node, collectors."""
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from mode_ros.msg import ActionChunk
    from mode_ros.ros.policy_node import GOAL_QOS

    h = ros_harness
    goal_pub = h.node.create_publisher(String, f"{NODE}/goal", GOAL_QOS)
    goal_pub.publish(String(data=GOALS[0]))
    chunks = h.collect(ActionChunk, f"{NODE}/action_chunk", 100)
    trajs = h.collect(JointTrajectory, f"{NODE}/joint_trajectory", 100)
    feed = Feed(h)
    node = start_module_node(
        executable("policy_node"), params_file=share_file("config", "policy.yaml"),
        params={"checkpoint": str(ckpt), "device": "cpu", "control_rate_hz": RATE,
                "max_observation_age": MAX_AGE, "action_lower_bounds": [LOW], "action_upper_bounds": [HIGH],
                "publish_joint_trajectory": True, "log_throttle_period": 0.5,
                "state_joint_names": ["j0", "j1", "j2"], "torch_threads": 1,
                "gpu_kernels": "triton_pdl"})   # no CUDA here: falls back to the PyTorch kernels, logged
    node.wait_for_output("active: publishing", timeout=180)
    h.wait_for_publishers(chunks, 1)

    class Rig:
        pass

    r = Rig()
    r.h, r.node, r.feed, r.chunks, r.trajs, r.goal_pub = h, node, feed, chunks, trajs, goal_pub
    r.goal = lambda text: goal_pub.publish(String(data=text))
    yield r
    feed.close()
    # every message the node published during the whole module: right shape, finite, in bounds
    check_chunks(chunks.msgs())
    h.drop(goal_pub, chunks, trajs, *feed.pubs.values(), feed.state_pub)


def check_chunks(msgs):
    for m in msgs:
        a = np.asarray(m.actions, dtype=np.float32)
        assert m.action_dim == ACTION_DIM and 1 <= m.chunk_size <= CHUNK
        assert a.size == m.chunk_size * m.action_dim
        assert np.isfinite(a).all(), f"non-finite action in tick {m.tick}"
        assert (a >= np.float32(LOW)).all() and (a <= np.float32(HIGH)).all(), f"out of bounds in tick {m.tick}"
        assert m.first_index + m.chunk_size <= CHUNK
        assert m.control_period.sec == 0 and abs(m.control_period.nanosec - 1e9 / RATE) < 2


def wait_chunks(rig, pred, timeout, what):
    return wait_until(lambda: [m for m in rig.chunks.msgs() if pred(m)], timeout, what, on_fail=rig.node.tail)


def wait_until_soft(pred, timeout, period=0.02) -> bool:
    """Poll ``pred`` for up to ``timeout`` seconds; False (no failure) when it never held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    return bool(pred())


def wait_new(rig, t0, pred, timeout, what):
    """Chunks received after monotonic time t0 that satisfy pred (waits for at least one)."""
    return wait_until(lambda: [m for t, m in rig.chunks.stamped() if t > t0 and pred(m)], timeout, what,
                      on_fail=rig.node.tail)


def window(rig, seconds):
    """Chunks received during the next `seconds` (receive time, msg)."""
    t0 = time.monotonic()
    time.sleep(seconds)  # a measurement window, not a synchronisation wait
    return [(t, m) for t, m in rig.chunks.stamped() if t >= t0]


# ---- tests, in order --------------------------------------------------------------------------------
def test_goal_published_before_start_is_honoured(rig):
    got = wait_chunks(rig, lambda m: True, 60, "the first ActionChunk")
    assert got[0].goal == GOALS[0]
    assert rig.node.alive


def test_chunks_rate_shape_bounds_and_stamps(rig):
    wait_chunks(rig, lambda m: True, 30, "chunks")
    span = 3.5
    got = window(rig, span)
    assert len(got) >= 2
    # messages per second over the whole window (not first-to-last: one chunk that a loaded machine
    # delivered late at the window's edge would bend that estimate without any tick being lost)
    # (+-15 %: on a busy 2-core machine the inference thread can hold the GIL past a whole period, and
    # the timer then skips that tick; the latency benchmark measures rate and jitter properly)
    rate = len(got) / span
    assert abs(rate - RATE) <= 0.15 * RATE, (f"achieved {rate:.2f} Hz, want {RATE} +-15% (camera feed: "
                                             f"longest gap {rig.feed.longest_gap(span):.3f} s)\n{rig.node.tail(20)}")
    msgs = [m for _, m in got]
    check_chunks(msgs)
    assert all(m.goal == GOALS[0] for m in msgs)
    ticks = [m.tick for m in msgs]
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    seqs = [m.sequence for m in msgs]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]
    # header stamp = the stamp of the observation (an image the feed published), never the publish time
    for m in msgs:
        assert (m.header.stamp.sec, m.header.stamp.nanosec) in rig.feed.sent
    # within one inference (same sequence), the rows advance with the ticks
    by_seq = {}
    for m in msgs:
        by_seq.setdefault(m.sequence, []).append(m.first_index)
    assert any(len(v) > 1 and v == sorted(v) for v in by_seq.values())
    # the same plan as a JointTrajectory
    tr = rig.trajs.msgs()[-1]
    assert len(tr.joint_names) == ACTION_DIM and 1 <= len(tr.points) <= CHUNK
    tfs = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in tr.points]
    assert tfs[0] == pytest.approx(1 / RATE) and np.all(np.diff(tfs) > 0)
    assert all(LOW <= v <= HIGH for p in tr.points for v in p.positions)


def test_goal_change_discards_old_plan(rig):
    rig.goal(GOALS[1])
    t0 = time.monotonic()
    new = wait_chunks(rig, lambda m: m.goal == GOALS[1], 10, "a chunk for the new goal")
    first = min(new, key=lambda m: m.tick)
    later_old = [m for m in rig.chunks.msgs() if m.tick > first.tick and m.goal != GOALS[1]]
    assert later_old == []
    assert time.monotonic() - t0 < 5


def test_diagnostics(rig):
    from diagnostic_msgs.msg import DiagnosticArray

    rig.goal(GOALS[1])   # set here: passes when selected alone (no goal left by an earlier test)
    wait_new(rig, time.monotonic(), lambda m: m.goal == GOALS[1], 20, "a chunk for the goal")
    d = rig.h.collect(DiagnosticArray, "/diagnostics", 10)
    try:
        got = wait_until(lambda: [s for a in d.msgs() for s in a.status if NODE in s.name and any(
            v.key == "goal" and v.value == GOALS[1] for v in s.values)], 10, "diagnostics with the goal")
        kv = {v.key: v.value for v in got[-1].values}
        for k in ("inference_latency_median_ms", "inference_latency_p99_ms", "achieved_rate_hz", "stale",
                  "rejected", "dropped_results", "goal", "ticks_published"):
            assert k in kv, k
        assert kv["goal"] == GOALS[1] and float(kv["inference_latency_median_ms"]) > 0
        assert float(kv["achieved_rate_hz"]) > 0.5 * RATE
    finally:
        rig.h.drop(d)


def test_enable_disable(rig):
    from std_srvs.srv import SetBool

    r = rig.h.call(SetBool, f"{NODE}/enable", SetBool.Request(data=False))
    assert r.success
    t_off = time.monotonic()
    got = window(rig, 1.0)
    assert len([x for x in got if x[0] > t_off + 0.05]) == 0, "published while disabled"
    r = rig.h.call(SetBool, f"{NODE}/enable", SetBool.Request(data=True))
    assert r.success
    t_on = time.monotonic()
    wait_until(lambda: [x for x in rig.chunks.stamped() if x[0] > t_on], 10, "output after enable",
               on_fail=rig.node.tail)
    assert "disabled" in rig.node.output()


def test_lifecycle_transitions(rig):
    h = rig.h
    assert h.lifecycle_state(NODE) == "active"
    assert h.lifecycle_transition(NODE, "deactivate")
    assert h.lifecycle_state(NODE) == "inactive"
    t_off = time.monotonic()
    assert len([x for x in window(rig, 0.6) if x[0] > t_off + 0.05]) == 0, "published while inactive"
    assert h.lifecycle_transition(NODE, "cleanup")
    assert h.lifecycle_state(NODE) == "unconfigured"
    assert h.lifecycle_transition(NODE, "configure", timeout=120)
    assert h.lifecycle_state(NODE) == "inactive"
    assert h.lifecycle_transition(NODE, "activate")
    t_on = time.monotonic()
    wait_until(lambda: [x for x in rig.chunks.stamped() if x[0] > t_on], 20, "output after re-activation",
               on_fail=rig.node.tail)


def test_gpu_kernels_fall_back_with_reason_on_cpu(rig):
    """gpu_kernels: triton_pdl on a CPU: the node runs the fused sampler with the PyTorch kernels and
    says why (the chunks of the whole module are checked by the rig: shape, finite, in bounds)."""
    out = rig.node.output()
    assert "need a CUDA device" in out and "using the PyTorch kernels" in out
    assert "pdl (programmatic dependent launch)" in out
    assert "'gemm': 'torch'" in out and "'fused': True" in out and "'pdl': False" in out


def test_policy_logger_adapter_has_info_and_warning():
    """enable_fast reports a skipped torch.compile with logger.info and select_fast its figures: the node's
    adapter must have it (an AttributeError there was taken for a fused-sampler failure, so on CUDA
    gpu_kernels triton with fast_inference compiled fell back to the eager sampler)."""
    from mode_ros.ros.policy_node import _StdLogger

    got = []

    class L:
        def info(self, m):
            got.append(("info", m))

        def warning(self, m):
            got.append(("warning", m))

    log = _StdLogger(L())
    log.info("torch.compile skipped: %s", "the all-Triton step")
    log.warning("fallback %d", 1)
    assert got == [("info", "torch.compile skipped: the all-Triton step"), ("warning", "fallback 1")]


def test_invalid_parameter_refused_with_its_name(rig):
    res = rig.h.set_parameters(NODE, {"control_rate_hz": -3.0})
    assert not res[0].successful and "control_rate_hz" in res[0].reason
    res = rig.h.set_parameters(NODE, {"image_transport": "carrier-pigeon"})
    assert not res[0].successful and "image_transport" in res[0].reason
    res = rig.h.set_parameters(NODE, {"max_observation_age": MAX_AGE})
    assert res[0].successful


def test_bad_inputs_are_rejected_and_logged(rig):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, JointState

    h, feed = rig.h, rig.feed
    pub = feed.pubs["static"]
    # the camera and state feeds reach the node (it publishes from them) before anything bad is sent
    wait_new(rig, time.monotonic(), lambda m: True, 30, "output from the live feed")
    now = lambda: h.node.get_clock().now().to_msg()  # noqa: E731

    def state(names, pos, age=0.0):
        js = JointState()
        js.header.stamp = now()
        js.header.stamp.sec -= int(age)
        js.name, js.position = names, pos
        return js

    # each bad input is sent (best effort, like a camera driver) until the node has logged why it was
    # rejected: a burst beside the live feed may be overwritten in the reader's queue, which is fine
    bad = [
        (pub, lambda: feed.image(now(), encoding="yuv422"), "unsupported image encoding"),
        (pub, lambda: feed.image(now(), data=b"\x00" * 100), "shorter than height*step"),
        (pub, lambda: feed.image(now(), height=0, width=0, step=0, data=b""), "zero size"),
        (pub, lambda: feed.image(now(), step=10), "step 10 <"),
        (feed.state_pub, lambda: state(["j0", "j1", "j2"], [float("nan"), 0.0, 0.0]), "contains NaN"),
        (feed.state_pub, lambda: state(["x"], [1.0]), "joint missing"),
        (feed.state_pub, lambda: state(["j0", "j1", "j2"], [1e39, 0.0, 0.0]), "beyond float32"),
        # older than the state the 30 Hz feed just sent: must not replace it
        (feed.state_pub, lambda: state(["j0", "j1", "j2"], [0.1, 0.2, 0.3], age=1.0), "out of order"),
    ]
    for p, make, text in bad:
        def sent_and_logged(p=p, make=make, text=text):
            p.publish(make())
            return wait_until_soft(lambda: text in rig.node.output(), 0.3)
        wait_until(sent_and_logged, 15, f"log line containing {text!r}", period=0.0, on_fail=rig.node.tail)
    rig.goal("")                      # empty goal: output stops, says why
    t_empty = time.monotonic()
    wait_until(lambda: "empty goal" in rig.node.output(), 5, "log of the empty goal", on_fail=rig.node.tail)
    quiet = [x for x in window(rig, 0.5) if x[0] > t_empty + 0.15]
    assert quiet == [], "published without a goal"
    rig.goal("x" * 5000)              # very long goal
    wait_until(lambda: "exceeds max_goal_length" in rig.node.output(), 5, "log of the long goal",
               on_fail=rig.node.tail)
    # a 1 kHz burst of (valid) images on one camera
    t0 = time.monotonic()
    for i in range(1000):
        pub.publish(feed.image(now(), i))
        time.sleep(max(0.0, t0 + (i + 1) * 1e-3 - time.monotonic()))
    # unsynchronised cameras: gripper stamps 0.4 s behind (fresh enough, but never within tolerance)
    t_goal = time.monotonic()
    rig.goal(GOALS[0])
    wait_new(rig, t_goal, lambda m: m.goal == GOALS[0], 20, "output after a valid goal")
    # (sync_queue_size 10 at 30 Hz keeps 0.3 s of images: -0.4 s never matches, and is not yet stale)
    feed.set(offset={"static": 0.0, "gripper": -0.4})
    wait_until(lambda: "camera_sync_tolerance" in rig.node.output(), 10, "log of unsynchronised cameras",
               on_fail=rig.node.tail)
    n0 = len(rig.chunks)
    wait_until(lambda: len(window(rig, 0.3)) == 0, 5, "output to stop while cameras are unsynchronised",
               on_fail=rig.node.tail)
    feed.set(offset={"static": 0.0, "gripper": 0.0})
    wait_until(lambda: len(rig.chunks) > n0 + 2, 10, "output after cameras are synchronised again",
               on_fail=rig.node.tail)
    # a compressed image on a raw topic is simply another type (no crash); garbage compressed data on
    # a compressed topic is covered by the decoder's unit tests
    cpub = h.node.create_publisher(CompressedImage, f"{NODE}/image_static/compressed", qos_profile_sensor_data)
    cpub.publish(CompressedImage(format="jpeg", data=b"not a jpeg"))
    h.drop(cpub)
    out = rig.node.output()
    for text in ("unsupported image encoding", "shorter than height*step", "zero size", "step 10 <",
                 "contains NaN", "joint missing", "beyond float32", "out of order", "empty goal",
                 "exceeds max_goal_length"):
        assert text in out, f"no log line containing {text!r}\n{rig.node.tail(40)}"
    assert rig.node.alive
    check_chunks(rig.chunks.msgs())


def test_stale_camera_stops_output_and_it_resumes(rig):
    rig.goal(GOALS[0])
    wait_new(rig, time.monotonic(), lambda m: m.goal == GOALS[0], 10, "output")
    rig.feed.set(cameras={"static"})          # the gripper camera stops
    wait_until(lambda: len(window(rig, 0.3)) == 0, MAX_AGE + 5, "output to stop", on_fail=rig.node.tail)
    t_stop = rig.feed.last_pub["gripper"]
    last = max(t for t, _ in rig.chunks.stamped())
    tick = 1.0 / RATE
    assert last - t_stop <= MAX_AGE + tick + 0.1, f"output went on {last - t_stop:.3f} s after the camera stopped"
    assert "is stale" in rig.node.output()
    rig.feed.set(cameras=set(CAMERAS))
    t_on = time.monotonic()
    wait_until(lambda: [x for x in rig.chunks.stamped() if x[0] > t_on], 10, "output after the camera returns",
               on_fail=rig.node.tail)


def test_node_refuses_invalid_params_file(start_node, tmp_path):
    import yaml

    doc = yaml.safe_load(share_file("config", "policy.yaml").read_text())
    doc["/**"]["ros__parameters"]["control_rate_hz"] = 5000.0
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    p = start_node(executable("policy_node"), params_file=f, name="bad_params")
    wait_until(lambda: not p.alive, 30, "the node to exit on an invalid parameter", on_fail=p.tail)
    assert p.proc.returncode == 2
    assert "control_rate_hz" in p.output()


def test_configure_failure_is_reported(ros_harness, start_node, tmp_path):
    p = start_node(executable("policy_node"), params={"checkpoint": str(tmp_path / "nope")}, name="bad_ckpt")
    p.wait_for_output("configure failed", 60)
    assert ros_harness.lifecycle_state("/bad_ckpt") == "unconfigured"
    assert "not a mode_ros checkpoint" in p.output() or "nope" in p.output()
    assert p.alive


def test_use_sim_time_drives_stamps_staleness_and_ticks(ckpt, ros_harness, start_node):
    """With use_sim_time the node clock follows /clock: a simulated time far from the wall clock still
    gives output (staleness is judged on the node clock), stamps are the simulated image stamps, and
    when images stop while simulated time runs on, the output stops. This node also takes its cameras
    as sensor_msgs/CompressedImage (image_transport: compressed, JPEG)."""
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.time import Time
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage, JointState

    from mode_ros.data.images import encode_compressed
    from std_msgs.msg import Header, String

    from mode_ros.msg import ActionChunk
    from mode_ros.ros.policy_node import GOAL_QOS

    h = ros_harness
    ns = "/sim_policy"
    clock_pub = h.node.create_publisher(Clock, "/clock", 10)
    cams = {c: h.node.create_publisher(CompressedImage, f"{ns}/image_{c}/compressed", qos_profile_sensor_data)
            for c in CAMERAS}
    jpeg = encode_compressed(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8), "jpeg")
    js_pub = h.node.create_publisher(JointState, f"{ns}/joint_states", qos_profile_sensor_data)
    goal = h.node.create_publisher(String, f"{ns}/goal", GOAL_QOS)
    goal.publish(String(data=GOALS[0]))
    chunks = h.collect(ActionChunk, f"{ns}/action_chunk", 100)
    sim = {"t": 1000.0, "images": True, "sent": set()}
    stop = threading.Event()

    def run():
        i = 0
        while not stop.is_set():
            sim["t"] += 0.01
            st = Time(nanoseconds=int(round(sim["t"] * 1e9))).to_msg()
            clock_pub.publish(Clock(clock=st))
            if i % 3 == 0 and sim["images"]:
                for c, p in cams.items():
                    p.publish(CompressedImage(header=Header(stamp=st), format="jpeg", data=jpeg))
                sim["sent"].add((st.sec, st.nanosec))
                js = JointState()
                js.header.stamp = st
                js.name, js.position = ["j0", "j1", "j2"], [0.0, 0.1, 0.2]
                js_pub.publish(js)
            i += 1
            stop.wait(0.01)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        node = start_node(executable("policy_node"), name="sim_policy",
                          params={"checkpoint": str(ckpt), "device": "cpu", "use_sim_time": True,
                                  "max_observation_age": MAX_AGE, "state_joint_names": ["j0", "j1", "j2"],
                                  "torch_threads": 1, "image_transport": "compressed"})
        wait_until(lambda: len(chunks) >= 5, 180, "chunks under simulated time", on_fail=node.tail)
        for m in chunks.msgs():
            assert (m.header.stamp.sec, m.header.stamp.nanosec) in sim["sent"]
            assert 999 < m.header.stamp.sec < 1e6      # simulated, not wall-clock, stamps
        sim["images"] = False                           # cameras stop, simulated time runs on
        wait_until(lambda: "is stale" in node.output(), 10, "the stale-camera log", on_fail=node.tail)
        n = len(chunks)
        time.sleep(0.5)  # measurement window: nothing may arrive while stale
        assert len(chunks) - n <= 1
        # the simulator resets: its clock jumps back 500 s and the cameras resume on the new timeline.
        # What was buffered from the old one must not be used (its stamps would look fresh for 500 s)
        n = len(chunks)
        sim["t"], sim["images"] = 500.0, True
        wait_until(lambda: "clock jumped back" in node.output(), 10, "the clock-jump log", on_fail=node.tail)
        wait_until(lambda: len(chunks) >= n + 3, 60, "chunks after the reset", on_fail=node.tail)
        new = chunks.msgs()[n:]
        assert all(500 <= m.header.stamp.sec < 900 for m in new), [m.header.stamp.sec for m in new]
    finally:
        stop.set()
        th.join(2)
        h.drop(clock_pub, js_pub, goal, chunks, *cams.values())


def test_lockstep_inference_serves_each_due_tick_from_its_own_observation(ckpt, ros_harness, start_node):
    """lockstep_inference under a scripted lockstep simulator (sim time advances only once the node's
    message for the tick has arrived). Every chunk comes from the observation of the tick it starts at:
    its stamp is that tick and its first_index 0; a new sequence starts exactly every replan_every ticks
    and the ticks between execute rows 1 .. R-1 of it. This holds when a tick's images and state arrive
    after its /clock (the node waits for them rather than using the previous tick's), and across a goal
    change (the next tick starts a chunk for the new goal) and while the node is disabled (the tick
    waits; ~/enable true serves it from a new chunk). So what the simulator executes depends only on what
    it observed, not on the machine's speed."""
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.time import Time
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from std_srvs.srv import SetBool

    from mode_ros.msg import ActionChunk
    from mode_ros.ros.policy_node import GOAL_QOS

    h = ros_harness
    ns, R, rate = "/lockstep_policy", 3, 10.0
    clock_pub = h.node.create_publisher(Clock, "/clock", 10)
    cams = {c: h.node.create_publisher(Image, f"{ns}/image_{c}", qos_profile_sensor_data) for c in CAMERAS}
    js_pub = h.node.create_publisher(JointState, f"{ns}/joint_states", qos_profile_sensor_data)
    goal = h.node.create_publisher(String, f"{ns}/goal", GOAL_QOS)
    goal.publish(String(data=GOALS[0]))
    chunks = h.collect(ActionChunk, f"{ns}/action_chunk", 100)
    rng = np.random.default_rng(3)

    def observe(st, k):
        frame = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8).tobytes()
        for p in cams.values():
            m = Image()
            m.header.stamp = st
            m.height, m.width, m.encoding, m.step, m.data = 24, 32, "rgb8", 32 * 3, frame
            p.publish(m)
        js = JointState()
        js.header.stamp = st
        js.name, js.position = ["j0", "j1", "j2"], [0.01 * k, 0.2, 0.3]
        js_pub.publish(js)

    def message_for(t_ns):
        for m in chunks.msgs():
            stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
            if stamp + m.first_index * int(1e9 / rate) == t_ns:
                return m
        return None

    node = start_node(executable("policy_node"), name="lockstep_policy",
                      params={"checkpoint": str(ckpt), "device": "cpu", "use_sim_time": True,
                              "control_rate_hz": rate, "replan_every": R, "lockstep_inference": True,
                              "state_joint_names": ["j0", "j1", "j2"], "torch_threads": 1, "seed": 0})
    got = []
    try:
        t0_ns = 2_000 * 1_000_000_000
        for k in range(24):
            t_ns = t0_ns + k * int(1e9 / rate)
            st = Time(nanoseconds=t_ns).to_msg()
            if k == 13:
                goal.publish(String(data=GOALS[1]))
            late = k % 5 == 2
            if k == 18:
                assert h.call(SetBool, f"{ns}/enable", SetBool.Request(data=False)).success
            if not late:
                observe(st, k)
            clock_pub.publish(Clock(clock=st))
            if late:                      # the clock comes first, the tick's observation 0.3 s later
                time.sleep(0.3)
                observe(st, k)
            if k == 18:                   # disabled at this tick: nothing for 0.5 s, then enabled
                time.sleep(0.5)
                assert message_for(t_ns) is None
                assert h.call(SetBool, f"{ns}/enable", SetBool.Request(data=True)).success
            deadline = time.monotonic() + (180 if k == 0 else 20)
            resend = time.monotonic() + 1.0
            while (m := message_for(t_ns)) is None:
                assert time.monotonic() < deadline, f"no message for tick {k}\n{node.tail()}"
                if time.monotonic() > resend:   # the node may not have been listening yet (start-up)
                    observe(st, k)
                    clock_pub.publish(Clock(clock=st))
                    resend = time.monotonic() + 1.0
                time.sleep(0.005)
            got.append((k, m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec, m.first_index,
                        m.sequence, m.goal))
    finally:
        h.drop(clock_pub, js_pub, goal, chunks, *cams.values())
    starts = [k for k, _, fi, _, _ in got if fi == 0]
    # the goal change at 13 and the re-enable at 18 start a chunk
    assert starts == [0, 3, 6, 9, 12, 13, 16, 18, 21], got
    for k, stamp, fi, seq, g in got:
        start = max(s for s in starts if s <= k)
        assert fi == k - start and stamp == t0_ns + start * int(1e9 / rate), (k, got)
        assert g == (GOALS[1] if k >= 13 else GOALS[0])
    seqs = [seq for k, _, fi, seq, _ in got if fi == 0]
    assert seqs == sorted(set(seqs)), got                      # one new inference per chunk start
