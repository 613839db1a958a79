"""Image-quality metrics shared by validation, ``test.py`` and the scripts.

Conventions: images are numpy arrays of shape (H, W, 3), RGB, uint8 in [0, 255] unless stated otherwise
(the per-image functions also accept float arrays holding values in [0, 255], which is what the
reference's validation loop feeds them). Every function returns a python ``float``.

Evaluation protocol of the reference (paper's public code, ``compare/full_ref.py`` + the Lightning
module's test loop), reproduced here:

* PSNR: ``skimage.metrics.peak_signal_noise_ratio`` with ``data_range=255``.
* SSIM: ``skimage.metrics.structural_similarity`` defaults (7x7 uniform window, sample covariance,
  K1=0.01, K2=0.03), channels on axis 2, ``data_range=255``, mean over the three channels.
* grey SSIM: OpenCV ``cvtColor(img, COLOR_RGB2GRAY)`` (:func:`rgb_to_gray` reproduces it bit-exactly),
  then SSIM. Quirk: the reference passes the 2-D grey image with ``multichannel=True``, which
  scikit-image (0.17 to 0.22; the reference pins 0.19.3) treats as "last axis = channels": its grey SSIM
  is the mean over image *columns* of a 1-D SSIM along each column (7-tap window, covariance
  normalised by 7/6). ``ssim_gray(..., columnwise=True)`` reproduces that; the default is the 2-D SSIM.
* LPIPS: LPIPS-AlexNet (:func:`utils.lpips.build_lpips`) on inputs ``x / 127.5 - 1`` in [-1, 1].
* Quirk 6: the test loop re-reads both PNGs with a BGR channel swap before every metric. The swap does
  not change PSNR or SSIM (channel order is irrelevant to them), but the grey conversion then weights
  B by 0.299 and R by 0.114, and LPIPS sees BGR input. ``image_metrics(..., reference_protocol=True)``
  applies the swap (and the column-wise grey SSIM). The reference also truncates its outputs to uint8 where
  this project rounds: :func:`quantize_output`.
* Model selection: :func:`combined_score`.
* One scoring path: validation, ``test.py`` and the benchmarks all score their (output, ground truth) pairs with
  :func:`score_pairs` (quantisation + :func:`image_metrics`) and average them with :func:`mean_scores`.
* Geometry. FS: the input is reflect-padded to a multiple of 32 and the output cropped back, so the full
  images are scored. TS (``data.test_geometry: center_crop``): input and ground truth are centre-cropped to
  multiples of 32 and only the crop is scored (LOL 600x400 -> 576x384); :func:`center_crop_boxes`, with the
  reference's two rounding rules under ``reference_protocol``.

``utils`` must not import ``models`` or ``data``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from utils.lpips import lpips_defined

DATA_RANGE = 255.0
SSIM_MIN_SIZE = 7
"""SSIM's 7x7 window (scikit-image's default) needs images of at least 7x7 pixels."""
# OpenCV (4.x) COLOR_RGB2GRAY on 8-bit images: 15-bit fixed point, round half up. Verified against
# opencv-python-headless 4.10.0.84 (the reference's version) on all 2**24 colours.
_GRAY_SHIFT = 15
_GRAY_COEFFS_U8 = (9798, 19235, 3735)  # R, G, B; sum 2**15
# OpenCV's float path (and KinD/LLFlow/GSAD's GT-mean): 0.299 R + 0.587 G + 0.114 B in float32.
_GRAY_COEFFS_F = (0.299, 0.587, 0.114)

__all__ = [
    "center_crop_boxes",
    "combined_score",
    "gt_mean_correct",
    "image_metrics",
    "lpips_distance",
    "mean_scores",
    "psnr",
    "quantize_output",
    "rgb_to_gray",
    "score_pair",
    "score_pairs",
    "ssim",
    "ssim_gray",
    "to_uint8",
]


def _check_pair(out: np.ndarray, gt: np.ndarray) -> None:
    if out.shape != gt.shape:
        raise ValueError(f"output and ground truth shapes differ: {out.shape} vs {gt.shape}")
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) images, got shape {out.shape}")


Box = tuple[int, int, int, int]
"""A region: (top, left, height, width) in pixels."""


def center_crop_boxes(height: int, width: int, multiple: int, reference_protocol: bool = False) -> tuple[Box, Box]:
    """The TS reference's test geometry: (input box, ground-truth box) of the centred crop whose sides are
    ``height`` and ``width`` floored to multiples of ``multiple`` (LOL 600x400, multiple 32: 576x384 at top 8,
    left 12), both (top, left, height, width).

    The reference crops the input with torchvision's ``CenterCrop`` (offset ``round(margin / 2)``, halves to
    even) but the ground truth in its metric with floor offsets (``margin // 2``): the two differ by one pixel
    where a margin is 3 mod 4 (its quirk 15). ``reference_protocol=True`` reproduces that; otherwise both
    boxes use the floor offsets, so output and ground truth cover the same pixels.
    """
    crop_h, crop_w = height // multiple * multiple, width // multiple * multiple
    if crop_h == 0 or crop_w == 0:
        raise ValueError(f"a {width}x{height} image has no centred crop of multiples of {multiple} pixels")
    gt_box = ((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)
    if not reference_protocol:
        return gt_box, gt_box
    input_box = (round((height - crop_h) / 2), round((width - crop_w) / 2), crop_h, crop_w)
    return input_box, gt_box


def to_uint8(img: np.ndarray | torch.Tensor, mode: str = "round") -> np.ndarray:
    """Float image in [0, 1] -> uint8 in [0, 255].

    Values are clipped to [0, 1] and multiplied by 255 in the input's own float precision (float32 stays
    float32, as in the reference), then ``mode="round"`` rounds half up (``floor(x * 255 + 0.5)``) and
    ``mode="truncate"`` drops the fraction (``(x * 255).astype(uint8)``, what the reference does before
    writing PNGs). Numpy arrays keep their layout; torch tensors are taken as channel-first, (C, H, W) or
    (N, C, H, W), and returned channel-last, (H, W, C) or (N, H, W, C).
    """
    if mode not in ("round", "truncate"):
        raise ValueError(f"mode must be 'round' or 'truncate', got {mode!r}")
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if not t.is_floating_point():
            raise TypeError(f"to_uint8 expects a float tensor, got {t.dtype}")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        if t.ndim in (3, 4):
            t = t.movedim(-3, -1)
        arr = t.numpy()
    else:
        arr = np.asarray(img)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"to_uint8 expects a float array, got {arr.dtype}")
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
    scale = arr.dtype.type(255)
    x = np.clip(arr, 0, 1) * scale
    if mode == "round":
        x = np.floor(x + arr.dtype.type(0.5))
    return x.astype(np.uint8)


def rgb_to_gray(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) grey exactly as OpenCV's ``cvtColor(img, COLOR_RGB2GRAY)``.

    uint8 input gives uint8 (fixed point ``(9798 R + 19235 G + 3735 B + 2**14) >> 15``); float input
    gives float32 ``0.299 R + 0.587 G + 0.114 B`` (same value range as the input)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    if img.dtype == np.uint8:
        c = img.astype(np.int32)
        r, g, b = _GRAY_COEFFS_U8
        y = (c[..., 0] * r + c[..., 1] * g + c[..., 2] * b + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT
        return y.astype(np.uint8)
    f = img.astype(np.float32, copy=False)
    r, g, b = (np.float32(v) for v in _GRAY_COEFFS_F)
    return f[..., 0] * r + f[..., 1] * g + f[..., 2] * b


def psnr(out: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB between two (H, W, 3) images in [0, 255] (``data_range=255``); ``inf`` if identical."""
    _check_pair(out, gt)
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(gt, out, data_range=DATA_RANGE))


def ssim(out: np.ndarray, gt: np.ndarray) -> float:
    """Mean SSIM over the three channels (scikit-image defaults: 7x7 uniform window, sample covariance),
    ``channel_axis=2``, ``data_range=255``. In [-1, 1], 1 for identical images."""
    _check_pair(out, gt)
    return float(structural_similarity(gt, out, channel_axis=2, data_range=DATA_RANGE))


def ssim_gray(out: np.ndarray, gt: np.ndarray, *, columnwise: bool = False) -> float:
    """SSIM of the grey images (:func:`rgb_to_gray`, OpenCV's RGB->grey), ``data_range=255``.

    ``columnwise=False``: the ordinary 2-D SSIM (7x7 uniform window). ``columnwise=True``: what the
    reference actually computes (2-D grey image passed with ``multichannel=True``): the mean over the W
    columns of a 1-D SSIM (7-tap window) along each column. The inputs are taken as given (RGB); for the
    reference's BGR-swapped variant pass ``img[..., ::-1]`` or use :func:`image_metrics`."""
    _check_pair(out, gt)
    g_out, g_gt = rgb_to_gray(out), rgb_to_gray(gt)
    if columnwise:
        return float(structural_similarity(g_gt, g_out, channel_axis=1, data_range=DATA_RANGE))
    return float(structural_similarity(g_gt, g_out, data_range=DATA_RANGE))


def _to_lpips_input(img: np.ndarray, device: torch.device, unscaled: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    t = t / 255.0 if unscaled else t / 127.5 - 1.0
    return t.to(device)


@torch.no_grad()
def lpips_distance(
    out: np.ndarray, gt: np.ndarray, model: torch.nn.Module, *, unscaled: bool = False
) -> float:
    """LPIPS distance between two (H, W, 3) images in [0, 255] (uint8, RGB; lower is better).

    ``model`` is an ``lpips.LPIPS`` from :func:`utils.lpips.build_lpips` (AlexNet for the reference's
    metric). Inputs go in as (1, 3, H, W) float32 ``x / 127.5 - 1`` in [-1, 1], on the model's device.
    ``unscaled=True`` feeds ``x / 255`` in [0, 1] instead (reference validation quirk 5)."""
    _check_pair(out, gt)
    device = next(model.parameters()).device
    d = model(_to_lpips_input(gt, device, unscaled), _to_lpips_input(out, device, unscaled))
    return float(d.reshape(-1)[0].item())


def gt_mean_correct(out: np.ndarray, gt: np.ndarray, mode: str = "truncate") -> np.ndarray:
    """Rescale the output's brightness so that its mean grey level matches the ground truth's.

    The "GT-mean" protocol of KinD's ``evaluate_LOLdataset.py`` as used by LLFlow and GSAD: both images
    go to float [0, 1] (``x / 255``); grey = 0.299 R + 0.587 G + 0.114 B (float32, OpenCV's float
    conversion); ratio = mean(grey(gt)) / mean(grey(out)); all three channels of the *output* are
    multiplied by ratio (a single gain on the sRGB-encoded pixel values, no linearisation), clipped to
    [0, 1] and converted back with :func:`to_uint8` (``mode="truncate"`` as those scripts do). The
    ground truth is not changed. Clipping and quantisation make the means match only approximately.
    An all-black output (mean 0) cannot be rescaled and is returned unchanged.

    Args: out, gt: (H, W, 3) uint8 RGB. Returns: (H, W, 3) uint8 RGB, the corrected output.
    """
    _check_pair(out, gt)
    out_f = np.asarray(out, dtype=np.float64) / 255.0
    gt_f = np.asarray(gt, dtype=np.float64) / 255.0
    mean_out = rgb_to_gray(out_f).mean()
    mean_gt = rgb_to_gray(gt_f).mean()
    if mean_out <= 0:
        return np.array(out, dtype=np.uint8, copy=True)
    return to_uint8(np.clip(out_f * (mean_gt / mean_out), 0.0, 1.0), mode=mode)


def combined_score(psnr: float, ssim: float, lpips: float) -> float:
    """The reference's model-selection score: ``0.8 * (1 - lpips) + 0.1 * ssim + 0.1 * psnr``
    (higher is better; PSNR in dB dominates)."""
    return 0.8 * (1.0 - lpips) + 0.1 * ssim + 0.1 * psnr


def image_metrics(
    out_u8: np.ndarray,
    gt_u8: np.ndarray,
    lpips_model: torch.nn.Module | None = None,
    reference_protocol: bool = False,
) -> dict[str, Any]:
    """All per-image metrics of one (output, ground truth) pair of (H, W, 3) uint8 RGB images.

    Returns ``{"psnr", "ssim", "ssim_gray", "lpips", "psnr_gt_mean", "ssim_gt_mean"}`` as floats. A metric is
    None where it is undefined, never an error: ``lpips`` without a model or on an image smaller than its
    network's input (:func:`utils.lpips.lpips_defined`: 31x31 pixels for AlexNet), the SSIMs on an image
    smaller than their 7x7 window. ``reference_protocol=True`` reproduces the reference's test loop:
    both images channel-swapped to BGR before the grey SSIM (computed column-wise, see
    :func:`ssim_gray`) and LPIPS. PSNR, SSIM and the GT-mean metrics do not depend on the flag (channel
    order does not matter to them; the GT-mean grey weights follow the peers' own BGR reading, which is
    the standard RGB weighting)."""
    for name, img in (("out_u8", out_u8), ("gt_u8", gt_u8)):
        if img.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8, got {img.dtype}")
    _check_pair(out_u8, gt_u8)
    if reference_protocol:
        out_c, gt_c = out_u8[..., ::-1], gt_u8[..., ::-1]
    else:
        out_c, gt_c = out_u8, gt_u8
    corrected = gt_mean_correct(out_u8, gt_u8)
    height, width = out_u8.shape[:2]
    has_ssim = min(height, width) >= SSIM_MIN_SIZE
    has_lpips = lpips_model is not None and lpips_defined(lpips_model, height, width)
    return {
        "psnr": psnr(out_u8, gt_u8),
        "ssim": ssim(out_u8, gt_u8) if has_ssim else None,
        "ssim_gray": ssim_gray(out_c, gt_c, columnwise=reference_protocol) if has_ssim else None,
        "lpips": lpips_distance(out_c, gt_c, lpips_model) if has_lpips else None,
        "psnr_gt_mean": psnr(corrected, gt_u8),
        "ssim_gt_mean": ssim(corrected, gt_u8) if has_ssim else None,
    }


METRICS = ("psnr", "ssim", "ssim_gray", "lpips", "psnr_gt_mean", "ssim_gt_mean")
"""The per-image metrics :func:`image_metrics` and :func:`score_pair` report, in report order."""

ImageLike = np.ndarray | torch.Tensor
"""A float image in [0, 1], (3, H, W) tensor or (H, W, 3) array, or an (H, W, 3) uint8 array."""


def quantize_output(img: ImageLike, reference_protocol: bool = False) -> np.ndarray:
    """An image as it is saved and scored: (H, W, 3) uint8, rounded (:func:`to_uint8`), or truncated as the
    reference writes its outputs with ``reference_protocol``. A uint8 array is returned as it is."""
    if isinstance(img, np.ndarray) and img.dtype == np.uint8:
        return img
    return to_uint8(img, mode="truncate" if reference_protocol else "round")


def score_pair(out: ImageLike, gt: ImageLike, lpips_model: torch.nn.Module | None = None, *,
               reference_protocol: bool = False) -> dict[str, float | None]:
    """The project's metrics (:data:`METRICS`) of one (output, ground truth) pair: the output quantised by
    :func:`quantize_output` (truncated under ``reference_protocol``), the ground truth rounded (so an 8-bit file
    read as float gives back its own bytes), then :func:`image_metrics` with the same protocol."""
    return image_metrics(quantize_output(out, reference_protocol), quantize_output(gt), lpips_model,
                         reference_protocol)


def score_pairs(pairs: Iterable[tuple[ImageLike, ImageLike]], lpips_model: torch.nn.Module | None = None, *,
                reference_protocol: bool = False) -> list[dict[str, float | None]]:
    """:func:`score_pair` of every (output, ground truth) pair: what validation, ``test.py`` and the benchmarks
    score, so that they report the same numbers for the same images."""
    return [score_pair(out, gt, lpips_model, reference_protocol=reference_protocol) for out, gt in pairs]


def mean_scores(rows: Sequence[Mapping[str, float | None]], keys: Sequence[str] = METRICS
                ) -> dict[str, float | None]:
    """The mean over images of each metric in ``keys``; None where it is undefined (None) on any image, since a
    mean over only some of the images would not be comparable. (Validation leaves the averaging to Lightning,
    which also reduces over DDP ranks, and averages only the images where a metric is defined: the two differ only
    when a set mixes images smaller than a metric's window with larger ones.)"""
    means: dict[str, float | None] = {}
    for key in keys:
        values = [row[key] for row in rows]
        means[key] = float(np.mean(values)) if values and None not in values else None
    return means
