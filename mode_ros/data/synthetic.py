"""A synthetic demonstration bag (for benchmarks, demos and smoke tests), and a conversion benchmark.

``python -m mode_ros.data.synthetic --out /tmp/bench --seconds 20`` writes a bag with a 640x480 rgb8
camera and a JPEG wrist camera at 30 Hz, JointState commands at 100 Hz and a goal String, converts it
at 10 Hz and prints the conversion throughput (messages/s, frames/s).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from .bag import BagWriter, convert_bags, format_report
from .images import encode_compressed, encode_image

__all__ = ["write_synthetic_bag", "SYNTHETIC_TOPIC_MAP", "main"]

JOINTS = [f"joint{i}" for i in range(1, 8)]

SYNTHETIC_TOPIC_MAP = {
    "control_rate_hz": 10,
    "tolerance_s": 0.1,
    "cameras": {"static": {"topic": "/camera/image_raw"},
                "gripper": {"topic": "/wrist/image_raw/compressed"}},
    "language": {"topic": "/mode_policy/goal"},
    "action": {"topic": "/arm/joint_command", "joints": JOINTS},
    "state": [{"topic": "/joint_states", "joints": JOINTS, "key": "joint_states"}],
}


def write_synthetic_bag(path: str | Path, seconds: float = 10.0, storage: str = "sqlite3", cam_hz: float = 30.0,
                        joint_hz: float = 100.0, size: tuple[int, int] = (480, 640), wrist_size=(240, 320),
                        seed: int = 0) -> int:
    """Write the bag; returns the number of messages."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]  # a smooth scene plus sensor noise (random noise alone is a gzip worst case)
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1)
    base = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    wbase = np.ascontiguousarray(np.linspace(0, 255, wrist_size[0] * wrist_size[1] * 3)
                                 .reshape(wrist_size[0], wrist_size[1], 3).astype(np.uint8))
    wrist_jpeg = encode_compressed(wbase, "jpeg", quality=90)
    t0 = 1_700_000_000 * 10**9
    n = 0
    with BagWriter(path, storage) as bw:
        T = bw.types
        bw.write("/mode_policy/goal", "std_msgs/msg/String", T["std_msgs/msg/String"](data="pick up the cube"), t0)
        n += 1
        events = []
        for k in range(int(seconds * cam_hz)):
            events.append((t0 + int(k * 1e9 / cam_hz) + 1000, "cam", k))
        for k in range(int(seconds * joint_hz)):
            events.append((t0 + int(k * 1e9 / joint_hz) + 500, "joint", k))
        events.sort()
        for t, kind, k in events:
            jitter = int(rng.integers(-2_000_000, 2_000_000))
            if kind == "cam":
                img = np.roll(base, k, axis=1)
                e = encode_image(img, "rgb8")
                bw.write("/camera/image_raw", "sensor_msgs/msg/Image", T["sensor_msgs/msg/Image"](
                    header=bw.header(t + jitter, "camera"), height=e.height, width=e.width, encoding=e.encoding,
                    is_bigendian=0, step=e.step, data=np.frombuffer(e.data, np.uint8)), t + 3_000_000)
                bw.write("/wrist/image_raw/compressed", "sensor_msgs/msg/CompressedImage",
                         T["sensor_msgs/msg/CompressedImage"](header=bw.header(t + jitter, "wrist"), format="jpeg",
                                                              data=np.frombuffer(wrist_jpeg, np.uint8)), t + 3_000_000)
                n += 2
            else:
                pos = np.sin(np.arange(7) + k * 0.01)
                for topic in ("/arm/joint_command", "/joint_states"):
                    bw.write(topic, "sensor_msgs/msg/JointState", T["sensor_msgs/msg/JointState"](
                        header=bw.header(t + jitter), name=JOINTS, position=pos, velocity=np.zeros(7),
                        effort=np.zeros(0)), t + 1_000_000)
                    n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/mode_ros_synthetic")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--storage", choices=["sqlite3", "mcap"], default="sqlite3")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t = time.perf_counter()
    n = write_synthetic_bag(out / "bag", a.seconds, a.storage)
    print(f"wrote {n} messages in {time.perf_counter() - t:.1f} s")
    rep = convert_bags([out / "bag"], SYNTHETIC_TOPIC_MAP, out / "episodes.hdf5", progress=True)
    print(format_report(rep))
    tot = rep["totals"]
    print(f"throughput: {tot['messages_read'] / tot['elapsed_s']:.0f} messages/s, "
          f"{tot['ticks'] / tot['elapsed_s']:.1f} output frames/s (2 cameras per frame)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
