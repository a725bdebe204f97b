"""Fused cached sampler for GPUs: fewer, larger kernels per denoising step.

Built on the routing table of ``CachedSampler`` (same routing, same math):
  * Q, K and V of each layer in one GEMM (weights concatenated once per cache build);
  * the k selected experts of each (layer, step) in one up-projection and one down-projection GEMM:
    fused weights are built only for the DISTINCT expert sets that occur in the table (the reference
    copied two experts for every (sigma, layer) pair), and the gates scale the SwiGLU hidden state;
  * optionally one ``torch.compile``d layer function (weights are arguments, so a single compilation
    serves every layer and step; Inductor fuses the RMSNorms, SiLU·v and residual adds).
The result is a fixed kernel sequence that ``mode_ros.model.graph.ChunkGraph`` captures whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .expert_cache import CachedSampler
from .sampling import ddim_step


def _rms(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)
    return (g * (x.float() / rms)).to(x.dtype)


def fused_layer(h, c, ln1_g, wqkv, bqkv, qg, kg, wproj, ln2_g, w1f, b1f, w2f, gates,
                n_heads: int, eps: float, reference_residual: bool, manual_attention: bool = False):
    b, t, d = h.shape
    hd = d // n_heads
    u = _rms(h, ln1_g, eps) + c
    q, k, v = F.linear(u, wqkv, bqkv).split(d, dim=-1)
    q = _rms(q.view(b, t, n_heads, hd), qg, eps).transpose(1, 2)
    k = _rms(k.view(b, t, n_heads, hd), kg, eps).transpose(1, 2)
    v = v.view(b, t, n_heads, hd).transpose(1, 2)
    if manual_attention:  # T is ~14 tokens: plain math fuses better than an SDPA kernel launch
        scores = (q.float() @ k.float().transpose(-1, -2)) * (hd ** -0.5)
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        a = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v
    else:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = h + F.linear(a.transpose(1, 2).reshape(b, t, d), wproj)
    y = _rms(h, ln2_g, eps)
    z = F.linear(y, w1f, b1f)                        # (b, t, k * 2H): [v_1, g_1, v_2, g_2, …]
    kk = gates.shape[0]
    z = z.view(b, t, kk, 2, -1)
    hid = z[..., 0, :] * F.silu(z[..., 1, :]) * gates.view(1, 1, kk, 1)
    out = F.linear(hid.reshape(b, t, -1), w2f)
    return (y if reference_residual else h) + out


def fused_step(x, ctx, c, c_in, c_skip, c_out, ratio, action_w, action_pos, lnf_g, out_w, out_b,
               layers, n_heads: int, eps: float, reference_residual: bool, manual_attention: bool):
    """One DDIM step (denoise + update) as one function of tensors: compiled once for all steps."""
    b = x.shape[0]
    cc = c.expand(b, 1, -1)
    a_in = (x * c_in).to(ctx.dtype)
    h = torch.cat([cc, ctx, F.linear(a_in, action_w) + action_pos], dim=1)
    for L in layers:
        h = fused_layer(h, cc, *L, n_heads=n_heads, eps=eps, reference_residual=reference_residual,
                        manual_attention=manual_attention)
    k = action_pos.shape[1]
    f = F.linear(_rms(h[:, -k:], lnf_g, eps), out_w, out_b).float()
    d = c_skip * x + c_out * f
    return d + ratio * (x - d)


class FusedSampler:
    """Drop-in replacement of ``CachedSampler.sample`` (same table, fused kernels)."""

    def __init__(self, cached: CachedSampler, compile: bool = False, whole_step: bool | None = None):
        self.cached = cached
        self.net = cached.net
        self.compile = compile
        self.whole_step = compile if whole_step is None else whole_step
        self._key = None
        self._fn = fused_layer
        self._step = fused_step
        if compile:
            import torch._dynamo
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._fn = torch.compile(fused_layer, dynamic=False, fullgraph=True)
            self._step = torch.compile(fused_step, dynamic=False, fullgraph=True)

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
        # fused expert weights, one per distinct (layer, expert tuple) in the routing table
        self.experts: dict[tuple, tuple] = {}
        for s in range(len(t.indices)):
            for l, sel in enumerate(t.indices[s]):
                key = (l, tuple(sel))
                if key in self.experts:
                    continue
                moe = net.blocks[l].moe
                self.experts[key] = (torch.cat([moe.w1[e] for e in sel]).contiguous(),
                                     torch.cat([moe.b1[e] for e in sel]).contiguous(),
                                     torch.cat([moe.w2[e] for e in sel], dim=1).contiguous())
        self._key = t.key

    def extra_parameters(self) -> int:
        """Parameters held in fused copies (memory cost of the fusion)."""
        if self._key is None:
            self.build()
        n = sum(w.numel() + b.numel() + w2.numel() for w, b, w2 in self.experts.values())
        return n + sum(L["wqkv"].numel() + L["bqkv"].numel() for L in self.layers)

    def ensure(self) -> None:
        t = self.cached.ensure()
        if self._key != t.key:
            self.build()

    def denoise_step(self, i: int, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        net, t = self.net, self.cached.table
        b = x.shape[0]
        c = t.noise_emb[i].expand(b, 1, -1)
        a_in = (x * t.c_in[i]).to(ctx.dtype)
        h = torch.cat([c, ctx, net.action_tokens(a_in)], dim=1)
        cfg = net.cfg
        ref = cfg.residual == "reference"
        for l, L in enumerate(self.layers):
            w1f, b1f, w2f = self.experts[(l, t.indices[i][l])]
            h = self._fn(h, c, L["ln1_g"], L["wqkv"], L["bqkv"], L["qg"], L["kg"], L["wproj"], L["ln2_g"],
                         w1f, b1f, w2f, t.gates[i, l], cfg.n_heads, cfg.norm_eps, ref)
        f = net.head(h).float()
        return t.c_skip[i] * x + t.c_out[i] * f

    def sample(self, x_T: torch.Tensor, goal: torch.Tensor, obs=None, state=None, return_trajectory: bool = False):
        self.ensure()
        t = self.cached.table
        net = self.net
        ctx = net.context_tokens(goal, obs, state)
        x = x_T
        if not self.whole_step:
            for i in range(len(t.indices)):
                x = ddim_step(x, self.denoise_step(i, x, ctx), t.ratio[i])
            return x
        cfg = net.cfg
        start = cfg.goal_seq_len + cfg.obs_seq_len - 1
        pos = net.pos_emb[:, start: start + net.chunk_size]
        for i in range(len(t.indices)):
            layers = []
            for l, L in enumerate(self.layers):
                w1f, b1f, w2f = self.experts[(l, t.indices[i][l])]
                layers.append((L["ln1_g"], L["wqkv"], L["bqkv"], L["qg"], L["kg"], L["wproj"], L["ln2_g"],
                               w1f, b1f, w2f, t.gates[i, l]))
            x = self._step(x, ctx, t.noise_emb[i], t.c_in[i], t.c_skip[i], t.c_out[i], t.ratio[i],
                           net.action_emb.weight, pos, net.ln.g, net.out.weight, net.out.bias, layers,
                           cfg.n_heads, cfg.norm_eps, cfg.residual == "reference", self.compile)
        return x
