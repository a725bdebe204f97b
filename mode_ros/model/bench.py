"""``mode-ros bench``: latency of one action chunk per preset / dtype / path / batch.

Paths: ``uncached`` (router every step, experts dispatched after a host read — the reference's
behaviour, fp32 by default), ``cached`` (routing table, eager), ``fused`` (fused QKV / expert GEMMs),
``compiled`` (cached + torch.compile), ``graph`` / ``fused-graph`` / ``compiled-graph`` (whole-chunk
CUDA graph, CUDA only), ``int8`` / ``fp8`` (fused with weight-only quantised experts; ``-graph``
suffix: compiled + CUDA graph), ``dense`` (a same-size model with all experts active).
Every row also reports the largest difference of its normalised actions from the eager uncached fp32
path on the same inputs (``max_abs_diff_vs_fp32``) and whether its routing table equals the fp32
one; plus the encoders' share and, on CUDA, achieved weight bandwidth and peak memory.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from .config import PolicyConfig, preset
from .info import denoiser_counts


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def copy_bandwidth(dev) -> float | None:
    """Measured device-to-device copy bandwidth, bytes/s (read + write counted)."""
    if dev.type != "cuda":
        return None
    x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def bench_preset(name: str, device: str, dtypes: list[str], paths: list[str], batches: list[int],
                 runs: int = 50, warmup: int = 5, steps: int = 10, log=print,
                 attention: str | None = None, gemm: str = "torch") -> list[dict]:
    """``attention``: the fused paths' attention kernel (``mode_ros.model.fast.ATTENTION``; default
    the fused sampler's own choice), ``gemm``: their GEMM kernels (``fast.GEMM``); both recorded in
    every row."""
    from .policy import MoDEPolicy

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = preset(name)
    cfg.diffusion.num_steps = steps
    rows = []
    bw = copy_bandwidth(dev)
    for dense in ([False, True] if "dense" in paths else [False]):
        c = PolicyConfig.from_dict(cfg.to_dict())
        if dense:
            c.model.top_k = c.model.num_experts
        torch.manual_seed(0)
        with torch.device(dev):
            policy = MoDEPolicy(c).eval()
        policy.to(dev)
        counts = denoiser_counts(policy.denoiser)
        h, w = c.vision.image_size
        inputs, ref_routing = {}, None
        for b in batches:   # fixed inputs per batch size; every path and dtype sees the same ones
            g = torch.Generator(device=dev).manual_seed(b)
            imgs = (torch.randint(0, 255, (b, c.n_cameras, 3, h, w), dtype=torch.uint8, device=dev, generator=g)
                    if c.n_cameras else None)
            goal = torch.randn(b, 512, device=dev, generator=g)
            noise = torch.randn(b, c.chunk_size, c.action_dim, device=dev, generator=g)
            # eager uncached fp32 (TF32 off) on the same inputs: what every path is compared with
            ref = None if dense else _reference(policy, imgs, goal, noise)
            inputs[b] = (imgs, goal, noise, ref)
        if not dense:
            policy.sampler.ensure()
            ref_routing = list(policy.sampler.table.indices)
        for dtype in dtypes:
            tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            policy.to_device(device, tdt)
            if dev.type == "cuda" and dtype != "fp32":
                policy.encoders.to(tdt)
            for b in batches:
                imgs, goal, noise, ref = inputs[b]
                variants = ["dense"] if dense else [p for p in paths if p != "dense"]
                for path in variants:
                    if path == "uncached" and dtype != "fp32" and "fp32" in dtypes:
                        continue
                    if path.endswith("graph") and dev.type != "cuda":
                        continue
                    quant = path.split("-")[0] if path.split("-")[0] in ("int8", "fp8") else "none"
                    if quant == "fp8" and dev.type != "cuda":
                        continue
                    if path in ("compiled-graph", "int8-graph", "fp8-graph") and dtype == "fp32" and len(dtypes) > 1:
                        continue  # compile once per batch size, in the low-precision dtype
                    fn = None
                    policy.fused = None
                    try:
                        if path in ("fused", "fused-graph", "int8", "fp8"):
                            policy.enable_fast(fused=True, weight_quant=quant, attention=attention, gemm=gemm)
                        elif path in ("compiled-graph", "int8-graph", "fp8-graph"):
                            policy.enable_fast(fused=True, compile=True, weight_quant=quant, attention=attention,
                                               gemm=gemm)
                        if quant != "none" and (policy.fused is None or policy.fused.weight_quant != quant):
                            raise RuntimeError(f"weight_quant {quant} unavailable")
                        if path in ("cached", "dense", "fused", "int8", "fp8"):
                            fn = lambda: policy.sample_normalized(imgs, goal, None, noise, cached=True)  # noqa: E731
                        elif path == "uncached":
                            fn = lambda: policy.sample_normalized(imgs, goal, None, noise, cached=False)  # noqa: E731
                        elif path == "compiled":
                            policy.sampler.ensure()
                            step = torch.compile(policy.sampler.denoise_step, dynamic=False)
                            orig = policy.sampler.denoise_step
                            policy.sampler.denoise_step = step
                            fn = lambda: policy.sample_normalized(imgs, goal, None, noise, cached=True)  # noqa: E731
                        elif path.endswith("graph"):
                            from .graph import ChunkGraph
                            g = ChunkGraph(policy, b)
                            fn = lambda: g(imgs, goal, None, noise)  # noqa: E731
                        if dev.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        ts = _time(fn, dev, runs, warmup)
                        out = fn().float()
                    except Exception as exc:  # noqa: BLE001
                        log(f"  {name} {dtype} {path} b={b}: failed: {exc}")
                        continue
                    finally:
                        if path == "compiled" and fn is not None:
                            policy.sampler.denoise_step = orig
                    enc_ms = None
                    if c.n_cameras and path in ("cached", "graph", "fused-graph", "compiled-graph"):
                        enc = _time(lambda: policy.encode_observation(imgs, goal), dev, max(10, runs // 5), 2)
                        enc_ms = statistics.median(enc)
                    itemsize = torch.tensor([], dtype=tdt).element_size()
                    executed = counts["executed_cached"] if path != "uncached" else counts["executed_uncached"]
                    bytes_chunk = (policy.fused.weight_bytes_per_chunk() if policy.fused is not None
                                   else executed * itemsize * steps)
                    diff = None if ref is None else float((out - ref).abs().max())
                    same_routing = None if dense else list(policy.sampler.table.indices) == ref_routing
                    med = statistics.median(ts)
                    row = {"preset": name, "device": str(dev), "dtype": dtype, "path": path, "batch": b,
                           "steps": steps, "median_ms": med, "p95_ms": float(np.percentile(ts, 95)),
                           "p99_ms": float(np.percentile(ts, 99)), "runs": runs, "encoders_ms": enc_ms,
                           "weight_bytes_per_chunk": bytes_chunk,
                           "achieved_bandwidth_GBps": bytes_chunk / (med / 1e3) / 1e9,
                           "bandwidth_fraction": (bytes_chunk / (med / 1e3)) / bw if bw else None,
                           "peak_mem_MB": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
                           "fused_extra_params": policy.fused.extra_parameters() if policy.fused is not None else 0,
                           "weight_quant": quant, "max_abs_diff_vs_fp32": diff, "same_routing_as_fp32": same_routing,
                           "attention": policy.fused.attention if policy.fused is not None else None,
                           "gemm": policy.fused.gemm if policy.fused is not None else None,
                           "compile_mode": policy.fused.compile_mode if policy.fused is not None else None}
                    rows.append(row)
                    log(f"  {name:>12} {dtype:>4} {path:>9} b={b:<3} median {med:8.2f} ms  p95 {row['p95_ms']:8.2f} ms"
                        + (f"  encoders {enc_ms:.2f} ms" if enc_ms is not None else "")
                        + (f"  max|a-a_fp32| {diff:.2e}" if diff is not None else ""))
        policy.fused = None
        del policy
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
# (attention, Inductor compile mode, expert weights[, gemm kernels]) of ``step_variants``' default list
STEP_VARIANTS = [("matmul", None, "none"), ("elementwise", None, "none"), ("sdpa", None, "none"),
                 ("matmul", MAX_AUTOTUNE, "none"), ("elementwise", MAX_AUTOTUNE, "none"),
                 ("elementwise", "default", "int8"), ("elementwise", MAX_AUTOTUNE, "int8"),
                 ("elementwise", MAX_AUTOTUNE, "fp8"),
                 ("triton", None, "none"), ("triton", None, "none", "triton"),
                 ("triton", None, "int8", "triton"), ("triton", None, "fp8", "triton"),
                 ("matmul", None, "none", "triton"),
                 # the Triton kernels without Inductor: eager fused layers captured by the chunk graph
                 ("triton", "eager", "none", "triton"), ("triton", "eager", "int8", "triton")]


def step_variants(name: str, device: str, dtype: str = "bf16", variants=None, runs: int = 100, warmup: int = 5,
                  log=print, on_row=None) -> list[dict]:
    """Chunk latency of the compiled fused step for each (attention, compile mode (``"eager"``: not
    compiled), weight quant[, gemm]) variant at batch 1: on CUDA through the whole-chunk graph,
    elsewhere eager. Every row: median / p99,
    encoders, the largest action difference from eager uncached fp32 and whether the routing is the
    same; a variant that fails is a row with ``failed`` (the others still run)."""
    from .fast import FusedSampler
    from .graph import ChunkGraph
    from .policy import MoDEPolicy

    dev = torch.device(device)
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    with torch.device(dev):
        pol = MoDEPolicy(preset(name)).eval()
    c = pol.config
    g = torch.Generator(device=dev).manual_seed(0)
    imgs = (torch.randint(0, 255, (1, c.n_cameras, 3, *c.vision.image_size), dtype=torch.uint8, device=dev,
                          generator=g) if c.n_cameras else None)
    goal = torch.randn(1, 512, device=dev, generator=g)
    noise = torch.randn(1, c.chunk_size, c.action_dim, device=dev, generator=g)
    ref = _reference(pol, imgs, goal, noise)
    routing = pol.sampler.ensure().indices_t.clone()
    pol.to_device(dev.type, tdt)
    if dev.type == "cuda":
        pol.encoders.to(tdt)
    rows = []
    for variant in (STEP_VARIANTS if variants is None else variants):
        att, mode, quant = variant[:3]
        gemm = variant[3] if len(variant) > 3 else "torch"
        t0 = time.time()
        row = {"preset": name, "device": str(dev), "dtype": dtype, "attention": att, "compile_mode": mode,
               "weight_quant": quant, "gemm": gemm}
        try:
            pol._graph = None
            eager = mode == "eager"   # not compiled: the fused layers run as they are (graph on CUDA)
            pol.fused = FusedSampler(pol.sampler, compile=not eager, attention=att,
                                     compile_mode=None if eager else mode, weight_quant=quant, gemm=gemm)
            pol.fused.build()
            if dev.type == "cuda":
                graph = ChunkGraph(pol, 1)
                fn = lambda: graph(imgs, goal, None, noise)  # noqa: E731
            else:
                fn = lambda: pol.sample_normalized(imgs, goal, None, noise, cached=True)  # noqa: E731
            ts = _time(fn, dev, runs, warmup)
            acts = fn().float()
            enc = (statistics.median(_time(lambda: pol.encode_observation(imgs, goal), dev, 20, 2))
                   if c.n_cameras else None)
            row.update({"compile_mode": "eager" if eager else pol.fused.compile_mode, "median_ms": statistics.median(ts),
                        "p99_ms": float(np.percentile(ts, 99)), "encoders_ms": enc,
                        "max_abs_diff_vs_fp32": float((acts - ref).abs().max()),
                        "same_routing_as_fp32": bool(torch.equal(pol.sampler.ensure().indices_t, routing)),
                        "build_s": time.time() - t0})
        except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
            row["failed"] = f"{type(exc).__name__}: {exc}"[:500]
        log(json.dumps(row))
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    pol.fused = pol._graph = None
    return rows


def _reference(policy, imgs, goal, noise):
    """Eager uncached fp32 actions (the reference-like baseline, TF32 off) for these inputs."""
    fused, graph = policy.fused, policy._graph
    policy.fused = policy._graph = None
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return policy.sample_normalized(imgs, goal, None, noise, cached=False).float()
    finally:
        policy.fused, policy._graph = fused, graph
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def table(rows: list[dict]) -> str:
    head = (f"{'preset':>12} {'dtype':>5} {'path':>14} {'batch':>5} {'median ms':>10} {'p99 ms':>9} {'enc ms':>7} "
            f"{'GB/s':>8} {'BW frac':>7} {'peak MB':>8} {'max|da|':>8} {'route':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        enc = f"{r['encoders_ms']:.2f}" if r["encoders_ms"] is not None else "-"
        pk = f"{r['peak_mem_MB']:.0f}" if r["peak_mem_MB"] is not None else "-"
        fr = f"{r['bandwidth_fraction']:.2f}" if r.get("bandwidth_fraction") is not None else "-"
        da = f"{r['max_abs_diff_vs_fp32']:.1e}" if r.get("max_abs_diff_vs_fp32") is not None else "-"
        rt = {True: "same", False: "DIFF", None: "-"}[r.get("same_routing_as_fp32")]
        lines.append(f"{r['preset']:>12} {r['dtype']:>5} {r['path']:>14} {r['batch']:>5} {r['median_ms']:>10.2f} "
                     f"{r['p99_ms']:>9.2f} {enc:>7} {r['achieved_bandwidth_GBps']:>8.1f} {fr:>7} {pk:>8} {da:>8} {rt:>5}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['preset']}\n{r['dtype']} {r['path']} b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["median_ms"] for r in rows],
           yerr=[[0] * len(rows), [r["p95_ms"] - r["median_ms"] for r in rows]])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("chunk latency (ms, median; bar to p95)")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], out: str | None, meta: dict) -> None:
    if not out:
        return
    from pathlib import Path
    p = Path(out)
    p.mkdir(parents=True, exist_ok=True)
    (p / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (p / "bench.txt").write_text(table(rows) + "\n")
    if rows:
        plot(rows, str(p / "bench.png"))
