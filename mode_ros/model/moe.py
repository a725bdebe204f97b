"""Noise-conditioned mixture of SwiGLU experts (reference ``RouterCond`` + ``Mlp(SwishGLU)``).

The router sees only the noise embedding c(sigma). Expert weights are stored stacked
(``w1: [E, 2*H, d]``, ``b1: [E, 2*H]``, ``w2: [E, d, H]``) so that (a) training evaluates all
experts in one batched matmul and masks by the gates (no data-dependent shapes, no host syncs) and
(b) the cached sampler takes plain views ``w1[e]`` of the selected experts (no weight copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NoiseRouter(nn.Module):
    """Linear(d->2d) -> exact GELU -> Linear(2d->E); softmax of max-shifted logits / tau, clamped."""

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, num_experts)
        self.temperature = temperature
        for lin in (self.fc1, self.fc2):  # reference CondRouterMLP init
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def logits(self, c: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dtype: compute in this dtype (e.g. float32 routing of a bf16 model) without copying the module."""
        w = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        return F.linear(F.gelu(F.linear(c, w(self.fc1.weight), w(self.fc1.bias))), w(self.fc2.weight), w(self.fc2.bias))

    def probs(self, c: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        logits = self.logits(c, dtype)
        shifted = (logits - logits.amax(dim=-1, keepdim=True)) / self.temperature
        return shifted.softmax(dim=-1).clamp(1e-9, 1.0 - 1e-9)

    def route(self, c: torch.Tensor, k: int, rows: int | None = None, dtype: torch.dtype | None = None):
        """THE routing function (training, plain eval, the cached sampler's table, exporters all call it).
        c: noise embeddings (…, d). rows None: deterministic top-k (inference), idx/gates (…, k);
        rows n: training — k experts drawn without replacement independently for each of n token rows,
        idx/gates (…, n, k). Returns (idx, gates, probs (…, E))."""
        p = self.probs(c, dtype)
        if rows is None:
            idx, g = topk_gates(p, k)
        else:
            idx, g = sampled_gates(p.unsqueeze(-2).expand(*p.shape[:-1], rows, p.shape[-1]), k)
        return idx, g, p


def topk_gates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic top-k with renormalised gates (eval/inference). Returns (indices, gates)."""
    p, idx = probs.topk(k, dim=-1)
    return idx, p / p.sum(dim=-1, keepdim=True)


def sampled_gates(probs: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Training routing: k experts drawn without replacement, independently for every row."""
    flat = probs.reshape(-1, probs.shape[-1])
    idx = torch.multinomial(flat, k, replacement=False, generator=generator)
    p = flat.gather(-1, idx)
    g = p / p.sum(dim=-1, keepdim=True)
    return idx.view(*probs.shape[:-1], k), g.view(*probs.shape[:-1], k)


def dense_gates(idx: torch.Tensor, gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter (…, k) selections into a (…, E) gate matrix (zeros for unselected experts)."""
    out = torch.zeros(*idx.shape[:-1], num_experts, dtype=gates.dtype, device=gates.device)
    return out.scatter(-1, idx, gates)


def load_balance_loss(gate_matrix: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Reference LB loss: E * sum_i mean_t(g_ti) * frac_t(i selected); minimum k. gate_matrix: (N, E)."""
    g = gate_matrix.reshape(-1, num_experts)
    frac = (g > 0).to(g.dtype).mean(dim=0).detach()
    return num_experts * (g.mean(dim=0) * frac).sum()


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts: h = v * SiLU(gate), [v; gate] = W1 y + b1; out = W2 h (no bias)."""

    def __init__(self, dim: int, num_experts: int, hidden: int, pdrop: float = 0.0):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.dropout = nn.Dropout(pdrop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyTorch's nn.Linear default per expert (kaiming_uniform a=sqrt(5), uniform bias)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.w1[e], a=5 ** 0.5)
            bound = 1 / self.w1.shape[-1] ** 0.5
            nn.init.uniform_(self.b1[e], -bound, bound)
            nn.init.kaiming_uniform_(self.w2[e], a=5 ** 0.5)

    def expert(self, y: torch.Tensor, e: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """One expert on all rows of y, with its weights as views (no copy). Optional gate scale on h."""
        z = F.linear(y, self.w1[e], self.b1[e])
        v, g = z.chunk(2, dim=-1)
        h = v * F.silu(g)
        if scale is not None:
            h = h * scale
        return F.linear(self.dropout(h), self.w2[e])

    def forward_dense(self, y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """All experts on all rows, mixed by a (…, E) gate matrix. y: (B, T, d), gates: (B, T, E)."""
        z = torch.einsum("btd,efd->btef", y, self.w1) + self.b1
        v, g = z.chunk(2, dim=-1)
        h = v * F.silu(g) * gates.unsqueeze(-1)
        return torch.einsum("bteh,edh->btd", self.dropout(h), self.w2)

    def forward_selected(self, y: torch.Tensor, experts, scales) -> torch.Tensor:
        """Only the listed experts (Python ints) with per-expert scales (0-d or broadcastable tensors)."""
        out = None
        for e, s in zip(experts, scales):
            o = self.expert(y, e, s)
            out = o if out is None else out + o
        return out
