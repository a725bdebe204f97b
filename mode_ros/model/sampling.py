"""Noise schedules, training noise densities and the DDIM sampler (reference ``sample_ddim``)."""
from __future__ import annotations

import math

import torch

from .config import DiffusionConfig


def exponential_schedule(n: int, sigma_min: float, sigma_max: float, dtype=torch.float64) -> torch.Tensor:
    """sigma_i = exp(linspace(ln sigma_max, ln sigma_min, n)), with 0 appended: n+1 values."""
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([s, s.new_zeros(1)]).to(dtype)


def karras_schedule(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype=torch.float64):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)]).to(dtype)


def make_schedule(cfg: DiffusionConfig, num_steps: int | None = None, dtype=torch.float32) -> torch.Tensor:
    n = cfg.num_steps if num_steps is None else num_steps
    fn = exponential_schedule if cfg.schedule == "exponential" else karras_schedule
    return fn(n, cfg.sigma_min, cfg.sigma_max).to(dtype)


def sample_training_sigmas(cfg: DiffusionConfig, n: int, generator: torch.Generator | None = None,
                           device=None) -> torch.Tensor:
    """Truncated log-logistic (loc ln sigma_data, scale 0.5) by inverse CDF in float64, or log-uniform."""
    lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    if cfg.train_density == "loguniform":
        log_sigma = lo + u * (hi - lo)
    else:
        loc = math.log(cfg.sigma_data) if cfg.loglogistic_loc is None else cfg.loglogistic_loc
        scale = cfg.loglogistic_scale
        cdf = lambda z: 1.0 / (1.0 + math.exp(-(z - loc) / scale))  # noqa: E731
        a, b = cdf(lo), cdf(hi)
        u = a + u * (b - a)
        log_sigma = loc + scale * (u.log() - (-u).log1p())
    return log_sigma.exp().to(torch.float32 if device is None else torch.float32).to(device)


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """x_{i+1} = D_i + (sigma_{i+1}/sigma_i)(x_i - D_i); ratio 0 at the last step gives x = D exactly."""
    return denoised + ratio * (x - denoised)


@torch.no_grad()
def sample_ddim(denoise_fn, x_T: torch.Tensor, sigmas: torch.Tensor, return_trajectory: bool = False):
    """Plain DDIM loop: ``denoise_fn(x, sigma_scalar_tensor)`` -> D. sigmas has the trailing 0."""
    x = x_T
    traj_x, traj_d = [], []
    for i in range(len(sigmas) - 1):
        d = denoise_fn(x, sigmas[i])
        if return_trajectory:
            traj_x.append(x)
            traj_d.append(d)
        x = ddim_step(x, d, sigmas[i + 1] / sigmas[i])
    if return_trajectory:
        return x, torch.stack(traj_x), torch.stack(traj_d)
    return x
