"""Padding images to the networks' multiple (reflection, as the reference), or seeing them padded without a copy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.anchor import equalization_luts


def padded_size(side: int, multiple: int) -> int:
    """A side of ``side`` pixels padded to the next multiple of ``multiple``."""
    return math.ceil(side / multiple) * multiple


def pad_to_multiple(img: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the right/bottom to multiples of ``multiple``: reflection as the reference,
    replication where the image is too small to reflect."""
    height, width = img.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return img
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(img, (0, pad_w, 0, pad_h), mode=mode)


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
        self.height, self.width = padded_size(height, multiple), padded_size(width, multiple)
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
