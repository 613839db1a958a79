"""Training losses: the image losses of the anchor stages, noise-space losses and the Diffusion Feature
Perceptual Loss (DFPL, Eq. 21). Every loss returns :class:`LossTerms`: the total and each weighted term, by name,
for the training log."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from models.diffusion import GaussianDiffusion
from utils.choices import ImageLossName, NoiseLossName
from utils.lpips import build_lpips

ImageLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossTerms:
    """A training loss: ``total`` (a scalar) and its weighted ``terms`` by name, which sum to it."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]

    @classmethod
    def single(cls, name: str, value: torch.Tensor) -> LossTerms:
        return cls(value, {name: value})


class Frozen:
    """Holds a frozen network (a loss or a metric) outside the module tree: it is moved to the device it
    is asked for, but never enters the model's state dict, checkpoints or optimizer."""

    def __init__(self, network: torch.nn.Module):
        self._network = network

    def on(self, device: torch.device) -> torch.nn.Module:
        return self._network.to(device)


class LPIPSLoss:
    """LPIPS between (B, 3, H, W) images in [0, 1] (scaled to [-1, 1] inside), batch mean."""

    def __init__(self, net: str):
        self.network = Frozen(build_lpips(net))

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.network.on(pred.device)(pred, target, normalize=True).mean()


def build_image_loss(name: str) -> ImageLoss:
    """Image-space loss on (B, 3, H, W) images in [0, 1] by name (:data:`utils.choices.ImageLossName`)."""
    if name in ("lpips_vgg", "lpips_alex"):
        return LPIPSLoss(name.removeprefix("lpips_"))
    if name == "l1":
        return F.l1_loss
    if name == "l2":
        return F.mse_loss
    raise ValueError(f"unknown image loss '{name}'; valid: {', '.join(typing.get_args(ImageLossName))}")


class AnchorLoss:
    """Weighted sum of image losses between an image (the anchor, or H's zeta) and its target, (B, 3, H, W) in
    [0, 1], computed in float32 even under bf16/fp16 autocast: MS-SSIM's products of small powers lose too much
    in bf16 (a bundled run's loss went NaN there).

    ``msssim`` is 1 - MS-SSIM over 4 scales with the first four standard weights, not renormalised (the
    reference's TS encoder loss; 4 scales fit its 160 px crops).
    """

    MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363)

    def __init__(self, names: Sequence[str], weights: Sequence[float]):
        self.terms = [(name, self._build(name), weight) for name, weight in zip(names, weights, strict=True)]

    @classmethod
    def _build(cls, name: str) -> ImageLoss:
        if name == "msssim":
            return lambda pred, target: 1 - multiscale_structural_similarity_index_measure(
                pred, target, data_range=1.0, betas=cls.MSSSIM_BETAS)
        return build_image_loss(name)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> LossTerms:
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            weighted = [(name, weight * loss(pred, target)) for name, loss, weight in self.terms]
        terms: dict[str, torch.Tensor] = {}
        for name, value in weighted:  # a loss named twice is logged once, summed
            terms[name] = terms[name] + value if name in terms else value
        return LossTerms(sum(value for _, value in weighted), terms)


class NoiseLoss:
    """Loss between the UNet's output and its target: the DRDA-shifted noise eps* (the paper), x0 or v
    (``diffusion.prediction``). ``l2`` is the mean squared error, ``l1`` the smooth L1 (Huber with beta 1) that the
    reference means by it."""

    def __init__(self, name: str):
        if name not in typing.get_args(NoiseLossName):
            raise ValueError(f"unknown noise loss '{name}'; valid: {', '.join(typing.get_args(NoiseLossName))}")
        self.name = name

    def __call__(self, eps_hat: torch.Tensor, eps_star: torch.Tensor) -> LossTerms:
        loss = F.mse_loss(eps_hat, eps_star) if self.name == "l2" else F.smooth_l1_loss(eps_hat, eps_star)
        return LossTerms.single(f"noise_{'l2' if self.name == 'l2' else 'smooth_l1'}", loss)


class DFPL:
    """DFPL (Eq. 21): an image loss between x_t rebuilt from the predicted and from the true noise.

    As in the reference, both sides go through ``q_sample`` once more, so each carries one extra k1_t c' shift;
    the two images differ only through eps_hat - eps*, as the paper's equation says."""

    def __init__(self, image_loss: ImageLoss):
        self.image_loss = image_loss

    def __call__(self, diffusion: GaussianDiffusion, x_start: torch.Tensor, t: torch.Tensor,
                 anchor: torch.Tensor | None, img_lr: torch.Tensor, eps_hat: torch.Tensor,
                 eps_star: torch.Tensor) -> LossTerms:
        x_t_pred = diffusion.q_sample(x_start, t, anchor, noise=eps_hat)
        x_t_true = diffusion.q_sample(x_start, t, anchor, noise=eps_star)
        return LossTerms.single("dfpl", self.image_loss(diffusion.decode(x_t_pred, img_lr, anchor),
                                                        diffusion.decode(x_t_true, img_lr, anchor)))
