"""Run folders, callbacks and the Lightning Trainer, built from a :class:`utils.config.Config`.

Reliability lives here: checkpoints are written atomically and never with non-finite weights
(:class:`AtomicCheckpointIO`); SIGINT/SIGTERM during training stop after the running step with ``last.ckpt``
saved (:class:`GracefulStop`); the random numbers of a step depend on (seed, epoch, batch) rather than on how long
the process has run, so a resumed run draws what an uninterrupted one would (:class:`ResumableRandomness`); the
merged config is written once per (re)start, by global rank 0 only, never over an existing file
(:class:`SaveRunConfig`).
"""

from __future__ import annotations

import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import DDPStrategy, Strategy
from torch.utils.data import ConcatDataset, RandomSampler

from utils.config import Config, ConfigError, save_config
from utils.image_io import atomic_write
from utils.metrics import METRICS

VAL_METRICS = (*METRICS, "combined")
"""What validation logs, as ``val/<name>`` (``lpips`` and ``combined`` are computed with LPIPS-AlexNet)."""
LPIPS_METRICS = ("val/lpips", "val/combined")


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights; the message names the step."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`utils.image_io.atomic_write` (temporary file in the same folder, fsync,
    rename): an interrupted or failed write (Ctrl-C, disk full) never leaves a truncated checkpoint and the
    previous file of that name stays intact. Weights that are not all finite are refused with TrainingDiverged,
    so a diverged run never replaces its last good checkpoint.

    Lightning's own TorchCheckpointIO (2.6, ``lightning_fabric.utilities.cloud_io._atomic_save``) is not atomic on a
    local disk: its fsspec transaction writes the bytes to a temporary file made by ``tempfile.mkstemp()`` in the
    system's temporary folder and then ``shutil.move``s it, which is a rename only where that folder is on the
    checkpoint's file system; elsewhere (a tmpfs /tmp, a scratch or network disk for the runs) it copies into the
    checkpoint's own path, so an interruption leaves it truncated. Nothing is fsynced either, and it has no check
    for non-finite weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        bad = next((k for k, v in checkpoint.get("state_dict", {}).items()
                    if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise TrainingDiverged(f"non-finite weights ({bad}) at step {checkpoint.get('global_step')}: "
                                     f"{path} not written, the previous checkpoint is kept")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a completed step; ``checkpoint`` holds that step (None: none saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f"; saved {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step}{saved}")


class GracefulStop(Callback):
    """The first SIGINT (Ctrl-C) or SIGTERM during training lets the running step finish, saves ``last.ckpt``
    beside ``checkpoint``'s files, lets Lightning log the step, then ends training with :class:`TrainingInterrupted`
    (skipping a validation that would be due). A second signal aborts at once (KeyboardInterrupt; the last
    checkpoint already on disk stays). Under DDP the ranks agree after every step, so all of them stop after the
    same one, whichever rank got the signal. A signal during validation takes effect after the next step.

    ``every_n_steps``: the ModelCheckpoint's period, whose own save of ``last.ckpt`` at such a step is not repeated.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: ModelCheckpoint | None, every_n_steps: int = 0):
        self.checkpoint, self.every_n_steps = checkpoint, every_n_steps
        self.received: int | None = None
        self.stopped: TrainingInterrupted | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, after Lightning registered its own SIGTERM handler, which this one replaces for the training loop
        self.received, self.stopped = None, None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this training step and saving last.ckpt "
              "(send it again to abort now)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self._agreed_signal(trainer, pl_module)
        if not signum or self.stopped is not None:
            return
        path, ckpt = None, self.checkpoint
        if ckpt is not None and ckpt.dirpath and not trainer.fast_dev_run:
            if saves_last_at(trainer.global_step, self.every_n_steps):
                path = last_checkpoint_path(ckpt)  # the ModelCheckpoint saves it right after this hook
            else:
                path = save_last_checkpoint(trainer, ckpt)
        self.stopped = TrainingInterrupted(signum, trainer.global_step, path)
        trainer.should_stop = True  # the step's metrics are logged, then the first hook below raises

    def _agreed_signal(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The signal received by any rank (0: none): one rank's signal stops them all, at the same point."""
        signum = self.received or 0
        if trainer.world_size > 1:
            signum = int(trainer.strategy.reduce(torch.tensor(float(signum), device=pl_module.device),
                                                 reduce_op="max").item())
        return signum

    def _raise_if_stopped(self, *args: Any) -> None:
        if self.stopped is not None:
            raise self.stopped

    on_validation_start = on_train_epoch_end = on_train_batch_start = _raise_if_stopped

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_stopped()
        signum = self._agreed_signal(trainer, pl_module)
        if signum:  # came during the last validation: training is complete and saved; skip what follows
            raise TrainingInterrupted(signum, trainer.global_step, None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([abs(int(k)) for k in keys]).generate_state(1)[0])


class ResumableRandomness(Callback):
    """Makes a training step's random numbers a function of (seed, rank, epoch, batch index) instead of the
    process's history, so that a run resumed from a checkpoint draws what the uninterrupted run would have.

    Before every training batch the global RNGs (torch, numpy, random: timesteps, noise, teacher forcing) are
    seeded from (seed, rank, epoch, batch); at the start of every epoch the training sampler's shuffle (when it is
    a plain RandomSampler; under DDP Lightning's DistributedSampler already shuffles by epoch) and the datasets'
    crop streams (``set_epoch``) restart from (seed, epoch). Resuming at an epoch boundary therefore reproduces
    the uninterrupted run exactly when ``data.num_workers`` is 0 (DataLoader workers keep the crop streams they
    started with). A mid-epoch resume restores weights, optimizer, step and LR schedule exactly, but Lightning
    restarts a non-resumable loader, so the rest of that epoch re-reads the epoch's order from its start.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed_epoch(trainer)  # also for a run resumed mid-epoch, where on_train_epoch_start is skipped

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seed_epoch(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed = derived_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _seed_epoch(self, trainer: pl.Trainer) -> None:
        epoch = trainer.current_epoch
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if type(sampler) is RandomSampler:
            # its own generator: the loader's also seeds workers, drawn at times that differ between runs
            sampler.generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        for dataset in _leaf_datasets(getattr(loader, "dataset", None)):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)


def _leaf_datasets(dataset: Any) -> list[Any]:
    if isinstance(dataset, ConcatDataset):
        return [leaf for part in dataset.datasets for leaf in _leaf_datasets(part)]
    return [] if dataset is None else [dataset]


class SaveRunConfig(Callback):
    """Writes the merged config into the run folder when fitting starts: on global rank 0 only (after DDP has
    launched, so every rank agreed on the folder), atomically and never over an existing file. A fresh run
    writes ``config.yaml``; each resume adds ``config_resumed.yaml``, ``config_resumed_2.yaml``, ..."""

    def __init__(self, config: Config, run_dir: Path, resumed: bool):
        self.config, self.run_dir, self.resumed = config, Path(run_dir), resumed
        self.path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.path is not None:
            return
        stem = "config_resumed" if self.resumed else "config"
        names = [f"{stem}.yaml"] + [f"{stem}_{i}.yaml" for i in range(2, 10_000)]
        self.path = next(self.run_dir / n for n in names if not (self.run_dir / n).exists())
        atomic_write(self.path, lambda tmp: save_config(self.config, tmp), overwrite=False)


class SaveFinalCheckpoint(Callback):
    """When training ends normally, ``last.ckpt`` holds the final weights, also when the last step is not one of
    the periodic saves (``max_steps`` not a multiple of ``checkpoint_every_n_steps``, or mid-epoch): Lightning's
    ModelCheckpoint saves ``last.ckpt`` at the end of training only when it has saved nothing before.

    ``every_n_steps``: the ModelCheckpoint's period (see :func:`saves_last_at`), whose saves are not repeated."""

    def __init__(self, checkpoint: ModelCheckpoint, every_n_steps: int = 0):
        self.checkpoint, self.every_n_steps = checkpoint, every_n_steps
        self.saved_step = 0  # as Lightning's: a run that takes no step has nothing to save

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if saves_last_at(trainer.global_step, self.every_n_steps):
            self.saved_step = trainer.global_step  # the ModelCheckpoint saves it right after this hook

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run and self.checkpoint.dirpath and self.saved_step != trainer.global_step:
            save_last_checkpoint(trainer, self.checkpoint)
            self.saved_step = trainer.global_step


def saves_last_at(step: int, every_n_steps: int) -> bool:
    """Whether the ``last.ckpt`` ModelCheckpoint of :func:`build_callbacks` saves at the end of the training batch
    that leaves the run at global step ``step``: every ``every_n_steps`` steps, never with 0 (it keeps no top-k
    checkpoints, so it saves nothing at epoch ends or after validation)."""
    return bool(every_n_steps) and step % every_n_steps == 0


def last_checkpoint_path(ckpt: ModelCheckpoint) -> Path:
    """Where ``ckpt`` keeps ``last.ckpt``."""
    return Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"


def save_last_checkpoint(trainer: pl.Trainer, ckpt: ModelCheckpoint) -> Path:
    """Save the training state now as ``ckpt``'s ``last.ckpt``, recorded as its own last checkpoint (which a
    resumed run then replaces instead of starting a last-v1.ckpt beside it); returns the path."""
    path = last_checkpoint_path(ckpt)
    ckpt.last_model_path = str(path)
    trainer.save_checkpoint(path)
    return path


class SkipNonFiniteGradients(Callback):
    """Skip an optimiser step whose gradients are not all finite, as torch's GradScaler does under fp16: the
    gradients are dropped (``None``), so the optimiser leaves those parameters and their moments as they are.

    A finite loss can have non-finite gradients: a power below 1 of a term that reaches 0 (MS-SSIM's contrast terms
    raised to its betas) has an unbounded derivative there. Each skip is reported on stderr; ``skipped`` counts
    them."""

    def __init__(self) -> None:
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norms = torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])
        if torch.isfinite(norms).all():
            return
        for p in params:
            p.grad = None
        self.skipped += 1
        if trainer.is_global_zero:
            print(f"step {trainer.global_step}: non-finite gradients, step skipped ({self.skipped} so far)",
                  file=sys.stderr)


def keeps_best_checkpoint(config: Config, has_validation: bool) -> bool:
    """Whether training keeps the best checkpoint on the monitored validation metric (else only last.ckpt)."""
    return has_validation and config.trainer.save_top_k != 0


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


def monitor_needs_lpips(config: Config, has_validation: bool) -> bool:
    """Whether the followed ``trainer.monitor`` is computed with LPIPS-AlexNet (val/lpips, val/combined)."""
    return bool(monitor_users(config, has_validation)) and config.trainer.monitor in LPIPS_METRICS


def build_callbacks(config: Config, checkpoint_dir: Path, has_validation: bool, *, run_dir: Path | None = None,
                    resumed: bool = False) -> list[Callback]:
    """Best checkpoint on the monitored validation metric (when there is validation), ``last.ckpt``, the learning
    rate log, the graceful stop on SIGINT/SIGTERM and resumable randomness; with ``run_dir`` also the config
    file (see :class:`SaveRunConfig`).

    Two checkpoint callbacks, because one cannot do both jobs: ``last.ckpt`` every ``checkpoint_every_n_steps``
    steps, and ``best-step=N.ckpt`` right after each validation (a callback saving on a step schedule would rank
    the weights of that step by the metric of an earlier validation). The best one comes first: it is
    ``trainer.checkpoint_callback``, which ``trainer.test(ckpt_path="best")`` reads.
    """
    trainer = config.trainer
    last = ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=0, save_last=True,
                           every_n_train_steps=trainer.checkpoint_every_n_steps or None)
    callbacks: list[Callback] = [last, LearningRateMonitor(logging_interval="step"),
                                 GracefulStop(last, trainer.checkpoint_every_n_steps),
                                 SaveFinalCheckpoint(last, trainer.checkpoint_every_n_steps),
                                 ResumableRandomness(config.seed), SkipNonFiniteGradients()]
    if keeps_best_checkpoint(config, has_validation):
        best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{step}", monitor=trainer.monitor,
                               mode=trainer.monitor_mode, save_top_k=trainer.save_top_k, save_last=False,
                               save_on_train_epoch_end=False)
        callbacks.insert(0, best)
    if run_dir is not None:
        callbacks.append(SaveRunConfig(config, run_dir, resumed))
    if config.optim.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=config.optim.ema_decay))
    return callbacks


def build_strategy(config: Config, find_unused_parameters: bool) -> str | Strategy:
    """``trainer.strategy``; for plain ``ddp``, DDP looks for parameters without gradients only when the
    configuration has some (``find_unused_parameters``: :func:`models.stages.has_unused_trained_parameters`)."""
    if config.trainer.strategy != "ddp":
        return config.trainer.strategy
    return DDPStrategy(find_unused_parameters=find_unused_parameters)


def build_trainer(config: Config, logger: TensorBoardLogger, callbacks: list[Callback], *,
                  find_unused_parameters: bool = False, fast_dev_run: bool = False) -> pl.Trainer:
    """A Lightning Trainer from the ``trainer`` section (devices, nodes, strategy, precision, clipping), saving
    checkpoints through :class:`AtomicCheckpointIO`. ``find_unused_parameters``: see :func:`build_strategy`."""
    t = config.trainer
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(config, find_unused_parameters),
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
        plugins=[AtomicCheckpointIO()],
        fast_dev_run=fast_dev_run,
        default_root_dir=logger.log_dir,
    )
