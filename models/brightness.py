"""Brightness control: re-expose an enhanced image so that its mean luminance hits a chosen target.

The model picks its own brightness; ``test_unpaired.py --brightness Y`` and the demo's slider let the user pick
instead. ``Y`` is the target *mean luminance* of the output: Rec. 709 luma ``0.2126 R + 0.7152 G + 0.0722 B``
on the sRGB values in [0, 1], averaged over all pixels (:func:`mean_luminance`).

:func:`match_brightness` applies one global exposure gain ``g`` in linear light (sRGB decoded) followed by a
smooth highlight roll-off (:func:`expose`), and solves for ``g`` by bisection so that the output's mean
luminance is as close to the target as the image allows. Why this form:

* a gain in linear light is what a longer or shorter exposure does: colours and contrast ratios are kept;
* the roll-off keeps raising the brightness from blowing the highlights out to flat white: values below the
  knee (linear 0.5 after the gain, sRGB 0.74) are plain exposure, values above it are compressed by a
  Reinhard-like shoulder scaled so that the image's white point ``g`` lands exactly on 1. So a pixel that was
  not white never becomes white (it only gets close), white stays white, and lowering the brightness
  (``g <= 1``) is a plain gain;
* every output pixel is non-decreasing in ``g`` (proved in :func:`expose`), so the mean luminance is
  monotone in ``g``, the bisection converges, and with its fixed bracket and iteration count the result is
  monotone in the target: a higher target never gives a darker pixel.

The gain is solved on at most ``sample_pixels`` pixels (a regular subsample of larger images, exact for
images up to a megapixel) and then applied to the whole image in row chunks, so a 24-megapixel photo needs
little extra memory. Where the target is out of the image's reach (an all-black image cannot be brightened)
the nearest reachable brightness is returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)
"""Rec. 709 luma weights of R, G, B."""
BRIGHTNESS_RANGE = (0.05, 0.95)
"""Valid targets (mean luminance, 0 black to 1 white)."""
KNEE = 0.5
"""Linear-light value above which the highlight roll-off compresses (sRGB ~0.735)."""
LOG2_GAIN_BRACKET = (-16.0, 16.0)
BISECTION_STEPS = 40
SAMPLE_PIXELS = 1 << 20
CHUNK_PIXELS = 1 << 20


def check_target(target: float) -> float:
    """``target`` as a float if it is a number in :data:`BRIGHTNESS_RANGE`, else a ValueError saying so."""
    low, high = BRIGHTNESS_RANGE
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"brightness must be a number in [{low}, {high}], got {target!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"brightness must be in [{low}, {high}] (mean luminance of the output, 0 black to "
                         f"1 white), got {target}")
    return value


def srgb_to_linear(img: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer function's inverse (IEC 61966-2-1), for values in [0, 1]."""
    return torch.where(img <= 0.04045, img / 12.92, ((img + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(img: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer function, for linear values in [0, 1]."""
    img = img.clamp(0, 1)
    return torch.where(img <= 0.0031308, img * 12.92, 1.055 * img ** (1 / 2.4) - 0.055)


def row_chunks(img: torch.Tensor) -> Iterator[slice]:
    """Row slices of (..., H, W) of about :data:`CHUNK_PIXELS` pixels each (bounded temporary memory)."""
    rows = max(1, CHUNK_PIXELS // max(1, img.shape[-1]))
    for top in range(0, img.shape[-2], rows):
        yield slice(top, top + rows)


def mean_luminance(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> (B,) mean Rec. 709 luma (float64 accumulation)."""
    weights = img.new_tensor(LUMA_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    return (img.double() * weights).sum(dim=1).mean(dim=(-2, -1))


def expose(img: torch.Tensor, gain: torch.Tensor | float, knee: float = KNEE) -> torch.Tensor:
    """sRGB ``img`` (B, 3, H, W) exposed by ``gain`` (a float or one per image, (B,)) in linear light with the
    highlight roll-off, back in sRGB.

    With ``y = gain * x`` (x linear): ``y`` itself where ``y <= knee`` or ``gain <= 1``; above the knee
    ``knee + (1 - knee) u / (1 + c u)`` with ``u = (y - knee) / (1 - knee)`` and ``c = 1 - 1 / U``,
    ``U = (gain - knee) / (1 - knee)``: slope 1 at the knee (smooth), 1 at ``x = 1`` (white stays white), below
    1 for every ``x < 1``. Non-decreasing in ``gain`` for every x: the derivative's sign is that of
    ``x (gain - knee)^2 - (gain x - knee)^2``, a concave quadratic in x that is positive at the knee's
    ``x = knee / gain`` and zero at ``x = 1``, hence >= 0 between them.
    """
    gain = torch.as_tensor(gain, dtype=torch.float32, device=img.device).reshape(-1, 1, 1, 1)
    y = srgb_to_linear(img.float()) * gain
    big_u = ((gain - knee) / (1 - knee)).clamp(min=1.0)
    c = 1 - 1 / big_u
    u = ((y - knee) / (1 - knee)).clamp(min=0.0)
    shoulder = knee + (1 - knee) * u / (1 + c * u)
    return linear_to_srgb(torch.where(y > knee, shoulder, y)).to(img.dtype)


def _subsample(img: torch.Tensor, pixels: int) -> torch.Tensor:
    """A regular subsample of at most about ``pixels`` pixels (``img`` itself when it is that small)."""
    height, width = img.shape[-2:]
    stride = max(1, math.ceil(math.sqrt(height * width / pixels)))
    return img[..., ::stride, ::stride]


def solve_gain(img: torch.Tensor, target: float, *, steps: int = BISECTION_STEPS,
               sample_pixels: int = SAMPLE_PIXELS) -> torch.Tensor:
    """(B,) gains with which :func:`expose` gives each image mean luminance ``target``, by bisection on the
    gain's logarithm over a fixed bracket (2^-16 .. 2^16); the bracket's end where the target is out of
    reach."""
    sample = _subsample(img, sample_pixels).float()
    low = torch.full((img.shape[0],), LOG2_GAIN_BRACKET[0], dtype=torch.float64, device=img.device)
    high = torch.full_like(low, LOG2_GAIN_BRACKET[1])
    for _ in range(steps):
        mid = (low + high) / 2
        too_bright = mean_luminance(expose(sample, torch.exp2(mid))) >= target
        high = torch.where(too_bright, mid, high)
        low = torch.where(too_bright, low, mid)
    return torch.exp2((low + high) / 2).float()


def match_brightness(img: torch.Tensor, target: float | None) -> torch.Tensor:
    """``img`` (B, 3, H, W) sRGB in [0, 1] re-exposed so that its mean luminance is ``target`` (see the module
    docstring); ``img`` itself for ``target=None`` (automatic: the model's own brightness). A new tensor,
    filled in row chunks (bounded temporary memory)."""
    if target is None:
        return img
    target = check_target(target)
    gain = solve_gain(img, target)
    out = torch.empty_like(img)
    for rows in row_chunks(img):
        out[..., rows, :] = expose(img[..., rows, :], gain)
    return out
