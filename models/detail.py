"""Detail transfer: the photo's own detail and colours, re-exposed by the model (``sampler.detail: input``).

A small regression network brightens and cleans a dark photo well but comes out soft, and it slightly
repaints photos that needed no help. NIQE on real photos punishes both. Instead of the network's
pixels, this final step keeps the *input's* pixels wherever they can be trusted, and uses the network for
what it knows: how much each region should be brightened, and what to do where the input is only noise.
With x the input and y the model's output (both sRGB in [0, 1]), Y the Rec. 709 luma and lin() the sRGB
decoding:

1. the model's local exposure change, in linear light: ``G = blur(Y(lin y)) / (blur(Y(lin x)) + eps)``
   (Gaussian, :attr:`DetailTransfer.gain_sigma` px);
2. the input re-exposed by it: ``r = srgb(G lin x)``: the input's detail and colour ratios at the model's
   brightness;
3. the input's detail that the model removed, less the noise: ``d = soft(HP(Y r) - HP(Y y), k sigma)``, where
   HP is a high-pass (input minus a :attr:`DetailTransfer.detail_sigma` px Gaussian blur), ``soft`` the soft
   threshold and sigma the image's noise level (median absolute HP(Y r) / 0.6745, the wavelet-denoising
   estimate): texture and edges above the noise come back, the amplified noise stays out;
4. the lit weight ``w``: a ramp of the blurred input luma from :attr:`DetailTransfer.lit_range`'s low end (0:
   too dark to trust) to its high end (1: lit);
5. ``out = w r + (1 - w) clamp(y + d)``: a well-lit photo keeps its own pixels (re-exposed as the model chose),
   a dark one is the model's output with the input's detail added back.

On the 25 held-out LOL pairs (inputs mostly below the ramp) this leaves PSNR / SSIM / LPIPS where they were and
on real photos it lowers NIQE and the colour shift of well-lit photos (README, "Real photos"). The three-channel
work runs in row chunks (the re-exposed input is recomputed in the last pass rather than kept whole), the rest
on single-channel maps: a 24-megapixel photo needed 0.8 GB more, its result included (measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.brightness import LUMA_WEIGHTS, linear_to_srgb, row_chunks, srgb_to_linear

NOISE_SAMPLE_STRIDE = 2
"""The noise level's median is taken over every second pixel of every second row."""


@dataclass(frozen=True)
class DetailTransfer:
    """Parameters of :func:`transfer_detail` (chosen on the held-out LOL pairs and ``real-dark``, README)."""

    gain_sigma: float = 16.0
    """Gaussian sigma (px) of the exposure map: how local the model's brightening is allowed to be."""
    detail_sigma: float = 1.5
    """Gaussian sigma (px) of the high-pass that defines detail."""
    noise_k: float = 2.0
    """Soft threshold in noise levels: detail below ``noise_k`` sigma is taken for noise."""
    lit_sigma: float = 8.0
    """Gaussian sigma (px) of the input luma that decides where the input is lit."""
    lit_range: tuple[float, float] = (0.05, 0.25)
    """Blurred input luma (sRGB, 0-1) at which the weight of the re-exposed input ramps from 0 to 1."""
    eps: float = 1e-3
    """Keeps the exposure map finite on black input."""


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with replicated borders (truncated at 4 sigma), in row chunks:
    convolving a whole 24-megapixel map at once took 1.7 GB of temporary memory."""
    radius = max(1, math.ceil(4 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=img.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(img.dtype)
    channels, height = img.shape[1], img.shape[-2]
    across = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    down = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    horizontal = torch.empty_like(img)
    for rows in row_chunks(img):
        horizontal[..., rows, :] = F.conv2d(F.pad(img[..., rows, :], (radius, radius, 0, 0), mode="replicate"),
                                            across, groups=channels)
    out = torch.empty_like(img)
    for rows in row_chunks(img):
        halo = torch.arange(rows.start - radius, min(rows.stop, height) + radius, device=img.device)
        out[..., rows, :] = F.conv2d(horizontal.index_select(-2, halo.clamp_(0, height - 1)), down, groups=channels)
    return out


def luma(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Rec. 709 luma."""
    weights = img.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (img * weights).sum(dim=1, keepdim=True)


def _reexposed(img: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """sRGB ``img`` times ``gain`` (B, 1, H, W) in linear light, back in sRGB."""
    return linear_to_srgb(srgb_to_linear(img) * gain)


def _high_pass(img: torch.Tensor, sigma: float) -> torch.Tensor:
    return img - gaussian_blur(img, sigma)


def noise_level(detail: torch.Tensor) -> torch.Tensor:
    """(B,) robust noise sigma of high-pass maps (B, 1, H, W): median absolute value / 0.6745."""
    sample = detail[..., ::NOISE_SAMPLE_STRIDE, ::NOISE_SAMPLE_STRIDE].abs().flatten(1)
    return sample.median(dim=1).values / 0.6745


def transfer_detail(img_lr: torch.Tensor, enhanced: torch.Tensor,
                    params: DetailTransfer = DetailTransfer()) -> torch.Tensor:
    """The input's detail and colours re-exposed by the model (module docstring). ``img_lr`` and ``enhanced``:
    (B, 3, H, W) sRGB in [0, 1], the same size. Returns a new (B, 3, H, W) tensor in [0, 1]."""
    if img_lr.shape != enhanced.shape:
        raise ValueError(f"input and output differ in shape: {tuple(img_lr.shape)} vs {tuple(enhanced.shape)}")
    img_lr, enhanced = img_lr.float(), enhanced.float()
    # luma maps (B, 1, H, W): linear-light input and output (the exposure), sRGB input (lit) and output (detail)
    y_in_linear, y_out_linear, y_in, y_out = (torch.empty_like(img_lr[:, :1]) for _ in range(4))
    for rows in row_chunks(img_lr):
        y_in_linear[..., rows, :] = luma(srgb_to_linear(img_lr[..., rows, :]))
        y_out_linear[..., rows, :] = luma(srgb_to_linear(enhanced[..., rows, :]))
        y_in[..., rows, :] = luma(img_lr[..., rows, :])
        y_out[..., rows, :] = luma(enhanced[..., rows, :])
    gain = gaussian_blur(y_out_linear, params.gain_sigma)
    gain.div_(gaussian_blur(y_in_linear, params.gain_sigma).add_(params.eps))
    del y_in_linear, y_out_linear
    lit = gaussian_blur(y_in, params.lit_sigma)
    del y_in
    low, high = params.lit_range
    lit = lit.sub_(low).div_(high - low).clamp_(0, 1)
    y_reexposed = torch.empty_like(gain)
    for rows in row_chunks(img_lr):
        y_reexposed[..., rows, :] = luma(_reexposed(img_lr[..., rows, :], gain[..., rows, :]))
    detail = _high_pass(y_reexposed, params.detail_sigma)
    threshold = (params.noise_k * noise_level(detail)).view(-1, 1, 1, 1)
    del y_reexposed
    detail.sub_(_high_pass(y_out, params.detail_sigma))
    del y_out
    detail = detail.sign() * (detail.abs() - threshold).clamp_(min=0)
    out = torch.empty_like(enhanced)
    for rows in row_chunks(img_lr):
        weight = lit[..., rows, :]
        reexposed = _reexposed(img_lr[..., rows, :], gain[..., rows, :])
        restored = (enhanced[..., rows, :] + detail[..., rows, :]).clamp_(0, 1)
        out[..., rows, :] = weight * reexposed + (1 - weight) * restored
    return out
