"""Bags, checkpoints and a known-output policy for the replay tests (test/test_replay*.py).

The bag: a JointState ``/robot/joint_states`` at 50 Hz (the checkpoints take its j2, j0, j1 as state), two cameras at 20 Hz (``static``: raw rgb8, ``gripper``: PNG CompressedImage, same header
stamps, frame index k written into pixel (0, 0)), a goal String, and the recorded action on
``/robot/action`` (Float32MultiArray, no header -> receive time) at 50 Hz: ``[x, y, gripper]`` with
x a ramp, y a sine and gripper +-1 switching every second. ``/robot/action_alt`` carries the same
values in the order ``[y, x, gripper]`` (a deliberately shifted mapping when used instead).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

S = 1_000_000_000
T0 = 1000 * S              # bag start (ns)
CAM_HZ, ACT_HZ = 20.0, 50.0
H = W = 16
GOAL = "open the drawer"
CAMERAS = ("static", "gripper")

TOPIC_MAP = {
    "control_rate_hz": 10,
    "tolerance_s": 0.1,
    "cameras": {"static": "/cam/static/image_raw", "gripper": "/cam/wrist/image_raw/compressed"},
    "language": {"topic": "/task/goal"},
    "action": {"topic": "/robot/action", "names": ["x", "y", "gripper"]},
    "state": [{"topic": "/robot/joint_states", "joints": ["j2", "j0", "j1"], "key": "joint_states"}],
}
STATE_DIM = 3


def action_at(t_ns: int) -> np.ndarray:
    s = (t_ns - T0) / S
    return np.array([0.2 * s, 0.1 * np.sin(2.0 * s), 1.0 if int(np.floor(s)) % 2 == 0 else -1.0])


def state_at(t_ns: int) -> np.ndarray:
    s = (t_ns - T0) / S
    return np.array([np.cos(s), 0.5 * s, -0.3])


def action_times(seconds: float) -> np.ndarray:
    return T0 + 10_000_000 + np.round(np.arange(int(seconds * ACT_HZ)) * S / ACT_HZ).astype(np.int64)


def cam_recv(k: int) -> int:
    return T0 + 25_000_000 + int(round(k * S / CAM_HZ))


def cam_stamp(k: int) -> int:
    return cam_recv(k) - 2_000_000


def frame(k: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = (7 * k) % 256
    img[..., 1] = np.arange(W, dtype=np.uint8)[None, :] * 9
    img[..., 2] = np.arange(H, dtype=np.uint8)[:, None] * 11
    img[0, 0] = (k % 256, k // 256, 77)
    return img


def frame_index(img: np.ndarray) -> int:
    return int(img[0, 0, 0]) + 256 * int(img[0, 0, 1])


def write_bag(path: Path, storage: str = "sqlite3", seconds: float = 3.0, goal: str | None = GOAL,
              cam_gap: tuple[float, float] | None = None, with_actions: bool = True) -> Path:
    """The test bag. ``cam_gap=(a, b)``: no camera messages between a and b seconds (the rest goes on)."""
    from mode_ros.data.bag import BagWriter
    from mode_ros.data.images import encode_compressed, encode_image

    with BagWriter(path, storage) as w:
        T = w.types
        events = []
        if goal is not None:
            events.append((T0 - 20_000_000, "goal", None))
        for k in range(int(seconds * CAM_HZ)):
            s = (cam_recv(k) - T0) / S
            if cam_gap and cam_gap[0] <= s < cam_gap[1]:
                continue
            events.append((cam_recv(k), "static", k))
            events.append((cam_recv(k) + 1_000_000, "gripper", k))
        if with_actions:
            for t in action_times(seconds):
                events.append((int(t), "action", None))
        events.sort(key=lambda e: e[0])
        for t, kind, k in events:
            if kind == "goal":
                w.write("/task/goal", "std_msgs/msg/String", T["std_msgs/msg/String"](data=goal), t)
            elif kind == "static":
                e = encode_image(frame(k), "rgb8")
                w.write("/cam/static/image_raw", "sensor_msgs/msg/Image", T["sensor_msgs/msg/Image"](
                    header=w.header(cam_stamp(k), "static"), height=e.height, width=e.width, encoding=e.encoding,
                    is_bigendian=0, step=e.step, data=np.frombuffer(e.data, np.uint8)), t)
            elif kind == "gripper":
                png = encode_compressed(frame(k), "png")
                w.write("/cam/wrist/image_raw/compressed", "sensor_msgs/msg/CompressedImage",
                        T["sensor_msgs/msg/CompressedImage"](header=w.header(cam_stamp(k), "wrist"), format="png",
                                                             data=np.frombuffer(png, np.uint8)), t)
            else:
                js = T["sensor_msgs/msg/JointState"](header=w.header(t - 1_000_000), name=["j0", "j1", "j2", "extra"],
                                                     position=np.array([*state_at(t), 9.0]), velocity=np.zeros(0),
                                                     effort=np.zeros(0))
                w.write("/robot/joint_states", "sensor_msgs/msg/JointState", js, t)
                a = action_at(t).astype(np.float32)
                for topic, vec in (("/robot/action", a), ("/robot/action_alt", a[[1, 0, 2]])):
                    w.write(topic, "std_msgs/msg/Float32MultiArray",
                            T["std_msgs/msg/Float32MultiArray"](layout=T["std_msgs/msg/MultiArrayLayout"](
                                dim=[], data_offset=0), data=vec), t)
    return path


def recorded_at(tau_ns: int, seconds: float, tol_ns: int = 100_000_000) -> np.ndarray | None:
    """Independent re-computation: the recorded action in effect at tau (latest at or before, <= tol old)."""
    ts = action_times(seconds)
    i = int(np.searchsorted(ts, tau_ns, "right")) - 1
    if i < 0 or tau_ns - ts[i] > tol_ns:
        return None
    return action_at(int(ts[i])).astype(np.float32).astype(np.float64)


def make_checkpoint(out: Path, low=None, high=None, action_dim: int = 3, cameras=CAMERAS) -> Path:
    """`mode-ros init --preset tiny`; low == high makes the output constant (normalisation scale 1e-6);
    ``cameras=()``: a state-only checkpoint."""
    cmd = [sys.executable, "-m", "mode_ros.cli", "init", "--preset", "tiny", "--out", str(out),
           "--cameras", ",".join(cameras), "--action-dim", str(action_dim), "--state-dim", str(STATE_DIM),
           "--goals", GOAL]
    if low is not None:
        cmd += ["--action-low", ",".join(map(str, low)), "--action-high", ",".join(map(str, high))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class OraclePolicy:
    """Knows the bag: reads the frame index from the static image and returns the recorded actions in
    effect at the observation stamp + i * period (what a perfectly trained policy would output)."""

    camera_names = list(CAMERAS)
    chunk_size = 10
    action_dim = 3
    state_dim = 0
    action_names = ["x", "y", "gripper"]
    device = "cpu"

    def __init__(self, seconds: float, period_s: float = 0.1):
        self.seconds, self.period_ns = seconds, int(round(period_s * S))
        self.calls = 0

    def warmup(self):
        return 0.0

    def predict_chunk(self, images, goal, state=None, seed=None):
        self.calls += 1
        k = frame_index(np.asarray(images[0]))
        assert frame_index(np.asarray(images[1])) == k, "cameras not matched by stamp"
        stamp = cam_stamp(k)
        out = []
        last = None
        for i in range(self.chunk_size):
            v = recorded_at(stamp + i * self.period_ns, self.seconds)
            last = v if v is not None else last
            out.append(last if last is not None else np.zeros(3))
        return np.asarray(out, np.float32)


def chunks_from_bag(path: Path) -> list[dict]:
    """The ActionChunks replay wrote (OUT/chunks), decoded with rosbags."""
    from rosbags.rosbag2 import Reader

    from mode_ros.data.rosmsgs import ACTION_CHUNK_TYPE, make_typestore

    ts = make_typestore()
    out = []
    with Reader(path) as r:
        conns = [c for c in r.connections if c.msgtype == ACTION_CHUNK_TYPE]
        for c, t, raw in r.messages(connections=conns):
            m = ts.deserialize_cdr(raw, ACTION_CHUNK_TYPE)
            out.append({"t": t, "stamp": int(m.header.stamp.sec) * S + int(m.header.stamp.nanosec),
                        "first_index": int(m.first_index),
                        "period": int(m.control_period.sec) * S + int(m.control_period.nanosec),
                        "actions": np.asarray(m.actions, np.float32).reshape(int(m.chunk_size), int(m.action_dim)),
                        "sequence": int(m.sequence), "tick": int(m.tick)})
    return out


def expected_scores(chunks: list[dict], seconds: float, order=(0, 1, 2)) -> dict:
    """MAE per dim (first action and whole chunk) re-computed from the written chunks."""
    first, allr = [], []
    for c in chunks:
        for r in range(c["actions"].shape[0]):
            tau = c["stamp"] + (c["first_index"] + r) * c["period"]
            v = recorded_at(tau, seconds)
            if v is None:
                continue
            e = np.abs(c["actions"][r].astype(np.float64) - v[list(order)])
            allr.append(e)
            if r == 0:
                first.append(e)
    return {"first": np.mean(first, 0) if first else None, "chunk": np.mean(allr, 0) if allr else None,
            "n_first": len(first), "n_chunk": len(allr)}


def run_cli(args: list[str], timeout: float = 600) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "replay", *args], capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def load_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ---- session fixtures (imported by test_replay*.py) ---------------------------------------------------
import pytest  # noqa: E402

CONST = (0.3, -0.2, 1.0)


@pytest.fixture(scope="session")
def const_ckpt(tmp_path_factory):
    """A real tiny checkpoint whose output is the constant CONST (normalisation scale 1e-6)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "const", CONST, CONST)


@pytest.fixture(scope="session")
def rand_ckpt(tmp_path_factory):
    """A real randomly initialised tiny checkpoint (its output depends on the images and the seed)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "rand")


@pytest.fixture(scope="session")
def state_ckpt(tmp_path_factory):
    """A random tiny checkpoint without cameras: its observation is the joint state alone."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "state", cameras=())


@pytest.fixture(scope="session")
def bags(tmp_path_factory):
    """{storage: bag path} of the standard 3 s test bag, plus its topic map file."""
    import yaml

    d = tmp_path_factory.mktemp("bags")
    out = {s: write_bag(d / f"bag_{s}", s, seconds=3.0) for s in ("sqlite3", "mcap")}
    (d / "map.yaml").write_text(yaml.safe_dump(TOPIC_MAP))
    out["map"] = d / "map.yaml"
    return out
