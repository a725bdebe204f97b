"""Model subcommands: info, bench, check-reference, init."""
from __future__ import annotations

import json
import sys

from .config import PRESETS


def register(sub) -> None:
    p = sub.add_parser("info", help="what a checkpoint or preset takes and gives, parameter counts and FLOPs",
                       description="Cameras and image size, state, action size/names/bounds, chunk size and "
                                   "sampling steps; for a checkpoint also its known goals, normalisation, control "
                                   "rate and training steps; then parameter counts and FLOPs. Nothing is loaded "
                                   "or initialised (instant, no GPU).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, choices=PRESETS, metavar="PRESET",
                     help=f"a preset: {', '.join(PRESETS)} (default: paper-8l when no --checkpoint)")
    src.add_argument("--checkpoint", default=None, metavar="CKPT",
                     help="a checkpoint folder, or 'bundled' (the MT10 checkpoint shipped in the package)")
    p.add_argument("--no-text", action="store_true", help="skip counting the CLIP text tower")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="latency of one action chunk (JSON + table + PNG)")
    p.add_argument("--presets", default="small",
                   help="comma list of presets (" + ", ".join(PRESETS) + ") or checkpoint folders / 'bundled' "
                        "(their architecture, random weights)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--paths", default="uncached,cached,dense",
                   help="comma list of uncached, cached, fused, compiled, int8, fp8 (CUDA), dense, onnx (onnxruntime, "
                        "the graph rewritten for it; --threads is its budget, the fastest count within it is kept, as the node's "
                        "onnx_threads 0 does), onnx-plain (the exported file as it is); CUDA only: "
                        "graph, fused-graph, compiled-graph, int8-graph, fp8-graph")
    p.add_argument("--batches", default="1", help="comma list of batch sizes (observations per chunk call)")
    p.add_argument("--runs", type=int, default=50,
                   help="timed chunks per configuration (median and p99 reported), in rounds of 10 per path in turn "
                        "(each row's paired_speedup_vs: median per-round speed-up over the fastest PyTorch path)")
    p.add_argument("--warmup", type=int, default=5, help="untimed chunks before timing (allocation, autotuning)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per chunk")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--attention", default=None, choices=("sdpa", "matmul", "elementwise", "triton"),
                   help="attention formulation of the fused paths (default: matmul when compiled, else sdpa; "
                        "triton: one kernel with the q/k norms, CUDA only)")
    p.add_argument("--gemm", default="torch", choices=("torch", "triton"),
                   help="GEMM kernels of the fused paths: cuBLAS/Inductor, or this package's small-M Triton "
                        "kernels (split-K projections, experts' up-projection with SwiGLU fused; CUDA only)")
    p.add_argument("--pdl", action="store_true",
                   help="with --attention triton --gemm triton (CUDA sm_90+): programmatic dependent launch, each "
                        "kernel scheduled while the previous one runs, its weights prefetched into L2 meanwhile")
    p.add_argument("--kernels", action="store_true",
                   help="instead of whole chunks: one layer-step's kernels (QKV, proj, up+SwiGLU, down, attention; "
                        "bf16/int8/fp8 weights), PyTorch vs the Triton kernels over launch configurations, timed "
                        "inside a CUDA graph (writes kernels.json, kernels.txt): for tuning on your GPU")
    p.add_argument("--sweep", default="full", choices=("full", "default"),
                   help="with --kernels: every launch configuration, or only the Triton defaults")
    p.add_argument("--rtc", action="store_true",
                   help="instead: the extra cost per chunk of real-time chunking (plain / replacement / guidance, "
                        "cached and fused samplers, interleaved in one run; --presets may name checkpoints, e.g. "
                        "bundled, loaded with their weights; --threads default 2; writes rtc_cost.json/.txt)")
    p.add_argument("--aot", action="store_true",
                   help="no GPU needed: compile every Triton kernel of one chunk of the all-Triton step (and the "
                        "on-device tuning's candidates) for CUDA sm_<--arch> with the installed Triton, and report "
                        "registers, spills, shared memory, blocks/SM and global loads by width from the binaries "
                        "(writes aot.json, aot.txt; exit 1 if any fails)")
    p.add_argument("--arch", type=int, default=90, help="with --aot: CUDA compute capability ×10 (90: H100/H200)")
    p.add_argument("--weight-quants", default="none,int8,fp8", help="with --aot: comma list of none,int8,fp8")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.txt, bench.png")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check-reference", help="compare this package's model with a reference fixture folder")
    p.add_argument("fixture", help="folder with config.json, weights.safetensors, cases.safetensors")
    p.add_argument("--tol", type=float, default=1e-5, help="largest max|diff| per compared tensor (default 1e-5)")
    p.add_argument("--device", default="cpu", help="torch device of the comparison (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_check_reference)

    p = sub.add_parser("import-reference", help="convert an authors'-layout checkpoint into a mode_ros checkpoint")
    p.add_argument("file", help=".ckpt / .pt / .safetensors with model.inner_model.*, static_resnet.*, gripper_resnet.* keys")
    p.add_argument("--preset", default="pretrain-12l", help="architecture of the file (paper-8l, pretrain-12l, …)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--goals", default="", help="';'-separated instructions to embed now (needs --text-weights)")
    p.add_argument("--text-weights", default=None, help="local open_clip checkpoint for the goal embeddings")
    p.set_defaults(func=cmd_import_reference)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint (for tests and demos)")
    p.add_argument("--preset", default="tiny", choices=PRESETS, metavar="PRESET",
                   help=f"architecture: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--cameras", default=None, help="comma list of camera names ('' for none; default: the preset's)")
    p.add_argument("--action-dim", type=int, default=None, help="action size (default: the preset's)")
    p.add_argument("--state-dim", type=int, default=None, help="proprioceptive state size (default: the preset's)")
    p.add_argument("--goals", default="", help="';'-separated instructions whose embeddings to ship")
    p.add_argument("--action-low", default=None, help="comma list: per-dim robot-unit minimum (sets normalisation)")
    p.add_argument("--action-high", default=None, help="comma list: per-dim robot-unit maximum (with --action-low)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    p.set_defaults(func=cmd_init)


def cmd_info(args) -> int:
    from .info import checkpoint_info, describe, format_contract, format_table, policy_counts

    if args.checkpoint:
        name, info = args.checkpoint, checkpoint_info(args.checkpoint, include_text=not args.no_text)
    else:
        from .config import preset
        name = args.preset or "paper-8l"
        cfg = preset(name)
        info = {**describe(cfg), "counts": policy_counts(cfg, include_text=not args.no_text)}
    if args.json:
        print(json.dumps({"name": name, **info}))
    else:
        print(f"{name}\n{format_contract(info)}\n")
        print(format_table(name, info["counts"]))
    return 0


def cmd_bench(args) -> int:
    import platform

    import torch

    from .bench import bench_preset, table, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    if args.rtc:
        from .rtc_bench import main as rtc_main
        return rtc_main(["--presets", args.presets, "--runs", str(args.runs), "--warmup", str(args.warmup),
                         "--steps", str(args.steps), "--threads", str(args.threads or 2)]
                        + (["--out", args.out] if args.out else []))
    if args.aot:
        return _bench_aot(args, args.dtypes.split(",") if args.dtypes else ["bf16"])
    if args.kernels:
        return _bench_kernels(args, device, dtypes)
    rows = []
    for name in args.presets.split(","):
        print(f"[bench] {name} on {device}", file=sys.stderr)
        rows += bench_preset(name, device, dtypes, args.paths.split(","), [int(b) for b in args.batches.split(",")],
                             runs=args.runs, warmup=args.warmup, steps=args.steps,
                             log=lambda m: print(m, file=sys.stderr), attention=args.attention, gemm=args.gemm,
                             pdl=args.pdl)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(table(rows))
    print(json.dumps({"meta": meta, "rows": rows}))
    write_results(rows, args.out, meta)
    if not rows:
        print(f"mode-ros bench: nothing ran on {device} (see the skipped paths above)", file=sys.stderr)
        return 1
    return 0


def _bench_kernels(args, device: str, dtypes: list[str]) -> int:
    from pathlib import Path

    import torch

    from .bench import kernel_table, kernel_variants

    sweep = None if args.sweep == "full" else [None]
    rows = []
    for name in args.presets.split(","):
        for dt in dtypes:
            for b in (int(x) for x in args.batches.split(",")):
                print(f"[bench --kernels] {name} {dt} batch {b} on {device}", file=sys.stderr)
                rows += kernel_variants(name, device, dt, batch=b, up_sweep=sweep, splitk_sweep=sweep,
                                        runs=args.runs, log=lambda m: print(m, file=sys.stderr))
    meta = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__}
    txt = kernel_table(rows)
    print(txt)
    failed = sorted({r["failed"].split(":")[0] + ": " + r["failed"].split(":", 1)[1].strip()[:120]
                     for r in rows if r.get("failed")})
    for f in failed:
        print(f"failed: {f}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        (out / "kernels.txt").write_text(txt + "\n")
    return 0


def _bench_aot(args, dtypes: list[str]) -> int:
    from pathlib import Path

    import triton

    from .triton_aot import aot_table, step_binaries

    rows = []
    for name in args.presets.split(","):
        for dt in dtypes:
            for q in args.weight_quants.split(","):
                for b in (int(x) for x in args.batches.split(",")):
                    print(f"[bench --aot] {name} {dt} experts {q} batch {b} for sm_{args.arch}", file=sys.stderr)
                    rows += step_binaries(name, dt, q, b, arch=args.arch, log=lambda m: print(m, file=sys.stderr),
                                          pdl=args.pdl)
    meta = {"arch": f"sm_{args.arch}", "triton": triton.__version__, "pdl": args.pdl}
    txt = aot_table(rows)
    print(txt)
    failed = [r for r in rows if "failed" in r]
    over = [r for r in rows if "failed" not in r and r["blocks_per_sm"] == 0]
    print(f"{len(rows)} binaries, {len(failed)} failed to compile, {len(over)} cannot launch on sm_{args.arch} "
          f"(over its per-SM limits), {sum(r.get('spill_bytes', 0) > 0 for r in rows)} spill registers "
          f"(Triton {triton.__version__})", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "aot.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        (out / "aot.txt").write_text(txt + "\n")
    return 1 if failed else 0


def cmd_check_reference(args) -> int:
    from .reference import check_reference

    ok, rows = check_reference(args.fixture, tol=args.tol, device=args.device)
    if args.json:
        print(json.dumps({"ok": ok, "rows": rows}))
    else:
        for r in rows:
            d = "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3e}"
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['key']:<28} max|diff| {d}  {r['note']}")
        print(f"{'PASS' if ok else 'FAIL'}: {sum(r['ok'] for r in rows)}/{len(rows)} keys within {args.tol:g}")
    return 0 if ok else 1


def cmd_init(args) -> int:
    import numpy as np
    import torch

    from .config import PolicyConfig, preset
    from .policy import Affine, MoDEPolicy

    d = preset(args.preset).to_dict()
    if args.cameras is not None:
        cams = [c for c in args.cameras.split(",") if c]
        d["camera_names"] = cams
        if not cams:
            d["vision"]["arch"] = "none"
    if args.action_dim is not None:
        d["action_dim"] = args.action_dim
    if args.state_dim is not None:
        d["state_dim"] = args.state_dim
    cfg = PolicyConfig.from_dict(d)
    torch.manual_seed(args.seed)
    norm = None
    if args.action_low and args.action_high:
        lo = np.array([float(v) for v in args.action_low.split(",")])
        hi = np.array([float(v) for v in args.action_high.split(",")])
        norm = Affine((lo + hi) / 2, np.maximum((hi - lo) / 2, 1e-6))
    policy = MoDEPolicy(cfg, action_norm=norm)
    goals = [g.strip() for g in args.goals.split(";") if g.strip()]
    if goals:
        policy.set_goal_embeddings(dict(zip(goals, policy.text.encode(goals))))
    policy.save_pretrained(args.out)
    print(f"wrote {args.out} ({cfg.n_cameras} cameras, action_dim {cfg.action_dim}, state_dim {cfg.state_dim}, "
          f"{len(goals)} cached goals)")
    return 0


def cmd_import_reference(args) -> int:
    from .config import preset
    from .policy import MoDEPolicy
    from .reference import load_reference_into

    cfg = preset(args.preset)
    if args.text_weights:
        cfg.text.weights, cfg.text.random_init_seed = args.text_weights, None
    policy = MoDEPolicy(cfg)
    rep = load_reference_into(policy, args.file)
    print(json.dumps(rep, indent=1))
    if rep["denoiser_missing"]:
        print(f"mode-ros import-reference: {len(rep['denoiser_missing'])} denoiser tensors missing from {args.file} "
              f"(wrong --preset?): {rep['denoiser_missing'][:5]}", file=sys.stderr)
        return 1
    goals = [g.strip() for g in args.goals.split(";") if g.strip()]
    if goals:
        policy.set_goal_embeddings(dict(zip(goals, policy.text.encode(goals))))
    policy.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0
