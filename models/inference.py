"""The one inference path: low-light image in, enhanced image out (test.py, test_unpaired.py, demo, bench).

:func:`enhance` pads the image (:mod:`models.padding`) or tiles it (:mod:`models.tiling`), computes the
anchor (:func:`encode`) and runs the reverse process (:func:`sample`) with a sampler of models/samplers.py.
Speed (each switchable, measured by ``bench/speed.py``): the model prepared once
(:func:`models.preparation.prepare_for_inference`), ``torch.inference_mode``, bf16/fp16 autocast of the two
networks (:mod:`models.precision`; the sampler's arithmetic stays float32) and few-step sampling, ``ddim``
(exact in the anchor-shifted coordinates, see models/samplers.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from models.anchor import AnchorEncoder, HENetwork, anchor_from_features, condition_features
from models.detail import transfer_detail
from models.diffusion import GaussianDiffusion
from models.padding import PaddedImage, pad_to_multiple
from models.precision import precision_context
from models.samplers import NoiseFn, Sampler, noise_like
from models.tiling import check_tile, enhance_tiled


@dataclass
class Enhanced:
    """Result of :func:`enhance`: both (B, 3, H, W) in [0, 1] at the input's size."""

    image: torch.Tensor
    anchor: torch.Tensor


def _grad_free(inference_mode: bool) -> contextlib.AbstractContextManager:
    return torch.inference_mode() if inference_mode else torch.no_grad()


# --------------------------------------------------------------------------------------------- sampling
def encode(encoder: AnchorEncoder, features: torch.Tensor, precision: str = "fp32",
           he_network: HENetwork | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The anchor on precomputed condition features (B, 12, H, W) (see
    :func:`models.anchor.condition_features`) -> (anchor (B, 3, H, W) float32, about [0, 1]; feature maps),
    computed by :func:`models.anchor.anchor_from_features` (with the TS variant's HE network when given) with
    the networks autocast to ``precision``.

    Equals the module's ``anchor(img)`` for ``features = condition_features(img)``; tiling crops the features
    of the whole image instead of recomputing them (histogram equalisation is image-global).
    """
    return anchor_from_features(encoder, features, he_network, lambda: precision_context(precision, features.device))


def sample(
    diffusion: GaussianDiffusion,
    sampler: Sampler,
    img_lr: torch.Tensor,
    anchor: torch.Tensor,
    feats: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    noise_fn: NoiseFn | None = None,
    inference_mode: bool = True,
) -> torch.Tensor:
    """Reverse process from x_T over the sampler's timesteps. Returns the image of the last step's x0_hat
    (:meth:`GaussianDiffusion.decode`), (B, 3, H, W) in [0, 1]; a sampler without timesteps (``anchor``) returns
    the anchor clamped to [0, 1].

    x_T is :meth:`GaussianDiffusion.sampling_start`: the anchor c' with DRDS as the reference, or noisy.
    ``callback(i, n)`` is called after each of the n steps (progress bars; once for the anchor). The noise of
    x_T and of stochastic steps comes from ``noise_fn`` when given, else from ``generator``. ``precision``
    autocasts the UNet only.
    """
    if not sampler.timesteps:
        if callback is not None:
            callback(1, 1)
        return anchor.clamp(0, 1)
    with _grad_free(inference_mode):
        start_noise = None
        if diffusion.start_draws_noise:
            start_noise = noise_fn(anchor) if noise_fn is not None else noise_like(anchor, generator)
        x = diffusion.sampling_start(anchor, start_noise)
        x0_hat = x
        batch = img_lr.shape[0]
        for i, t in enumerate(sampler.timesteps):
            t_batch = torch.full((batch,), t, device=img_lr.device, dtype=torch.long)
            with precision_context(precision, img_lr.device):
                _, x0_hat = diffusion.predict_start(x, t_batch, img_lr, list(feats), anchor)
            x0_hat = x0_hat.float()
            noise = noise_fn(x) if noise_fn is not None and sampler.draws_noise(t) else None
            x = sampler.step(x0_hat, t, x, anchor, generator=generator, noise=noise).prev_sample
            if callback is not None:
                callback(i + 1, len(sampler.timesteps))
        return diffusion.decode(x0_hat, img_lr, anchor)


# --------------------------------------------------------------------------------------------- enhancing
class AnchorNetworks(NamedTuple):
    """What computes the anchor (:func:`encode`): the encoder, and the TS variant's HE network or None."""

    encoder: AnchorEncoder
    he_network: HENetwork | None = None


def _enhance_full(anchor_networks: AnchorNetworks, diffusion: GaussianDiffusion, sampler: Sampler,
                  img: torch.Tensor, features: torch.Tensor, *, precision: str, generator: torch.Generator | None,
                  noise_fn: NoiseFn | None, callback: Callable[[int, int], None] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor then the reverse process on one (padded) image or tile -> (image in [0, 1], raw anchor)."""
    anchor, feats = encode(anchor_networks.encoder, features, precision, anchor_networks.he_network)
    image = sample(diffusion, sampler, img, anchor, feats, generator=generator, callback=callback,
                   precision=precision, noise_fn=noise_fn, inference_mode=torch.is_inference_mode_enabled())
    return image, anchor


def enhance(
    encoder: AnchorEncoder,
    diffusion: GaussianDiffusion,
    img_lr: torch.Tensor,
    *,
    sampler: Sampler,
    pad_multiple: int = 32,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    tile: int | None = None,
    tile_overlap: int = 64,
    inference_mode: bool = True,
    he_network: HENetwork | None = None,
    detail: str = "model",
) -> Enhanced:
    """Enhance (B, 3, H, W) low-light images in [0, 1] of any size (padded, then cropped back) with ``sampler``
    (:func:`models.samplers.make_sampler`).

    ``he_network``: the TS variant's HE network H, which the anchor then includes (see
    :func:`models.anchor.anchor_from_features`). ``detail="input"``: the image's fine detail and, where it is
    lit, its colours come from the input, re-exposed by the model (:func:`models.detail.transfer_detail`, on
    the whole image after tiling); ``"model"``: the network's pixels as they are.

    ``precision``: fp32 | bf16 | fp16 autocast of the networks. ``tile``: run on overlapping tiles of this
    size (a multiple of ``pad_multiple``), blended over ``tile_overlap`` px, for bounded memory (see
    :mod:`models.tiling` and :func:`models.tiling.auto_tile`); None runs the whole image at once.

    Memory beyond the networks' when tiled: the blended image and anchor sums, which become the results in
    place, and the blending weights' sum, 7 floats a pixel (670 MB for 24 megapixels), besides the input
    itself; the image is never padded (:class:`models.padding.PaddedImage`) and the whole image's features never
    exist (:func:`models.tiling.tile_features`).
    """
    if tile is not None:
        check_tile(tile, tile_overlap, pad_multiple)
    height, width = img_lr.shape[-2:]
    with _grad_free(inference_mode):
        anchor_networks = AnchorNetworks(encoder, he_network)
        if tile is None:
            padded = pad_to_multiple(img_lr, pad_multiple)
            image, anchor = _enhance_full(anchor_networks, diffusion, sampler, padded, condition_features(padded),
                                          precision=precision, generator=generator, noise_fn=None,
                                          callback=callback)
        else:
            enhance_tile = functools.partial(_enhance_full, anchor_networks, diffusion, sampler,
                                             precision=precision, generator=None)
            steps_per_tile = max(1, len(sampler.timesteps))  # the anchor sampler reports one step
            image, anchor = enhance_tiled(PaddedImage(img_lr, pad_multiple), enhance_tile, tile=tile,
                                          overlap=tile_overlap, steps=steps_per_tile, generator=generator,
                                          callback=callback)
        image = image[..., :height, :width]
        if detail == "input":
            image = transfer_detail(img_lr, image)
        return Enhanced(image=image, anchor=anchor.clamp_(0, 1)[..., :height, :width])
