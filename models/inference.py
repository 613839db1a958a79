"""The one inference path: low-light image in, enhanced image out (test.py, test_unpaired.py, demo, bench).

Speed (each switchable, measured by ``bench/speed.py``):

* :func:`prepare_for_inference` once per model: eval mode, no gradients, weight norm folded into plain
  weights, optionally channels_last and ``torch.compile``, and on CPU the glibc allocator setting of
  :func:`retain_freed_memory`.
* :func:`enhance` runs under ``torch.inference_mode`` and, with ``precision="bf16"``/``"fp16"``, under
  autocast for the two networks (the sampler's arithmetic stays float32).
* Few-step sampling: ``sampler="ddim"`` (exact in the anchor-shifted coordinates, see models/samplers.py).

Large images: ``enhance(..., tile=SIZE)`` runs the whole per-tile pipeline (anchor encoder and every
sampling step) on overlapping tiles and blends the final images and anchors with raised-cosine weights, so
the networks' memory is bounded by the tile size; :func:`auto_tile` chooses whether and how to tile from a
measured memory model (what test_unpaired.py and the demo do by default). What keeps tiled close to untiled:

* every tile gets exactly the untiled network inputs: the 12 condition features of its crop of the padded
  image, equalised with the histogram of the *whole* padded image (:func:`models.anchor.equalization_luts`,
  image-global as untiled) and with the gradient taken across the tile's border (:func:`tile_features`),
  so the whole image's features (48 bytes a pixel) are never held at once;
* stochastic samplers draw, at every step, the noise the untiled run would draw for the whole padded image
  and use the tile's crop of it (each tile restarts from the same generator state), so overlapping tiles
  agree on the noise at every pixel and blending does not average independent noise;
* what still differs is the networks' instance-norm statistics (per tile instead of per image) and the
  receptive field at tile borders, which the blending ramps down-weight.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from models.anchor import AnchorEncoder, HENetwork, anchor_from_features, condition_features, equalization_luts
from models.diffusion import GaussianDiffusion
from models.samplers import DDIMSampler, DDPMSampler, make_sampler, noise_like
from models.unet import UNetBackbone
from utils.config import PRECISIONS, ModelConfig

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""Standard-normal noise shaped like its argument, for one stochastic sampler step."""
Box = tuple[int, int, int, int]
"""A tile: (top, left, height, width) in pixels."""

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAINING = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}


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


# --------------------------------------------------------------------------------------------- preparation
def fold_weight_norm(module: nn.Module) -> int:
    """Replace every weight parametrization (weight norm) below ``module`` by its current value as a plain
    ``weight`` parameter, in place; returns how many were folded.

    Outputs are unchanged up to float rounding (the folded weight is g v / |v| computed once instead of at
    every forward). Irreversible: the state dict then holds ``weight`` instead of g/v, so the module no
    longer saves or loads in the checkpoint format and training would change its parametrization. Fold a
    ``copy.deepcopy`` to keep the original (safe: see :func:`_detach_parametrized_class`).
    """
    folded = 0
    for child in module.modules():
        if parametrize.is_parametrized(child, "weight"):
            _detach_parametrized_class(child)
            parametrize.remove_parametrizations(child, "weight", leave_parametrized=True)
            folded += 1
    return folded


def _detach_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of its parametrized class.

    torch.nn.utils.parametrize injects one class per module and removing a parametrization deletes the
    property from that class, but ``copy.deepcopy`` shares the class between original and copy, so folding
    a copy would break the original's ``weight``.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def retain_freed_memory(enabled: bool = True) -> bool:
    """glibc's allocator, process-wide: serve every allocation from the heap (no mmap per large tensor) and
    keep freed memory for reuse.

    By default glibc maps each large tensor freshly and unmaps it when freed, so every activation of a
    full-image UNet page-faults zeroed memory (several times slower elementwise ops at 600x400 on a 2-core
    CPU, see bench/speed.py). Peak RSS stays about the same; memory is returned by :func:`release_memory`
    or ``enabled=False`` (glibc's default values, though its dynamic mmap threshold stays off once an
    option was set). Returns False (and does nothing) where libc is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    for option, value in (_RETAINING if enabled else _GLIBC_DEFAULTS).items():
        libc.mallopt(option, value)
    if not enabled:
        libc.malloc_trim(0)
    return True


def release_memory() -> None:
    """Return the allocator's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def prepare_for_inference(module: nn.Module, device: torch.device | str = "cpu", *, fold: bool = True,
                          channels_last: bool = False, compile: bool = False,
                          retain_memory: bool = True) -> nn.Module:
    """Make ``module`` (the LightningModule, or any module holding the networks) fast to run; in place.

    Eval mode, no gradients, on ``device``; then, each switchable: ``fold`` weight norm
    (:func:`fold_weight_norm`; irreversible), ``channels_last`` weights, ``compile`` every UNet (anchor
    encoder and noise predictor) with ``torch.compile`` (slow first call per input size), and on CPU
    ``retain_memory`` (:func:`retain_freed_memory`, process-wide). Returns ``module``.
    """
    device = torch.device(device)
    module.eval().requires_grad_(False).to(device)
    if fold:
        fold_weight_norm(module)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        for network in module.modules():
            if isinstance(network, UNetBackbone):
                network.compile()
    if retain_memory and device.type == "cpu":
        retain_freed_memory()
    return module


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively: a CUDA GPU with bf16, or a CPU whose oneDNN has bf16 kernels
    (AVX512-BF16/AMX). Elsewhere bf16 is emulated and far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.mkldnn.is_available() and probe is not None and bool(probe())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32); fp16 needs CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if precision == "bf16" and not bf16_supported(device):
        warnings.warn(f"bf16 is emulated on this {device.type} (no native bf16): expect it to be much slower "
                      "than fp32", stacklevel=2)
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the networks at ``precision`` (a null context for fp32)."""
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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
    sampler: DDPMSampler | DDIMSampler,
    img_lr: torch.Tensor,
    center: torch.Tensor,
    feats: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    noise_fn: NoiseFn | None = None,
    inference_mode: bool = True,
) -> torch.Tensor:
    """Reverse process from x_T over the sampler's timesteps. Returns res2img(x0_hat) of the last step,
    (B, 3, H, W) in [0, 1].

    x_T is the anchor c' with DRDS (``use_center_sampler``), otherwise standard-normal noise, as the reference
    (see :meth:`GaussianDiffusion.sampling_start`). ``callback(i, n)`` is called after each of the n steps
    (progress bars). The noise of x_T and of stochastic steps comes from ``noise_fn`` when given, else from
    ``generator``. ``precision`` autocasts the UNet only.
    """
    with _grad_free(inference_mode):
        start_noise = None
        if not diffusion.use_center_sampler:
            start_noise = noise_fn(center) if noise_fn is not None else noise_like(center, generator)
        x = diffusion.sampling_start(center, start_noise)
        x0_hat = x
        batch = img_lr.shape[0]
        for i, t in enumerate(sampler.timesteps):
            t_batch = torch.full((batch,), t, device=img_lr.device, dtype=torch.long)
            with precision_context(precision, img_lr.device):
                _, x0_hat = diffusion.predict_start(x, t_batch, img_lr, list(feats))
            x0_hat = x0_hat.float()
            noise = noise_fn(x) if noise_fn is not None and sampler.draws_noise(t) else None
            x = sampler.step(x0_hat, t, x, center, generator=generator, noise=noise)
            if callback is not None:
                callback(i + 1, len(sampler.timesteps))
        return diffusion.res2img(x0_hat, img_lr)


# --------------------------------------------------------------------------------------------- tiling
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length), neighbours overlapping by at least
    ``overlap`` pixels, spread evenly; one tile at 0 when ``length <= tile``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """Overlapping (top, left, height, width) tiles covering an image of ``height`` x ``width``.

    ``0 <= overlap < tile``; a tile is clipped to the image where the image is smaller than ``tile``.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= tile_overlap < tile, got tile={tile}, overlap={overlap}")
    return [(top, left, min(tile, height), min(tile, width))
            for top in tile_starts(height, tile, overlap) for left in tile_starts(width, tile, overlap)]


def _ramp(length: int, rise: bool, fall: bool, width: int) -> torch.Tensor:
    """(length,) weights in (0, 1]: raised-cosine ramps of ``width`` px at the rising/falling ends."""
    weights = torch.ones(length)
    if width == 0:
        return weights
    edge = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(min(width, length)) + 0.5) / width)
    if rise:
        weights[: edge.numel()] = edge
    if fall:
        weights[-edge.numel():] = torch.minimum(weights[-edge.numel():], edge.flip(0))
    return weights


def blend_weights(box: Box, height: int, width: int, overlap: int) -> torch.Tensor:
    """(1, 1, h, w) blending weights of a tile in an image of ``height`` x ``width``: 1 inside, ramping
    down over ``overlap`` px towards every side that borders another tile (not towards the image border)."""
    top, left, h, w = box
    rows = _ramp(h, top > 0, top + h < height, overlap)
    cols = _ramp(w, left > 0, left + w < width, overlap)
    return (rows[:, None] * cols[None, :])[None, None]


def _crop(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    top, left, h, w = box
    return tensor[..., top: top + h, left: left + w]


def padding_index(length: int, padded: int) -> torch.Tensor:
    """(padded,) indices into a side of ``length`` pixels that :func:`pad_to_multiple` reads for each pixel
    of the padded side: itself, then the reflection (``length - 2 - k`` for the k-th padded pixel)."""
    index = torch.arange(padded)
    return torch.where(index < length, index, 2 * (length - 1) - index)


class PaddedImage:
    """An image seen as :func:`pad_to_multiple` pads it, without the padded copy: its tiles and the pixels of
    its padding are gathered from the original on demand (at 24 megapixels the copy would take 290 MB)."""

    def __init__(self, img: torch.Tensor, multiple: int):
        self.img = img
        height, width = img.shape[-2:]
        self.height, self.width = (math.ceil(n / multiple) * multiple for n in (height, width))
        reflect = self.height - height < height and self.width - width < width  # as pad_to_multiple
        self.rows = padding_index(height, self.height) if reflect else torch.arange(self.height).clamp(max=height - 1)
        self.cols = padding_index(width, self.width) if reflect else torch.arange(self.width).clamp(max=width - 1)
        self.rows, self.cols = self.rows.to(img.device), self.cols.to(img.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.img.shape[:-2], self.height, self.width))

    def crop(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The padded image's pixels [top, top + height) x [left, left + width) (a copy), within its size."""
        rows, cols = self.rows[top: top + height], self.cols[left: left + width]
        return self.img.index_select(-2, rows).index_select(-1, cols)

    def padding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The padding's pixels: the rows below the image (full padded width) and the columns right of it."""
        height, width = self.img.shape[-2:]
        return self.crop(height, 0, self.height - height, self.width), self.crop(0, width, height, self.width - width)

    def luts(self) -> torch.Tensor:
        """:func:`models.anchor.equalization_luts` of the padded image."""
        return equalization_luts(self.img, *self.padding())


def tile_features(img: torch.Tensor | PaddedImage, box: Box, luts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pixels of ``box`` of ``img``, their condition features), the features equal to the crop of
    ``condition_features(img)`` (for a PaddedImage, of the padded image): equalised with ``luts``
    (:func:`models.anchor.equalization_luts` of the whole image), and computed on the box grown by one row and
    column (where ``img`` has them) so that the forward-difference gradient at the box's bottom and right
    edges sees the pixels beyond."""
    top, left, h, w = box
    if isinstance(img, PaddedImage):
        grown = img.crop(top, left, h + 1, w + 1)
    else:
        grown = img[..., top: top + h + 1, left: left + w + 1]
    return grown[..., :h, :w], condition_features(grown, luts)[..., :h, :w]


NETWORK_BYTES_PER_PIXEL = (450, 40)
"""Peak memory of one enhancement per (padded) pixel, ``a + b * width`` bytes for networks of base width
``width`` (model.unet_dim): measured peak RSS above the loaded model on CPU (fp32, any sampler and step
count), 0.84-0.99 GiB per megapixel at width 16 (the bundled checkpoint), 1.39 at 32 and 2.56-2.60 at 64 (the
paper's model), rounded up (1.02, 1.61 and 2.80 GiB). Tiles are sized on it."""
AUTO_TILE_MEMORY = 5 * 2**28
"""Memory (bytes) that :func:`auto_tile` lets the networks use for one piece: 1.25 GiB, so that with the
interpreter, torch and the model (1.0-1.3 GiB) and the image-sized buffers of a 24-megapixel photo (the
decoded photo and :func:`enhance`'s sums, about 1 GiB) a CPU run stays under 4 GiB."""


def network_width(model_config: ModelConfig) -> int:
    """The base width that memory scales with: the wider of the noise predictor and the anchor encoder."""
    return max(model_config.unet_dim, model_config.cond_dim or model_config.unet_dim)


def auto_tile(height: int, width: int, *, model_width: int, pad_multiple: int,
              memory: float | None = None) -> int | None:
    """None when a ``height`` x ``width`` image (padded to ``pad_multiple``) fits in ``memory`` bytes
    (default :data:`AUTO_TILE_MEMORY`) in one piece (:data:`NETWORK_BYTES_PER_PIXEL` for networks of base width
    ``model_width``), else the tile size: the largest square multiple of ``pad_multiple`` that fits (at least
    ``pad_multiple``). The bundled checkpoint (width 16) enhances up to 1.23 megapixels in one piece and
    larger images on 1088 px tiles; the paper's model (width 64) up to 0.45 megapixels, on 640 px tiles."""
    per_pixel = NETWORK_BYTES_PER_PIXEL[0] + NETWORK_BYTES_PER_PIXEL[1] * model_width
    budget = int((AUTO_TILE_MEMORY if memory is None else memory) // per_pixel)
    padded = math.ceil(height / pad_multiple) * pad_multiple * math.ceil(width / pad_multiple) * pad_multiple
    if padded <= budget:
        return None
    return max(pad_multiple, math.isqrt(budget) // pad_multiple * pad_multiple)


def _cropped_noise(generator: torch.Generator, shape: torch.Size, box: Box) -> NoiseFn:
    """Noise of a tile: each call draws the whole-image noise of ``shape`` that an untiled run would draw
    at that step and returns the tile's crop."""

    def draw(like: torch.Tensor) -> torch.Tensor:
        full = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
        return _crop(full, box).to(like.device)

    return draw


def _tile_generator_state(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The state every tile's noise restarts from: ``generator``'s, or that of a generator seeded from the
    global RNG."""
    if generator is not None:
        return generator.get_state()
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, ())))
    return seeded.get_state()


class AnchorNetworks(NamedTuple):
    """What computes the anchor (:func:`encode`): the encoder, and the TS variant's HE network or None."""

    encoder: AnchorEncoder
    he_network: HENetwork | None = None


def _enhance_full(anchor_networks: AnchorNetworks, diffusion: GaussianDiffusion,
                  sampler: DDPMSampler | DDIMSampler | None, img: torch.Tensor, features: torch.Tensor, *,
                  precision: str, generator: torch.Generator | None, noise_fn: NoiseFn | None,
                  callback: Callable[[int, int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor then the reverse process on one (padded) image or tile -> (image in [0, 1], raw anchor).
    Without a sampler (``anchor``) the image is the anchor clamped to [0, 1]."""
    center, feats = encode(anchor_networks.encoder, features, precision, anchor_networks.he_network)
    if sampler is None:
        if callback is not None:
            callback(1, 1)
        return center.clamp(0, 1), center
    image = sample(diffusion, sampler, img, center, feats, generator=generator, callback=callback,
                   precision=precision, noise_fn=noise_fn, inference_mode=torch.is_inference_mode_enabled())
    return image, center


def _enhance_tiled(anchor_networks: AnchorNetworks, diffusion: GaussianDiffusion,
                   sampler: DDPMSampler | DDIMSampler | None, img: PaddedImage, *,
                   tile: int, overlap: int, precision: str, generator: torch.Generator | None,
                   callback: Callable[[int, int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_enhance_full` per tile of the padded image on its :func:`tile_features`, blended into image and
    anchor sums of the *unpadded* size (in place: the sums become the results); ``generator`` ends where one
    untiled run would leave it."""
    height, width = img.img.shape[-2:]
    boxes = tile_boxes(img.height, img.width, tile, overlap)
    luts = img.luts()
    noise_device = generator.device if generator is not None else img.img.device
    state = _tile_generator_state(generator, noise_device)
    image_sum, anchor_sum = torch.zeros_like(img.img), torch.zeros_like(img.img)
    weight_sum = img.img.new_zeros(1, 1, height, width)
    steps = len(sampler.timesteps) if sampler is not None else 1
    tile_generator = torch.Generator(device=noise_device)
    for index, box in enumerate(boxes):
        tile_generator.set_state(state)
        progress = None if callback is None else _offset_callback(callback, index * steps, len(boxes) * steps)
        pixels, features = tile_features(img, box, luts)
        image, anchor = _enhance_full(anchor_networks, diffusion, sampler, pixels, features, precision=precision,
                                      generator=None, callback=progress,
                                      noise_fn=_cropped_noise(tile_generator, img.shape, box))
        del pixels, features
        weight = blend_weights(box, img.height, img.width, overlap).to(image.device)
        top, left, h, w = box
        inside = (top, left, min(h, height - top), min(w, width - left))  # the part within the unpadded image
        if inside[2] > 0 and inside[3] > 0:
            inner = (0, 0, *inside[2:])
            weight = _crop(weight, inner)
            _crop(image_sum, inside).add_(_crop(image, inner) * weight)
            _crop(anchor_sum, inside).add_(_crop(anchor, inner) * weight)
            _crop(weight_sum, inside).add_(weight)
        del image, anchor  # the next tile's networks reuse this memory
    if generator is not None:
        generator.set_state(tile_generator.get_state())
    return image_sum.div_(weight_sum), anchor_sum.div_(weight_sum)


def _offset_callback(callback: Callable[[int, int], None], done: int, total: int
                     ) -> Callable[[int, int], None]:
    return lambda i, _n: callback(done + i, total)


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
    precision: str = "fp32",
    tile: int | None = None,
    tile_overlap: int = 64,
    inference_mode: bool = True,
    he_network: HENetwork | None = None,
) -> Enhanced:
    """Enhance (B, 3, H, W) low-light images in [0, 1] of any size (padded, then cropped back).

    ``he_network``: the TS variant's HE network H, which the anchor then includes (see
    :func:`models.anchor.anchor_from_features`).

    ``precision``: fp32 | bf16 | fp16 autocast of the networks. ``tile``: run on overlapping tiles of this
    size (a multiple of ``pad_multiple``), blended over ``tile_overlap`` px, for bounded memory (see the
    module docstring and :func:`auto_tile`); None runs the whole image at once.

    Memory beyond the networks' when tiled: the blended image and anchor sums, which become the results in
    place, and the blending weights' sum, 7 floats a pixel (670 MB for 24 megapixels), besides the input
    itself; the image is never padded (:class:`PaddedImage`) and the whole image's features never exist
    (:func:`tile_features`).
    """
    if tile is not None and (tile < pad_multiple or tile % pad_multiple):
        raise ValueError(f"tile must be a positive multiple of pad_multiple={pad_multiple}, got {tile}")
    height, width = img_lr.shape[-2:]
    steps_sampler = make_sampler(diffusion, sampler, steps, eta)
    with _grad_free(inference_mode):
        anchor_networks = AnchorNetworks(encoder, he_network)
        if tile is None:
            padded = pad_to_multiple(img_lr, pad_multiple)
            image, anchor = _enhance_full(anchor_networks, diffusion, steps_sampler, padded,
                                          condition_features(padded), precision=precision, generator=generator,
                                          noise_fn=None, callback=callback)
        else:
            image, anchor = _enhance_tiled(anchor_networks, diffusion, steps_sampler,
                                           PaddedImage(img_lr, pad_multiple), tile=tile, overlap=tile_overlap,
                                           precision=precision, generator=generator, callback=callback)
        return Enhanced(image=image[..., :height, :width], anchor=anchor.clamp_(0, 1)[..., :height, :width])
