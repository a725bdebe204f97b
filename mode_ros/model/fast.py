"""Fused cached sampler for GPUs: fewer, larger kernels per denoising step.

Built on the routing table of ``CachedSampler`` (same routing, same math):
  * Q, K and V of each layer in one GEMM (weights concatenated once per cache build);
  * the k selected experts of each (layer, step) in one batched up-projection and one batched
    down-projection GEMM over strided VIEWS of the model's stacked expert weights (any pair of experts
    is one strided slice, ``expert_views``): the experts exist once in memory, whatever the routing
    (the reference copied two experts for every (sigma, layer) pair); the gates scale the SwiGLU hidden
    state. Quantised experts are quantised once per layer (stacked, the same strided views); only the
    Triton GEMMs use fused copies, one per DISTINCT (layer, expert set);
  * optionally one ``torch.compile``d layer function (weights are arguments, so a single compilation
    serves every layer and step; Inductor fuses the RMSNorms, SiLU·v and residual adds);
  * optionally weight-only int8 or fp8 (e4m3) copies of the expert weights (one per expert), one scale per
    output row (the experts are ~85 % of the weights a step reads, so at batch 1 — bound by reading
    weights — this cuts the bytes per chunk by about 2x against bf16). Activations, attention, norms
    and the accumulation stay in the model dtype / fp32; see ``quantize_rows`` and ``qlinear``.
  * optionally this package's Triton kernels (``attention="triton"``, ``gemm="triton"``,
    ``mode_ros.model.triton_kernels``); with both, a step is Triton kernels only (never compiled).
The result is a fixed kernel sequence that ``mode_ros.model.graph.ChunkGraph`` captures whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import triton_kernels as tk
from .expert_cache import CachedSampler
from .sampling import ddim_loop, ddim_step, edm_denoise


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)
    return (g * (x.float() / rms)).to(x.dtype)


WEIGHT_QUANT = ("none", "int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}


def quantize_rows(w: torch.Tensor, kind: str, scale_dtype: torch.dtype = torch.bfloat16):
    """Weight-only quantisation of an ``F.linear`` weight (N, K), one scale per output row.

    The scale is rounded to ``scale_dtype`` BEFORE the weights are divided by it, so the stored
    values and the scale the kernel multiplies by agree exactly. int8: symmetric, [-127, 127];
    fp8: float8_e4m3fn, row maximum mapped to 448. Returns (q (N, K), scale (N,))."""
    if kind not in _QMAX:
        raise ValueError(f"weight_quant: {kind!r} is not one of {WEIGHT_QUANT}")
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=1) / _QMAX[kind]).clamp_min(1e-12).to(scale_dtype)
    x = w32 / scale.float()[:, None]
    if kind == "int8":
        q = x.round().clamp(-127, 127).to(torch.int8)
    else:
        q = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def int8_kernel_available(device: torch.device) -> bool:
    """Whether ``torch._weight_int8pack_mm`` (int8 weights read directly, bf16 activations) runs on
    this device. Probed once per build, outside any graph capture."""
    fn = getattr(torch, "_weight_int8pack_mm", None)
    if fn is None:
        return False
    try:
        x = torch.zeros(2, 32, dtype=torch.bfloat16, device=device)
        w = torch.zeros(8, 32, dtype=torch.int8, device=device)
        fn(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def qlinear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None,
            int8_kernel: bool = False) -> torch.Tensor:
    """``F.linear`` for plain or row-quantised weights (``scale`` not None). With ``int8_kernel`` the
    int8 weights are read by ``torch._weight_int8pack_mm`` (activations in bf16, output cast back);
    otherwise the weights are widened to the activation dtype and the row scales applied to the
    output — under torch.compile Inductor fuses the widening into the matmul's weight load."""
    if scale is None:
        return F.linear(x, w, bias)
    if int8_kernel and w.dtype == torch.int8:
        shp = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shp[-1]).to(torch.bfloat16), w, scale)
        y = y.reshape(*shp[:-1], -1).to(x.dtype)
    else:
        y = F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


ATTENTION = ("sdpa", "matmul", "elementwise", "triton")
# GEMM kernels of the fused layer: cuBLAS / Inductor ("torch") or this package's small-M Triton
# kernels ("triton": split-K projections, the experts' up-projection with SwiGLU and gates fused)
GEMM = ("torch", "triton")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """Causal attention over (b, heads, t, hd) for the ~14 tokens of a MoDE step, three ways:
    ``sdpa`` (one library kernel), ``matmul`` (scores and weighted sum as two batched GEMMs, fp32
    scores) and ``elementwise`` (both products as broadcast multiply + reduction, fp32: no GEMM at all,
    so that under torch.compile Inductor can generate them, with the softmax, as its own kernels
    instead of two cuBLAS calls per layer). All three compute the same function. (The fourth kind,
    ``triton``, also owns the q/k norms and reads the QKV output directly: see ``fused_layer``.)"""
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t, hd = q.shape[-2], q.shape[-1]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if kind == "matmul":
        scores = (q.float() @ k.float().transpose(-1, -2)) * (hd ** -0.5)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v
    if kind == "elementwise":
        scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * (hd ** -0.5)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (p.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(v.dtype)
    raise ValueError(f"attention: {kind!r} is not one of {ATTENTION}")


@dataclass
class QuantizedExperts:
    """A layer's experts quantised once, stacked like ``SwiGLUExperts``: w1 (E, 2H, d), w2 (E, d, H)
    int8 / fp8 with one scale per output row (s1 (E, 2H); s2 (E, d), the same row scale for every
    expert — a view of one (d,) vector — so any set of experts concatenated along H (the Triton
    kernels' down-projection block) keeps one scale per row); b1 is the model's own."""
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def of(cls, moe, kind: str, scale_dtype: torch.dtype) -> "QuantizedExperts":
        e, two_h, d = moe.w1.shape
        h = moe.w2.shape[-1]
        q1, s1 = quantize_rows(moe.w1.reshape(e * two_h, d), kind, scale_dtype)
        q2, s2 = quantize_rows(moe.w2.permute(1, 0, 2).reshape(d, e * h), kind, scale_dtype)   # (d, E·H)
        q2 = q2.view(d, e, h).permute(1, 0, 2).contiguous()                                  # (E, d, H)
        return cls(q1.view(e, two_h, d), moe.b1, q2, s1.view(e, two_h), s2.expand(e, d))

    def concatenated(self, sel: tuple) -> tuple:
        """The experts ``sel`` as one contiguous block each, as the Triton GEMMs read them: (w1 (k·2H, d),
        b1 (k·2H,), w2 (d, k·H), s1 (k·2H,), s2 (d,)) — the quantised values themselves, not requantised."""
        return (torch.cat([self.w1[e] for e in sel]).contiguous(), torch.cat([self.b1[e] for e in sel]).contiguous(),
                torch.cat([self.w2[e] for e in sel], dim=1).contiguous(),
                torch.cat([self.s1[e] for e in sel]).contiguous(), self.s2[0].contiguous())


def expert_views(experts, sel: tuple) -> tuple | None:
    """The experts ``sel`` (ascending ints) of a layer's stacked experts (``SwiGLUExperts`` or
    ``QuantizedExperts``) as views, no copy: (w1 (k, 2H, d), b1 (k, 2H), w2 (k, d, H), s1, s2), the
    scales None when not quantised. Any arithmetic progression of experts — every pair, so every top-2
    selection — is one strided slice; None for other sets (k >= 3, uneven gaps)."""
    step = sel[1] - sel[0] if len(sel) > 1 else 1
    if step < 1 or any(b - a != step for a, b in zip(sel, sel[1:])):
        return None
    sl = slice(sel[0], sel[-1] + 1, step)
    if isinstance(experts, QuantizedExperts):
        return experts.w1[sl], experts.b1[sl], experts.w2[sl], experts.s1[sl], experts.s2[sl]
    return experts.w1[sl], experts.b1[sl], experts.w2[sl], None, None


def selected_experts(y, w1, b1, w2, gates, s1=None, s2=None, int8_kernel: bool = False):
    """The gated sum of k SwiGLU experts whose weights are (strided) views of the stacked parameters:
    one batched GEMM up (k, 2H) and one down, summed over k. y (b, t, d); w1 (k, 2H, d); b1 (k, 2H);
    w2 (k, d, H); gates (k,). Row-quantised views (scales s1 (k, 2H), s2 (k, d)): expert by expert
    through ``qlinear`` (each expert's slice of the stacked quantised weights is contiguous)."""
    b, t, d = y.shape
    k = w1.shape[0]
    if s1 is not None:
        rows = y.reshape(b * t, d)
        out = None
        for e in range(k):
            v, g = qlinear(rows, w1[e], s1[e], b1[e], int8_kernel).chunk(2, dim=-1)   # (bt, H) each
            part = qlinear(v * F.silu(g) * gates[e], w2[e], s2[e], None, int8_kernel)  # (bt, d)
            out = part if out is None else out + part
        return out.view(b, t, d)
    yk = y.reshape(1, b * t, d).expand(k, b * t, d)                       # (k, bt, d), no copy
    z = torch.baddbmm(b1.unsqueeze(1), yk, w1.transpose(1, 2))              # (k, bt, 2H): [v | g]
    v, g = z.chunk(2, dim=-1)
    hid = v * F.silu(g) * gates.view(k, 1, 1)                               # (k, bt, H)
    return torch.bmm(hid, w2.transpose(1, 2)).sum(0).view(b, t, d)          # (b, t, d)


def fused_layer(h, c, ln1_g, wqkv, bqkv, qg, kg, wproj, ln2_g, w1f, b1f, w2f, gates,
                n_heads: int, eps: float, reference_residual: bool, attention: str = "sdpa",
                w1s=None, w2s=None, int8_kernel: bool = False, gemm: str = "torch"):
    b, t, d = h.shape
    hd = d // n_heads
    tri = gemm == "triton"
    u = rms_norm(h, ln1_g, eps) + c
    qkv = tk.linear(u, wqkv, None, bqkv) if tri else F.linear(u, wqkv, bqkv)
    if attention == "triton":   # (with gemm="triton" too, FusedSampler runs tk.layer_chain instead)
        a = tk.qkv_attention(qkv, qg, kg, n_heads, eps)
    else:
        q, k, v = qkv.split(d, dim=-1)
        q = rms_norm(q.view(b, t, n_heads, hd), qg, eps).transpose(1, 2)
        k = rms_norm(k.view(b, t, n_heads, hd), kg, eps).transpose(1, 2)
        v = v.view(b, t, n_heads, hd).transpose(1, 2)
        a = causal_attention(q, k, v, attention).transpose(1, 2).reshape(b, t, d)
    h = h + (tk.linear(a, wproj) if tri else F.linear(a, wproj))
    y = rms_norm(h, ln2_g, eps)
    kk = gates.shape[0]
    if tri:                                              # views of the stacked experts, or a k >= 3 block
        hid = tk.swiglu_up(y, w1f, w1s, b1f, gates)
        out = tk.linear(hid, w2f, w2s)
    elif w1f.dim() == 3:                                 # views of the stacked experts (no copies)
        return (y if reference_residual else h) + selected_experts(y, w1f, b1f, w2f, gates, w1s, w2s, int8_kernel)
    else:
        z = qlinear(y, w1f, w1s, b1f, int8_kernel)       # (b, t, k * 2H): [v_1, g_1, v_2, g_2, …]
        z = z.view(b, t, kk, 2, -1)
        hid = z[..., 0, :] * F.silu(z[..., 1, :]) * gates.view(1, 1, kk, 1)
        out = qlinear(hid.reshape(b, t, -1), w2f, w2s, None, int8_kernel)
    return (y if reference_residual else h) + out


def fused_denoise(x, ctx, c, c_in, c_skip, c_out, action_w, action_pos, lnf_g, out_w, out_b,
                  layers, n_heads: int, eps: float, reference_residual: bool, attention: str,
                  int8_kernel: bool = False, gemm: str = "torch", layer=None):
    """D(x; sigma) of one step as a function of tensors: ``sampling.edm_denoise`` around the fused
    network (tokens, ``layer`` per block — ``fused_layer`` or its compiled version —, the head).
    ``layers``: per block (ln1_g, wqkv, bqkv, qg, kg, wproj, ln2_g, w1f, b1f, w2f, gates, w1s, w2s)."""
    layer = fused_layer if layer is None else layer
    cc = c.expand(x.shape[0], 1, -1)
    k = action_pos.shape[1]

    def network(a_in):
        h = torch.cat([cc, ctx, F.linear(a_in.to(ctx.dtype), action_w) + action_pos], dim=1)
        for L in layers:
            h = layer(h, cc, *L[:11], n_heads=n_heads, eps=eps, reference_residual=reference_residual,
                      attention=attention, w1s=L[11], w2s=L[12], int8_kernel=int8_kernel, gemm=gemm)
        return F.linear(rms_norm(h[:, -k:], lnf_g, eps), out_w, out_b).float()
    return edm_denoise(x, network, c_in, c_skip, c_out)


def fused_step(x, ctx, c, c_in, c_skip, c_out, ratio, action_w, action_pos, lnf_g, out_w, out_b,
               layers, n_heads: int, eps: float, reference_residual: bool, attention: str,
               int8_kernel: bool = False, gemm: str = "torch"):
    """One DDIM step (denoise + update) as one function of tensors: compiled once for all steps.
    ``sampling.ddim_step`` after ``fused_denoise`` (ratio 0: D itself). The all-Triton step is their
    kernel lowering: ``tk.step_in`` scales x by c_in into the tokens, ``tk.step_out`` computes the head,
    edm_denoise's output and ddim_step in one kernel (checked against the PyTorch formulation by
    test/triton_interp_checks.py)."""
    if gemm == "triton" and attention == "triton":
        # the whole step as Triton kernels: tokens + first norm, seven per layer, head + DDIM update
        h, u = tk.step_in(x, c_in, c, ctx, action_w, action_pos, layers[0][0], eps)
        y = tk.layer_chain(h, c, layers, lnf_g, n_heads, eps, reference_residual, u=u)
        return tk.step_out(y, out_w, out_b, x, c_skip, c_out, ratio)
    return ddim_step(x, fused_denoise(x, ctx, c, c_in, c_skip, c_out, action_w, action_pos, lnf_g, out_w, out_b,
                                      layers, n_heads, eps, reference_residual, attention, int8_kernel, gemm), ratio)


def check_fast_options(weight_quant: str, attention: str | None, gemm: str) -> None:
    """ValueError naming the option when ``weight_quant``, ``attention`` or ``gemm`` is not a known choice."""
    if weight_quant not in WEIGHT_QUANT:
        raise ValueError(f"weight_quant: {weight_quant!r} is not one of {WEIGHT_QUANT}")
    if attention is not None and attention not in ATTENTION:
        raise ValueError(f"attention: {attention!r} is not one of {ATTENTION}")
    if gemm not in GEMM:
        raise ValueError(f"gemm: {gemm!r} is not one of {GEMM}")


class FusedSampler:
    """Drop-in replacement of ``CachedSampler.sample`` (same table, fused kernels)."""

    def __init__(self, cached: CachedSampler, compile: bool = False, whole_step: bool | None = None,
                 weight_quant: str = "none", attention: str | None = None, compile_mode: str | None = None,
                 gemm: str = "torch", autotune: bool | None = None, pdl: bool = False):
        check_fast_options(weight_quant, attention, gemm)
        dev = next(cached.net.parameters()).device
        if gemm == "triton" or attention == "triton":
            reason = tk.unavailable_reason(dev)
            if reason is not None:
                raise ValueError(f"attention={attention!r} / gemm={gemm!r}: {reason}")
        if pdl:
            if not (gemm == "triton" and attention == "triton"):
                raise ValueError("pdl: programmatic dependent launch is for the all-Triton step "
                                 "(attention='triton', gemm='triton')")
            reason = tk.pdl_unavailable_reason(dev)
            if reason is not None:
                raise ValueError(f"pdl: {reason}")
        self.pdl = bool(pdl)
        self.gemm = gemm
        # time the Triton GEMMs' launch configurations on the device at build (default: on CUDA)
        self.autotune = (gemm == "triton" and dev.type == "cuda") if autotune is None else autotune
        self.compile_skipped = None
        if gemm == "triton" and attention == "triton":
            whole_step = True   # the all-Triton layer chain lives in fused_step
            if compile:
                # nothing between the Triton kernels for Inductor to fuse; not compiling also keeps the
                # path independent of Dynamo's support for user-defined Triton kernels
                self.compile_skipped = "the all-Triton step has no PyTorch ops for Inductor to fuse"
                compile = False
        # default: the measured choice so far (H100, compiled: matmul beat one SDPA launch per layer)
        self.attention = attention or ("matmul" if compile else "sdpa")
        self.weight_quant = weight_quant
        self.int8_kernel = False
        self.cached = cached
        self.net = cached.net
        self.compile = compile
        self.compile_mode = None
        self.whole_step = compile if whole_step is None else whole_step
        self._key = None
        self.quantized: list[QuantizedExperts] = []   # per layer, with weight_quant and torch GEMMs
        self._fn = fused_layer
        self._step = fused_step
        if compile:
            import torch._dynamo
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # compile_mode: e.g. "max-autotune-no-cudagraphs" (Inductor times Triton GEMM templates
            # against cuBLAS for these small-M shapes; the chunk graph captures the result anyway).
            # Quantised experts on CUDA default to it: only a Triton template can fuse the widening of
            # int8/fp8 weights into its loads (Inductor's prologue fusion; its old mixed-mm path is
            # gone), while the default mode widens the weights into a bf16 copy that cuBLAS then reads
            # (more bytes than bf16 weights). An inference from Inductor's design, to be confirmed by
            # scripts/gpu_measure.py, which also times the "default" mode explicitly.
            if compile_mode is None and weight_quant != "none" and dev.type == "cuda":
                compile_mode = "max-autotune-no-cudagraphs"
            self.compile_mode = compile_mode
            self._fn = torch.compile(fused_layer, dynamic=False, fullgraph=True, mode=compile_mode)
            self._step = torch.compile(fused_step, dynamic=False, fullgraph=True, mode=compile_mode)

    @torch.no_grad()
    def build(self) -> None:
        t = self.cached.ensure()
        net = self.net
        self.layers = []
        for blk in net.blocks:
            a = blk.attn
            self.layers.append({
                "ln1_g": blk.ln_1.g, "ln2_g": blk.ln_2.g, "qg": a.q_norm.g, "kg": a.k_norm.g,
                "wqkv": torch.cat([a.query.weight, a.key.weight, a.value.weight]).contiguous(),
                "bqkv": torch.cat([a.query.bias, a.key.bias, a.value.bias]).contiguous(),
                "wproj": a.c_proj.weight})
        # fused expert weights, one per distinct (layer, expert SET) in the routing table: a pair ranked
        # differently at another sigma ((5, 2) after (2, 5)) reads the same copy, its gates permuted to the
        # stored (ascending) order once here (ranked keys stored 15 copies for 13 distinct pairs)
        self.experts: dict[tuple, tuple] = {}
        order = torch.tensor([[sorted(range(len(sel)), key=sel.__getitem__) for sel in step] for step in t.indices],
                             device=t.gates.device)
        self.gates = t.gates.gather(-1, order)   # (S, L, k) in the order of the stored experts
        quant = self.weight_quant != "none"
        dev = net.blocks[0].moe.w1.device
        if self.gemm == "triton" or self.attention == "triton":
            tk.prepare(dev)
        tk.set_tuning(self.autotune and self.gemm == "triton")
        # the Triton GEMMs widen int8 in their own loads; torch's int8 kernel is for gemm="torch"
        self.int8_kernel = self.weight_quant == "int8" and self.gemm == "torch" and int8_kernel_available(dev)
        # the int8 kernel wants scales in its activation dtype (bf16); the generic path keeps fp32
        sdt = torch.bfloat16 if self.int8_kernel else torch.float32
        if not quant:
            self.quantized = []
        elif not self.quantized:   # quantised once, kept across rebuilds (the fp32 experts may be released)
            self.quantized = [QuantizedExperts.of(blk.moe, self.weight_quant, sdt) for blk in net.blocks]
        for s in range(len(t.indices)):
            for l, ranked in enumerate(t.indices[s]):
                sel = tuple(sorted(ranked))
                key = (l, sel)
                if key in self.experts:
                    continue
                moe = net.blocks[l].moe
                views = expert_views(self.quantized[l] if self.quantized else moe, sel)
                # the GEMMs (torch's batched ones and the Triton kernels alike) read the selected experts as
                # views of stacked weights: the model's own or, quantised, each layer's experts quantised ONCE
                # (stacked, one scale per output row; the down projection's shared by the experts)
                if views is not None:
                    self.experts[key] = views
                    continue
                if quant:   # k >= 3 experts at uneven gaps: a contiguous copy of the once-quantised experts
                    w1, b1, w2, s1, s2 = self.quantized[l].concatenated(sel)
                else:
                    w1 = torch.cat([moe.w1[e] for e in sel]).contiguous()
                    w2 = torch.cat([moe.w2[e] for e in sel], dim=1).contiguous()
                    b1 = torch.cat([moe.b1[e] for e in sel]).contiguous()
                    s1 = s2 = None
                self.experts[key] = (w1, b1, w2, s1, s2)
        self._key = t.key
        if self.autotune and self.gemm == "triton":
            self.pretune(1)

    @torch.no_grad()
    def pretune(self, batch: int) -> dict:
        """Tune the Triton GEMMs' launch configurations for ``batch`` now, eagerly (a compiled or
        captured step only uses what was tuned before); the shapes are the same in every layer, so
        layer 0's weights stand for all. Returns the tuned table."""
        net, L = self.net, self.layers[0]
        d = L["wqkv"].shape[1]
        dt = L["wqkv"].dtype
        x = torch.zeros(batch * net.n_tokens, d, dtype=dt, device=L["wqkv"].device)
        tk.linear_partials(x, L["wqkv"])
        tk.linear_partials(x, L["wproj"])
        (sel, (w1f, b1f, w2f, s1, s2)) = next((k[1], e) for k, e in self.experts.items() if k[0] == 0)
        gates = torch.ones(len(sel), dtype=dt, device=x.device)
        tk.swiglu_up(x, w1f, s1, b1f, gates)
        tk.linear_partials(torch.zeros(x.shape[0], w1f.shape[:-1].numel() // 2, dtype=dt, device=x.device), w2f, s2)
        return tk.tuned()

    def extra_parameters(self) -> int:
        """Parameters held in fused copies (memory cost of the fusion)."""
        if self._key is None:
            self.build()
        n = sum(w.numel() + b.numel() + w2.numel() for w, b, w2, _, _ in self.expert_copies())
        n += sum(q.w1.numel() + q.w2.numel() for q in self.quantized)
        return n + sum(L["wqkv"].numel() + L["bqkv"].numel() for L in self.layers)

    def expert_copies(self) -> list[tuple]:
        """The fused expert entries that hold their own memory: views of the model's weights and of the
        once-quantised stacked experts (``self.quantized``, counted by ``extra_bytes`` once) excluded."""
        own = {p.untyped_storage().data_ptr() for blk in self.net.blocks for p in (blk.moe.w1, blk.moe.b1, blk.moe.w2)}
        own |= {t.untyped_storage().data_ptr() for q in self.quantized for t in (q.w1, q.w2)}
        return [e for e in self.experts.values() if e[0].untyped_storage().data_ptr() not in own]

    def extra_bytes(self) -> int:
        """Bytes held in fused copies (quantised experts count at their storage size)."""
        if self._key is None:
            self.build()
        n = sum(sum(x.numel() * x.element_size() for x in e if x is not None) for e in self.expert_copies())
        n += sum(t.untyped_storage().nbytes() for q in self.quantized for t in (q.w1, q.w2, q.s1, q.s2))
        return n + sum(L[k].numel() * L[k].element_size() for L in self.layers for k in ("wqkv", "bqkv"))

    def weight_bytes_per_chunk(self) -> int:
        """Bytes of weights the denoiser reads for one chunk on this path (every step: the layers'
        attention weights and norms, the selected experts at their storage size, the action
        embedding and head); context embeddings are computed once per chunk and counted once."""
        self.ensure()
        t, net = self.cached.table, self.net

        def nb(*xs):
            return sum(x.numel() * x.element_size() for x in xs if x is not None)
        per_layer = sum(nb(L["ln1_g"], L["ln2_g"], L["qg"], L["kg"], L["wqkv"], L["bqkv"], L["wproj"])
                        for L in self.layers)
        fixed = nb(net.action_emb.weight, net.ln.g, net.out.weight, net.out.bias)
        total = 0
        for i in range(len(t.indices)):
            total += per_layer + fixed
            total += sum(nb(*self.selection(i, l)[0]) for l in range(len(self.layers)))
        ctx = sum(p.numel() * p.element_size() for n, p in net.named_parameters()
                  if n.split(".")[0] in ("goal_emb", "tok_emb", "gripper_embed", "state_emb", "pos_emb"))
        return total + ctx

    @property
    def differentiable(self) -> bool:
        """Whether ``denoise_step`` supports autograd in x (real-time chunking's guidance takes a VJP
        through it): the eager PyTorch layers — not compiled, no Triton kernels, unquantised experts."""
        return (not self.compile and not self.whole_step and self.gemm == "torch" and self.attention != "triton"
                and self.weight_quant == "none")

    def ensure(self) -> None:
        t = self.cached.ensure()
        if self._key != t.key:
            self.build()

    def selection(self, i: int, l: int) -> tuple[tuple, torch.Tensor]:
        """Step i, layer l: the fused weights of its expert set and the gates in their stored order."""
        return self.experts[(l, tuple(sorted(self.cached.table.indices[i][l])))], self.gates[i, l]

    def step_args(self, i: int, ctx: torch.Tensor) -> tuple:
        """The tensors of step i for ``fused_denoise`` / ``fused_step`` after x: context, the table's noise
        embedding and scalings, the action embedding and head, and per layer its fused weights and the
        step's expert pair (its gates) — the one place the fused copies are looked up."""
        net, t, cfg = self.net, self.cached.table, self.net.cfg
        start = cfg.goal_seq_len + cfg.obs_seq_len - 1
        pos = net.pos_emb[:, start: start + net.chunk_size]
        layers = []
        for l, L in enumerate(self.layers):
            (w1f, b1f, w2f, s1, s2), gates = self.selection(i, l)
            layers.append((L["ln1_g"], L["wqkv"], L["bqkv"], L["qg"], L["kg"], L["wproj"], L["ln2_g"],
                           w1f, b1f, w2f, gates, s1, s2))
        return (ctx, t.noise_emb[i], t.c_in[i], t.c_skip[i], t.c_out[i], net.action_emb.weight, pos, net.ln.g,
                net.out.weight, net.out.bias, layers, cfg.n_heads, cfg.norm_eps, cfg.residual == "reference",
                self.attention, self.int8_kernel, self.gemm)

    def denoise_step(self, i: int, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """D(x; sigma_i): ``fused_denoise`` with the (compiled) layer function, or the whole-step function
        with DDIM ratio 0 when the step is one compiled / Triton function."""
        if self.whole_step:
            return self.advance(i, x, ctx, torch.zeros_like(self.cached.table.ratio[i]))
        return fused_denoise(x, *self.step_args(i, ctx), layer=self._fn)

    def advance(self, i: int, x: torch.Tensor, ctx: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """``fused_step`` (D and the DDIM update with ``ratio``) for step i in one (compiled) call."""
        a = self.step_args(i, ctx)
        return self._step(x, *a[:5], ratio, *a[5:])

    def sample(self, x_T: torch.Tensor, goal: torch.Tensor, obs=None, state=None, return_trajectory: bool = False,
               guide=None):
        """``CachedSampler.sample`` with the fused layers: the same ``sampling.ddim_loop``; a whole-step
        function advances x in one call unless a ``guide`` needs D itself."""
        self.ensure()
        t = self.cached.table
        ctx = self.net.context_tokens(goal, obs, state)
        if self.gemm == "triton":
            tk.set_pdl(self.pdl)   # module-wide launch option: set by the sampler that launches
        advance = (lambda i, x: self.advance(i, x, ctx, t.ratio[i])) if self.whole_step else None
        return ddim_loop(lambda i, x: self.denoise_step(i, x, ctx), x_T, t.ratio, advance=advance, guide=guide,
                         return_trajectory=return_trajectory)
