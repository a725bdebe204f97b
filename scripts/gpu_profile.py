#!/usr/bin/env python3
"""Where the time of one captured chunk goes (paper-8l, bf16, batch 1): full graph vs denoiser-only
vs encoders-only graphs, compile modes, and the top CUDA kernels of one replay."""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo as _dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mode_ros.model.config import preset  # noqa: E402
from mode_ros.model.policy import MoDEPolicy  # noqa: E402


def timeit(fn, n=100, w=10):
    for _ in range(w):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def capture(fn):
    from mode_ros.model.bench import capture_graph
    return capture_graph(fn)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    res = {}
    for mode in ["default"]:
        torch.manual_seed(0)
        with torch.device(dev):
            pol = MoDEPolicy(preset("paper-8l")).eval()
        pol.to_device("cuda", torch.bfloat16)
        pol.encoders.to(torch.bfloat16).to(memory_format=torch.channels_last)
        from mode_ros.model import fast
        pol.fused = fast.FusedSampler(pol.sampler, compile=True)
        pol.fused.build()
        imgs = torch.randint(0, 255, (1, 2, 3, 224, 224), dtype=torch.uint8, device=dev)
        goal = torch.randn(1, 512, device=dev)
        noise = torch.randn(1, 10, 7, device=dev)
        t0 = time.time()
        g_full, _ = capture(lambda: pol.sample_normalized(imgs, goal, None, noise, cached=True))
        comp = time.time() - t0
        obs = pol.encode_observation(imgs, goal).to(torch.bfloat16)
        gb = goal.to(torch.bfloat16)
        g_den, _ = capture(lambda: pol.fused.sample(noise * 80, gb, obs, None))
        g_enc, _ = capture(lambda: pol.encode_observation(imgs, goal))
        r = {"compile_and_capture_s": comp, "full_ms": timeit(g_full.replay), "denoiser_ms": timeit(g_den.replay),
             "encoders_ms": timeit(g_enc.replay)}
        print(mode, json.dumps(r), flush=True)
        res[mode] = r
        if mode == "default":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    g_full.replay()
                torch.cuda.synchronize()
            tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            print(tab)
            (out / "profile.txt").write_text(tab)
        del pol, g_full, g_den, g_enc
        torch.cuda.empty_cache()
    (out / "profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
