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


def sample_prefix_rows(cfg: DiffusionConfig, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Training-time prefix conditioning: per sample, how many leading rows are given clean — 0 with
    probability 1 - prefix_prob, else uniform in prefix_min_rows..prefix_max_rows. None when the config
    has none."""
    if not cfg.prefix_trained:
        return None
    rows = torch.randint(cfg.prefix_min_rows, cfg.prefix_max_rows + 1, (n,), generator=generator)
    given = torch.rand(n, generator=generator) < cfg.prefix_prob
    return torch.where(given, rows, torch.zeros_like(rows))


def edm_denoise(x: torch.Tensor, network, c_in, c_skip, c_out) -> torch.Tensor:
    """THE EDM denoiser: D(x; sigma) = c_skip·x + c_out·F(c_in·x), with ``network(a_in) -> F`` the
    network at this sigma (plain forward, cached-routing body, fused or compiled layers)."""
    return c_skip * x + c_out * network(x * c_in)


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """x_{i+1} = D_i + (sigma_{i+1}/sigma_i)(x_i - D_i); ratio 0 at the last step gives x = D exactly."""
    return denoised + ratio * (x - denoised)


def ddim_loop(denoise, x_T: torch.Tensor, ratios: torch.Tensor, advance=None, guide=None,
              return_trajectory: bool = False):
    """THE DDIM loop (every sampler runs it). ``denoise(i, x) -> D(x; sigma_i)``; ``ratios[i] =
    sigma_{i+1}/sigma_i``. ``advance(i, x)``: the same step fused into one function (a compiled or
    Triton whole step: ``ddim_step(x, denoise(i, x), ratios[i])`` computed at once), used when given
    and no ``guide`` is. ``guide(i, x, denoise) -> (x, D)``: real-time chunking's per-step correction
    (``mode_ros.model.inpainting``: the sample inpainted, or D guided, toward a known prefix)."""
    x = x_T
    xs, ds = [], []
    for i in range(len(ratios)):
        if guide is None and advance is not None and not return_trajectory:
            x = advance(i, x)
            continue
        x, d = guide(i, x, denoise) if guide is not None else (x, denoise(i, x))
        if return_trajectory:
            xs.append(x)
            ds.append(d)
        x = ddim_step(x, d, ratios[i])
    if return_trajectory:
        return x, torch.stack(xs), torch.stack(ds)
    return x


@torch.no_grad()
def sample_ddim(denoise_fn, x_T: torch.Tensor, sigmas: torch.Tensor, return_trajectory: bool = False,
                guide=None):
    """Plain DDIM: ``denoise_fn(x, sigma_scalar_tensor)`` -> D. sigmas has the trailing 0."""
    return ddim_loop(lambda i, x: denoise_fn(x, sigmas[i]), x_T, sigmas[1:] / sigmas[:-1], guide=guide,
                     return_trajectory=return_trajectory)
