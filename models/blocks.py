"""Building blocks shared by the noise-predicting UNet and the anchor encoder."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class SinusoidalPosEmb(nn.Module):
    """Timestep embedding: (B,) integer steps -> (B, dim) [sin | cos] features."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Block(nn.Module):
    """Reflection pad 1 -> 3x3 conv -> Mish."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim_out, 3), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResnetBlock(nn.Module):
    """Two Blocks, each followed by instance norm, with an additive time embedding between them.

    Called without ``time_emb`` (the anchor encoder) the time term is skipped.
    """

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int, use_instance_norm: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()
        self.norm = nn.InstanceNorm2d(dim_out) if use_instance_norm else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.block1(x))
        if time_emb is not None:
            h = h + self.mlp(time_emb)[:, :, None, None]
        h = self.norm(self.block2(h))
        return h + self.res_conv(x)


class Downsample(nn.Module):
    """Reflection pad 1 -> 3x3 conv, stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Transposed 4x4 conv, stride 2: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose2d(dim, dim, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def apply_weight_norm(module: nn.Module) -> None:
    """Weight-normalise every Conv1d/Conv2d below ``module`` (not ConvTranspose2d, not Linear)."""
    for child in list(module.modules()):
        if type(child) in (nn.Conv1d, nn.Conv2d):
            weight_norm(child)


def init_linear_weights(module: nn.Module, scale: float = 0.1) -> None:
    """The reference's ``weight_init``: scaled Kaiming-normal weights and zero biases.

    In the reference this also touches weight-normed convolutions, but there it does not persist (their
    weight is recomputed from g and v), so only Linear layers and plain convolutions are changed.
    """
    for child in module.modules():
        is_plain_conv = isinstance(child, nn.Conv2d) and not hasattr(child, "parametrizations")
        if isinstance(child, nn.Linear) or is_plain_conv:
            nn.init.kaiming_normal_(child.weight, a=0, mode="fan_in")
            with torch.no_grad():
                child.weight.mul_(scale)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
