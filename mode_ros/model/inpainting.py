"""Real-time chunking (MODE_SPEC Appendix C): the next chunk as an inpainting problem.

While a chunk is computed, the robot keeps executing the previous plan. ``ChunkPrefix`` carries the
previous plan's rows that overlap the new chunk (already shifted to its time base: row j of
``actions`` is what the previous plan says for row j of the new chunk), how many of them will run
before the new chunk lands (``fixed`` = d) and how to impose them (``method``):

* ``"replace"`` — at every denoising step the known rows, noised to the current sigma, replace the
  sample over the soft mask W; the frozen rows (j < d) of the output are the previous plan exactly;
* ``"guidance"`` — the denoised estimate is pulled toward the previous plan over W by a
  vector-Jacobian product through the denoiser (Black et al. 2025, arXiv 2506.07339, transposed to
  EDM/DDIM), with the step weight clipped at ``guidance_max``; frozen rows are also copied exactly.

``prefix_weights`` gives W: 1 for j < d, decaying to 0 over the overlap d <= j < n, 0 for j >= n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .denoiser import EDMPrecond

METHODS = ("replace", "guidance")
DECAYS = ("exp", "linear", "hard")


class PrefixError(ValueError):
    """A ChunkPrefix that does not fit the policy (shape, values, method)."""


@dataclass(frozen=True)
class ChunkPrefix:
    """The previous plan over the new chunk's first rows, in robot units.

    actions: (n, A) float, n <= chunk_size — the previous plan's actions for rows 0..n-1 of the new chunk.
    fixed: d — rows that execute (from the previous plan) before the new chunk lands; 0 <= d <= n.
    method: "replace" (inpainting at every step) or "guidance" (pull of the denoised estimate).
    decay: weights over the overlap rows d <= j < n: "exp" (Black et al.), "linear", or "hard" (0).
    guidance_max: clip of the guidance step weight (beta in Black et al.; only for "guidance").
    """
    actions: np.ndarray
    fixed: int
    method: str = "replace"
    decay: str = "exp"
    guidance_max: float = 5.0

    def __post_init__(self):
        a = np.asarray(self.actions, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise PrefixError(f"ChunkPrefix.actions: expected shape (n, action_dim) with n >= 1, got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise PrefixError("ChunkPrefix.actions contains NaN or Inf")
        object.__setattr__(self, "actions", a)
        if isinstance(self.fixed, bool) or not isinstance(self.fixed, (int, np.integer)):
            raise PrefixError(f"ChunkPrefix.fixed: expected an int, got {self.fixed!r}")
        if not 0 <= int(self.fixed) <= a.shape[0]:
            raise PrefixError(f"ChunkPrefix.fixed: {self.fixed} not in [0, n={a.shape[0]}] (rows of actions)")
        object.__setattr__(self, "fixed", int(self.fixed))
        if self.method not in METHODS:
            raise PrefixError(f"ChunkPrefix.method: {self.method!r} is not one of {METHODS}")
        if self.decay not in DECAYS:
            raise PrefixError(f"ChunkPrefix.decay: {self.decay!r} is not one of {DECAYS}")
        if not (math.isfinite(self.guidance_max) and self.guidance_max >= 0):
            raise PrefixError(f"ChunkPrefix.guidance_max: expected a finite value >= 0, got {self.guidance_max}")

    @property
    def rows(self) -> int:
        """n: rows of the new chunk the previous plan covers."""
        return self.actions.shape[0]

    def check(self, chunk_size: int, action_dim: int) -> "ChunkPrefix":
        """Raise PrefixError unless the prefix fits a policy with this chunk size and action dimension."""
        n, a = self.actions.shape
        if a != action_dim:
            raise PrefixError(f"ChunkPrefix.actions: {a} action dims, the policy has {action_dim}")
        if n > chunk_size:
            raise PrefixError(f"ChunkPrefix.actions: {n} rows, more than the chunk size {chunk_size}")
        return self

    def weights(self, chunk_size: int) -> np.ndarray:
        """W for this prefix over a chunk of ``chunk_size`` rows (see ``prefix_weights``)."""
        return prefix_weights(self.rows, self.fixed, chunk_size, self.decay)


def prefix_weights(n: int, fixed: int, chunk_size: int, decay: str = "exp") -> np.ndarray:
    """Per-row weights W (chunk_size,) float32: 1 for j < fixed, decaying toward 0 for fixed <= j < n,
    0 for j >= n. "exp": c = (n - j) / (n - fixed + 1), W = c (e^c - 1) / (e - 1) (Black et al. 2025);
    "linear": W = c; "hard": W = 0 over the overlap."""
    if not 0 <= fixed <= n <= chunk_size:
        raise PrefixError(f"prefix weights: need 0 <= fixed ({fixed}) <= n ({n}) <= chunk_size ({chunk_size})")
    if decay not in DECAYS:
        raise PrefixError(f"prefix weights: decay {decay!r} is not one of {DECAYS}")
    w = np.zeros(chunk_size, np.float64)
    w[:fixed] = 1.0
    j = np.arange(fixed, n)
    c = (n - j) / (n - fixed + 1)
    if decay == "exp":
        w[fixed:n] = c * np.expm1(c) / math.expm1(1.0)
    elif decay == "linear":
        w[fixed:n] = c
    return w.astype(np.float32)


class PrefixGuide:
    """Real-time chunking's per-step correction for ``sampling.ddim_loop`` (``guide(i, x, denoise) ->
    (x, D)``), in normalised action units, on any sampler whose ``denoise(i, x)`` is D(x; sigma_i).

    known: (B, K, A) the previous plan (rows beyond a prefix: anything, their weight is 0);
    weights: (B, K) W; noise: (B, K, A) the sample's initial noise, reused as the known rows' noise
    (DDIM is deterministic: the known rows follow one noise direction, like the sample itself);
    sigmas: (S + 1,) the schedule. method "replace": x <- W (known + sigma_i noise) + (1 - W) x, then D;
    ``clean`` (a prefix-trained checkpoint, ``DiffusionConfig.prefix_prob`` > 0): the frozen rows (W = 1)
    are then given as the model was trained to read them, clean (``EDMPrecond.clean_input``);
    "guidance": D + w_i J^T (W (known - D)) with J = dD/dx (one vector-Jacobian product through the
    denoiser) and w_i = min(guidance_max, (sigma_i^2 + sigma_data^2) / sigma_data^2) — PiGDM's
    1 / r_sigma^2 in D units, clipped as in Black et al. 2025 (their beta)."""

    def __init__(self, method: str, known, weights, noise, sigmas, sigma_data: float, guidance_max: float = 5.0,
                 clean: bool = False):
        if method not in METHODS:
            raise PrefixError(f"method {method!r} is not one of {METHODS}")
        self.method, self.clean = method, bool(clean)
        self.precond = EDMPrecond(float(sigma_data))
        self.needs_grad = method == "guidance"   # a VJP through the denoiser: eager, differentiable paths
        self.known = known.float()
        self.w = weights.float().unsqueeze(-1)
        self.frozen = self.w >= 1
        self.noise = noise.float()
        self.sigmas = sigmas.float()
        sd2 = float(sigma_data) ** 2
        self.step_weight = ((self.sigmas ** 2 + sd2) / sd2).clamp(max=float(guidance_max))

    def __call__(self, i: int, x, denoise):
        if self.method == "replace":
            x = self.w * (self.known + self.sigmas[i] * self.noise) + (1 - self.w) * x
        if self.clean:
            x = torch.where(self.frozen, self.precond.clean_input(self.known, self.sigmas[i]), x)
        if self.method == "replace":
            return x, denoise(i, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = denoise(i, xg)
            (g,) = torch.autograd.grad(d, xg, grad_outputs=self.w * (self.known - d.detach()))
        return x, d.detach() + self.step_weight[i] * g


def prefix_guide(prefixes, normalize, noise, sigmas, sigma_data: float, clean: bool = False) -> PrefixGuide | None:
    """The guide for a batch: ``prefixes`` one ChunkPrefix or None per sample (None everywhere: no
    guide, the plain sampler); ``normalize`` maps robot units to the model's (numpy); ``noise``
    (B, K, A) the initial noise; ``clean``: the model is prefix-trained (``PrefixGuide``). Prefixes of
    one batch share method and guidance_max."""
    b, k, a = noise.shape
    if len(prefixes) != b:
        raise PrefixError(f"{len(prefixes)} prefixes for a batch of {b}")
    given = [p for p in prefixes if p is not None]
    if not given:
        return None
    if len({(p.method, p.guidance_max) for p in given}) > 1:
        raise PrefixError("the prefixes of one batch must share method and guidance_max")
    known = np.zeros((b, k, a), np.float32)
    w = np.zeros((b, k), np.float32)
    for j, p in enumerate(prefixes):
        if p is not None:
            p.check(k, a)
            known[j, :p.rows] = normalize(p.actions)
            w[j] = p.weights(k)
    dev = noise.device
    return PrefixGuide(given[0].method, torch.from_numpy(known).to(dev), torch.from_numpy(w).to(dev), noise,
                       sigmas.to(dev), sigma_data, given[0].guidance_max, clean)


__all__ = ["ChunkPrefix", "PrefixError", "PrefixGuide", "prefix_guide", "prefix_weights", "METHODS", "DECAYS"]
