"""Samplers for the anchored reverse process, diffusers-style: ``set_timesteps`` then ``step``, which returns a
:class:`SamplerStep`.

The caller owns the loop (see :func:`models.inference.sample`): it runs the UNet to get x0_hat at each of the
sampler's ``timesteps`` and asks the sampler for x at the next one. :class:`AnchorSampler` has no timesteps: its
output is the anchor itself, the fast preview and what a model without a trained noise predictor runs.

DDPM and DDIM work in the coordinates z = x - s of :meth:`GaussianDiffusion.anchor_shift` (s = c' with DRDS,
else 0), in which the DRDS posterior is the plain DDPM posterior. DDIM is derived from that posterior: it is the
family of processes whose marginals are those the posterior implies, z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,
so eta = 1 over all timesteps is exactly the DDPM sampler, for every combination of the ablation switches. With
DRDA and DRDS both on (the paper) or both off, these are also the marginals of the trained forward process, so DDIM
over any subsequence of timesteps is exact. The ablations that switch only one of them train on one forward process
and sample with the posterior of another by design (as the reference does); DDIM then follows the posterior, like
DDPM.

Settings are validated where they enter, in the config (:func:`utils.config.check_sampler`); the samplers only
refuse what they cannot compute (ValueError).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from models.diffusion import GaussianDiffusion

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""Standard-normal noise shaped like its argument, for one stochastic sampler step (instead of :func:`noise_like`)."""


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard-normal noise shaped like ``x``, on its device, drawn from ``generator`` (on the generator's device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def sampler_timesteps(name: str, total: int, steps: int) -> list[int]:
    """The timesteps a sampler ``name`` runs the UNet at, from T - 1 down, for a diffusion of ``total`` timesteps:
    none for ``anchor``, all for ``ddpm``, ``steps`` evenly spaced ones (rounded half to even) for ``ddim``."""
    if name == "anchor":
        return []
    if name == "ddpm" or steps == total:
        return list(range(total - 1, -1, -1))
    if steps == 1:
        return [total - 1]
    return torch.linspace(total - 1, 0, steps, dtype=torch.float64).round().long().tolist()


@dataclass
class SamplerStep:
    """What one reverse step returns, as diffusers' scheduler outputs: x at the next timestep and the x0_hat it
    was computed from, both (B, 3, H, W) residuals in about [-1, 1]."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class Sampler(Protocol):
    """A reverse-process sampler: ``timesteps`` (after :meth:`set_timesteps`) are where the UNet runs, from T - 1
    down; :meth:`step` maps x_t to x at the next of them."""

    timesteps: list[int]

    def set_timesteps(self, steps: int) -> None: ...

    def draws_noise(self, t: int) -> bool:
        """Whether :meth:`step` at timestep t adds noise."""

    def step(self, x0_hat: torch.Tensor, t: int, x_t: torch.Tensor, anchor: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> SamplerStep: ...


class _Timesteps:
    """The timestep bookkeeping the samplers share: ``timesteps`` set by :meth:`set_timesteps` (a step before it
    is refused) and each one's successor (-1 after the last)."""

    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion
        self.timesteps: list[int] = []
        self._previous: dict[int, int] = {}

    def _set(self, timesteps: list[int]) -> None:
        self.timesteps = timesteps
        self._previous = dict(zip(timesteps, [*timesteps[1:], -1], strict=False))

    def _check_steps(self, steps: int) -> None:
        total = self.diffusion.num_timesteps
        if not 1 <= steps <= total:
            raise ValueError(f"{type(self).__name__}: steps must be in [1, {total}], got {steps}")

    def _next(self, t: int) -> int:
        if t not in self._previous:
            raise RuntimeError(f"{type(self).__name__}.step({t}): call set_timesteps first (timesteps: "
                               f"{self.timesteps or 'not set'})")
        return self._previous[t]


class AnchorSampler(_Timesteps):
    """No reverse steps: the output is the anchor c itself (clamped to [0, 1])."""

    def set_timesteps(self, steps: int) -> None:
        self._set([])

    def draws_noise(self, t: int) -> bool:
        return False

    def step(self, x0_hat: torch.Tensor, t: int, x_t: torch.Tensor, anchor: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> SamplerStep:
        raise RuntimeError("AnchorSampler has no reverse steps: its output is the anchor")


class DDPMSampler(_Timesteps):
    """The paper's sampler (DRDS): every timestep, x_{t-1} = posterior mean + [t > 0] sigma_t z."""

    def set_timesteps(self, steps: int) -> None:
        """DDPM runs every timestep: ``steps`` must be T."""
        self._check_steps(steps)
        if steps != self.diffusion.num_timesteps:
            raise ValueError(f"DDPMSampler runs all {self.diffusion.num_timesteps} timesteps, got steps={steps}; "
                             "the ddim sampler runs fewer")
        self._set(sampler_timesteps("ddpm", steps, steps))

    def draws_noise(self, t: int) -> bool:
        """Every step but the last."""
        return t > 0

    def step(self, x0_hat: torch.Tensor, t: int, x_t: torch.Tensor, anchor: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> SamplerStep:
        """x_t (B, 3, H, W) at timestep t -> x_{t-1}, given the (clipped) prediction x0_hat.

        ``noise``: the standard-normal z to add (shaped like x_t); drawn from ``generator`` when None.
        """
        self._next(t)
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        mean, _, log_variance = self.diffusion.q_posterior(x0_hat, x_t, t_batch, anchor)
        if not self.draws_noise(t):
            return SamplerStep(mean, x0_hat)
        z = noise if noise is not None else noise_like(x_t, generator)
        return SamplerStep(mean + (0.5 * log_variance).exp() * z, x0_hat)


class DDIMSampler(_Timesteps):
    """DDIM in the anchor-shifted coordinates over ``steps`` evenly spaced timesteps.

    ``eta = 0`` is deterministic; ``eta = 1`` over all timesteps is the DDPM/DRDS posterior exactly.
    """

    def __init__(self, diffusion: GaussianDiffusion, eta: float = 0.0):
        super().__init__(diffusion)
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"DDIMSampler: eta must be a finite number >= 0, got {eta}")
        self.eta = eta

    def set_timesteps(self, steps: int) -> None:
        self._check_steps(steps)
        self._set(sampler_timesteps("ddim", self.diffusion.num_timesteps, steps))

    def draws_noise(self, t: int) -> bool:
        """eta > 0, every step but the last."""
        return self.eta > 0 and self._next(t) >= 0

    def step(self, x0_hat: torch.Tensor, t: int, x_t: torch.Tensor, anchor: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> SamplerStep:
        """x_t at timestep t -> x at the next timestep of the subsequence (x0_hat after the last).

        ``noise``: the standard-normal z to add (shaped like x_t); drawn from ``generator`` when None.
        """
        s = self._next(t)
        abar_t, abar_s = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(s)
        shift = self.diffusion.anchor_shift(anchor)
        z_t, z0 = x_t - shift, x0_hat - shift
        eps = (z_t - abar_t.sqrt() * z0) / (1 - abar_t).sqrt()
        sigma = self.eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
        z_s = abar_s.sqrt() * z0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if self.draws_noise(t):
            z_s = z_s + sigma * (noise if noise is not None else noise_like(x_t, generator))
        return SamplerStep(z_s + shift, x0_hat)


def make_sampler(diffusion: GaussianDiffusion, name: str, steps: int, eta: float = 0.0) -> Sampler:
    """A sampler by name (:data:`utils.choices.SamplerName`) with its timesteps set."""
    samplers: dict[str, Callable[[], Sampler]] = {
        "anchor": lambda: AnchorSampler(diffusion),
        "ddpm": lambda: DDPMSampler(diffusion),
        "ddim": lambda: DDIMSampler(diffusion, eta=eta),
    }
    if name not in samplers:
        raise ValueError(f"unknown sampler '{name}'; valid: {', '.join(samplers)}")
    sampler = samplers[name]()
    sampler.set_timesteps(steps)
    return sampler
