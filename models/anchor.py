"""The anchor c (the paper's phi, the reference's "center"): condition features of the low-light image, the
encoder E that maps them to an anchor image and to the feature maps the noise predictor is conditioned on, and
the two-step (TS) variant's HE network H. :func:`anchor_from_features` is the one place the anchor is computed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

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


def equalization_luts(img: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """The lookup tables of :func:`equalized` for ``img`` (B, C, H, W) in [0, 1]: (B, C, 256) uint8, computed
    as torchvision's ``equalize`` computes them (its histogram, step and rounding), one channel at a time.
    ``more``: further pixels (B, C, h, w) of the same images, counted in the histogram as if they were part
    of ``img`` (the padding of an image that is never padded as a whole).

    ``apply_luts(crop, equalization_luts(img))`` equals the crop of ``equalized(img)`` exactly, so tiles of a
    large image get the whole image's equalisation without the whole image's features in memory.
    """
    luts = torch.empty(*img.shape[:2], 256, dtype=torch.uint8, device=img.device)
    identity = torch.arange(256, device=img.device)
    for b in range(img.shape[0]):
        for c in range(img.shape[1]):
            hist = sum(torch.bincount((part[b, c] * 255).to(torch.uint8).reshape(-1).long(), minlength=256)
                       for part in (img, *more))
            step = torch.div(hist[hist != 0][:-1].sum(), 255, rounding_mode="floor")
            if step == 0:
                luts[b, c] = identity
                continue
            lut = torch.div(torch.cumsum(hist, 0) + torch.div(step, 2, rounding_mode="floor"), step,
                            rounding_mode="floor")
            luts[b, c] = torch.nn.functional.pad(lut, [1, 0])[:-1].clamp(0, 255)
    return luts


def apply_luts(img: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """:func:`equalized` with the tables of :func:`equalization_luts` (of this image or of a larger one it
    is cropped from). (B, C, H, W) in [0, 1] -> same shape."""
    index = (img * 255).to(torch.uint8).long()
    out = torch.stack([torch.stack([lut[chan] for lut, chan in zip(image_luts, image, strict=True)])
                       for image_luts, image in zip(luts, index, strict=True)])
    return out.to(img.dtype) / 255.0


def color_map(img: torch.Tensor) -> torch.Tensor:
    """Chromaticity: img / (mean over channels + 1e-8) / 3, clamped to [0, 1]. (B, 3, H, W)."""
    return (img / (img.mean(dim=1, keepdim=True) + 1e-8) / 3).clamp(0, 1)


def grad_map(img: torch.Tensor) -> torch.Tensor:
    """max(|dy|, |dx|) of forward differences (last row/column zero). (B, C, H, W)."""
    dy, dx = image_gradients(img)
    return torch.maximum(dy.abs(), dx.abs())


def condition_features(img_lr: torch.Tensor, luts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) low-light image in [0, 1] -> (B, 12, H, W):
    [image, equalised image, colour map, gradient of the colour map].

    ``luts``: equalise with these tables (:func:`equalization_luts` of the whole image when ``img_lr`` is a
    tile of it) instead of the image's own histogram.
    """
    colors = color_map(img_lr)
    equalised = equalized(img_lr) if luts is None else apply_luts(img_lr, luts)
    return torch.cat((img_lr, equalised, colors, grad_map(colors)), dim=1)


class AnchorEncoder(UNetBackbone):
    """Maps the condition features to the anchor c and the per-level feature maps.

    With ``on_res`` (the FS reference) the anchor is the equalised image plus the network's output; without
    it (the TS encoder E) the output is img_c = sigmoid(network output), which the TS variant blends with the
    HE network's output (:func:`anchor_from_features`). ``zero_residual`` starts the FS residual at zero (the
    output conv's weight-norm magnitude and bias), so the untrained anchor is exactly the equalised image; the
    reference's random output adds a strong colour cast, which a frozen encoder (``train_encoder: false``)
    keeps for good.
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

    def output(self, out: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The encoder's image from its final conv ``out``: FS (``on_res``) the equalised image (features
        3..5) plus ``out``, about [0, 1] and not clamped, as the reference; otherwise (TS) img_c =
        sigmoid(out), in (0, 1)."""
        return out + features[:, 3:6] if self.on_res else torch.sigmoid(out)

    def forward(self, img_lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """img_lr (B, 3, H, W) in [0, 1] -> (the encoder's image (B, 3, H, W) (see :meth:`output`); feature
        maps: one per down level, then one per up level). Without an HE network this image is the anchor."""
        return anchor_from_features(self, condition_features(img_lr))


class HENetwork(UNetBackbone):
    """The TS variant's HE network H (the reference's ``Unet_he``): the encoder's U shape and time-free blocks,
    6 input channels [HE(lr), img_c], output zeta in [0, 1].

    ``on_res`` (the reference, which reads the diffusion's ``on_res``): zeta = clamp(final conv + HE(lr), 0, 1),
    a residual on the equalised image; otherwise zeta = sigmoid(final conv).
    """

    def __init__(self, *, dim: int, dim_mults: Sequence[int], in_dim: int = 6, out_dim: int = 3,
                 on_res: bool = True, **kwargs):
        super().__init__(in_dim=in_dim, out_dim=out_dim, dim=dim, dim_mults=dim_mults,
                         concat_features=False, **kwargs)
        self.on_res = on_res

    def output(self, out: torch.Tensor, equalised: torch.Tensor) -> torch.Tensor:
        """zeta from the final conv ``out`` and HE(lr) ``equalised``, both (B, 3, H, W)."""
        return (out + equalised).clamp(0, 1) if self.on_res else torch.sigmoid(out)

    def forward(self, equalised: torch.Tensor, img_c: torch.Tensor) -> torch.Tensor:
        """HE(lr) and the encoder's img_c, (B, 3, H, W) in [0, 1] -> zeta (B, 3, H, W) in [0, 1]."""
        out, _ = self.run(torch.cat((equalised, img_c), dim=1))
        return self.output(out, equalised)


def screen_blend(zeta: torch.Tensor, img_c: torch.Tensor) -> torch.Tensor:
    """The TS anchor c = zeta + (1 - zeta) img_c = 1 - (1 - zeta)(1 - img_c): a per-pixel "screen" blend, so
    c >= max(zeta, img_c) for inputs in [0, 1]."""
    return zeta + (1 - zeta) * img_c


def anchor_from_features(
    encoder: AnchorEncoder,
    features: torch.Tensor,
    he_network: HENetwork | None = None,
    network_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The anchor c from the condition features (B, 12, H, W) of :func:`condition_features`: the one place
    the anchor is computed (the module, the encoder's forward and tiled inference all call it).

    * FS (``encoder.on_res``, no H): c = E's output + HE(lr).
    * sigmoid encoder, no H: c = img_c = sigmoid(E's output).
    * TS (``he_network``): zeta = H([HE(lr), img_c]), c = zeta + (1 - zeta) img_c (:func:`screen_blend`).

    ``network_context`` wraps each network call (autocast at inference); the network outputs are taken to
    float32 before the formulas. Returns (c (B, 3, H, W) float32, about [0, 1]; E's feature maps).
    """
    equalised = features[:, 3:6]
    with network_context():
        out, feats = encoder.run(features)
    img_c = encoder.output(out.float(), features)
    if he_network is None:
        return img_c, feats
    with network_context():
        he_out, _ = he_network.run(torch.cat((equalised, img_c), dim=1))
    return screen_blend(he_network.output(he_out.float(), equalised), img_c), feats
