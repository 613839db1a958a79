"""The method in one place: :class:`AnchoredDiffusion` holds the anchor encoder E, the TS variant's HE network H
(optional) and the anchored diffusion (its UNet and schedule), and owns the anchor, each stage's training loss and
enhancement. The Lightning module (models/module.py) wraps it for optimisation, logging and validation.

Where the paper's equations live: the anchor c in :func:`models.anchor.anchor_from_features`; DRDA's forward process
(Eqs. 12-13) in :meth:`models.diffusion.GaussianDiffusion.q_sample`; DRDS's posterior (Eqs. 17-19) in
:meth:`~models.diffusion.GaussianDiffusion.q_posterior`; the coefficients k1, k2 in models/schedule.py; DFPL (Eq. 21)
in :class:`models.losses.DFPL`; the reverse process in models/samplers.py and :func:`models.inference.sample`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.anchor import AnchorEncoder, HENetwork, anchor_from_features, condition_features, equalized
from models.diffusion import GaussianDiffusion
from models.inference import Enhanced, enhance
from models.losses import DFPL, AnchorLoss, LossTerms, NoiseLoss
from models.samplers import Sampler, make_sampler
from models.stages import stage_target
from utils.choices import AnchorTarget, Stage


@dataclass
class Objective:
    """A stage's training loss, built once from the config (:func:`models.build.build_objective`).

    ``loss``: the anchor stages' image losses (:class:`AnchorLoss`), or the diffusion's (DFPL or a noise loss).
    ``anchor_target``: what stage ``anchor`` fits, hr or its chromaticity C(hr). ``ref_prob``: the diffusion
    stage's chance of teacher forcing (the ground truth as anchor). ``train_anchor``: the diffusion stage lets
    gradients reach the anchor networks (``optim.train_encoder``). ``timesteps``: the diffusion stage draws t
    from these (``optim.train_timesteps: sampler``), else from all."""

    stage: Stage
    loss: AnchorLoss | DFPL | NoiseLoss
    anchor_target: AnchorTarget = "hr"
    ref_prob: float = 0.0
    train_anchor: bool = False
    timesteps: tuple[int, ...] | None = None

    def target(self, img_hr: torch.Tensor) -> torch.Tensor:
        """What the stage's output is compared with (:func:`models.stages.stage_target`)."""
        return stage_target(self.stage, self.anchor_target, img_hr)


class AnchoredDiffusion(nn.Module):
    """E (``encoder``), H (``he_network``, None without the TS variant) and the diffusion (``model``, its UNet
    ``model.unet``), under the official checkpoint's state-dict prefixes. Images are (B, 3, H, W) in [0, 1] with
    sides multiples of ``pad_multiple`` (the scripts pad or tile: :meth:`enhance` does)."""

    def __init__(self, encoder: AnchorEncoder, diffusion: GaussianDiffusion, he_network: HENetwork | None = None,
                 *, pad_multiple: int = 32):
        super().__init__()
        self.encoder = encoder
        self.model = diffusion
        self.he_network = he_network
        self.pad_multiple = pad_multiple

    # ----------------------------------------------------------------- the anchor
    def anchor(self, img_lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (anchor c (B, 3, H, W), about [0, 1]; E's feature maps): FS E's output, TS the screen blend of H's
        zeta and E's img_c (:func:`models.anchor.anchor_from_features`)."""
        return anchor_from_features(self.encoder, condition_features(img_lr), self.he_network)

    def he_output(self, img_lr: torch.Tensor) -> torch.Tensor:
        """H's zeta (B, 3, H, W) in [0, 1] on E's img_c: what stage ``he`` trains against hr. E's img_c is computed
        without a graph: H's stage keeps E frozen."""
        with torch.no_grad():
            img_c, _ = self.encoder(img_lr)
        return self.he_network(equalized(img_lr), img_c)

    # ----------------------------------------------------------------- training losses
    def loss(self, img_lr: torch.Tensor, img_hr: torch.Tensor, objective: Objective) -> LossTerms:
        """The training loss of ``objective.stage`` on a batch of pairs."""
        stage_loss = {"anchor": self.anchor_loss, "he": self.he_loss, "diffusion": self.diffusion_loss}
        return stage_loss[objective.stage](img_lr, img_hr, objective)

    def anchor_loss(self, img_lr: torch.Tensor, img_hr: torch.Tensor, objective: Objective) -> LossTerms:
        """Stage ``anchor``: E's anchor against its target (hr or C(hr))."""
        anchor, _ = self.encoder(img_lr)
        return objective.loss(anchor, objective.target(img_hr))

    def he_loss(self, img_lr: torch.Tensor, img_hr: torch.Tensor, objective: Objective) -> LossTerms:
        """Stage ``he``: H's zeta = H([HE(lr), img_c]) against hr, on the frozen E's img_c."""
        return objective.loss(self.he_output(img_lr), img_hr)

    def diffusion_loss(self, img_lr: torch.Tensor, img_hr: torch.Tensor, objective: Objective) -> LossTerms:
        """Stage ``diffusion``: x_t from DRDA's forward process at a random t and the UNet's output; DFPL (through
        the eps*_hat it implies, against the true eps* = eps + k1_t c'), a loss against the output's target
        (eps*, x0 or v), or image losses on the image of x0_hat. Without DRDA, as the reference, there is no anchor
        and no encoder feature (the config then has ``model.stronger_cond: false``)."""
        diffusion = self.model
        anchor: torch.Tensor | None = None
        feats: list[torch.Tensor] = []
        if diffusion.drda:
            with torch.set_grad_enabled(objective.train_anchor):
                anchor, feats = self.anchor(img_lr)
            if objective.ref_prob > 0 and torch.rand((), device=img_lr.device) < objective.ref_prob:
                anchor = img_hr  # teacher forcing; no random draw without it (the TS reference)
        x_start = diffusion.encode(img_hr, img_lr, anchor)
        if objective.timesteps:
            pick = torch.randint(0, len(objective.timesteps), (img_lr.shape[0],), device=img_lr.device)
            t = torch.tensor(objective.timesteps, device=img_lr.device)[pick]
        else:
            t = torch.randint(0, diffusion.num_timesteps, (img_lr.shape[0],), device=img_lr.device)
        eps = torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, t, anchor, noise=eps)
        output = diffusion.unet(x_t, t, img_lr, feats, anchor)
        eps_hat, x0_hat = diffusion.from_output(output, x_t, t)
        eps_star = diffusion.drda_noise(eps, t, anchor)
        if isinstance(objective.loss, DFPL):
            return objective.loss(diffusion, x_start, t, anchor, img_lr, eps_hat, eps_star)
        if isinstance(objective.loss, AnchorLoss):  # loss_type image: on the image x0_hat stands for
            return objective.loss(diffusion.decode(x0_hat, img_lr, anchor), img_hr)
        return objective.loss(output, diffusion.prediction_target(x_start, eps_star, t))

    # ----------------------------------------------------------------- enhancing
    def sampler(self, name: str, steps: int, eta: float = 0.0) -> Sampler:
        """A sampler of this diffusion with its timesteps set (:func:`models.samplers.make_sampler`)."""
        return make_sampler(self.model, name, steps, eta)

    def enhance(self, img_lr: torch.Tensor, sampler: Sampler, **kwargs: Any) -> Enhanced:
        """Enhance (B, 3, H, W) images in [0, 1] of any size with ``sampler`` (padded or tiled:
        :func:`models.inference.enhance` takes the keyword arguments)."""
        return enhance(self.encoder, self.model, img_lr, sampler=sampler, pad_multiple=self.pad_multiple,
                       he_network=self.he_network, **kwargs)
