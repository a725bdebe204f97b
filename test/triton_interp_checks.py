"""Run by test_triton_kernels.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it at import):
the package's Triton kernels executed by Triton's CPU interpreter, compared with the PyTorch
formulation they replace. Prints one JSON object of measured errors; the test asserts on them."""
import json
import sys

import torch
import torch.nn.functional as F

from mode_ros.model import fast
from mode_ros.model import triton_kernels as tk
from mode_ros.model.bench import kernel_table, kernel_variants, preset, step_variants
from mode_ros.model.fast import FusedSampler, rms_norm, causal_attention, quantize_rows
from mode_ros.model.policy import MoDEPolicy


def err(a, b):
    return float((a.float() - b.float()).abs().max())


def rel(a, b):
    return err(a, b) / float(b.float().abs().max())


def attention_ref(qkv, qg, kg, nh, eps):
    b, t, d3 = qkv.shape
    d = d3 // 3
    hd = d // nh
    q, k, v = qkv.split(d, -1)
    q = rms_norm(q.reshape(b, t, nh, hd), qg, eps).transpose(1, 2)
    k = rms_norm(k.reshape(b, t, nh, hd), kg, eps).transpose(1, 2)
    v = v.reshape(b, t, nh, hd).transpose(1, 2)
    return causal_attention(q, k, v, "matmul").transpose(1, 2).reshape(b, t, d)


def main():
    assert tk.interpreted() and tk.unavailable_reason("cpu") is None
    torch.manual_seed(0)
    out = {}
    # attention: padded tokens (14 -> 16, 9 -> 16), a head size that is not a power of two (24 -> 32)
    for dt in ("fp32", "bf16"):
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        for b, t, d, nh in ((2, 14, 64, 2), (1, 9, 48, 2)):
            qkv = torch.randn(b, t, 3 * d).to(tdt)
            qg, kg = (1 + 0.1 * torch.randn(2, d // nh)).to(tdt)
            got = tk.qkv_attention(qkv, qg, kg, nh, 1e-6)
            out[f"attn_{dt}_t{t}_d{d}"] = rel(got, attention_ref(qkv, qg, kg, nh, 1e-6))
        # causal: changing the last token's k and v leaves the earlier rows bit-identical
        qkv2 = qkv.clone()
        qkv2[:, -1, d:] += 1.0
        got2 = tk.qkv_attention(qkv2, qg, kg, nh, 1e-6)
        out[f"attn_{dt}_causal_prefix_equal"] = bool(torch.equal(got2[:, :-1], got[:, :-1]))
        out[f"attn_{dt}_causal_last_changed"] = not torch.equal(got2[:, -1], got[:, -1])
        # from the QKV projection's split-K partials: the kernel finishes the projection (sum + bias)
        u = torch.randn(b, t, d).to(tdt)
        w = (torch.randn(3 * d, d) / d ** 0.5).to(tdt)
        bias = (0.1 * torch.randn(3 * d)).to(tdt)
        parts = tk.linear_partials(u, w, None, blocks={"bk": 16, "split": 3})
        got = tk.qkv_attention(parts, qg, kg, nh, 1e-6, bias=bias, out_dtype=tdt)
        proj = (u.float() @ w.float().T + bias.float()).to(tdt)
        out[f"attn_{dt}_from_partials"] = {"splits": parts.shape[0], "dtype": str(got.dtype),
                                           "rel": rel(got, attention_ref(proj, qg, kg, nh, 1e-6))}
    # residual add of split-K partials + RMSNorm (+ the noise token), and the plain norm (no partials)
    for dt in ("fp32", "bf16"):
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        base = torch.randn(2, 7, 48).to(tdt)
        parts = torch.randn(3, 2, 7, 48)
        gain, cvec = (1 + 0.1 * torch.randn(48)).to(tdt), torch.randn(48).to(tdt)
        h, y = tk.add_rms(base, parts, gain, 1e-6, cvec)
        h_ref = base + parts.sum(0).to(tdt)
        h0, y0 = tk.add_rms(base, None, gain, 1e-6)
        out[f"add_rms_{dt}"] = {"h": rel(h, h_ref), "y": rel(y, rms_norm(h_ref, gain, 1e-6) + cvec),
                                "plain_y": rel(y0, rms_norm(base, gain, 1e-6)), "plain_h_is_base": h0 is base}
    # experts' up-projection + SwiGLU + gates; 40 rows = 3 row blocks, H = 40 not a block multiple
    for dt in ("fp32", "bf16"):
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        for quant in ("none", "int8", "fp8"):
            m, k, h, ne = 40, 96, 40, 2
            x = torch.randn(m, k).to(tdt)
            w = torch.randn(ne * 2 * h, k) / k ** 0.5
            bias = (0.1 * torch.randn(ne * 2 * h)).to(tdt)
            gates = torch.rand(ne).to(tdt)
            if quant == "none":
                wq, s, wd = w.to(tdt), None, w.to(tdt).float()
            else:
                wq, s = quantize_rows(w, quant, torch.float32)
                wd = wq.float() * s[:, None]
            z = F.linear(x.float(), wd, bias.float()).view(m, ne, 2, h)
            ref = (z[:, :, 0] * F.silu(z[:, :, 1]) * gates.float().view(1, ne, 1)).reshape(m, ne * h)
            out[f"swiglu_{dt}_{quant}"] = rel(tk.swiglu_up(x, wq, s, bias, gates), ref)
    # the same kernels on VIEWS of stacked experts (no copy): experts (1, 3) of 4 (a stride of two
    # experts), H = 40 so the 32-wide K blocks of the down projection straddle the two experts
    e_, m, k, h = 4, 9, 48, 40
    x = torch.randn(m, k)
    w1 = torch.randn(e_, 2 * h, k) / k ** 0.5
    b1, w2 = 0.1 * torch.randn(e_, 2 * h), torch.randn(e_, k, h) / h ** 0.5
    gates = torch.rand(2)
    z = torch.stack([F.linear(x, w1[e], b1[e]) for e in (1, 3)], 1).view(m, 2, 2, h)
    hid_ref = (z[:, :, 0] * F.silu(z[:, :, 1]) * gates.view(1, 2, 1)).reshape(m, 2 * h)
    hid = tk.swiglu_up(x, w1[1::2], None, b1[1::2], gates, blocks={"bk": 32})
    down = tk.linear_partials(hid, w2[1::2], None, blocks={"bk": 32, "split": 2})
    wq, sq = quantize_rows(w2.permute(1, 0, 2).reshape(k, e_ * h), "int8", torch.float32)   # one scale per row
    wq = wq.view(k, e_, h).permute(1, 0, 2).contiguous()
    down_q = tk.linear(hid, wq[1::2], sq.expand(e_, k)[1::2], blocks={"bk": 32})
    ref_q = hid @ torch.cat([wq[1].float(), wq[3].float()], 1).T * sq
    bad = []
    for args in ((x, w1[1::2].transpose(1, 2), None, b1[1::2], gates), (x, w1[1::2], None, b1[1::2, :h], gates)):
        try:
            tk.swiglu_up(*args)
        except ValueError as exc:
            bad.append(str(exc)[:60])
    out["views"] = {"up": rel(hid, hid_ref), "down_splits": down.shape[0],
                    "down": rel(down.sum(0), hid_ref @ torch.cat([w2[1], w2[3]], 1).T),
                    "down_int8": rel(down_q, ref_q), "refused": bad}
    # split-K partials: K = 300 not a multiple of the 128-wide block, several splits
    x = torch.randn(2, 7, 300)
    w = torch.randn(70, 300)
    for split in (1, 3, None):
        p = tk.linear_partials(x, w, None, None if split is None else {"split": split})
        out[f"partials_split{split}"] = {"splits": p.shape[0], "rel": rel(p.sum(0), x @ w.T)}
    wq, s = quantize_rows(w, "int8", torch.float32)
    out["linear_int8"] = rel(tk.linear(x, wq, s, torch.ones(70)), x @ (wq.float() * s[:, None]).T + 1)

    # the fused sampler with the Triton kernels == the cached sampler (tiny preset, batch 2, fp32)
    pol = MoDEPolicy(preset("tiny")).eval()
    c = pol.config
    g = torch.Generator().manual_seed(1)
    goal = torch.randn(2, 512, generator=g)
    noise = torch.randn(2, c.chunk_size, c.action_dim, generator=g)
    imgs = (torch.randint(0, 255, (2, c.n_cameras, 3, *c.vision.image_size), dtype=torch.uint8, generator=g)
            if c.n_cameras else None)
    ref = pol.sample_normalized(imgs, goal, None, noise, cached=True)
    for att, gemm, whole, quant in (("triton", "torch", False, "none"), ("sdpa", "triton", False, "none"),
                                    ("triton", "triton", True, "none"), ("triton", "triton", True, "int8")):
        pol.fused = FusedSampler(pol.sampler, attention=att, gemm=gemm, whole_step=whole, weight_quant=quant)
        pol.fused.build()
        key = f"sampler_{att}_{gemm}_{'step' if whole else 'layer'}_{quant}"
        acts = pol.sample_normalized(imgs, goal, None, noise, cached=True)
        out[key] = err(acts, ref)
        out[key + "_expert_copies"] = len(pol.fused.expert_copies())
    # asked to compile the all-Triton step: it is not compiled (nothing for Inductor), and says why
    fs = FusedSampler(pol.sampler, attention="triton", gemm="triton", compile=True)
    out["compile_skipped"] = {"compile": fs.compile, "reason": fs.compile_skipped, "whole_step": fs.whole_step}
    # launch-configuration tuning (two candidates per kernel here): build pre-tunes batch 1, the first
    # eager batch-2 chunk tunes its own shapes, and the chosen configurations give the same actions
    tk.TUNE_CANDIDATES["up"] = [{"bn": 64, "bk": 64}]
    tk.TUNE_CANDIDATES["splitk"] = [{"bn": 64, "bk": 64, "split": 2}]
    tk.set_tuning(False, runs=1)
    pol.fused = FusedSampler(pol.sampler, attention="triton", gemm="triton", autotune=True)
    pol.fused.build()
    n_tok = pol.sampler.net.n_tokens
    after_build = tk.tuned()
    tuned_acts = pol.sample_normalized(imgs, goal, None, noise, cached=True)
    after_chunk = tk.tuned()
    tk.set_tuning(False)
    out["tuning"] = {"build_rows": sorted({k[1] for k in after_build}), "chunk_rows": sorted({k[1] for k in after_chunk}),
                     "kinds": sorted({k[0] for k in after_chunk}), "n_tokens": n_tok,
                     "n_keys_build": len(after_build), "choices": sorted({str(v) for v in after_chunk.values()}),
                     "err": err(tuned_acts, ref)}
    # the same int8 weights (fp32 row scales) through PyTorch's generic path (not its bf16-activation
    # int8 kernel): the Triton int8 path agrees with it, not just with fp32
    fast.int8_kernel_available = lambda device: False
    pol.fused = FusedSampler(pol.sampler, weight_quant="int8")
    pol.fused.build()
    acts_torch = pol.sample_normalized(imgs, goal, None, noise, cached=True)
    out["sampler_int8_torch_vs_fp32"] = err(acts_torch, ref)
    out["sampler_int8_triton_vs_torch"] = err(acts, acts_torch)
    # bf16 / fp16 denoiser: the all-Triton step against PyTorch's fused step (same rounding points;
    # the remaining difference is fp32 summation order flipping bf16 roundings)
    for dt, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        pol.fused = None
        pol.to_device("cpu", tdt)
        fused = {}
        for att, gemm in (("sdpa", "torch"), ("triton", "triton")):
            pol.fused = FusedSampler(pol.sampler, attention=att, gemm=gemm, whole_step=True)
            pol.fused.build()
            fused[gemm] = pol.sample_normalized(imgs, goal, None, noise, cached=True)
        pol.fused = None
        ref_lp = pol.sample_normalized(imgs, goal, None, noise, cached=True)
        out[f"sampler_{dt}_triton_vs_torch_fused"] = err(fused["triton"], fused["torch"])
        out[f"sampler_{dt}_torch_fused_vs_cached"] = err(fused["torch"], ref_lp)
        out[f"sampler_{dt}_vs_fp32"] = err(fused["triton"], ref)
    pol.to_device("cpu", torch.float32)
    # step_in / step_out alone against the PyTorch formulation of fast.fused_step (fp32 and bf16)
    for dt in ("fp32", "bf16"):
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        b_, p_, k_, a_, d_ = 2, 3, 10, 7, 48
        x = torch.randn(b_, k_, a_)
        ctx = torch.randn(b_, p_, d_).to(tdt)
        cvec, aw, pos = torch.randn(1, 1, d_).to(tdt), torch.randn(d_, a_).to(tdt), torch.randn(1, k_, d_).to(tdt)
        gain, cin = (1 + 0.1 * torch.randn(d_)).to(tdt), torch.tensor(0.37)
        h, u = tk.step_in(x, cin, cvec, ctx, aw, pos, gain, 1e-6)
        h_ref = torch.cat([cvec.expand(b_, 1, -1), ctx, F.linear((x * cin).to(tdt), aw) + pos], dim=1)
        y = torch.randn(b_, 1 + p_ + k_, d_).to(tdt)
        ow, ob = torch.randn(a_, d_).to(tdt), torch.randn(a_).to(tdt)
        cs, co, ra = torch.tensor(0.2), torch.tensor(0.9), torch.tensor(0.6)
        f = F.linear(y[:, -k_:], ow, ob).float()
        den = cs * x + co * f
        out[f"step_in_out_{dt}"] = {"h": rel(h, h_ref), "u": rel(u, rms_norm(h_ref, gain, 1e-6) + cvec),
                                    "x": rel(tk.step_out(y, ow, ob, x, cs, co, ra), den + ra * (x - den))}
    # the GPU script's variant harness runs the uncompiled Triton variant here too
    rows = step_variants("tiny", "cpu", "fp32", runs=1, warmup=0, log=lambda m: None,
                         variants=[("triton", "eager", "none", "triton")])
    out["step_variant_row"] = {k: rows[0].get(k) for k in ("failed", "max_abs_diff_vs_fp32", "same_routing_as_fp32",
                                                            "gemm", "attention", "compile_mode")}
    # the GPU script's kernel sweep: every op, PyTorch and Triton (two launch configurations each)
    krows = kernel_variants("tiny", "cpu", "fp32", up_sweep=[None, {"bn": 64, "bk": 64, "num_stages": 4}],
                            splitk_sweep=[None, {"bn": 64, "split": 2}], reps=1, runs=1, log=lambda m: None)
    out["kernel_rows"] = [{k: r.get(k) for k in ("op", "weight_quant", "impl", "blocks", "median_us",
                                                  "max_abs_diff_vs_torch", "failed")} for r in krows]
    out["kernel_table"] = kernel_table(krows)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
