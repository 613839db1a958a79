"""The training stages as data: what each one trains, what it is scored on, which samplers its checkpoint can
run and what it needs from an earlier stage. Everything that depends on ``config.stage`` reads it here.

* ``anchor``: the anchor encoder E alone, fitted to hr (or C(hr)); scored on the anchor.
* ``he``: the TS variant's HE network H alone, on a frozen E; scored on H's zeta.
* ``diffusion``: the noise predictor (the UNet), on frozen anchor networks (E too with ``optim.train_encoder``);
  scored on the enhanced image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from models.anchor import color_map
from models.errors import CheckpointError
from utils.choices import SamplerName
from utils.config import Config
from utils.training import monitor_needs_lpips

Network = Literal["encoder", "he_network", "model"]
"""The method's networks by their state-dict prefix: the anchor encoder E, the HE network H, the diffusion (UNet)."""
NETWORK_NAMES: dict[str, str] = {"encoder": "anchor encoder", "he_network": "HE network", "model": "noise predictor"}
"""What each network is called in messages."""


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    ``trains``: the networks it optimises (all others frozen); ``scores``: what validation compares with the
    target (``anchor``, ``he``: H's zeta, ``enhanced``: the sampler's output); ``samplers``: what a checkpoint of
    it can run (the UNet of a stage before ``diffusion`` was never trained); ``losses``: the config fields
    (``optim.<name>`` and ``optim.<name>_weights``) of its image losses, None for the diffusion's own."""

    trains: tuple[Network, ...]
    scores: Literal["anchor", "he", "enhanced"]
    samplers: tuple[SamplerName, ...]
    losses: str | None


STAGES: dict[str, StageSpec] = {
    "anchor": StageSpec(trains=("encoder",), scores="anchor", samplers=("anchor",), losses="anchor_loss"),
    "he": StageSpec(trains=("he_network",), scores="he", samplers=("anchor",), losses="he_loss"),
    "diffusion": StageSpec(trains=("model",), scores="enhanced", samplers=get_args(SamplerName), losses=None),
}


def stage_spec(config: Config) -> StageSpec:
    """The :class:`StageSpec` of ``config.stage``."""
    return STAGES[config.stage]


def stage_target(stage: str, anchor_target: str, img_hr: torch.Tensor) -> torch.Tensor:
    """What a stage's output is trained and scored against: C(hr) for stage ``anchor`` fitted to the
    chromaticity (``optim.anchor_target: chroma``, the TS reference's E), else hr itself. (B, 3, H, W) in [0, 1]."""
    return color_map(img_hr) if stage == "anchor" and anchor_target == "chroma" else img_hr


def trained_networks(config: Config) -> tuple[Network, ...]:
    """The networks a run of ``config`` optimises: its stage's, and the encoder too in the diffusion stage with
    ``optim.train_encoder`` (the reference's option; it never trains it by default)."""
    trains = stage_spec(config).trains
    return (*trains, "encoder") if config.optim.train_encoder and "encoder" not in trains else trains


def has_unused_trained_parameters(config: Config) -> bool:
    """Whether a trained parameter can go without a gradient in a training step, which DDP must then look for
    (``find_unused_parameters``: one more traversal of the graph every step; without it DDP stops at such a step).

    Only the anchor networks' can: each U-Net but the denoiser owns a time MLP it never runs (so that the official
    checkpoints load), the encoder's output is not used on teacher-forced steps nor its feature maps in the anchor
    stage, and without DRDA it does not run at all. So: whenever a run trains anything but the denoiser alone."""
    return trained_networks(config) != ("model",)


def runnable_samplers(config: Config) -> tuple[SamplerName, ...]:
    """The samplers a model of this config can run."""
    return stage_spec(config).samplers


def require_sampler(config: Config, name: str) -> None:
    """A CheckpointError unless a model of ``config`` can run sampler ``name``: what the scripts check before any
    work, and enhancing again."""
    if name not in runnable_samplers(config):
        raise CheckpointError(f"this checkpoint runs only {', '.join(runnable_samplers(config))}, not {name}: its "
                              f"noise predictor was never trained (it comes from the {config.stage} stage)")


def stage_losses(config: Config) -> list[tuple[str, float]]:
    """(loss name, weight) of the stage's training loss: the anchor stages' image losses, the diffusion's image
    losses (``optim.loss_type: image``), DFPL's image loss (``optim.dfpl_image_loss``, weight 1) or the loss on
    the UNet's output (``optim.loss_type``, weight 1)."""
    optim = config.optim
    field = stage_spec(config).losses or ("image_loss" if optim.loss_type == "image" else None)
    if field is not None:
        return list(zip(getattr(optim, field), getattr(optim, f"{field}_weights"), strict=True))
    return [(optim.dfpl_image_loss if optim.loss_type == "dfpl" else optim.loss_type, 1.0)]


def lpips_nets(config: Config) -> set[str]:
    """The LPIPS backbones ("alex", "vgg") the stage's training loss uses."""
    return {name.removeprefix("lpips_") for name, _ in stage_losses(config) if name.startswith("lpips_")}


def missing_earlier_stage(config: Config) -> str | None:
    """Why a fresh run of this configuration needs ``init_from`` (None if it does not): the TS stages after the
    first train on frozen networks of the earlier ones, which must not be random."""
    if config.init_from is not None:
        return None
    if config.stage == "he":
        return ("stage he trains the HE network on a frozen anchor encoder: set init_from to the anchor stage's "
                "checkpoint (cfg/train/ts_encoder.yaml)")
    if config.stage == "diffusion" and config.model.he_network:
        return ("stage diffusion with model.he_network freezes the anchor encoder and the HE network: set init_from "
                "to the he stage's checkpoint (cfg/train/ts_he.yaml)")
    return None


def networks_from_earlier_stage(config: Config, available: set[str]) -> dict[Network, bool]:
    """What ``init_from`` loads: network -> required, given the prefixes an earlier stage's checkpoint holds. The
    anchor encoder always; the HE network when the model has one and the checkpoint holds it, and required by
    the diffusion stage (which keeps it frozen)."""
    wanted: dict[Network, bool] = {"encoder": True}
    if config.model.he_network and ("he_network" in available or config.stage == "diffusion"):
        wanted["he_network"] = config.stage == "diffusion"
    return wanted


def required_lpips_nets(config: Config, has_validation: bool) -> list[str]:
    """The LPIPS backbones ("alex", "vgg") a training run of ``config`` uses: its stage loss's
    (:func:`lpips_nets`) and AlexNet for a followed monitor computed with it."""
    return sorted(lpips_nets(config) | ({"alex"} if monitor_needs_lpips(config, has_validation) else set()))
