"""End-to-end latency and output jitter of the installed policy node, measured over real DDS.

    source scripts/env.sh
    python -m mode_ros.ros.latency_bench --duration 20 --out runs/latency   # tiny random checkpoint
    python -m mode_ros.ros.latency_bench --checkpoint ckpt/ --rate 15 --replan-every 1

Starts ``policy_node`` (the installed executable, as ``ros2 run`` would) on a checkpoint (default: a
tiny random one made with ``mode-ros init``), feeds it images for every camera of the checkpoint at
``--camera-hz`` plus a goal, and records every ActionChunk. Reported:

* end-to-end latency: image published -> first ActionChunk computed from that image received
  (inference + waiting for the next control tick + DDS both ways), median / p90 / p99 / max;
* inference latency as reported in the chunks (``inference_latency``);
* publication period of the chunks as received: mean, standard deviation (jitter), p99 of the
  absolute deviation from the nominal period, and missed ticks (period > 1.5 x nominal).

Writes ``latency.json`` and, with matplotlib, ``latency.png`` (histograms) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from mode_ros.ros.processes import installed_executable, node_command, stop_process_group


def _make_checkpoint(path: Path, cameras: str, action_dim: int) -> None:
    r = subprocess.run([sys.executable, "-m", "mode_ros.cli", "init", "--preset", "tiny", "--out", str(path),
                        "--cameras", cameras, "--action-dim", str(action_dim), "--goals", "open the drawer"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mode-ros init failed:\n{r.stderr[-2000:]}")


def _summary(x: np.ndarray, scale: float = 1e3) -> dict:
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "median_ms": float(np.median(x) * scale), "p90_ms": float(np.percentile(x, 90) * scale),
            "p99_ms": float(np.percentile(x, 99) * scale), "max_ms": float(x.max() * scale),
            "mean_ms": float(x.mean() * scale)}


def run(args) -> dict:
    from mode_ros.model.checkpoint import checkpoint_config, resolve_checkpoint

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    tmp = Path(tempfile.mkdtemp(prefix="mode_ros_bench_"))
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else tmp / "tiny"
    if not args.checkpoint:
        print(f"making a tiny random checkpoint in {ckpt} ...", file=sys.stderr)
        _make_checkpoint(ckpt, args.cameras, args.action_dim)
    cams = list(checkpoint_config(ckpt).camera_names)
    exe = installed_executable("policy_node")
    if exe is None:
        raise SystemExit("the installed policy_node is missing: scripts/build.sh, then `source scripts/env.sh`")
    params = {"checkpoint": str(ckpt), "device": args.device, "control_rate_hz": float(args.rate),
              "replan_every": args.replan_every, "torch_threads": args.torch_threads}
    with open(tmp / "node.log", "wb") as log:
        proc = subprocess.Popen(node_command(exe, params, NODE[1:]), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rows, sent = _measure(args, cams, proc, tmp / "node.log")
        finally:
            stop_process_group(proc)
    res = {"checkpoint": str(ckpt), "device": args.device, "cameras": cams, "image_size": list(args.image_size),
           "control_rate_hz": args.rate, "replan_every": args.replan_every, "camera_hz": args.camera_hz,
           "duration_s": args.duration}
    t = np.array([r[0] for r in rows])           # receive times of the chunks
    e2e, inf, n_inferences = _latencies(rows, sent)
    res.update(_analyse(t, e2e, inf, n_inferences, 1.0 / args.rate))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency.json").write_text(json.dumps(res, indent=1))
        _plot(e2e, inf, np.diff(t), 1.0 / args.rate, out / "latency.png")
    return res


NODE = "/bench_policy"


def _measure(args, cams: list[str], proc, log_path: Path):
    """Feed the node images and a goal; the chunks received during ``--duration`` after ``--warm-s``:
    rows (receive time, sequence, header stamp, inference latency) and {image stamp: publish time}."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from mode_ros.msg import ActionChunk
    from mode_ros.ros.policy_node import GOAL_QOS

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("latency_bench", context=ctx)
    sent: dict[tuple[int, int], float] = {}
    got: list[tuple[float, int, tuple[int, int], float]] = []
    lock = threading.Lock()

    def on_chunk(m):
        t = time.monotonic()
        lat = m.inference_latency.sec + m.inference_latency.nanosec * 1e-9
        with lock:
            got.append((t, m.sequence, (m.header.stamp.sec, m.header.stamp.nanosec), lat))

    node.create_subscription(ActionChunk, f"{NODE}/action_chunk", on_chunk, 100)
    pubs = [node.create_publisher(Image, f"{NODE}/image_{c}", qos_profile_sensor_data) for c in cams]
    node.create_publisher(String, f"{NODE}/goal", GOAL_QOS).publish(String(data="open the drawer"))
    h, w = args.image_size
    frame = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8).tobytes()

    def publish_images():
        st = node.get_clock().now().to_msg()
        for p in pubs:
            m = Image()
            m.header.stamp = st
            m.height, m.width, m.encoding, m.step, m.data = h, w, "rgb8", w * 3, frame
            p.publish(m)
        with lock:
            sent[(st.sec, st.nanosec)] = time.monotonic()

    node.create_timer(1.0 / args.camera_hz, publish_images)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    spin = threading.Thread(target=ex.spin, daemon=True)
    spin.start()
    try:
        t0 = time.monotonic()
        while not got:
            if proc.poll() is not None or time.monotonic() - t0 > args.startup_timeout:
                raise SystemExit(f"no ActionChunk from the node (log: {log_path}):\n" + log_path.read_text()[-3000:])
            time.sleep(0.05)
        print(f"node up after {time.monotonic() - t0:.1f} s; measuring {args.duration:g} s ...", file=sys.stderr)
        time.sleep(args.warm_s)
        with lock:
            start = len(got)
        time.sleep(args.duration)
        with lock:
            return got[start:], dict(sent)
    finally:
        ex.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


def _latencies(rows, sent: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Per inference (the first chunk received of each sequence) whose image stamp was sent here: end-to-end
    latency (image published -> chunk received) and the inference latency the chunk reports; the number
    of inferences."""
    e2e, inf, seen = [], [], set()
    for tr, seq, stamp, lat in rows:
        if seq in seen:
            continue
        seen.add(seq)
        if stamp in sent:
            e2e.append(tr - sent[stamp])
            inf.append(lat)
    return np.array(e2e), np.array(inf), len(seen)


def _analyse(t: np.ndarray, e2e: np.ndarray, inf: np.ndarray, n_inferences: int, nominal: float) -> dict:
    """Latency summaries and the publication period of chunks received at times ``t``."""
    periods = np.diff(t)
    some = periods.size > 0
    return {
        "chunks": len(t), "inferences": n_inferences,
        "achieved_rate_hz": float((len(t) - 1) / (t[-1] - t[0])) if len(t) > 1 else 0.0,
        "end_to_end_latency": _summary(e2e),
        "inference_latency": _summary(inf),
        "period": {"nominal_ms": nominal * 1e3, "mean_ms": float(periods.mean() * 1e3) if some else None,
                   "jitter_std_ms": float(periods.std() * 1e3) if some else None,
                   "p99_abs_dev_ms": float(np.percentile(np.abs(periods - nominal), 99) * 1e3) if some else None,
                   "max_ms": float(periods.max() * 1e3) if some else None,
                   "missed_ticks": int((periods > 1.5 * nominal).sum())},
    }


def _plot(e2e: np.ndarray, inf: np.ndarray, periods: np.ndarray, nominal: float, path: Path) -> None:
    """Histograms of the latencies and of the publication period (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].hist(e2e * 1e3, bins=30, alpha=0.7, label="image -> chunk received")
    ax[0].hist(inf * 1e3, bins=30, alpha=0.7, label="inference")
    ax[0].set_xlabel("ms")
    ax[0].legend()
    ax[0].set_title("latency")
    ax[1].hist(periods * 1e3, bins=30)
    ax[1].axvline(nominal * 1e3, color="k", ls="--")
    ax[1].set_xlabel("ms")
    ax[1].set_title(f"publication period (nominal {nominal * 1e3:.0f} ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a tiny random one)")
    ap.add_argument("--cameras", default="static,gripper", help="cameras of the generated tiny checkpoint")
    ap.add_argument("--action-dim", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rate", type=float, default=10.0, help="control_rate_hz")
    ap.add_argument("--replan-every", type=int, default=1)
    ap.add_argument("--camera-hz", type=float, default=30.0)
    ap.add_argument("--image-size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    ap.add_argument("--torch-threads", type=int, default=0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warm-s", type=float, default=2.0, help="seconds skipped after the first chunk")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--out", default=None, help="folder for latency.json / latency.png")
    args = ap.parse_args(argv)
    res = run(args)
    e, i, p = res["end_to_end_latency"], res["inference_latency"], res["period"]
    print(json.dumps(res, indent=1))
    if e.get("n"):
        print(f"end-to-end latency: median {e['median_ms']:.1f} ms, p99 {e['p99_ms']:.1f} ms (n={e['n']}); "
              f"inference median {i['median_ms']:.1f} ms, p99 {i['p99_ms']:.1f} ms; period "
              f"{p['mean_ms']:.1f} ms +- {p['jitter_std_ms']:.2f} ms (std), p99 |dev| {p['p99_abs_dev_ms']:.2f} ms, "
              f"missed ticks {p['missed_ticks']}; achieved {res['achieved_rate_hz']:.2f} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
