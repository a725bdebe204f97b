"""Transformer building blocks of the MoDE denoiser: RMSNorm, causal attention with qk-norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = g * x / max(rms(x), eps) — the reference clamps the RMS, it does not add eps inside the sqrt."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * (x.shape[-1] ** -0.5)
        return self.g * (x / rms.clamp_min(self.eps))


class CausalSelfAttention(nn.Module):
    """Q, K, V with bias, per-head RMSNorm on Q and K (gain shared across heads), output proj without bias."""

    def __init__(self, dim: int, n_heads: int, attn_pdrop: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.query = nn.Linear(dim, dim, bias=True)
        self.key = nn.Linear(dim, dim, bias=True)
        self.value = nn.Linear(dim, dim, bias=True)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.attn_pdrop = attn_pdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.query(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))
