"""Noise schedules and the anchoring coefficients: small pure functions in float64.

Equation numbers refer to the AnlightenDiff paper. Every schedule returns betas of shape (T,).
"""

from __future__ import annotations

import math
import typing

import torch

from utils.choices import BetaSchedule


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule as the reference computes it: T+1 points on [0, T+1] (end point T+1, not T)."""
    steps = timesteps + 1
    x = torch.linspace(0, steps, steps, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule, rescaled to ``timesteps`` steps."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def beta_schedule(name: str, timesteps: int) -> torch.Tensor:
    """Betas (T,) float64 for a schedule by name."""
    if name == "cosine":
        return cosine_beta_schedule(timesteps)
    if name == "linear":
        return linear_beta_schedule(timesteps)
    raise ValueError(f"unknown beta schedule '{name}'; valid: {', '.join(typing.get_args(BetaSchedule))}")


def drda_coefficient(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """k1_t = (1 - sqrt(abar_t)) / sqrt(1 - abar_t) (Eqs. 12-13).

    DRDA draws eps* ~ N(k1_t c', I) so that the mean of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps*
    moves from x0 (abar = 1) to the anchor c' (abar = 0).
    """
    return (1 - alphas_cumprod.sqrt()) / (1 - alphas_cumprod).sqrt()


def drds_coefficient(
    alphas: torch.Tensor, alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor
) -> torch.Tensor:
    """k2_t, the anchor's weight in the DRDS posterior mean (Eqs. 17-19).

    k2_t = ((1 - sqrt(abar_{t-1}))(1 - alpha_t) - sqrt(alpha_t)(1 - sqrt(alpha_t))(1 - abar_{t-1}))
           / (1 - abar_t), which equals 1 - coef1_t - coef2_t of the standard DDPM posterior.
    """
    numerator = (1 - alphas_cumprod_prev.sqrt()) * (1 - alphas) - alphas.sqrt() * (1 - alphas.sqrt()) * (
        1 - alphas_cumprod_prev
    )
    return numerator / (1 - alphas_cumprod)


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-timestep buffer the diffusion needs, under the official checkpoint's names (float64)."""
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat((alphas_cumprod.new_ones(1), alphas_cumprod[:-1]))
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        "extra_term_coef1": drda_coefficient(alphas_cumprod),
        "extra_term_coef2": drds_coefficient(alphas, alphas_cumprod, alphas_cumprod_prev),
    }


def extract(a: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps t (B,) and reshape to (B, 1, 1, ...) broadcastable to shape."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))
