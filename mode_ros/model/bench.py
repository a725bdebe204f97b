"""``mode-ros bench``: latency of one action chunk per preset / dtype / path / batch.

Paths: ``uncached`` (router every step, experts dispatched after a host read — the reference's
behaviour, fp32 by default), ``cached`` (routing table, eager), ``fused`` (fused QKV / expert GEMMs),
``compiled`` (the fused sampler's step torch.compiled once for every step: weights are arguments),
``onnx`` (the whole chunk exported to ONNX and run by onnxruntime, ``mode_ros.export``; fp32/fp16), ``graph`` / ``fused-graph`` / ``compiled-graph`` (whole-chunk
CUDA graph, CUDA only), ``int8`` / ``fp8`` (fused with weight-only quantised experts; ``-graph``
suffix: compiled + CUDA graph), ``dense`` (a same-size model with all experts active).
Every row also reports the largest difference of its normalised actions from the eager uncached fp32
path on the same inputs (``max_abs_diff_vs_fp32``) and whether its routing table equals the fp32
one; plus the encoders' share and, on CUDA, achieved weight bandwidth and peak memory. The paths of
one preset / dtype / batch are timed in rounds (``time_in_rounds``), so each row's speed-up over the
fastest PyTorch path is paired round by round (``paired_speedup_vs``).
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import config_for
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
                 attention: str | None = None, gemm: str = "torch", pdl: bool = False) -> list[dict]:
    """``attention``: the fused paths' attention kernel (``mode_ros.model.fast.ATTENTION``; default
    the fused sampler's own choice), ``gemm``: their GEMM kernels (``fast.GEMM``), ``pdl``: with both
    Triton, programmatic dependent launch; all recorded in every row."""
    from .policy import MoDEPolicy

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = config_for(name)   # a preset, or a checkpoint folder / 'bundled'
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
            st = torch.randn(b, c.state_dim, device=dev, generator=g) if c.state_dim else None
            # eager uncached fp32 (TF32 off) on the same inputs: what every path is compared with
            ref = None if dense else _reference(policy, imgs, goal, noise, st)
            inputs[b] = (imgs, goal, noise, ref, st)
        if not dense:
            policy.sampler.ensure()
            ref_routing = list(policy.sampler.table.indices)
        for dtype in dtypes:
            tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            policy.to_device(device, tdt)
            if dev.type == "cuda" and dtype != "fp32":
                policy.encoders.to(tdt)
            for b in batches:
                imgs, goal, noise, ref, st = inputs[b]
                ctx = {"preset": name, "device": dev, "dtype": dtype, "dtypes": dtypes, "batch": b, "steps": steps,
                       "runs": runs, "warmup": warmup, "ref": ref, "counts": counts, "bandwidth": bw,
                       "itemsize": torch.tensor([], dtype=tdt).element_size(), "dense": dense,
                       "ref_routing": ref_routing, "imgs": imgs, "goal": goal, "state": st, "noise": noise,
                       "kernels": (attention, gemm, pdl)}
                rows += _bench_paths(policy, ctx, ["dense"] if dense else [p for p in paths if p != "dense"], log)
        policy.fused = None
        del policy
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows




def _bench_paths(policy, ctx: dict, paths: list[str], log) -> list[dict]:
    """Rows of ``paths`` for one preset / dtype / batch (``ctx``: ``bench_preset``'s facts and inputs),
    built first, then timed together in rounds (``time_in_rounds``), with paired speed-ups."""
    name, dtype, b = ctx["preset"], ctx["dtype"], ctx["batch"]
    built = {}   # path -> (timed callable, its fused sampler or None, export facts)
    for path in paths:
        skip = _skip_reason(path, dtype, ctx["dtypes"], ctx["device"])
        if skip:
            if skip != "-":
                log(f"[bench] {name} {dtype} b={b} {path}: skipped ({skip})")
            continue
        try:
            built[path] = _build_path(policy, path, ctx["imgs"], ctx["goal"], ctx["state"], ctx["noise"], dtype, b,
                                      *ctx["kernels"])
        except Exception as exc:  # noqa: BLE001
            log(f"  {name} {dtype} {path} b={b}: failed: {exc}")
    times, peaks = time_in_rounds({k: v[0] for k, v in built.items()}, ctx["device"], ctx["runs"], ctx["warmup"],
                                     log)
    rows = []
    for path in times:
        fn, fused, onnx_info = built[path]
        policy.fused = fused
        row = _row(policy, ctx, path, sum(times[path], []), fn().float(), peaks.get(path))
        row.update(onnx_info)
        rows.append(row)
        log(f"  {name:>12} {dtype:>4} {path:>9} b={b:<3} median {row['median_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms"
            + (f"  encoders {row['encoders_ms']:.2f} ms" if row["encoders_ms"] is not None else "")
            + (f"  max|a-a_fp32| {row['max_abs_diff_vs_fp32']:.2e}" if row["max_abs_diff_vs_fp32"] is not None else ""))
    paired_ratios(rows, times)
    return rows

def _skip_reason(path: str, dtype: str, dtypes: list[str], dev) -> str | None:
    """Why ``path`` is not timed in ``dtype`` on ``dev`` ("-": silently, it is timed in another dtype)."""
    quant = path.split("-")[0]
    if path == "uncached" and dtype != "fp32" and "fp32" in dtypes:
        return "-"
    if path.endswith("graph") and dev.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if quant == "fp8" and dev.type != "cuda":
        return "fp8 needs a CUDA device"
    if path in ("compiled-graph", "int8-graph", "fp8-graph") and dtype == "fp32" and len(dtypes) > 1:
        return "-"   # compiled once per batch size, in the low-precision dtype
    return None


def _build_path(policy, path: str, imgs, goal, st, noise, dtype: str, b: int, attention, gemm, pdl):
    """(callable running one chunk on ``path`` -> normalised actions, the fused sampler it needs or
    None, export facts). The callable installs its own fused sampler first, so paths interleave."""
    quant = path.split("-")[0] if path.split("-")[0] in ("int8", "fp8") else "none"
    policy.fused = None
    if path in ("fused", "fused-graph", "int8", "fp8"):
        policy.enable_fast(fused=True, weight_quant=quant, attention=attention, gemm=gemm, pdl=pdl)
    elif path in ("compiled", "compiled-graph", "int8-graph", "fp8-graph"):
        policy.enable_fast(fused=True, compile=True, weight_quant=quant, attention=attention, gemm=gemm, pdl=pdl)
    if quant != "none" and (policy.fused is None or policy.fused.weight_quant != quant):
        raise RuntimeError(f"weight_quant {quant} unavailable")
    fused, info = policy.fused, {}
    if path in ("cached", "dense", "fused", "compiled", "int8", "fp8"):
        fn = lambda: policy.sample_normalized(imgs, goal, st, noise, cached=True)  # noqa: E731
    elif path == "uncached":
        fn = lambda: policy.sample_normalized(imgs, goal, st, noise, cached=False)  # noqa: E731
    elif path in ("onnx", "onnx-plain"):
        fn, info = onnx_runner(policy, dtype, imgs, goal, st, noise, rewrite=path == "onnx")
    elif path.endswith("graph"):
        from .graph import ChunkGraph
        g = ChunkGraph(policy, b)
        fn = lambda: g(imgs, goal, st, noise)  # noqa: E731
    else:
        raise ValueError(f"unknown path {path!r}")

    def run():
        policy.fused = fused
        return fn()
    return run, fused, info


BLOCK = 10   # calls per path per round in ``time_in_rounds``


def time_in_rounds(fns: dict, dev, runs: int, warmup: int, log=print, block: int = BLOCK) -> tuple[dict, dict]:
    """(ms per call of each callable, grouped in rounds; its peak CUDA memory in MB — CUDA only).
    Each round times ``block`` consecutive calls of every path in turn, after one untimed call (the
    first after another path pays for its thread pool waking and its caches), so a burst of load on a
    noisy machine hits every path alike and the per-round ratios are paired, while two runtimes' thread
    pools never alternate call by call (on a 2-core CPU that slows both 2–4×). A path that raises in its
    warm-up is left out (logged)."""
    for path, fn in list(fns.items()):
        try:
            _time(fn, dev, 0, warmup)
        except Exception as exc:  # noqa: BLE001
            log(f"  {path}: failed: {exc}")
            fns.pop(path)
    times, peaks = {p: [] for p in fns}, {}
    for r in range(0, runs, block):
        for path, fn in fns.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[path].append(_time(fn, dev, min(block, runs - r), 1))
            if dev.type == "cuda":
                peaks[path] = max(peaks.get(path, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    return times, peaks


def paired_ratios(rows: list[dict], times: dict[str, list[float]]) -> None:
    """Each row of one (preset, dtype, batch) gets ``paired_speedup_vs``: the fastest PyTorch path of
    the same rounds and, over rounds, the median (p10, p90) of its median time / this row's."""
    torch_rows = [r for r in rows if not r["path"].startswith("onnx")]
    if not torch_rows:
        return
    best = min(torch_rows, key=lambda r: r["median_ms"])["path"]
    for r in rows:
        ratios = [statistics.median(a) / statistics.median(t) for a, t in zip(times[best], times[r["path"]])]
        r["paired_speedup_vs"] = {"path": best, "median": statistics.median(ratios),
                                  "p10": float(np.percentile(ratios, 10)), "p90": float(np.percentile(ratios, 90))}


def _row(policy, ctx: dict, path: str, ts: list[float], out, peak_mb: float | None) -> dict:
    """One result row: latency statistics of ``ts`` and what the path computed (``out``) against the
    reference of ``ctx`` (``bench_preset``'s facts for this preset / dtype / batch)."""
    dev, f, steps = ctx["device"], policy.fused, ctx["steps"]
    enc_ms = None
    if policy.config.n_cameras and path in ("cached", "graph", "fused-graph", "compiled-graph"):
        enc = _time(lambda: policy.encode_observation(ctx["imgs"], ctx["goal"]), dev, max(10, ctx["runs"] // 5), 2)
        enc_ms = statistics.median(enc)
    executed = ctx["counts"]["executed_cached" if path != "uncached" else "executed_uncached"]
    bytes_chunk = f.weight_bytes_per_chunk() if f is not None else executed * ctx["itemsize"] * steps
    med, bw = statistics.median(ts), ctx["bandwidth"]
    return {"preset": ctx["preset"], "device": str(dev), "dtype": ctx["dtype"], "path": path, "batch": ctx["batch"],
            "steps": steps, "median_ms": med, "p95_ms": float(np.percentile(ts, 95)),
            "p90_ms": float(np.percentile(ts, 90)), "p99_ms": float(np.percentile(ts, 99)), "runs": ctx["runs"],
            "encoders_ms": enc_ms, "weight_bytes_per_chunk": bytes_chunk,
            "achieved_bandwidth_GBps": bytes_chunk / (med / 1e3) / 1e9,
            "bandwidth_fraction": (bytes_chunk / (med / 1e3)) / bw if bw else None, "peak_mem_MB": peak_mb,
            "fused_extra_params": f.extra_parameters() if f is not None else 0,
            "weight_quant": f.weight_quant if f is not None else "none",
            "max_abs_diff_vs_fp32": None if ctx["ref"] is None else float((out - ctx["ref"]).abs().max()),
            "same_routing_as_fp32": None if ctx["dense"] else list(policy.sampler.table.indices) == ctx["ref_routing"],
            "attention": f.attention if f is not None else None, "gemm": f.gemm if f is not None else None,
            "pdl": f.pdl if f is not None else False, "compile_mode": f.compile_mode if f is not None else None}

MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
# (attention, Inductor compile mode, expert weights[, gemm kernels[, programmatic dependent launch]]) of
# ``step_variants``' default list (indices are used by scripts/gpu_measure.py --variants: append only)
STEP_VARIANTS = [("matmul", None, "none"),
                 # the all-Triton layer chain, not compiled (quick to build: first, so a short GPU call has them)
                 ("triton", "eager", "none", "triton"), ("triton", "eager", "int8", "triton"),
                 ("triton", "eager", "fp8", "triton"),
                 ("elementwise", None, "none"), ("sdpa", None, "none"),
                 ("matmul", MAX_AUTOTUNE, "none"), ("elementwise", MAX_AUTOTUNE, "none"),
                 ("elementwise", "default", "int8"), ("elementwise", MAX_AUTOTUNE, "int8"),
                 ("elementwise", MAX_AUTOTUNE, "fp8"),
                 # compiled mixes: Triton attention with cuBLAS GEMMs, PyTorch attention with Triton GEMMs
                 # (the all-Triton step is never compiled: FusedSampler.compile_skipped)
                 ("triton", None, "none"), ("matmul", None, "none", "triton"),
                 # the all-Triton step with programmatic dependent launch + L2 prefetch of the weights (sm_90+)
                 ("triton", "eager", "none", "triton", True), ("triton", "eager", "int8", "triton", True),
                 ("triton", "eager", "fp8", "triton", True)]


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
    st = torch.randn(1, c.state_dim, device=dev, generator=g) if c.state_dim else None
    ref = _reference(pol, imgs, goal, noise, st)
    routing = pol.sampler.ensure().indices_t.clone()
    pol.to_device(dev.type, tdt)
    if dev.type == "cuda":
        pol.encoders.to(tdt)
    rows = []
    for variant in (STEP_VARIANTS if variants is None else variants):
        att, mode, quant = variant[:3]
        gemm = variant[3] if len(variant) > 3 else "torch"
        pdl = bool(variant[4]) if len(variant) > 4 else False
        t0 = time.time()
        row = {"preset": name, "device": str(dev), "dtype": dtype, "attention": att, "compile_mode": mode,
               "weight_quant": quant, "gemm": gemm, "pdl": pdl}
        try:
            pol.chunk_graph = None
            eager = mode == "eager"   # not compiled: the fused layers run as they are (graph on CUDA)
            pol.fused = FusedSampler(pol.sampler, compile=not eager, attention=att,
                                     compile_mode=None if eager else mode, weight_quant=quant, gemm=gemm,
                                     pdl=pdl)
            pol.fused.build()
            if dev.type == "cuda":
                graph = ChunkGraph(pol, 1)
                fn = lambda: graph(imgs, goal, st, noise)  # noqa: E731
            else:
                fn = lambda: pol.sample_normalized(imgs, goal, st, noise, cached=True)  # noqa: E731
            ts = _time(fn, dev, runs, warmup)
            acts = fn().float()
            enc = (statistics.median(_time(lambda: pol.encode_observation(imgs, goal), dev, 20, 2))
                   if c.n_cameras else None)
            row.update({"compile_mode": "eager" if eager else pol.fused.compile_mode, "median_ms": statistics.median(ts),
                        "p99_ms": float(np.percentile(ts, 99)), "encoders_ms": enc,
                        "max_abs_diff_vs_fp32": float((acts - ref).abs().max()),
                        "same_routing_as_fp32": bool(torch.equal(pol.sampler.ensure().indices_t, routing)),
                        "build_s": time.time() - t0})
            if gemm == "triton":   # the launch configurations the build-time tuning chose
                from . import triton_kernels as tk
                row["tuned_blocks"] = {"/".join(map(str, k)): v for k, v in tk.tuned().items()}
        except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
            row["failed"] = f"{type(exc).__name__}: {exc}"[:500]
        log(json.dumps(row))
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    pol.fused = pol.chunk_graph = None
    return rows


# launch configurations ``kernel_variants`` sweeps for the Triton GEMMs (block keys of
# ``triton_kernels.BLOCK_KEYS``; None = the shape heuristic's choice)
UP_SWEEP = [None] + [{"bn": bn, "bk": bk, "num_stages": ns} for bn in (32, 64, 128) for bk in (64, 128, 256)
                     for ns in (3, 4)]
SPLITK_SWEEP = [None] + [{"bn": bn, "bk": bk, "split": sp} for bn in (32, 64, 128) for bk in (128, 256)
                         for sp in (None, 4, 8)]


def capture_graph(fn, reps: int = 1):
    """Warm ``fn`` up on a side stream (compiles, tunes, allocates), then capture ``reps`` calls of it
    in one CUDA graph. Returns (graph, output of the last captured call)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(g):
        for _ in range(reps):
            out = fn()
    return g, out


def _graph_us(fn, dev, reps: int = 20, runs: int = 30) -> float:
    """Median µs per call of ``fn``: on CUDA ``reps`` calls captured in one CUDA graph (how the chunk
    graph runs them: no launch overhead from Python), replayed ``runs`` times; elsewhere wall time."""
    if dev.type != "cuda":
        ts = _time(fn, dev, runs, 1)
        return statistics.median(ts) * 1e3
    g, _ = capture_graph(fn, reps)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


def kernel_variants(name: str, device: str, dtype: str = "bf16", batch: int = 1, up_sweep=None,
                    splitk_sweep=None, reps: int = 20, runs: int = 30, log=print, on_row=None) -> list[dict]:
    """One layer-step's kernels of the fused sampler at the preset's shapes, PyTorch against this
    package's Triton kernels (``triton_kernels``) over a sweep of launch configurations: QKV and output
    projections, the experts' up-projection (+ SwiGLU and gates) and down-projection in the model
    dtype and with int8 / fp8 weights (CUDA), and the attention with its q/k norms. Every row: median
    µs per call (CUDA: inside a CUDA graph), weight GB/s, the largest difference from the PyTorch
    output; a configuration that fails is a row with ``failed``. For tuning the Triton defaults."""
    from . import triton_kernels as tk
    from .fast import rms_norm, causal_attention, int8_kernel_available, qlinear, quantize_rows

    dev = torch.device(device)
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    c = preset(name)
    mc = c.model
    d, nh, kk = mc.embed_dim, mc.n_heads, mc.top_k
    hd, H = d // nh, mc.mlp_ratio * d
    t = 1 + mc.goal_seq_len + c.n_cameras * mc.obs_seq_len + (c.state_dim > 0) + c.chunk_size
    m = batch * t
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(tdt)
    if tk.unavailable_reason(dev) is None:
        tk.prepare(dev)
    tk.set_tuning(False)   # each row times exactly its configuration (None = the shape heuristic)
    x = rnd(batch, t, d)
    hid = rnd(batch, t, kk * H, scale=0.5)
    w_qkv, b_qkv, w_proj = rnd(3 * d, d, scale=d ** -0.5), rnd(3 * d, scale=0.02), rnd(d, d, scale=d ** -0.5)
    w_up, b_up, w_down = rnd(kk * 2 * H, d, scale=d ** -0.5), rnd(kk * 2 * H, scale=0.02), rnd(d, kk * H, scale=H ** -0.5)
    gates = torch.rand(kk, generator=g, device=dev).to(tdt)
    qkv = rnd(batch, t, 3 * d)
    qg, kg = rnd(hd, scale=0.1) + 1, rnd(hd, scale=0.1) + 1
    int8_kernel = int8_kernel_available(dev)
    quants = ["none", "int8"] + (["fp8"] if dev.type == "cuda" else [])
    qw = {}
    for q in quants[1:]:
        # fp32 row scales for the Triton kernels; PyTorch's int8 kernel wants them in bf16
        qw[q] = {"up32": quantize_rows(w_up, q, torch.float32), "down32": quantize_rows(w_down, q, torch.float32)}
        bf = q == "int8" and int8_kernel
        qw[q]["up"] = quantize_rows(w_up, q, torch.bfloat16) if bf else qw[q]["up32"]
        qw[q]["down"] = quantize_rows(w_down, q, torch.bfloat16) if bf else qw[q]["down32"]

    def torch_up(wq=None, s=None):
        z = qlinear(x, w_up if wq is None else wq, s, b_up, int8_kernel).view(batch, t, kk, 2, H)
        return (z[..., 0, :] * F.silu(z[..., 1, :]) * gates.view(1, 1, kk, 1)).reshape(batch, t, kk * H)

    def torch_attention(qkv):
        q, k_, v = qkv.split(d, dim=-1)
        q = rms_norm(q.view(batch, t, nh, hd), qg, mc.norm_eps).transpose(1, 2)
        k_ = rms_norm(k_.view(batch, t, nh, hd), kg, mc.norm_eps).transpose(1, 2)
        v = v.view(batch, t, nh, hd).transpose(1, 2)
        return causal_attention(q, k_, v, "matmul").transpose(1, 2).reshape(batch, t, d)

    def nbytes(*ts):
        return sum(z.numel() * z.element_size() for z in ts if z is not None)
    # (op, quant, weight bytes, torch fn, triton fn(blocks), sweep)
    cases = [("qkv", "none", nbytes(w_qkv, b_qkv), lambda: F.linear(x, w_qkv, b_qkv),
              lambda bl: tk.linear(x, w_qkv, None, b_qkv, bl), splitk_sweep),
             ("proj", "none", nbytes(w_proj), lambda: F.linear(x, w_proj), lambda bl: tk.linear(x, w_proj, None, None, bl),
              splitk_sweep),
             ("attention", "none", nbytes(qg, kg), lambda: torch_attention(qkv),
              lambda bl: tk.qkv_attention(qkv, qg, kg, nh, mc.norm_eps), [None])]
    # the all-Triton chain's other kernels, against what PyTorch does in their place: attention that
    # finishes the QKV projection from 3 split-K partials, residual add of partials + RMSNorm
    parts_qkv = torch.randn(3, batch, t, 3 * d, generator=g, device=dev) / 3
    parts_d = torch.randn(4, batch, t, d, generator=g, device=dev) / 4
    ln_g = rnd(d, scale=0.1) + 1

    def torch_add_rms():
        h = x + parts_d.sum(0).to(tdt)
        return rms_norm(h, ln_g, mc.norm_eps)
    cases += [("attn+partials", "none", nbytes(qg, kg, b_qkv),
               lambda: torch_attention((parts_qkv.sum(0) + b_qkv.float()).to(tdt)),
               lambda bl: tk.qkv_attention(parts_qkv, qg, kg, nh, mc.norm_eps, bias=b_qkv, out_dtype=tdt), [None]),
              ("add+norm", "none", nbytes(ln_g), torch_add_rms,
               lambda bl: tk.add_rms(x, parts_d, ln_g, mc.norm_eps)[1], [None])]
    for q in quants:
        if q == "none":
            cases += [("up", q, nbytes(w_up, b_up), torch_up, lambda bl: tk.swiglu_up(x, w_up, None, b_up, gates, bl),
                       up_sweep),
                      ("down", q, nbytes(w_down), lambda: F.linear(hid, w_down),
                       lambda bl: tk.linear(hid, w_down, None, None, bl), splitk_sweep)]
            continue
        (uq, us), (dq, ds) = qw[q]["up"], qw[q]["down"]
        (uq32, us32), (dq32, ds32) = qw[q]["up32"], qw[q]["down32"]
        cases += [("up", q, nbytes(uq32, us32, b_up), lambda uq=uq, us=us: torch_up(uq, us),
                   lambda bl, a=uq32, b=us32: tk.swiglu_up(x, a, b, b_up, gates, bl), up_sweep),
                  ("down", q, nbytes(dq32, ds32), lambda dq=dq, ds=ds: qlinear(hid, dq, ds, None, int8_kernel),
                   lambda bl, a=dq32, b=ds32: tk.linear(hid, a, b, None, bl), splitk_sweep)]
    rows = []

    def emit(row):
        log(json.dumps(row))
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    for op, q, wbytes, tfn, kfn, sweep in cases:
        base = {"preset": name, "device": str(dev), "dtype": dtype, "batch": batch, "rows": m, "op": op,
                "weight_quant": q, "weight_MB": wbytes / 1e6}
        ref = None
        try:
            with torch.no_grad():
                ref = tfn()
                us = _graph_us(tfn, dev, reps, runs)
            emit({**base, "impl": "torch", "blocks": None, "median_us": us, "GBps": wbytes / us / 1e3})
        except Exception as exc:  # noqa: BLE001 - one failing kernel must not lose the others
            emit({**base, "impl": "torch", "blocks": None, "failed": f"{type(exc).__name__}: {exc}"[:300]})
        for bl in (sweep if sweep is not None else [None]):
            try:
                with torch.no_grad():
                    out = kfn(bl)
                    us = _graph_us(lambda: kfn(bl), dev, reps, runs)
                row = {**base, "impl": "triton", "blocks": bl, "median_us": us, "GBps": wbytes / us / 1e3}
                if ref is not None:
                    row["max_abs_diff_vs_torch"] = float((out.float() - ref.float()).abs().max())
                emit(row)
            except Exception as exc:  # noqa: BLE001
                emit({**base, "impl": "triton", "blocks": bl, "failed": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def kernel_table(rows: list[dict]) -> str:
    """Per (op, weights): PyTorch, the Triton default and the fastest Triton configuration."""
    head = f"{'op':>13} {'weights':>7} {'MB':>6} {'torch us':>9} {'triton us':>10} {'best us':>8} {'best GB/s':>9}  best blocks"
    lines = [head, "-" * len(head)]
    keys = list(dict.fromkeys((r["op"], r["weight_quant"]) for r in rows))
    for op, q in keys:
        rs = [r for r in rows if (r["op"], r["weight_quant"]) == (op, q) and "median_us" in r]
        tor = [r for r in rs if r["impl"] == "torch"]
        tri = [r for r in rs if r["impl"] == "triton"]
        dflt = [r for r in tri if r["blocks"] is None]
        best = min(tri, key=lambda r: r["median_us"]) if tri else None
        mb = next((r["weight_MB"] for r in rows if (r["op"], r["weight_quant"]) == (op, q)), 0.0)

        def f(r):
            return f"{r['median_us']:.2f}" if r else "-"
        lines.append(f"{op:>13} {q:>7} {mb:>6.1f} {f(tor[0] if tor else None):>9} {f(dflt[0] if dflt else None):>10} "
                     f"{f(best):>8} {(best['GBps'] if best else 0):>9.0f}  {best['blocks'] if best else '-'}")
    return "\n".join(lines)


# issue 8's targets (H100, batch 1, 10 steps, paper-8l, bf16)
TARGETS = {"denoiser_ms": 2.5, "total_ms": 4.0, "speedup_vs_uncached_fp32": 5.0}


def target_summary(rows: list[dict], baseline_ms: float) -> tuple[list[dict], str]:
    """Each measured step-variant row against the targets: chunk latency (encoders included), the
    denoiser's share (chunk minus the separately timed encoders), the speed-up over the eager uncached
    fp32 baseline ``baseline_ms`` (same inputs and run), accuracy and routing. Returns (rows, table)."""
    out = []
    for r in rows:
        if "median_ms" not in r:
            continue
        enc = r.get("encoders_ms") or 0.0
        den = r["median_ms"] - enc
        sp = baseline_ms / r["median_ms"]
        out.append({"variant": "/".join(str(r.get(k)) for k in ("attention", "compile_mode", "weight_quant", "gemm"))
                    + ("/pdl" if r.get("pdl") else ""),
                    "chunk_ms": r["median_ms"], "encoders_ms": enc, "denoiser_ms": den, "speedup": sp,
                    "max_abs_diff_vs_fp32": r.get("max_abs_diff_vs_fp32"),
                    "same_routing": r.get("same_routing_as_fp32"),
                    "meets": {"denoiser": den <= TARGETS["denoiser_ms"], "total": r["median_ms"] <= TARGETS["total_ms"],
                              "speedup": sp >= TARGETS["speedup_vs_uncached_fp32"]}})
    head = (f"{'variant':>44} {'chunk ms':>9} {'denoiser':>9} {'enc':>6} {'x base':>7} {'max|da|':>8} "
            f"{'route':>5}  targets (den<={TARGETS['denoiser_ms']}, tot<={TARGETS['total_ms']}, "
            f">={TARGETS['speedup_vs_uncached_fp32']}x)")
    lines = [f"baseline: eager uncached fp32 {baseline_ms:.2f} ms", head, "-" * len(head)]
    for o in out:
        m = o["meets"]
        da = f"{o['max_abs_diff_vs_fp32']:.1e}" if o["max_abs_diff_vs_fp32"] is not None else "-"
        lines.append(f"{o['variant']:>44} {o['chunk_ms']:>9.2f} {o['denoiser_ms']:>9.2f} {o['encoders_ms']:>6.2f} "
                     f"{o['speedup']:>7.1f} {da:>8} {'same' if o['same_routing'] else 'DIFF':>5}  "
                     + " ".join(("yes" if m[k] else "NO") for k in ("denoiser", "total", "speedup")))
    return out, "\n".join(lines)


def onnx_runner(policy, dtype: str, imgs, goal, st, noise, rewrite: bool = True):
    """Export ``policy``'s chunk (batch of ``goal``, static shapes) to a temporary folder and return
    (a callable running it with onnxruntime on these inputs -> normalised actions as a tensor, export
    facts: seconds, file size, graph rewrites, threads). onnxruntime gets torch's thread count as its
    budget (same threads as the torch rows) and keeps the count within it that runs fastest, as the
    node does by default (``onnx_threads`` 0); ``rewrite`` False: the exported file as it is (path
    ``onnx-plain``)."""
    import tempfile

    from ..export.onnx import export_onnx
    from ..export.onnx_runtime import OnnxChunk

    if dtype not in ("fp32", "fp16"):
        raise RuntimeError(f"ONNX export is fp32 or fp16, not {dtype}")
    out = tempfile.mkdtemp(prefix="mode_ros_bench_onnx_")
    meta = export_onnx(policy, out, batch=goal.shape[0], dtype=dtype, verify=False)
    chunk = OnnxChunk.load(out, threads=torch.get_num_threads(), device=str(policy.device), rewrite=rewrite,
                           calibrate=True)

    def run():
        return torch.from_numpy(chunk.run_all(imgs, goal, st, noise)[1])
    return run, {"export_s": meta["export_seconds"], "onnx_file_MB": meta["file_bytes"] / 1e6,
                 "onnx_nodes": chunk.rewrites.get("nodes"), "onnx_rewrites": chunk.rewrites,
                 "onnx_threads": chunk.threads}


def _reference(policy, imgs, goal, noise, state=None):
    """Eager uncached fp32 actions (the reference-like baseline, TF32 off) for these inputs."""
    fused, graph = policy.fused, policy.chunk_graph
    policy.fused = policy.chunk_graph = None
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return policy.sample_normalized(imgs, goal, state, noise, cached=False).float()
    finally:
        policy.fused, policy.chunk_graph = fused, graph
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


def _proc_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_policy(name: str, steps: int):
    from .policy import MoDEPolicy

    cfg = preset(name)
    cfg.diffusion.num_steps = steps
    torch.manual_seed(0)
    return MoDEPolicy(cfg).eval()


def path_memory(name: str, path: str, steps: int = 10, export_dir: str | None = None) -> dict:
    """Resident memory a CPU fast path holds for preset ``name``: the process after a plain cached chunk
    (policy + routing table), then after building ``path`` (fused / compiled / onnx) and computing two
    chunks; ``held_MB`` is the difference (weight copies, compiled code, the onnxruntime session).
    ``int8_node``: int8 experts with the full-precision ones released, as the node deploys
    ``weight_quant`` int8. ``onnx_node``: as the node runs it without real-time chunking — the export in ``export_dir`` (written
    by a child process first if missing, so no export garbage stays here) attached and the PyTorch
    denoiser/encoder weights released. One path per process:
    ``python -m mode_ros.model.bench memory PRESET PATH [STEPS [EXPORT_DIR]]``."""
    import gc

    if path == "onnx_node":
        if not export_dir:
            raise ValueError("path onnx_node: needs EXPORT_DIR")
        from pathlib import Path

        from ..export.onnx import MODEL_FILE
        if not (Path(export_dir) / MODEL_FILE).is_file():
            import subprocess
            import sys
            subprocess.run([sys.executable, "-m", "mode_ros.model.bench", "export", name, str(steps), export_dir],
                           check=True)
    policy = _memory_policy(name, steps)
    c = policy.config
    g = torch.Generator().manual_seed(0)
    imgs = (torch.randint(0, 255, (1, c.n_cameras, 3, *c.vision.image_size), dtype=torch.uint8, generator=g)
            if c.n_cameras else None)
    goal, noise = torch.randn(1, 512, generator=g), torch.randn(1, c.chunk_size, c.action_dim, generator=g)
    st = torch.randn(1, c.state_dim, generator=g) if c.state_dim else None
    with torch.no_grad():
        policy.sample_normalized(imgs, goal, st, noise, cached=True)
        gc.collect()
        base = _proc_mb("VmRSS")
        fn, extra = (lambda: policy.sample_normalized(imgs, goal, st, noise, cached=True)), {}
        if path in ("fused", "compiled", "int8", "int8_node"):
            policy.enable_fast(fused=True, compile=path == "compiled", weight_quant="none" if path in (
                "fused", "compiled") else "int8")
            extra = {"fused_entries": len(policy.fused.experts), "expert_copies": len(policy.fused.expert_copies()),
                     "fused_extra_MB": policy.fused.extra_bytes() / 1e6}
            if path == "int8_node":   # as the node deploys it: the full-precision experts released
                extra["released_MB"] = policy.release_expert_weights() / 1e6
                gc.collect()
        elif path == "onnx":
            fn, extra = onnx_runner(policy, "fp32", imgs, goal, st, noise)
        elif path == "onnx_node":
            from ..export.onnx_runtime import OnnxChunk
            policy.backend = chunk = OnnxChunk.load(export_dir, threads=torch.get_num_threads())
            extra = {"released_MB": policy.release_torch_weights() / 1e6}
            gc.collect()

            def fn():
                return chunk.run_all(imgs, goal, st, noise)
        elif path != "cached":
            raise ValueError(f"path: {path!r} is not one of cached, fused, compiled, int8, int8_node, onnx, onnx_node")
        fn()
        fn()
        gc.collect()
    now = _proc_mb("VmRSS")
    return {"preset": name, "path": path, "steps": steps, "rss_cached_MB": base, "rss_MB": now,
            "held_MB": now - base, "peak_rss_MB": _proc_mb("VmHWM"), **extra}


if __name__ == "__main__":   # python -m mode_ros.model.bench memory PRESET PATH [STEPS]
    import sys
    if len(sys.argv) >= 5 and sys.argv[1] == "export":   # export PRESET STEPS DIR (for memory onnx_node)
        from ..export.onnx import export_onnx
        export_onnx(_memory_policy(sys.argv[2], int(sys.argv[3])), sys.argv[4], batch=1, verify=False)
        raise SystemExit(0)
    if len(sys.argv) < 4 or sys.argv[1] != "memory":
        raise SystemExit("usage: python -m mode_ros.model.bench memory PRESET PATH [STEPS [EXPORT_DIR]]")
    torch.set_num_threads(1)
    print(json.dumps(path_memory(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 10,
                                 sys.argv[5] if len(sys.argv) > 5 else None)))
