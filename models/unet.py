"""The U-shaped network, used twice: as the noise predictor and as the anchor encoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.blocks import (
    Block,
    Downsample,
    ResnetBlock,
    SinusoidalPosEmb,
    Upsample,
    apply_weight_norm,
    init_linear_weights,
)


class UNetBackbone(nn.Module):
    """Down levels, two middle blocks, up levels, final conv.

    Widths are ``dim * dim_mults``; every down level but the deepest halves the resolution and every up
    level doubles it, so inputs must be multiples of ``2 ** (len(dim_mults) - 1)``. The timestep MLPs are
    always built; :meth:`run` without ``time`` skips them (the anchor encoder: it owns 0.38 M unused
    time-MLP parameters at the paper's size, exactly as the reference, so its checkpoint loads strictly).

    Args:
        concat_features: concatenate an external feature map after the first block of every down level
            (the reference's ``stronger_cond``), which doubles that level's second block input.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        dim: int,
        dim_mults: Sequence[int],
        concat_features: bool,
        use_instance_norm: bool = True,
        use_wn: bool = True,
        weight_init: bool = True,
    ):
        super().__init__()
        dims = [in_dim, *(dim * m for m in dim_mults)]
        pairs = list(zip(dims[:-1], dims[1:], strict=False))
        self.concat_features = concat_features
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

        def resnet(din: int, dout: int) -> ResnetBlock:
            return ResnetBlock(din, dout, time_emb_dim=dim, use_instance_norm=use_instance_norm)

        widen = 2 if concat_features else 1
        self.downs = nn.ModuleList(
            nn.ModuleList([
                resnet(din, dout),
                resnet(dout * widen, dout),
                Downsample(dout) if level < len(pairs) - 1 else nn.Identity(),
            ])
            for level, (din, dout) in enumerate(pairs)
        )
        self.mid_block1 = resnet(dims[-1], dims[-1])
        self.mid_block2 = resnet(dims[-1], dims[-1])
        self.ups = nn.ModuleList(
            nn.ModuleList([resnet(dout * 2, din), resnet(din, din), Upsample(din)])
            for din, dout in reversed(pairs[1:])
        )
        self.final_conv = nn.Sequential(Block(dim, dim), nn.Conv2d(dim, out_dim, 1))
        if use_wn:
            apply_weight_norm(self)
        if weight_init:
            init_linear_weights(self)

    def run(
        self, x: torch.Tensor, time: torch.Tensor | None = None, features: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, in_dim, H, W) -> ((B, out_dim, H, W), per-level feature maps: downs then ups)."""
        t = self.mlp(self.time_pos_emb(time)) if time is not None else None
        skips: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        for level, (block1, block2, downsample) in enumerate(self.downs):
            x = block1(x, t)
            if self.concat_features:
                x = torch.cat((x, features[level]), dim=1)
            x = block2(x, t)
            skips.append(x)
            feats.append(x)
            x = downsample(x)
        x = self.mid_block2(self.mid_block1(x, t), t)
        for block1, block2, upsample in self.ups:
            x = block2(block1(torch.cat((x, skips.pop()), dim=1), t), t)
            feats.append(x)
            x = upsample(x)
        return self.final_conv(x), feats


class NoiseUNet(UNetBackbone):
    """The denoiser: predicts the DRDA-shifted noise eps* (or x0, or v: ``diffusion.prediction``) from x_t, t, the
    low-light image, the anchor encoder's features (concatenated at every down level) and, with
    ``sees_anchor``, the anchor itself."""

    def __init__(self, *, dim: int, dim_mults: Sequence[int], in_dim: int = 6, out_dim: int = 3,
                 stronger_cond: bool = True, sees_anchor: bool = False, **kwargs):
        super().__init__(in_dim=in_dim + (out_dim if sees_anchor else 0), out_dim=out_dim, dim=dim,
                         dim_mults=dim_mults, concat_features=stronger_cond, **kwargs)
        self.sees_anchor = sees_anchor

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, img_lr: torch.Tensor, feats: Sequence[torch.Tensor],
                anchor: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, 3, H, W) in about [-1, 1]; t: (B,) long; img_lr: (B, 3, H, W) in [0, 1]; feats: encoder maps
        (the first ``len(dim_mults)`` are used); anchor: (B, 3, H, W) in about [0, 1], read with ``sees_anchor``.
        Returns (B, 3, H, W)."""
        inputs = (x_t, img_lr, anchor) if self.sees_anchor else (x_t, img_lr)
        out, _ = self.run(torch.cat(inputs, dim=1), t, feats)
        return out
