"""Extra cost per chunk of real-time chunking (``mode-ros bench --rtc``): plain vs replacement vs
guidance, interleaved in one run on the same inputs, so the ratios are paired (CPU load drifts)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .checkpoint import BUNDLED, resolve_checkpoint
from .config import ConfigError, preset
from .inpainting import ChunkPrefix

VARIANTS = (("plain", "cached"), ("replace", "cached"), ("guidance", "cached"), ("plain", "fused"),
            ("replace", "fused"), ("guidance", "fused"))


def load(name: str, steps: int):
    """A preset with random weights, or a checkpoint (a folder or 'bundled') with its weights."""
    from pathlib import Path

    from .policy import MoDEPolicy
    try:
        preset(name)
    except ConfigError:
        if not (name in BUNDLED or Path(name).expanduser().exists()):
            raise
        return MoDEPolicy.from_pretrained(resolve_checkpoint(name), num_steps=steps)
    p = MoDEPolicy.from_preset(name).eval()
    p.set_num_steps(steps)
    return p


def bench_rtc(name: str, runs: int = 20, warmup: int = 2, steps: int = 10, fixed: int = 3, shift: int = 3,
              log=print) -> list[dict]:
    """Per variant (method, sampler path): median / p90 ms per chunk (encoders + sampler + guide set-up)
    and the median of the per-round ratios to the plain cached chunk. The prefix: a previous plan
    shifted by ``shift`` executed rows, ``fixed`` rows frozen, the rest of the overlap soft."""
    p = load(name, steps)
    c = p.config
    g = torch.Generator().manual_seed(0)
    h, w = c.vision.image_size
    imgs = torch.randint(0, 255, (1, c.n_cameras, 3, h, w), dtype=torch.uint8, generator=g) if c.n_cameras else None
    goal = torch.randn(1, 512, generator=g)
    st = torch.randn(1, c.state_dim, generator=g) if c.state_dim else None
    noise = torch.randn(1, c.chunk_size, c.action_dim, generator=g)
    prev = p.postprocess(p.sample_normalized(imgs, goal, st, torch.randn(noise.shape, generator=g)))[0]
    fused = p.enable_fast(fused=True, logger=None)["fused"]
    fast_sampler = p.fused
    variants = [v for v in VARIANTS if fused or v[1] == "cached"]

    def chunk(method: str, path: str):
        p.fused = fast_sampler if path == "fused" else None
        guide = None
        if method != "plain":
            guide = p.chunk_guide([ChunkPrefix(prev[shift:], fixed, method)], noise)
        return p.sample_normalized(imgs, goal, st, noise, guide=guide)

    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for r in range(warmup + runs):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            chunk(*v)
            if r >= warmup:
                times[v].append((time.perf_counter() - t0) * 1e3)
                cpu[v].append((time.process_time() - c0) * 1e3)
    base, base_cpu = times[("plain", "cached")], cpu[("plain", "cached")]
    rows = []
    for (method, path), ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        cs = cpu[(method, path)]
        rows.append({"name": name, "method": method, "path": path, "steps": steps, "threads": torch.get_num_threads(),
                     "fixed": fixed, "shift": shift, "runs": runs, "median_ms": statistics.median(ts),
                     "p90_ms": float(np.percentile(ts, 90)), "ratio_vs_plain": ratio,
                     # process CPU time: less sensitive than wall time to other processes on a shared CPU
                     "median_cpu_ms": statistics.median(cs),
                     "cpu_ratio_vs_plain": statistics.median(c / b for c, b in zip(cs, base_cpu))})
        log(f"  {name} {method:8s} {path:6s} {rows[-1]['median_ms']:8.2f} ms  x{ratio:.2f}  "
            f"(cpu {rows[-1]['median_cpu_ms']:.2f} ms x{rows[-1]['cpu_ratio_vs_plain']:.2f})")
    p.fused = fast_sampler
    return rows


def rtc_table(rows: list[dict]) -> str:
    head = (f"{'checkpoint/preset':22s} {'method':9s} {'path':6s} {'median ms':>10s} {'p90 ms':>8s} {'x plain':>8s} "
            f"{'cpu ms':>8s} {'cpu x':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:22]:22s} {r['method']:9s} {r['path']:6s} {r['median_ms']:10.2f} "
                     f"{r['p90_ms']:8.2f} {r['ratio_vs_plain']:8.2f} {r['median_cpu_ms']:8.2f} "
                     f"{r['cpu_ratio_vs_plain']:6.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m mode_ros.model.rtc_bench`` (also ``mode-ros bench --rtc``): JSON + a table."""
    import argparse
    import json
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="mode-ros bench --rtc", description=__doc__)
    ap.add_argument("--presets", default="tiny,small,bundled", help="presets and/or checkpoints ('bundled')")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed", type=int, default=3, help="d: frozen rows")
    ap.add_argument("--shift", type=int, default=3, help="s: rows executed since the previous plan")
    ap.add_argument("--out", default=None, help="folder for rtc_cost.json and rtc_cost.txt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.presets.split(","):
        print(f"[bench --rtc] {name}", file=sys.stderr)
        try:
            rows += bench_rtc(name, args.runs, args.warmup, args.steps, args.fixed, args.shift,
                              log=lambda m: print(m, file=sys.stderr))
        except (ConfigError, ValueError, OSError) as exc:
            print(f"mode-ros bench --rtc: {name}: {exc}", file=sys.stderr)
            return 2
    print(rtc_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rtc_cost.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
        (out / "rtc_cost.txt").write_text(rtc_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
