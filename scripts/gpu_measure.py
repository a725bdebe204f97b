#!/usr/bin/env python3
"""Every GPU measurement of the project in one run (the GPU machine is lent for minutes only).

    python scripts/gpu_measure.py --fixture PATH --out DIR

1. reference fixture on CUDA (TF32 off): max |diff| per key
2. graph (bf16) vs eager fp32 actions and routing identity, 8-layer preset
3. mode-ros bench: presets x dtypes x paths x batch 1/8/32 (JSON + table + PNG)
4. torch.compile path; one layer-step's kernels, PyTorch vs Triton over launch configurations;
   fused-step variants: attention formulation x Inductor mode x weights x GEMM kernels (paper-8l bf16 b1)
5. training throughput of the 8-layer preset (bf16 autocast, synthetic batches on the device)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def section(t):
    print(f"\n===== {t} =====", flush=True)


def paper8l_case(dev):
    """The paper's 8-layer policy (seeded random weights, fp32) and one batch-1 input on ``dev``."""
    from mode_ros.model.config import preset
    from mode_ros.model.policy import MoDEPolicy
    torch.manual_seed(0)
    with torch.device(dev):
        pol = MoDEPolicy(preset("paper-8l")).eval()
    pol.to(dev)
    imgs = torch.randint(0, 255, (1, 2, 3, 224, 224), dtype=torch.uint8, device=dev)
    goal = torch.randn(1, 512, device=dev)
    noise = torch.randn(1, 10, 7, device=dev)
    return pol, imgs, goal, noise


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", default="paper-8l,pretrain-12l,small")
    ap.add_argument("--paths", default="uncached,cached,graph,fused-graph,compiled-graph,int8-graph,fp8-graph,dense")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: ref,graph,bench,compile,kernels,attention,select,train")
    ap.add_argument("--variants", default="",
                    help="comma list of indices into mode_ros.model.bench.STEP_VARIANTS for the step-variants "
                         "section (default: all; each compiles the paper-8l step, ~0.5-1 min on an H100)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "sections": {}}
    print(json.dumps({k: res[k] for k in ("torch", "device")}))

    from mode_ros.model.bench import bench_preset, copy_bandwidth, table, write_results
    from mode_ros.model.config import preset
    from mode_ros.model.policy import MoDEPolicy

    dev = torch.device("cuda")
    res["copy_bandwidth_GBps"] = copy_bandwidth(dev) / 1e9
    print("copy bandwidth GB/s", res["copy_bandwidth_GBps"])

    if a.fixture and "ref" not in skip:
        section("reference fixture on CUDA, TF32 off")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        from mode_ros.model.reference import check_reference
        ok, rows = check_reference(a.fixture, tol=1e-5, device="cuda")
        for r in rows:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['key']:<26} {r['max_abs_diff']}")
        res["sections"]["reference_cuda"] = {"ok": ok, "max": max(r["max_abs_diff"] or 0 for r in rows)}

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    if "graph" not in skip:
        section("graph bf16 vs eager fp32 (paper-8l, batch 1)")
        pol, imgs, goal, noise = paper8l_case(dev)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        ref = pol.sample_normalized(imgs, goal, None, noise, cached=False).float()
        cached32 = pol.sample_normalized(imgs, goal, None, noise, cached=True).float()
        idx32 = pol.sampler.ensure().indices_t.clone()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        pol.to_device("cuda", torch.bfloat16)
        pol.encoders.to(torch.bfloat16)
        from mode_ros.model.graph import ChunkGraph
        torch.backends.cudnn.benchmark = True
        pol.enable_fast(fused=True, compile=True)
        g = ChunkGraph(pol, 1)
        gout = g(imgs, goal, None, noise).float().clone()
        idx16 = pol.sampler.ensure().indices_t.clone()
        eager16 = pol.sample_normalized(imgs, goal, None, noise, cached=True).float()
        r = {"uncached_fp32_vs_cached_fp32": (ref - cached32).abs().max().item(),
             "graph_bf16_vs_eager_fp32": (gout - ref).abs().max().item(),
             "graph_bf16_vs_eager_bf16": (gout - eager16).abs().max().item(),
             "action_abs_max": ref.abs().max().item(),
             "routing_identical": bool(torch.equal(idx32, idx16)),
             "distinct_pairs_per_layer": pol.sampler.table.distinct_pairs()}
        print(json.dumps(r))
        res["sections"]["graph_vs_eager"] = r
        del pol, g
        torch.cuda.empty_cache()

    if "bench" not in skip:
        section("bench")
        rows = []
        runs = 20 if a.quick else 50
        plan = [("paper-8l", ["fp32", "bf16"], a.paths.split(","), [int(x) for x in a.batches.split(",")]),
                ("pretrain-12l", ["fp32", "bf16"], ["uncached", "cached", "graph", "fused-graph", "compiled-graph"], [1]),
                ("small", ["fp32", "bf16"], ["uncached", "cached", "graph", "fused-graph"], [1])]
        plan = [p for p in plan if p[0] in a.presets.split(",")]
        for name, dts, paths, bs in plan:
            t0 = time.time()
            rows += bench_preset(name, "cuda", dts, paths, bs, runs=runs, warmup=5, log=print)
            print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
            write_results(rows, str(out / "bench"), {"device": res["device"], "torch": res["torch"]})
        print(table(rows))
        res["sections"]["bench"] = rows

    if "compile" not in skip:
        section("torch.compile (paper-8l bf16 b1)")
        try:
            t0 = time.time()
            rows_c = bench_preset("paper-8l", "cuda", ["bf16"], ["compiled"], [1], runs=50, warmup=3, log=print)
            res["sections"]["compiled"] = rows_c
            print(f"compile section {time.time() - t0:.0f} s")
        except Exception as exc:  # noqa: BLE001
            print("compile failed", exc)

    if "kernels" not in skip:
        section("kernels of one layer-step: PyTorch vs the Triton kernels, launch-configuration sweep (paper-8l bf16)")
        # mode_ros.model.bench.kernel_variants: QKV / proj / up(+SwiGLU) / down / attention, bf16, int8,
        # fp8 weights, each timed inside a CUDA graph; the fastest configuration per op is what the
        # Triton defaults (triton_kernels._blocks) should become
        from mode_ros.model.bench import kernel_table, kernel_variants

        for bsz in (1, 8):
            def save_k(rows, bsz=bsz):
                res["sections"][f"kernels_b{bsz}"] = rows
                (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
            t0 = time.time()
            full = bsz == 1   # batch 8: the Triton defaults against PyTorch only
            krows = kernel_variants("paper-8l", "cuda", "bf16", batch=bsz, on_row=save_k, log=lambda m: None,
                                    up_sweep=None if full else [None], splitk_sweep=None if full else [None])
            txt = kernel_table(krows)
            print(f"batch {bsz} ({time.time() - t0:.0f} s)\n{txt}", flush=True)
            (out / f"kernels_b{bsz}.txt").write_text(txt + "\n")
        torch.cuda.empty_cache()

    if "attention" not in skip:
        section("step variants (paper-8l bf16 b1, compiled, whole-chunk graph)")
        # attention formulation x Inductor mode x expert weights (mode_ros.model.bench.STEP_VARIANTS):
        # max-autotune lets Inductor fuse epilogues (bias, SiLU*v*gate, residual) and, for int8/fp8,
        # the widening of the weights into its Triton GEMMs
        from mode_ros.model.bench import step_variants

        def save(rows):
            res["sections"]["step_variants"] = rows
            (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
        from mode_ros.model.bench import STEP_VARIANTS
        chosen = ([STEP_VARIANTS[int(i)] for i in a.variants.split(",")] if a.variants else None)
        vrows = step_variants("paper-8l", "cuda", "bf16", runs=100, on_row=save, variants=chosen)
        torch.cuda.empty_cache()

        section("issue 8 targets: step variants against the eager uncached fp32 baseline (same run)")
        from mode_ros.model.bench import _time, target_summary
        pol, imgs, goal, noise = paper8l_case(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        baseline_ms = statistics.median(_time(lambda: pol.sample_normalized(imgs, goal, None, noise, cached=False),
                                              dev, 10, 2))
        summary, txt = target_summary(vrows, baseline_ms)
        print(txt, flush=True)
        res["sections"]["targets"] = {"baseline_uncached_fp32_ms": baseline_ms, "rows": summary}
        (out / "targets.txt").write_text(txt + "\n")
        (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
        del pol
        torch.cuda.empty_cache()

    if "select" not in skip:
        section("the node's gpu_kernels auto: MoDEPolicy.select_fast over torch / triton / triton_pdl "
                "(paper-8l bf16 b1, compiled, whole-chunk graph)")
        import logging
        logging.basicConfig(level=logging.INFO)
        pol, imgs, goal, noise = paper8l_case(dev)
        pol.to_device("cuda", torch.bfloat16)
        base = {"fused": True, "compile": True, "graph": True}
        cands = [{**base, "attention": None, "gemm": "torch"}, {**base, "attention": "triton", "gemm": "triton"},
                 {**base, "attention": "triton", "gemm": "triton", "pdl": True}]
        try:
            sel = pol.select_fast(cands, runs=50, logger=logging.getLogger("select_fast"))
            res["sections"]["select_fast"] = sel
            print(json.dumps(sel, indent=1, default=str), flush=True)
        except Exception as exc:  # noqa: BLE001
            res["sections"]["select_fast"] = {"error": repr(exc)}
            print("select_fast failed:", repr(exc), flush=True)
        (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
        del pol
        torch.cuda.empty_cache()

    if "train" not in skip:
        section("training throughput paper-8l (bf16 autocast, synthetic on-device batches)")
        from mode_ros.train.schedule import param_groups
        torch.manual_seed(0)
        with torch.device(dev):
            pol = MoDEPolicy(preset("paper-8l")).train()
        opt = torch.optim.AdamW(param_groups(pol, 0.05), lr=1e-4, betas=(0.9, 0.95))
        for bsz in (32, 64):
            batch = {"images": torch.randint(0, 255, (bsz, 2, 3, 224, 224), dtype=torch.uint8, device=dev),
                     "goal_emb": torch.randn(bsz, 512, device=dev), "actions": torch.randn(bsz, 10, 7, device=dev).clamp(-1, 1)}
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, aux = pol.loss(batch)
                    tot = loss + 0.01 * aux["load_balance"]
                opt.zero_grad(set_to_none=True)
                tot.backward()
                opt.step()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            n = 10
            t0 = time.time()
            for _ in range(n):
                step()
            torch.cuda.synchronize()
            dt = time.time() - t0
            r = {"batch": bsz, "steps_per_s": n / dt, "samples_per_s": n * bsz / dt,
                 "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30}
            print(json.dumps(r))
            res["sections"].setdefault("train", []).append(r)

    (out / "gpu_results.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
