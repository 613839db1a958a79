"""The one inference path: low-light image in, enhanced image out (test.py, test_unpaired.py, demo, bench)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.anchor import AnchorEncoder
from models.diffusion import GaussianDiffusion
from models.samplers import DDIMSampler, DDPMSampler, make_sampler


@dataclass
class Enhanced:
    """Result of :func:`enhance`: both (B, 3, H, W) in [0, 1] at the input's size."""

    image: torch.Tensor
    anchor: torch.Tensor


def pad_to_multiple(img: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the right/bottom to multiples of ``multiple``: reflection as the reference,
    replication where the image is too small to reflect."""
    height, width = img.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return img
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(img, (0, pad_w, 0, pad_h), mode=mode)


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    sampler: DDPMSampler | DDIMSampler,
    img_lr: torch.Tensor,
    center: torch.Tensor,
    feats: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Reverse process from x_T = c' over the sampler's timesteps. Returns res2img(x0_hat) of the last step.

    ``callback(i, n)`` is called after each of the n steps (progress bars).
    """
    x = diffusion.anchor_shift(center)
    x0_hat = x
    batch = img_lr.shape[0]
    for i, t in enumerate(sampler.timesteps):
        t_batch = torch.full((batch,), t, device=img_lr.device, dtype=torch.long)
        _, x0_hat = diffusion.predict_start(x, t_batch, img_lr, list(feats))
        x = sampler.step(x0_hat, t, x, center, generator=generator)
        if callback is not None:
            callback(i + 1, len(sampler.timesteps))
    return diffusion.res2img(x0_hat, img_lr)


@torch.no_grad()
def enhance(
    encoder: AnchorEncoder,
    diffusion: GaussianDiffusion,
    img_lr: torch.Tensor,
    *,
    sampler: str = "ddpm",
    steps: int = 100,
    eta: float = 0.0,
    pad_multiple: int = 32,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> Enhanced:
    """Enhance (B, 3, H, W) low-light images in [0, 1] of any size (padded, then cropped back)."""
    height, width = img_lr.shape[-2:]
    padded = pad_to_multiple(img_lr, pad_multiple)
    center, feats = encoder(padded)
    steps_sampler = make_sampler(diffusion, sampler, steps, eta)
    image = sample(diffusion, steps_sampler, padded, center, feats, generator=generator, callback=callback)
    return Enhanced(image=image[..., :height, :width], anchor=center[..., :height, :width].clamp(0, 1))
