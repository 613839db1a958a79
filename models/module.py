"""The LightningModule: optimisation, logging, validation and test around the method
(:class:`models.anchored_diffusion.AnchoredDiffusion`)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from lion_pytorch import Lion
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau
from torchvision.utils import make_grid

from models.anchored_diffusion import AnchoredDiffusion, Objective
from models.build import build_method, build_objective
from models.inference import Enhanced
from models.losses import Frozen
from models.padding import pad_to_multiple
from models.stages import (
    require_sampler,
    required_lpips_nets,
    runnable_samplers,
    stage_spec,
    stage_target,
    trained_networks,
)
from utils.config import Config, SamplerConfig, config_from_dict
from utils.lpips import LPIPSWeightsMissing, build_lpips, lpips_available, missing_weights_message
from utils.metrics import combined_score, score_pairs
from utils.training import TrainingDiverged, monitor_needs_lpips

NETWORK_ORDER = ("model", "encoder", "he_network")
"""The order in which the trained networks' parameters enter the optimizer."""


class AnlightenDiff(pl.LightningModule):
    """Trains and evaluates ``method``, the :class:`AnchoredDiffusion` of ``config``, whose networks it holds
    under the official checkpoint's prefixes: ``model`` the GaussianDiffusion (its UNet ``model.unet``),
    ``encoder`` the anchor encoder, ``he_network`` the TS variant's HE network H (None without
    ``model.he_network``); models/checkpoint.py maps the TS reference's prefixes. Batches are dicts
    {"low", "high", "name"}. What ``config.stage`` trains and scores is models/stages.py's table."""

    def __init__(self, config: Config | dict[str, Any]):
        super().__init__()
        self.config = config if isinstance(config, Config) else config_from_dict(config)
        self.save_hyperparameters({"config": self.config.to_dict()})
        method = build_method(self.config)
        self.encoder, self.model, self.he_network = method.encoder, method.model, method.he_network
        # the method shares the networks registered above, so it is kept outside the module tree (its own
        # registration would add a second, prefixed copy of every key to the state dict)
        object.__setattr__(self, "method", method)
        self.method: AnchoredDiffusion
        trained = trained_networks(self.config)
        for name in NETWORK_ORDER:
            if getattr(self, name) is not None:
                getattr(self, name).requires_grad_(name in trained)
        self._objective: Objective | None = None
        self._lpips_alex: Frozen | None = None

    def prepare_training(self, has_validation: bool) -> None:
        """Build now, before a run writes anything, every LPIPS network training will use, so that missing
        weights stop the run at once with LPIPSWeightsMissing (its message names the command that fetches them)
        instead of in the first training step or after the first validation: the training loss's and
        LPIPS-AlexNet when the followed monitor is computed with it."""
        for net in required_lpips_nets(self.config, has_validation):
            if not lpips_available(net):
                raise LPIPSWeightsMissing(missing_weights_message(net))
        self._objective = build_objective(self.config)
        if monitor_needs_lpips(self.config, has_validation) and self._lpips_alex is None:
            self._lpips_alex = Frozen(build_lpips("alex"))

    @property
    def objective(self) -> Objective:
        """The stage's training loss (built on first use when :meth:`prepare_training` was not called)."""
        if self._objective is None:
            self._objective = build_objective(self.config)
        return self._objective

    # ----------------------------------------------------------------- inference
    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers this model can run (:func:`models.stages.runnable_samplers`)."""
        return runnable_samplers(self.config)

    def require_sampler(self, name: str) -> None:
        """A CheckpointError unless this model can run sampler ``name`` (:func:`models.stages.require_sampler`)."""
        require_sampler(self.config, name)

    def enhance(self, img_lr: torch.Tensor, sampler: SamplerConfig | None = None, **kwargs: Any) -> Enhanced:
        """Enhance (B, 3, H, W) images in [0, 1] with a sampler config (default: ``config.sampler``); keyword
        arguments go to :func:`models.inference.enhance` (precision, tiling, progress)."""
        sampler = sampler or self.config.sampler
        self.require_sampler(sampler.sampler)
        stochastic = sampler.sampler == "ddpm" or sampler.eta > 0 or self.model.start_draws_noise
        generator = None
        if stochastic and sampler.seed is not None:
            generator = torch.Generator(device=img_lr.device).manual_seed(sampler.seed)
        steps = self.method.sampler(sampler.sampler, sampler.steps, sampler.eta)
        return self.method.enhance(img_lr, steps, generator=generator, detail=sampler.detail, **kwargs)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The stage's loss on the batch; logs ``train/loss`` and each weighted term as ``train/loss/<name>``."""
        loss = self.method.loss(batch["low"], batch["high"], self.objective)
        if not torch.isfinite(loss.total):
            raise TrainingDiverged(f"non-finite training loss {loss.total.item()} at step {self.global_step}")
        batch_size = batch["low"].shape[0]
        self.log("train/loss", loss.total, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss/{name}": value for name, value in loss.terms.items()}, batch_size=batch_size)
        return loss.total

    def configure_optimizers(self) -> Any:
        optim = self.config.optim
        trained = trained_networks(self.config)
        params = [p for name in NETWORK_ORDER if name in trained for p in getattr(self, name).parameters()]
        if optim.optimizer == "lion":
            optimizer = Lion(params, lr=optim.lr, weight_decay=optim.weight_decay)
        else:
            optimizer = AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
        if optim.scheduler is None:
            return optimizer
        if optim.scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            scheduler = CosineAnnealingLR(optimizer, T_max=max(1, int(total)), eta_min=optim.min_lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = ReduceLROnPlateau(optimizer, mode=self.config.trainer.monitor_mode, min_lr=optim.min_lr,
                                      factor=optim.scheduler_factor, patience=optim.scheduler_patience)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.config.trainer.monitor}}

    # ----------------------------------------------------------------- evaluation
    def _lpips_model(self) -> torch.nn.Module | None:
        """LPIPS-AlexNet for validation and test, or None when its weights are not on this machine."""
        if self._lpips_alex is None and lpips_available("alex"):
            self._lpips_alex = Frozen(build_lpips("alex"))
        return self._lpips_alex.on(self.device) if self._lpips_alex is not None else None

    def _stage_result(self, img_lr: torch.Tensor, sampler: SamplerConfig) -> Enhanced:
        """What the stage is scored on (:attr:`models.stages.StageSpec.scores`), as an Enhanced whose ``image``
        is scored: the enhanced image, the anchor, or H's zeta (with the TS anchor beside it)."""
        scores = stage_spec(self.config).scores
        if scores == "enhanced":
            return self.enhance(img_lr, sampler)
        anchored = self.enhance(img_lr, SamplerConfig(sampler="anchor"))
        if scores == "anchor":
            return anchored
        height, width = img_lr.shape[-2:]
        zeta = self.method.he_output(pad_to_multiple(img_lr, self.config.diffusion.pad_multiple))
        return Enhanced(image=zeta[..., :height, :width], anchor=anchored.anchor)

    def _evaluate(self, batch: dict[str, Any], stage: str, batch_idx: int) -> None:
        sampler = self.config.val_sampler if stage == "val" else self.config.sampler
        result = self._stage_result(batch["low"], sampler)
        target = stage_target(self.config.stage, self.config.optim.anchor_target, batch["high"])
        for scores in score_pairs(zip(result.image, target, strict=True), self._lpips_model()):
            if scores["lpips"] is not None:
                scores["combined"] = combined_score(scores["psnr"], scores["ssim"], scores["lpips"])
            self.log_dict({f"{stage}/{k}": float(v) for k, v in scores.items() if v is not None}, on_epoch=True,
                          sync_dist=True, batch_size=1)
        if batch_idx == 0 and stage == "val":
            self._log_grid(batch, result)

    def _log_grid(self, batch: dict[str, Any], result: Enhanced) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        rows = [batch["low"][0], result.anchor[0], result.image[0], batch["high"][0]]
        grid = make_grid([r.clamp(0, 1).cpu() for r in rows], nrow=4, padding=2)
        experiment.add_image("val/low|anchor|enhanced|gt", grid, self.global_step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)
