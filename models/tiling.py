"""Large images: overlapping tiles, their network inputs and noise, raised-cosine blending, and the memory model
that decides whether and how to tile (:func:`auto_tile`, what test_unpaired.py and the demo do by default).

:func:`enhance_tiled` runs the whole per-tile pipeline (anchor encoder and every sampling step) on each tile and
blends the final images and anchors, so the networks' memory is bounded by the tile size. What keeps tiled
close to untiled:

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

import math
from collections.abc import Callable
from typing import Protocol

import torch

from models.anchor import condition_features
from models.padding import PaddedImage, padded_size
from models.samplers import NoiseFn

Box = tuple[int, int, int, int]
"""A tile: (top, left, height, width) in pixels."""
Progress = Callable[[int, int], None]
"""``progress(i, n)``: step i of n done."""


class TileEnhancer(Protocol):
    """The whole enhancement of one tile."""

    def __call__(self, pixels: torch.Tensor, features: torch.Tensor, *, noise_fn: NoiseFn,
                 callback: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (B, 3, h, w) in [0, 1], their condition features (B, 12, h, w)) -> (image, anchor), both
        (B, 3, h, w), drawing every noise from ``noise_fn`` and reporting progress to ``callback``."""


NETWORK_BYTES_PER_PIXEL = (450, 40)
"""Peak memory of one enhancement per (padded) pixel, ``a + b * width`` bytes for networks of base width
``width`` (model.unet_dim): measured peak RSS above the loaded model on CPU (fp32, any sampler and step
count), 0.84-0.99 GiB per megapixel at width 16 (the bundled checkpoint), 1.39 at 32 and 2.56-2.60 at 64 (the
paper's model), rounded up (1.02, 1.61 and 2.80 GiB). Tiles are sized on it."""
AUTO_TILE_MEMORY = 5 * 2**28
"""Memory (bytes) that :func:`auto_tile` lets the networks use for one piece: 1.25 GiB, so that with the
interpreter, torch and the model (1.0-1.3 GiB) and the image-sized buffers of a 24-megapixel photo (the
decoded photo and :func:`enhance_tiled`'s sums, about 1 GiB) a CPU run stays under 4 GiB."""


# --------------------------------------------------------------------------------------------- tiles
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering [0, length), neighbours overlapping by at least
    ``overlap`` pixels, spread evenly; one tile at 0 when ``length <= tile``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def check_tile(tile: int, overlap: int, pad_multiple: int, names: tuple[str, str] = ("tile", "tile_overlap")
               ) -> None:
    """A ValueError unless tiles of ``tile`` px overlapping by ``overlap`` px fit networks that need sides
    multiple of ``pad_multiple``: ``tile`` a positive multiple of it and 0 <= ``overlap`` < ``tile``. ``names``:
    what the message calls the two (the scripts' flags or fields)."""
    if tile < pad_multiple or tile % pad_multiple:
        raise ValueError(f"{names[0]} must be a positive multiple of {pad_multiple} (the model's padding), "
                         f"got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"{names[1]} must be in [0, {names[0]}) = [0, {tile}), got {overlap}")


def tile_overlap_for(tile: int, limit: int = 64) -> int:
    """The overlap of automatically sized tiles: a quarter of the tile, at most ``limit`` px."""
    return min(limit, tile // 4)


def tile_count(height: int, width: int, tile: int, overlap: int, pad_multiple: int) -> int:
    """How many tiles a ``height`` x ``width`` image (padded to ``pad_multiple``) is enhanced in."""
    return len(tile_boxes(padded_size(height, pad_multiple), padded_size(width, pad_multiple), tile, overlap))


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


# --------------------------------------------------------------------------------------------- the decision
class Widths(Protocol):
    """The config's ``model`` section, as far as memory is concerned."""

    unet_dim: int
    cond_dim: int | None


def network_width(model: Widths) -> int:
    """The base width that memory scales with: the wider of the noise predictor (``model.unet_dim``) and the
    anchor encoder (``model.cond_dim``, None: the UNet's)."""
    return max(model.unet_dim, model.cond_dim or model.unet_dim)


def auto_tile(height: int, width: int, *, model_width: int, pad_multiple: int,
              memory: float | None = None) -> int | None:
    """None when a ``height`` x ``width`` image (padded to ``pad_multiple``) fits in ``memory`` bytes
    (default :data:`AUTO_TILE_MEMORY`) in one piece (:data:`NETWORK_BYTES_PER_PIXEL` for networks of base width
    ``model_width``), else the tile size: the largest square multiple of ``pad_multiple`` that fits (at least
    ``pad_multiple``). The bundled checkpoint (width 16) enhances up to 1.23 megapixels in one piece and
    larger images on 1088 px tiles; the paper's model (width 64) up to 0.45 megapixels, on 640 px tiles."""
    per_pixel = NETWORK_BYTES_PER_PIXEL[0] + NETWORK_BYTES_PER_PIXEL[1] * model_width
    budget = int((AUTO_TILE_MEMORY if memory is None else memory) // per_pixel)
    if padded_size(height, pad_multiple) * padded_size(width, pad_multiple) <= budget:
        return None
    return max(pad_multiple, math.isqrt(budget) // pad_multiple * pad_multiple)


def automatic_tiling(height: int, width: int, model: Widths, pad_multiple: int, max_overlap: int = 64
                     ) -> tuple[int | None, int]:
    """(tile size or None, overlap) as the scripts tile a ``height`` x ``width`` image by default: the size of
    :func:`auto_tile` for these networks, overlapping by :func:`tile_overlap_for`."""
    tile = auto_tile(height, width, model_width=network_width(model), pad_multiple=pad_multiple)
    return tile, tile_overlap_for(tile or 0, max_overlap)


# --------------------------------------------------------------------------------------------- enhancing
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


def _offset_callback(callback: Progress, done: int, total: int) -> Progress:
    return lambda i, _n: callback(done + i, total)


def enhance_tiled(img: PaddedImage, enhance_tile: TileEnhancer, *, tile: int, overlap: int, steps: int,
                  generator: torch.Generator | None, callback: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``enhance_tile`` on each tile of the padded image (:func:`tile_boxes`) with its :func:`tile_features` and
    its crop of the untiled noise, blended into image and anchor sums of the *unpadded* size (in place: the sums
    become the results, both (B, 3, H, W)); ``generator`` ends where one untiled run would leave it.
    ``callback`` counts the ``steps`` progress steps of every tile."""
    height, width = img.img.shape[-2:]
    boxes = tile_boxes(img.height, img.width, tile, overlap)
    luts = img.luts()
    noise_device = generator.device if generator is not None else img.img.device
    state = _tile_generator_state(generator, noise_device)
    image_sum, anchor_sum = torch.zeros_like(img.img), torch.zeros_like(img.img)
    weight_sum = img.img.new_zeros(1, 1, height, width)
    tile_generator = torch.Generator(device=noise_device)
    for index, box in enumerate(boxes):
        tile_generator.set_state(state)
        progress = None if callback is None else _offset_callback(callback, index * steps, len(boxes) * steps)
        pixels, features = tile_features(img, box, luts)
        image, anchor = enhance_tile(pixels, features, noise_fn=_cropped_noise(tile_generator, img.shape, box),
                                     callback=progress)
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
