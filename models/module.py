"""The LightningModule: optimisation, logging, validation and test around the anchored diffusion."""

from __future__ import annotations

from typing import Any, get_args

import pytorch_lightning as pl
import torch
from lion_pytorch import Lion
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau
from torchvision.utils import make_grid

from models.anchor import AnchorEncoder, HENetwork, anchor_from_features, color_map, condition_features, equalized
from models.diffusion import GaussianDiffusion
from models.inference import Enhanced, enhance
from models.losses import AnchorLoss, Frozen, build_image_loss, dfpl_loss, noise_loss
from models.padding import pad_to_multiple
from models.unet import NoiseUNet
from utils.config import Config, ConfigError, SamplerConfig, SamplerName, config_from_dict
from utils.lpips import LPIPSWeightsMissing, build_lpips, lpips_available, missing_weights_message
from utils.metrics import METRICS, combined_score, score_pairs
from utils.training import TrainingDiverged, keeps_best_checkpoint

VAL_METRICS = (*METRICS, "combined")
"""What validation logs, as ``val/<name>`` (``lpips`` and ``combined`` are computed with LPIPS-AlexNet)."""
LPIPS_METRICS = ("val/lpips", "val/combined")


def build_networks(config: Config) -> tuple[AnchorEncoder, GaussianDiffusion]:
    """The anchor encoder and the diffusion (with its UNet) described by ``config``."""
    m, d = config.model, config.diffusion
    shared = dict(dim_mults=m.dim_mults, use_instance_norm=m.use_instance_norm, weight_init=m.weight_init)
    unet = NoiseUNet(dim=m.unet_dim, in_dim=m.in_dim, out_dim=m.unet_outdim, stronger_cond=m.stronger_cond,
                     use_wn=m.use_wn, **shared)
    encoder = AnchorEncoder(dim=m.cond_dim or m.unet_dim, in_dim=m.cond_in_dim, out_dim=m.unet_outdim,
                            on_res=m.cond_on_res, zero_residual=m.cond_zero_residual, use_wn=m.cond_use_wn,
                            **shared)
    diffusion = GaussianDiffusion(unet, timesteps=d.timesteps, beta_schedule_name=d.beta_schedule,
                                  use_center=d.use_center, use_center_sampler=d.use_center_sampler,
                                  clip_denoised=d.clip_denoised)
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


def logged_metrics(has_validation: bool) -> tuple[str, ...]:
    """Every metric a training run logs that ``trainer.monitor`` can follow: ``train/loss``, and with validation
    ``val/<name>`` for each of :data:`VAL_METRICS`."""
    return ("train/loss", *(f"val/{name}" for name in VAL_METRICS)) if has_validation else ("train/loss",)


def monitor_users(config: Config, has_validation: bool) -> list[str]:
    """What follows ``trainer.monitor`` in this configuration: the best checkpoint, the plateau LR schedule."""
    users = ["the best checkpoint (trainer.save_top_k)"] if keeps_best_checkpoint(config, has_validation) else []
    return users + (["optim.scheduler: plateau"] if config.optim.scheduler == "plateau" else [])


def check_monitor(config: Config, has_validation: bool) -> None:
    """Refuse at start-up a ``trainer.monitor`` that no configuration logs (a typo), or that something follows
    (the best checkpoint, the plateau schedule) but this configuration never logs (a val/ metric without
    validation), which Lightning would report only after the first validation, or never."""
    users, monitor = monitor_users(config, has_validation), config.trainer.monitor
    if monitor not in logged_metrics(True):  # no configuration logs it: a typo, whether or not anything follows it
        raise ConfigError(f"trainer.monitor: {monitor!r} is never logged; training logs "
                          f"{', '.join(logged_metrics(True))}")
    logged = logged_metrics(has_validation)
    if users and monitor not in logged:
        why = "" if has_validation else " (no validation: data.val_folder is null)"
        raise ConfigError(f"trainer.monitor: {monitor!r}, which {' and '.join(users)} follow(s), is never logged by "
                          f"this configuration{why}; it logs {', '.join(logged)}")


def required_lpips_nets(config: Config, has_validation: bool) -> list[str]:
    """The LPIPS backbones ("alex", "vgg") a training run of ``config`` uses: its loss's (DFPL's image loss, or
    the anchor stages' losses) and AlexNet for a followed monitor computed with it."""
    optim = config.optim
    losses = {"anchor": optim.anchor_loss, "he": optim.he_loss}.get(
        config.stage, [optim.dfpl_image_loss] if optim.loss_type == "dfpl" else [])
    nets = {name.removeprefix("lpips_") for name in losses if name.startswith("lpips_")}
    return sorted(nets | ({"alex"} if monitor_needs_lpips(config, has_validation) else set()))


def monitor_needs_lpips(config: Config, has_validation: bool) -> bool:
    """Whether the followed ``trainer.monitor`` is computed with LPIPS-AlexNet (val/lpips, val/combined)."""
    return bool(monitor_users(config, has_validation)) and config.trainer.monitor in LPIPS_METRICS


def runnable_samplers(config: Config) -> tuple[str, ...]:
    """The samplers a model of this config can run: all of them after a ``diffusion`` stage; only ``anchor`` when
    its noise predictor was never trained (a checkpoint of stage ``anchor`` or ``he``)."""
    return get_args(SamplerName) if config.stage == "diffusion" else ("anchor",)


class AnlightenDiff(pl.LightningModule):
    """``model`` is the GaussianDiffusion (its UNet is ``model.unet``), ``encoder`` the anchor encoder,
    ``he_network`` the TS variant's HE network H (None without ``model.he_network``); the FS prefixes match the
    official checkpoint (models/checkpoint.py maps the TS one's). Batches are dicts {"low", "high", "name"}.

    ``config.stage``: ``anchor`` trains the encoder alone, ``he`` the HE network alone (on the frozen encoder),
    ``diffusion`` the UNet (encoder and HE network frozen; the encoder trained too with ``optim.train_encoder``)."""

    def __init__(self, config: Config | dict[str, Any]):
        super().__init__()
        self.config = config if isinstance(config, Config) else config_from_dict(config)
        self.save_hyperparameters({"config": self.config.to_dict()})
        self.encoder, self.model = build_networks(self.config)
        self.he_network = build_he_network(self.config)
        self.encoder.requires_grad_(self.trains_encoder)
        self.model.requires_grad_(self.config.stage == "diffusion")
        if self.he_network is not None:
            self.he_network.requires_grad_(self.config.stage == "he")
        self._image_loss = None
        self._anchor_loss: AnchorLoss | None = None
        self._he_loss: AnchorLoss | None = None
        self._lpips_alex = None

    @property
    def trains_encoder(self) -> bool:
        """The anchor stage trains the encoder alone; the diffusion stage only if ``optim.train_encoder``."""
        return self.config.stage == "anchor" or self.config.optim.train_encoder

    def prepare_training(self, has_validation: bool) -> None:
        """Build now, before a run writes anything, every LPIPS network training will use, so that missing
        weights stop the run at once with LPIPSWeightsMissing (its message names the command that fetches them)
        instead of in the first training step or after the first validation: the training loss (DFPL's image
        loss, or the anchor stage's losses) and LPIPS-AlexNet when the followed monitor is computed with it."""
        for net in required_lpips_nets(self.config, has_validation):
            if not lpips_available(net):
                raise LPIPSWeightsMissing(missing_weights_message(net))
        optim = self.config.optim
        if self.config.stage == "anchor":
            self._anchor_loss = AnchorLoss(optim.anchor_loss, optim.anchor_loss_weights)
        elif self.config.stage == "he":
            self._he_loss = AnchorLoss(optim.he_loss, optim.he_loss_weights)
        elif optim.loss_type == "dfpl":
            self._image_loss = build_image_loss(optim.dfpl_image_loss)
        if monitor_needs_lpips(self.config, has_validation) and self._lpips_alex is None:
            self._lpips_alex = Frozen(build_lpips("alex"))

    def networks_from_earlier_stage(self, available: set[str]) -> dict[str, tuple[torch.nn.Module, bool]]:
        """What ``init_from`` loads: state-dict prefix -> (network, required), given the prefixes an earlier
        stage's checkpoint holds. The anchor encoder always; the HE network when this model has one and the
        checkpoint holds it, and required by the diffusion stage (which keeps it frozen)."""
        wanted: dict[str, tuple[torch.nn.Module, bool]] = {"encoder": (self.encoder, True)}
        if self.he_network is not None and ("he_network" in available or self.config.stage == "diffusion"):
            wanted["he_network"] = (self.he_network, self.config.stage == "diffusion")
        return wanted

    # ----------------------------------------------------------------- inference
    def anchor(self, img_lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, H, W) in [0, 1] -> (anchor phi (B, 3, H, W), encoder feature maps): FS the encoder's output,
        TS the screen blend of the HE network's zeta and the encoder's img_c (see
        :func:`models.anchor.anchor_from_features`)."""
        return anchor_from_features(self.encoder, condition_features(img_lr), self.he_network)

    def he_output(self, img_lr: torch.Tensor) -> torch.Tensor:
        """The HE network's zeta (B, 3, H, W) in [0, 1] for (B, 3, H, W) images in [0, 1] that fit the networks
        (sides multiples of 2 ** (len(model.dim_mults) - 1), as ``diffusion.pad_multiple`` is): what stage ``he``
        trains against hr."""
        img_c, _ = self.encoder(img_lr)
        return self.he_network(equalized(img_lr), img_c)

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers this model can run (:func:`runnable_samplers` of its config)."""
        return runnable_samplers(self.config)

    def require_sampler(self, name: str) -> None:
        """A CheckpointError unless this model can run sampler ``name``: what the scripts check before any work,
        and :meth:`enhance` again."""
        if name not in self.samplers:
            from models.checkpoint import CheckpointError  # models.checkpoint imports this module

            raise CheckpointError(f"this checkpoint runs only {', '.join(self.samplers)}, not {name}: its noise "
                                  f"predictor was never trained (it comes from the {self.config.stage} stage)")

    def enhance(self, img_lr: torch.Tensor, sampler: SamplerConfig | None = None, **kwargs: Any) -> Enhanced:
        """Enhance (B, 3, H, W) images in [0, 1] with a sampler config (default: ``config.sampler``)."""
        sampler = sampler or self.config.sampler
        self.require_sampler(sampler.sampler)
        # without DRDS, x_T itself is noise (see GaussianDiffusion.sampling_start)
        stochastic = sampler.sampler == "ddpm" or sampler.eta > 0 or not self.config.diffusion.use_center_sampler
        generator = None
        if stochastic and sampler.seed is not None:
            generator = torch.Generator(device=img_lr.device).manual_seed(sampler.seed)
        return enhance(self.encoder, self.model, img_lr, sampler=sampler.sampler, steps=sampler.steps,
                       eta=sampler.eta, pad_multiple=self.config.diffusion.pad_multiple, generator=generator,
                       he_network=self.he_network, detail=sampler.detail, **kwargs)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.config.stage == "anchor":
            loss = self._anchor_step(batch)
        elif self.config.stage == "he":
            loss = self._he_step(batch)
        else:
            loss = self._diffusion_step(batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite training loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["low"].shape[0])
        return loss

    def _anchor_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Stage ``anchor``: the encoder's anchor against its target (hr or C(hr))."""
        if self._anchor_loss is None:
            optim = self.config.optim
            self._anchor_loss = AnchorLoss(optim.anchor_loss, optim.anchor_loss_weights)
        center, _ = self.encoder(batch["low"])
        with torch.autocast(self.device.type, enabled=False):  # the losses in fp32 under mixed precision
            return self._anchor_loss(center.float(), self.anchor_target(batch["high"]))

    def _he_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Stage ``he``: the HE network's zeta = H([HE(lr), img_c]) against hr, on the frozen encoder's img_c."""
        if self._he_loss is None:
            self._he_loss = AnchorLoss(self.config.optim.he_loss, self.config.optim.he_loss_weights)
        img_lr = batch["low"]
        with torch.no_grad():
            img_c, _ = self.encoder(img_lr)
        zeta = self.he_network(equalized(img_lr), img_c)
        with torch.autocast(self.device.type, enabled=False):  # the losses in fp32 under mixed precision
            return self._he_loss(zeta.float(), batch["high"])

    def anchor_target(self, img_hr: torch.Tensor) -> torch.Tensor:
        """What the anchor stage fits: hr itself or its chromaticity C(hr) (``optim.anchor_target``)."""
        return color_map(img_hr) if self.config.optim.anchor_target == "chroma" else img_hr

    def _diffusion_step(self, batch: dict[str, Any]) -> torch.Tensor:
        img_lr, img_hr = batch["low"], batch["high"]
        optim, diffusion = self.config.optim, self.model
        center: torch.Tensor | None = None
        feats: list[torch.Tensor] = []
        if diffusion.use_center:
            with torch.set_grad_enabled(self.trains_encoder):
                center, feats = self.anchor(img_lr)
            if optim.ref_prob > 0 and torch.rand((), device=self.device) < optim.ref_prob:  # no draw without it (TS)
                center = img_hr  # teacher forcing: the ground truth as anchor ("ref")
        # else, as the reference without DRDA: no anchor and no encoder features (the config then has
        # model.stronger_cond false, so the UNet takes none)
        x_start = diffusion.img2res(img_hr, img_lr)
        t = torch.randint(0, diffusion.num_timesteps, (img_lr.shape[0],), device=self.device)
        eps = torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, t, center, noise=eps)
        eps_hat = diffusion.unet(x_t, t, img_lr, feats)
        eps_star = diffusion.drda_noise(eps, t, center)
        if optim.loss_type == "dfpl":
            if self._image_loss is None:
                self._image_loss = build_image_loss(optim.dfpl_image_loss)
            loss = dfpl_loss(diffusion, self._image_loss, x_start, t, center, img_lr, eps_hat, eps_star)
        else:
            loss = noise_loss(optim.loss_type, eps_hat, eps_star)
        return loss

    def configure_optimizers(self) -> Any:
        optim = self.config.optim
        params = list(self.model.parameters()) if self.config.stage == "diffusion" else []
        if self.trains_encoder:
            params += list(self.encoder.parameters())
        if self.config.stage == "he":
            params += list(self.he_network.parameters())
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
        """What a stage is evaluated on, as an Enhanced whose ``image`` is scored: the anchor (stage anchor), the
        HE network's zeta (stage he, with the TS anchor beside it), the enhanced image (stage diffusion)."""
        if self.config.stage == "diffusion":
            return self.enhance(img_lr, sampler)
        anchored = self.enhance(img_lr, SamplerConfig(sampler="anchor"))
        if self.config.stage == "anchor":
            return anchored
        height, width = img_lr.shape[-2:]
        zeta = self.he_output(pad_to_multiple(img_lr, self.config.diffusion.pad_multiple))
        return Enhanced(image=zeta[..., :height, :width], anchor=anchored.anchor)

    def _evaluate(self, batch: dict[str, Any], stage: str, batch_idx: int) -> None:
        sampler = self.config.val_sampler if stage == "val" else self.config.sampler
        result = self._stage_result(batch["low"], sampler)
        target = self.anchor_target(batch["high"]) if self.config.stage == "anchor" else batch["high"]
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
