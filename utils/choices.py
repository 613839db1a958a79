"""Every choice of the configuration (schedules, samplers, losses, datasets, stages, ...), declared once as a
``typing.Literal``: utils/config.py types its fields with them, so loading refuses any other value naming the
valid ones, and the modules that implement a choice read the same declaration (``typing.get_args``) without
importing the config schema."""

from __future__ import annotations

import typing
from typing import Literal

BetaSchedule = Literal["cosine", "linear"]
"""``diffusion.beta_schedule`` (models/schedule.py)."""
SamplerName = Literal["ddpm", "ddim", "anchor"]
"""``sampler.sampler`` and ``val_sampler.sampler``, the scripts' ``--sampler`` (models/samplers.py)."""
DetailName = Literal["model", "input"]
"""Where the output's fine detail comes from: ``model`` (the network's pixels, the paper) or ``input`` (the
photo's own detail and colours re-exposed by the model, models/detail.py)."""
Stage = Literal["anchor", "he", "diffusion"]
"""``stage``: what a training run trains (models/stages.py)."""
NoiseLossName = Literal["l1", "l2"]
"""Noise-space losses (models/losses.py:NoiseLoss): ``l1`` is the smooth L1 (Huber, beta 1) of the reference."""
LossType = Literal["dfpl", NoiseLossName, "image"]
"""``optim.loss_type``: DFPL, a loss between the UNet's output and its target (``l1``, ``l2``: in noise space for
``diffusion.prediction: eps``), or image losses on the image rebuilt from x0_hat (``image``: ``optim.image_loss``)."""
Prediction = Literal["eps", "x0", "v"]
"""``diffusion.prediction``: what the UNet outputs (models/diffusion.py)."""
DiffusionDomain = Literal["residual", "image"]
"""``diffusion.domain``: what x0 is, the residual 2 (hr - lr) - 1 (the paper) or the image 2 hr - 1."""
TrainTimesteps = Literal["all", "sampler"]
"""``optim.train_timesteps``: the timesteps training draws t from, all of them (the paper) or those the validation
sampler visits."""
SamplingStart = Literal["anchor", "marginal"]
"""``diffusion.sampling_start``: x_T is the anchor c' (the reference) or a draw of DRDA's forward marginal at T."""
ImageLossName = Literal["lpips_vgg", "lpips_alex", "l1", "l2"]
"""``optim.dfpl_image_loss`` (models/losses.py:build_image_loss)."""
AnchorLossName = Literal["msssim", ImageLossName]
"""Entries of ``optim.anchor_loss`` and ``optim.he_loss`` (models/losses.py:AnchorLoss)."""
OptimizerName = Literal["lion", "adamw"]
SchedulerName = Literal["cosine", "plateau"]
AnchorTarget = Literal["chroma", "hr"]
DatasetName = Literal["LOL", "LOLv2", "LOLv2_synthetic", "VELOL", "LOL+LOLv2", "LOL+LOLv2+VELOL", "folder"]
"""``data.use_dataset`` (data/datamodule.py:DATASET_COMBINATIONS maps each to its layouts)."""
SynthKind = Literal["dark", "identity", "bright"]
"""Entries of ``data.synth_kinds`` (data/exposure.py)."""
TestGeometry = Literal["pad", "center_crop"]
MonitorMode = Literal["min", "max"]
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)
"""Inference precisions: fp32, or autocast of the two networks to bf16/fp16 (the sampler stays fp32)."""


def precision_error(precision: str, device_type: str) -> str | None:
    """Why ``precision`` cannot run on a ``device_type`` device ("cpu", "cuda"), or None if it can: one of
    :data:`PRECISIONS`, and fp16 only on CUDA."""
    if precision not in PRECISIONS:
        return f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}"
    if precision == "fp16" and device_type != "cuda":
        return f"precision fp16 needs a CUDA device, not {device_type}; use fp32 or bf16"
    return None
