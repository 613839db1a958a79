"""Run folders, callbacks and the Lightning Trainer, built from a :class:`utils.config.Config`."""

from __future__ import annotations

import re
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from utils.config import Config


def next_version(run_root: Path) -> int:
    """The first unused ``version_N`` under ``run_root``: every run gets a fresh folder."""
    versions = [int(m.group(1)) for p in run_root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions, default=-1) + 1


def build_callbacks(config: Config, checkpoint_dir: Path, has_validation: bool) -> list[Callback]:
    """Best checkpoint on the monitored validation metric (when there is validation), plus ``last.ckpt``."""
    trainer = config.trainer
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best-{step}",
            monitor=trainer.monitor if has_validation else None,
            mode=trainer.monitor_mode,
            save_top_k=trainer.save_top_k if has_validation else 0,
            save_last=True,
            every_n_train_steps=trainer.checkpoint_every_n_steps or None,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if config.optim.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=config.optim.ema_decay))
    return callbacks


def build_trainer(config: Config, logger: TensorBoardLogger, callbacks: list[Callback],
                  fast_dev_run: bool = False) -> pl.Trainer:
    """A Lightning Trainer from the ``trainer`` section (devices, nodes, strategy, precision, clipping)."""
    t = config.trainer
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm="norm",
        accumulate_grad_batches=t.accumulate_grad_batches,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        val_check_interval=t.val_check_interval,
        log_every_n_steps=t.log_every_n_steps,
        limit_val_batches=t.limit_val_batches,
        deterministic=t.deterministic,
        logger=logger,
        callbacks=callbacks,
        fast_dev_run=fast_dev_run,
        default_root_dir=logger.log_dir,
    )
