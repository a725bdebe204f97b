"""Video library and LeRobot conversion speed on this machine (a measurement command, not a test).

``python -m mode_ros.data.lerobot_bench --out /tmp/lerobot_bench.json`` encodes and decodes a smooth
moving scene with PyAV (H.264 and AV1, 96x96 and 640x480), says whether torchcodec can decode here,
and times ``export_lerobot`` -> ``import_lerobot`` of a synthetic episode file; prints a table and
writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from .episodes import EpisodeWriter
from .lerobot import VideoFrames, VideoWriter
from .lerobot_export import export_lerobot
from .lerobot_import import import_lerobot

SIZES = ((96, 96), (480, 640))


def scene(t: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = [128 + 100 * np.sin((xx + 3 * t) / 17), 128 + 100 * np.cos((yy - 2 * t) / 13), 40 + 150 * xx / w]
    return np.clip(np.stack(rgb, -1), 0, 255).astype(np.uint8)


def codec_speed(tmp: Path, vcodec: str, h: int, w: int, n: int) -> dict:
    frames = [scene(t, h, w) for t in range(n)]
    path = tmp / f"{vcodec}_{w}x{h}.mp4"
    t0 = time.perf_counter()
    v = VideoWriter(path, 20, h, w, vcodec=vcodec)
    for f in frames:
        v.add(f)
    v.close()
    enc = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    r = VideoFrames(path, 20, "bench")
    got = [r.get(i) for i in range(n)]
    r.close()
    dec = n / (time.perf_counter() - t0)
    err = float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(got, frames)]))
    return {"encode_fps": round(enc, 1), "decode_fps": round(dec, 1), "mean_abs_error": round(err, 2),
            "bytes_per_frame": round(path.stat().st_size / n)}


def torchcodec_status(path: Path) -> str:
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError:
        return "not installed"
    try:
        VideoDecoder(str(path))
        return "decodes"
    except Exception as exc:  # noqa: BLE001 - report why it cannot run here
        return f"cannot decode: {str(exc).splitlines()[0][:120]}"


def conversion_speed(tmp: Path, episodes: int, length: int, h: int, w: int) -> dict:
    rng = np.random.default_rng(0)
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "src.hdf5"
    with EpisodeWriter(src, ["static", "gripper"], [], control_rate_hz=20, state_keys=["state"]) as wr:
        for e in range(episodes):
            imgs = np.stack([scene(t + e, h, w) for t in range(length)])
            wr.add_episode(rng.normal(size=(length, 7)), {"static": imgs, "gripper": imgs[:, ::-1].copy()},
                           f"task {e % 3}", states={"state": rng.normal(size=(length, 9))})
    out = {}
    rep = export_lerobot([src], tmp / "ds", progress=False)
    out["export_frames_per_s"] = rep["frames_per_s"]
    rep = import_lerobot([tmp / "ds"], tmp / "back.hdf5", progress=False)
    out["import_frames_per_s"] = rep["totals"]["frames_per_s"]
    out.update(frames=episodes * length, cameras=2, size=[h, w])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the numbers as JSON here")
    ap.add_argument("--frames", type=int, default=100, help="frames per codec measurement")
    a = ap.parse_args(argv)
    res: dict = {"codecs": {}, "conversion": {}}
    with tempfile.TemporaryDirectory(prefix="lerobot_bench_") as tmp:
        tmp = Path(tmp)
        for vcodec in ("h264", "av1"):
            for h, w in SIZES:
                res["codecs"][f"{vcodec} {w}x{h}"] = codec_speed(tmp, vcodec, h, w, a.frames)
        res["torchcodec"] = torchcodec_status(tmp / "h264_96x96.mp4")
        for h, w in SIZES:
            res["conversion"][f"{w}x{h}"] = conversion_speed(tmp / f"conv{w}", 4, 50, h, w)
    print(f"{'codec':<16}{'encode f/s':>12}{'decode f/s':>12}{'|err|':>8}{'B/frame':>9}")
    for k, v in res["codecs"].items():
        print(f"{k:<16}{v['encode_fps']:>12}{v['decode_fps']:>12}{v['mean_abs_error']:>8}{v['bytes_per_frame']:>9}")
    print(f"torchcodec: {res['torchcodec']}")
    for k, v in res["conversion"].items():
        print(f"conversion {k} (2 cameras, {v['frames']} frames): export {v['export_frames_per_s']} frames/s, "
              f"import {v['import_frames_per_s']} frames/s")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
