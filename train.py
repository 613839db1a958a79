"""Train AnlightenDiff: ``python train.py --cfg cfg/train/tiny.yaml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from data.datamodule import datamodule_from_config
from models import AnlightenDiff, CheckpointError
from utils.cli import UserError, run_cli
from utils.config import ConfigError, load_config, save_config
from utils.image_io import ImageReadError
from utils.lpips import LPIPSWeightsMissing
from utils.training import build_callbacks, build_trainer, next_version


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train AnlightenDiff. Each run writes to <trainer.output_dir>/<trainer.run_name>/version_N "
                    "(config.yaml, TensorBoard logs, checkpoints/last.ckpt and the best checkpoint).",
        epilog="example: python train.py --cfg cfg/train/tiny.yaml data.extra_train_folders=[my_pairs] "
               "trainer.max_steps=100")
    parser.add_argument("--cfg", required=True, help="YAML config (see cfg/train/); unset keys take the paper's "
                                                     "defaults")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides of config values, validated like the file (e.g. optim.lr=1e-4)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                        help="continue an interrupted run: its version_N folder (uses checkpoints/last.ckpt) or a "
                             "checkpoint file; optimizer state, step and epoch are restored")
    parser.add_argument("--no-test", action="store_true", help="skip the final test on the best checkpoint")
    parser.add_argument("--fast-dev-run", action="store_true",
                        help="one training and one validation batch, no checkpoints: checks the set-up")
    return parser.parse_args(argv)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.cfg, args.overrides)
    pl.seed_everything(config.seed, workers=True)
    output_dir = Path(config.trainer.output_dir)
    version, ckpt_path = resolve_resume(args.resume, output_dir, config.trainer.run_name)
    if version is None:
        version = next_version(output_dir / config.trainer.run_name)
    logger = TensorBoardLogger(save_dir=str(output_dir), name=config.trainer.run_name, version=version,
                               default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    datamodule = datamodule_from_config(config.data, config.seed)
    module = AnlightenDiff(config)
    has_validation = config.data.val_folder is not None
    callbacks = build_callbacks(config, run_dir / "checkpoints", has_validation)
    trainer = build_trainer(config, logger, callbacks, fast_dev_run=args.fast_dev_run)
    if trainer.is_global_zero and not args.fast_dev_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / ("config.yaml" if ckpt_path is None else "config_resumed.yaml"))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.interrupted:
        return 130
    has_test = config.data.test_folder is not None or config.data.use_dataset != "folder"
    if not args.no_test and not args.fast_dev_run and has_test:
        best = "best" if has_validation else "last"
        trainer.test(module, datamodule=datamodule, ckpt_path=best)
    print(f"run folder: {run_dir}")
    return 0


USER_ERRORS = (ConfigError, CheckpointError, ImageReadError, LPIPSWeightsMissing, FileNotFoundError, ValueError,
               FloatingPointError)

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
