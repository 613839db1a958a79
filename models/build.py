"""Builders: the networks, the method and the training objective described by a config. A leaf that both the
checkpoint loader and the Lightning module import."""

from __future__ import annotations

from models.anchor import AnchorEncoder, HENetwork
from models.anchored_diffusion import AnchoredDiffusion, Objective
from models.diffusion import GaussianDiffusion
from models.losses import DFPL, AnchorLoss, NoiseLoss, build_image_loss
from models.samplers import sampler_timesteps
from models.stages import stage_losses, stage_spec
from models.unet import NoiseUNet
from utils.config import Config


def build_networks(config: Config) -> tuple[AnchorEncoder, GaussianDiffusion]:
    """The anchor encoder and the diffusion (with its UNet) described by ``config``."""
    m, d = config.model, config.diffusion
    shared = dict(dim_mults=m.dim_mults, use_instance_norm=m.use_instance_norm, weight_init=m.weight_init)
    unet = NoiseUNet(dim=m.unet_dim, in_dim=m.in_dim, out_dim=m.unet_outdim, stronger_cond=m.stronger_cond,
                     sees_anchor=m.unet_sees_anchor, use_wn=m.use_wn, **shared)
    encoder = AnchorEncoder(dim=m.cond_dim or m.unet_dim, in_dim=m.cond_in_dim, out_dim=m.unet_outdim,
                            on_res=m.cond_on_res, zero_residual=m.cond_zero_residual, use_wn=m.cond_use_wn,
                            **shared)
    diffusion = GaussianDiffusion(unet, timesteps=d.timesteps, beta_schedule_name=d.beta_schedule,
                                  drda=d.use_center, drds=d.use_center_sampler, clip_denoised=d.clip_denoised,
                                  prediction=d.prediction, domain=d.domain, scale=d.scale,
                                  sampling_start=d.sampling_start)
    return encoder, diffusion


def build_he_network(config: Config) -> HENetwork | None:
    """The TS variant's HE network H (``model.he_network``), or None. Built as the reference builds it: the UNet's
    width, ``in_dim`` (6: HE(lr) and img_c), ``use_wn`` and H's ``on_res`` (``model.he_on_res``)."""
    m = config.model
    if not m.he_network:
        return None
    return HENetwork(dim=m.unet_dim, dim_mults=m.dim_mults, in_dim=m.in_dim, out_dim=m.unet_outdim,
                     on_res=m.he_on_res, use_wn=m.use_wn, use_instance_norm=m.use_instance_norm,
                     weight_init=m.weight_init)


def build_method(config: Config) -> AnchoredDiffusion:
    """The whole method of ``config``: E, H (TS) and the diffusion, randomly initialised."""
    encoder, diffusion = build_networks(config)
    return AnchoredDiffusion(encoder, diffusion, build_he_network(config), pad_multiple=config.diffusion.pad_multiple)


def build_objective(config: Config) -> Objective:
    """The training loss of ``config.stage`` (its LPIPS networks are built here: LPIPSWeightsMissing when their
    weights are not on this machine)."""
    optim = config.optim
    if stage_spec(config).losses is not None or optim.loss_type == "image":
        names, weights = zip(*stage_losses(config), strict=True)
        loss: AnchorLoss | DFPL | NoiseLoss = AnchorLoss(names, weights)
    elif optim.loss_type == "dfpl":
        loss = DFPL(build_image_loss(optim.dfpl_image_loss))
    else:
        loss = NoiseLoss(optim.loss_type)
    timesteps = None
    if optim.train_timesteps == "sampler":
        val = config.val_sampler
        timesteps = tuple(sampler_timesteps(val.sampler, config.diffusion.timesteps, val.steps))
    return Objective(config.stage, loss, anchor_target=optim.anchor_target, ref_prob=optim.ref_prob,
                     train_anchor=optim.train_encoder, timesteps=timesteps)
