"""Train AnlightenDiff: ``python train.py --cfg cfg/train/tiny.yaml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from data.datamodule import datamodule_from_config
from data.datasets import DatasetError, DatasetNotFoundError
from models import AnlightenDiff, CheckpointError
from models.checkpoint import load_earlier_stage, read_checkpoint
from models.stages import has_unused_trained_parameters, missing_earlier_stage
from utils.cli import UserError, ensure_output_dir, run_cli
from utils.config import Config, ConfigError, config_from_dict, load_config
from utils.image_io import ImagePathNotFoundError, ImageReadError
from utils.lpips import LPIPSWeightsMissing
from utils.training import (
    TrainingDiverged,
    TrainingInterrupted,
    build_callbacks,
    build_trainer,
    check_monitor,
    keeps_best_checkpoint,
)

RESUME_KEYS = {"model": None, "diffusion": None, "optim": ("optimizer", "train_encoder", "scheduler", "ema_decay")}
"""Config keys a resumed run must share with its checkpoint (None: the whole section): they shape the weights,
the optimizer state or the callbacks' state."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train AnlightenDiff. Each run writes to <trainer.output_dir>/<trainer.run_name>/version_N "
                    "(config.yaml, TensorBoard logs, checkpoints/last.ckpt and the best checkpoint). Ctrl-C or "
                    "SIGTERM stops after the running step with checkpoints/last.ckpt saved (exit 130 / 143); "
                    "--resume continues from it.",
        epilog="example: python train.py --cfg cfg/train/tiny.yaml data.extra_train_folders=[my_pairs] "
               "trainer.max_steps=100")
    parser.add_argument("--cfg", required=True, help="YAML config (see cfg/train/); unset keys take the paper's "
                                                     "defaults")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides of config values, validated like the file (e.g. optim.lr=1e-4)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                        help="continue an interrupted run: its version_N folder (uses checkpoints/last.ckpt) or a "
                             "checkpoint file; weights, optimizer state, step, epoch and LR schedule are restored")
    parser.add_argument("--no-test", action="store_true", help="skip the final test on the best checkpoint")
    parser.add_argument("--fast-dev-run", action="store_true",
                        help="one training and one validation batch, no checkpoints: checks the set-up")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the flags


def resolve_resume(resume: str | None, output_dir: Path, run_name: str) -> tuple[int | None, str | None]:
    """(logger version to continue, checkpoint path) for ``--resume``; (None, None) for a fresh run."""
    if resume is None:
        return None, None
    path = Path(resume)
    checkpoint = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise UserError(f"--resume {resume}: no checkpoint at {checkpoint}")
    run_dir = checkpoint.parent.parent
    if run_dir.parent.resolve() == (output_dir / run_name).resolve() and run_dir.name.startswith("version_"):
        return int(run_dir.name.removeprefix("version_")), str(checkpoint)
    return None, str(checkpoint)


def check_resumable(checkpoint: str, config: Config) -> None:
    """Refuse, before anything is written, a ``--resume`` file that is not a training checkpoint of this project
    or whose architecture/optimizer differ from the config's."""
    ckpt = read_checkpoint(checkpoint)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise UserError(f"--resume {checkpoint}: not a training checkpoint (no optimizer or loop state); it can be "
                        "evaluated with test.py but not resumed")
    saved = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict):
        raise UserError(f"--resume {checkpoint}: the checkpoint holds no config of this project")
    try:  # keys the checkpoint's version of the project did not have yet take their defaults
        saved = config_from_dict(saved).to_dict()
    except ConfigError as err:
        raise UserError(f"--resume {checkpoint}: the checkpoint's config is not valid here ({err})") from None
    current = config.to_dict()
    diffs = [f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, config {value!r}"
             for section, keys in RESUME_KEYS.items() for key, value in current[section].items()
             if (keys is None or key in keys) and saved.get(section, {}).get(key) != value]
    if diffs:
        raise UserError(f"--resume {checkpoint}: the config does not match the checkpoint's ({'; '.join(diffs)}); "
                        "pass the config it was trained with")


def run_stage(trainer: pl.Trainer, stage: Callable[[], Any]) -> None:
    """``trainer.fit`` or ``trainer.test``: Lightning ends a KeyboardInterrupt (or a SIGTERM outside the training
    loop) with its own sys.exit(1); turn it back into the KeyboardInterrupt it was (exit 130)."""
    try:
        stage()
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def init_from_earlier_stage(module: AnlightenDiff, path: str) -> list[str]:
    """Load the networks the earlier stage's checkpoint ``path`` (``init_from``) hands over into ``module``: the
    anchor encoder, and the HE network of the TS variant (see :func:`models.checkpoint.load_earlier_stage`); a
    missing file or network, or one of another shape, is a CheckpointError naming the key and the file."""
    return load_earlier_stage(module, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.cfg, args.overrides)
    has_validation = config.data.val_folder is not None
    check_monitor(config, has_validation)
    pl.seed_everything(config.seed, workers=True)
    output_dir = Path(config.trainer.output_dir)
    version, ckpt_path = resolve_resume(args.resume, output_dir, config.trainer.run_name)
    if ckpt_path is not None:
        check_resumable(ckpt_path, config)
    elif (missing := missing_earlier_stage(config)) is not None:
        raise ConfigError(missing)
    datamodule = datamodule_from_config(config.data, config.seed)
    datamodule.setup("fit")  # refuse missing or unpaired training data before anything is written
    module = AnlightenDiff(config)
    module.prepare_training(has_validation)  # missing LPIPS weights stop the run here, before anything is written
    if config.init_from is not None and ckpt_path is None:  # a bad init_from too
        init_from_earlier_stage(module, config.init_from)
    if not args.fast_dev_run and rank_zero_only.rank == 0:
        ensure_output_dir(output_dir / config.trainer.run_name, "trainer.output_dir")
    logger = TensorBoardLogger(save_dir=str(output_dir), name=config.trainer.run_name, version=version,
                               default_hp_metric=False)
    run_dir = Path(logger.log_dir)  # a fresh run (version None): the logger's next unused version_N
    callbacks = build_callbacks(config, run_dir / "checkpoints", has_validation,
                                run_dir=None if args.fast_dev_run else run_dir, resumed=ckpt_path is not None)
    try:
        trainer = build_trainer(config, logger, callbacks, fast_dev_run=args.fast_dev_run,
                                find_unused_parameters=has_unused_trained_parameters(config))
    except MisconfigurationException as err:
        raise UserError(f"trainer settings: {err}") from None
    try:
        run_stage(trainer, lambda: trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path))
    except TrainingInterrupted as stop:
        if trainer.is_global_zero:
            print(f"interrupted: {stop}; continue with --resume {run_dir}", file=sys.stderr)
        return 128 + stop.signum
    except TrainingDiverged as err:
        last = run_dir / "checkpoints" / "last.ckpt"
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written"
        raise TrainingDiverged(f"{err}; training stopped, {kept}") from None
    if trainer.interrupted:
        return 128 + signal.SIGINT
    has_test = config.data.test_folder is not None or config.data.use_dataset != "folder"
    if not args.no_test and not args.fast_dev_run and has_test:
        best = "best" if keeps_best_checkpoint(config, has_validation) else "last"
        run_stage(trainer, lambda: trainer.test(module, datamodule=datamodule, ckpt_path=best))
    if trainer.is_global_zero:
        print(f"run folder: {run_dir}")
    return 0


USER_ERRORS = (ConfigError, CheckpointError, ImageReadError, ImagePathNotFoundError, DatasetError, DatasetNotFoundError,
               LPIPSWeightsMissing, TrainingDiverged)
"""The project's own errors for what the user can fix (with UserError): one line, exit 2. Anything else is a bug
and keeps its traceback."""

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
