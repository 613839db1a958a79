"""The anchor (phi, "center"): condition features of the low-light image and the encoder that maps them
to the anchor image and to the feature maps the noise predictor is conditioned on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils import parametrize
from torchmetrics.functional.image import image_gradients
from torchvision.transforms.functional import equalize

from models.unet import UNetBackbone


def equalized(img: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation of uint8(img * 255) (truncated, as the reference), back to [0, 1].

    img: (B, 3, H, W) in [0, 1].
    """
    as_uint8 = (img * 255).to(torch.uint8)
    return equalize(as_uint8).to(img.dtype) / 255.0


def color_map(img: torch.Tensor) -> torch.Tensor:
    """Chromaticity: img / (mean over channels + 1e-8) / 3, clamped to [0, 1]. (B, 3, H, W)."""
    return (img / (img.mean(dim=1, keepdim=True) + 1e-8) / 3).clamp(0, 1)


def grad_map(img: torch.Tensor) -> torch.Tensor:
    """max(|dy|, |dx|) of forward differences (last row/column zero). (B, C, H, W)."""
    dy, dx = image_gradients(img)
    return torch.maximum(dy.abs(), dx.abs())


def condition_features(img_lr: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) low-light image in [0, 1] -> (B, 12, H, W):
    [image, equalised image, colour map, gradient of the colour map]."""
    colors = color_map(img_lr)
    return torch.cat((img_lr, equalized(img_lr), colors, grad_map(colors)), dim=1)


class AnchorEncoder(UNetBackbone):
    """Maps the condition features to the anchor phi and the per-level feature maps.

    With ``on_res`` (the reference) the anchor is the equalised image plus the network's output.
    ``zero_residual`` starts that output at zero (the output conv's weight-norm magnitude and bias), so the
    untrained anchor is exactly the equalised image; the reference's random output adds a strong colour cast,
    which a frozen encoder (``train_encoder: false``) keeps for good.
    """

    def __init__(self, *, dim: int, dim_mults: Sequence[int], in_dim: int = 12, out_dim: int = 3,
                 on_res: bool = True, zero_residual: bool = False, **kwargs):
        super().__init__(in_dim=in_dim, out_dim=out_dim, dim=dim, dim_mults=dim_mults,
                         concat_features=False, **kwargs)
        self.on_res = on_res
        if zero_residual:
            self._zero_output()

    @torch.no_grad()
    def _zero_output(self) -> None:
        conv = self.final_conv[-1]
        if parametrize.is_parametrized(conv, "weight"):
            conv.parametrizations.weight.original0.zero_()  # weight norm's g: weight = g * v / |v| = 0
        else:
            conv.weight.zero_()
        conv.bias.zero_()

    def forward(self, img_lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """img_lr (B, 3, H, W) in [0, 1] -> (anchor (B, 3, H, W), about [0, 1] and not clamped, as the
        reference; feature maps: one per down level, then one per up level)."""
        features = condition_features(img_lr)
        out, feats = self.run(features)
        center = out + features[:, 3:6] if self.on_res else torch.sigmoid(out)
        return center, feats
