"""Samplers for the anchored reverse process, diffusers-style: ``set_timesteps`` then ``step``.

The caller owns the loop (see :func:`models.inference.sample`): it runs the UNet to get x0_hat at each
timestep and asks the sampler for x at the next one.

Both samplers work in the coordinates z = x - s of :meth:`GaussianDiffusion.anchor_shift` (s = c' with DRDS,
``use_center_sampler``, else 0), in which the DRDS posterior is the plain DDPM posterior. DDIM is derived from that
posterior: it is the family of processes whose marginals are those the posterior implies,
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, so eta = 1 over all timesteps is exactly the DDPM sampler, for every
combination of the ablation switches. With DRDA and DRDS both on (the paper) or both off, these are also the
marginals of the trained forward process, so DDIM over any subsequence of timesteps is exact. The ablations that
switch only one of them train on one forward process and sample with the posterior of another by design (as the
reference does); DDIM then follows the posterior, like DDPM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.diffusion import GaussianDiffusion
from utils.config import SamplerConfig, check_sampler

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""Standard-normal noise shaped like its argument, for one stochastic sampler step (instead of :func:`noise_like`)."""


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard-normal noise shaped like ``x``, on its device, drawn from ``generator`` (on the generator's device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDPMSampler:
    """The paper's sampler (DRDS): every timestep, x_{t-1} = posterior mean + [t > 0] sigma_t z."""

    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion
        self.timesteps = list(range(diffusion.num_timesteps - 1, -1, -1))

    def set_timesteps(self, steps: int) -> None:
        check_sampler(SamplerConfig("ddpm", steps), self.diffusion.num_timesteps, prefix="")

    def draws_noise(self, t: int) -> bool:
        """Whether :meth:`step` at timestep t adds noise (every step but the last)."""
        return t > 0

    def step(self, x0_hat: torch.Tensor, t: int, x_t: torch.Tensor, center: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, 3, H, W) at timestep t -> x_{t-1}, given the (clipped) prediction x0_hat.

        ``noise``: the standard-normal z to add (shaped like x_t); drawn from ``generator`` when None.
        """
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        mean, _, log_variance = self.diffusion.q_posterior(x0_hat, x_t, t_batch, center)
        if not self.draws_noise(t):
            return mean
        z = noise if noise is not None else noise_like(x_t, generator)
        return mean + (0.5 * log_variance).exp() * z


class DDIMSampler:
    """DDIM in the anchor-shifted coordinates over ``steps`` evenly spaced timesteps.

    ``eta = 0`` is deterministic; ``eta = 1`` over all timesteps is the DDPM/DRDS posterior exactly.
    """

    def __init__(self, diffusion: GaussianDiffusion, eta: float = 0.0):
        self.diffusion = diffusion
        self.eta = eta
        self.set_timesteps(diffusion.num_timesteps)

    def set_timesteps(self, steps: int) -> None:
        total = self.diffusion.num_timesteps
        check_sampler(SamplerConfig("ddim", steps, self.eta), total, prefix="")
        if steps == 1:
            self.timesteps = [total - 1]
        else:
            self.timesteps = torch.linspace(total - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        self._previous = dict(zip(self.timesteps, self.timesteps[1:] + [-1], strict=True))

    def draws_noise(self, t: int) -> bool:
        """Whether :meth:`step` at timestep t adds noise (eta > 0, every step but the last)."""
        return self.eta > 0 and self._previous[t] >= 0

    def step(self, x0_hat: torch.Tensor, t: int, x_t: torch.Tensor, center: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t at timestep t -> x at the next timestep of the subsequence (x0_hat after the last).

        ``noise``: the standard-normal z to add (shaped like x_t); drawn from ``generator`` when None.
        """
        s = self._previous[t]
        abar_t = self.diffusion.alphas_cumprod[t]
        abar_s = self.diffusion.alphas_cumprod[s] if s >= 0 else abar_t.new_tensor(1.0)
        shift = self.diffusion.anchor_shift(center)
        z_t, z0 = x_t - shift, x0_hat - shift
        eps = (z_t - abar_t.sqrt() * z0) / (1 - abar_t).sqrt()
        sigma = self.eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
        z_s = abar_s.sqrt() * z0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if self.draws_noise(t):
            z_s = z_s + sigma * (noise if noise is not None else noise_like(x_t, generator))
        return z_s + shift


def make_sampler(diffusion: GaussianDiffusion, name: str, steps: int, eta: float = 0.0
                 ) -> DDPMSampler | DDIMSampler | None:
    """Build a sampler by name with its timesteps set; None for ``anchor`` (no diffusion steps: the output is
    the anchor itself). The name and settings are checked by :func:`utils.config.check_sampler` (ConfigError; the
    names are :data:`utils.config.SamplerName`)."""
    check_sampler(SamplerConfig(name, steps, eta), diffusion.num_timesteps, prefix="")
    if name == "anchor":
        return None
    sampler = DDPMSampler(diffusion) if name == "ddpm" else DDIMSampler(diffusion, eta=eta)
    sampler.set_timesteps(steps)
    return sampler
