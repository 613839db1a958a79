"""LightningDataModule for paired low-light enhancement data (LOL, LOL-v2, VE-LOL and plain folders).

Batches are dicts ``{"low": float32 Bx3xHxW in [0, 1], "high": same, "name": list of B file names}``.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from data.datasets import DatasetError, PairedImageDataset, find_pairs_dirs
from data.exposure import ExposureSynthesis
from utils.config import DataConfig

DATASET_COMBINATIONS: dict[str, tuple[str, ...]] = {
    "LOL": ("LOL",),
    "LOLv2": ("LOLv2",),
    "LOLv2_synthetic": ("LOLv2_synthetic",),
    "VELOL": ("VELOL",),
    "LOL+LOLv2": ("LOL", "LOLv2"),
    "LOL+LOLv2+VELOL": ("LOL", "LOLv2", "VELOL"),
    "folder": (),
}
"""``use_dataset`` -> the layouts whose training splits are concatenated (as in the reference; LOLv2
means its Real_captured part). The first one's test split is the default test set."""

DEFAULT_ROOTS: dict[str, str] = {"LOL": "data/LOL", "LOLv2": "data/LOLv2", "VELOL": "data/VE-LOL-L"}
"""Dataset root per ``roots`` key; LOLv2_synthetic lives under the LOLv2 root."""

_ROOT_KEY = {"LOL": "LOL", "LOLv2": "LOLv2", "LOLv2_synthetic": "LOLv2", "VELOL": "VELOL"}


def collate_pairs(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch; images of different sizes raise DatasetError naming them."""
    sizes = {tuple(item["low"].shape) for item in batch}
    if len(sizes) > 1:
        listing = ", ".join(f"{it['name']} ({it['low'].shape[2]}x{it['low'].shape[1]})" for it in batch)
        raise DatasetError(
            f"cannot batch full-size images of different sizes: {listing}; use eval_batch_size=1"
        )
    return {
        "low": torch.stack([item["low"] for item in batch]),
        "high": torch.stack([item["high"] for item in batch]),
        "name": [item["name"] for item in batch],
    }


class LowLightDataModule(pl.LightningDataModule):
    """Training, validation, test and predict data for low-light enhancement.

    use_dataset: a key of DATASET_COMBINATIONS; "folder" trains on ``extra_train_folders`` only.
    roots: overrides of DEFAULT_ROOTS (keys LOL, LOLv2, VELOL), each in the layout the dataset ships
    with (see data.datasets.find_pairs_dirs). extra_train_folders: further ``low/`` + ``high/`` folders
    added to training (e.g. synthetic pairs). val_folder: a ``low/`` + ``high/`` folder for validation;
    None means no validation loop (validation is never silently the test split). test_folder: the test
    (and predict) set; None means the test split of the first dataset of ``use_dataset``.
    image_size: training crop side. exposure: synthetic exposures of the targets mixed into training
    (data.exposure). Training batches are random crops + augmentation; evaluation uses
    full images, batched by ``eval_batch_size`` (images of different sizes in one batch are an error,
    so keep 1 unless all evaluation images share a size). seed: training order and crops.
    """

    def __init__(
        self,
        use_dataset: str = "LOL+LOLv2+VELOL",
        roots: Mapping[str, str] | None = None,
        extra_train_folders: Sequence[str] = (),
        val_folder: str | None = None,
        test_folder: str | None = None,
        image_size: int = 160,
        train_batch_size: int = 24,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        seed: int = 3407,
        exposure: ExposureSynthesis | None = None,
    ):
        super().__init__()
        if use_dataset not in DATASET_COMBINATIONS:
            choices = list(DATASET_COMBINATIONS)
            raise DatasetError(f"unknown use_dataset {use_dataset!r}; expected one of {choices}")
        unknown = set(roots or {}) - set(DEFAULT_ROOTS)
        if unknown:
            expected = sorted(DEFAULT_ROOTS)
            raise DatasetError(f"unknown roots key(s) {sorted(unknown)}; expected some of {expected}")
        if use_dataset == "folder" and not extra_train_folders:
            raise DatasetError('use_dataset="folder" trains on extra_train_folders, which is empty')
        for name, value in (
            ("image_size", image_size),
            ("train_batch_size", train_batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value <= 0:
                raise DatasetError(f"{name} must be positive, got {value}")
        if num_workers < 0:
            raise DatasetError(f"num_workers must be >= 0, got {num_workers}")
        self.use_dataset = use_dataset
        self.roots = {**DEFAULT_ROOTS, **(roots or {})}
        self.extra_train_folders = list(extra_train_folders)
        self.val_folder = val_folder
        self.test_folder = test_folder
        self.image_size = image_size
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.exposure = exposure
        self.train_dataset: Dataset | None = None
        self.val_dataset: PairedImageDataset | None = None
        self.test_dataset: PairedImageDataset | None = None

    def train_dirs(self) -> list[tuple[Path, Path]]:
        """(low, high) folders concatenated for training, in order."""
        dirs = [
            find_pairs_dirs(kind, self.roots[_ROOT_KEY[kind]], "train")
            for kind in DATASET_COMBINATIONS[self.use_dataset]
        ]
        return dirs + [find_pairs_dirs("folder", folder) for folder in self.extra_train_folders]

    def test_dirs(self) -> tuple[Path, Path]:
        """(low, high) folders of the test (and predict) set."""
        if self.test_folder is not None:
            return find_pairs_dirs("folder", self.test_folder)
        kinds = DATASET_COMBINATIONS[self.use_dataset]
        if not kinds:
            raise DatasetError('use_dataset="folder" has no default test set: set test_folder')
        return find_pairs_dirs(kinds[0], self.roots[_ROOT_KEY[kinds[0]]], "test")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (fit, validate, test, predict; None: all); idempotent."""
        if stage in (None, "fit") and self.train_dataset is None:
            parts = [
                PairedImageDataset(
                    low, high, crop_size=self.image_size, augment=True, seed=_sub_seed(self.seed, i),
                    exposure=self.exposure,
                )
                for i, (low, high) in enumerate(self.train_dirs())
            ]
            self.train_dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        if stage in (None, "fit", "validate") and self.val_dataset is None and self.val_folder is not None:
            self.val_dataset = PairedImageDataset(*find_pairs_dirs("folder", self.val_folder))
        if stage in ("test", "predict") or (stage is None and self._has_test_set()):
            if self.test_dataset is None:
                self.test_dataset = PairedImageDataset(*self.test_dirs())

    def _has_test_set(self) -> bool:
        return self.test_folder is not None or bool(DATASET_COMBINATIONS[self.use_dataset])

    def train_dataloader(self) -> DataLoader:
        """Shuffled random crops; the order is seeded (Lightning swaps in a DistributedSampler under DDP)."""
        self.setup("fit")
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_dataset, self.train_batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader | list:
        """Full validation images, or an empty list (no validation) when val_folder is None."""
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Full test images, in file order."""
        self.setup("test")
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def on_exception(self, exception: BaseException) -> None:
        """A stage of the trainer failed or was interrupted (GracefulStop's TrainingInterrupted, Ctrl-C, an error):
        shut down the DataLoader workers of every loader the trainer holds, see :func:`shut_down_workers`.

        Lightning's own clean-up after an exception only tears down the loop that was running: training interrupted
        in ``on_validation_start`` (where it ends whenever there is a validation loop, since Lightning validates
        once ``should_stop`` is set) left the training loader's persistent worker running. Nothing freed it before
        the interpreter exited (the exception's traceback keeps the trainer alive), and at exit multiprocessing
        terminate()s daemonic children with SIGTERM, which the workers ignore, then join()s them with no timeout:
        the process printed "interrupted: ..." and never exited. (On a GPU, ``pin_memory`` makes torch register an
        exit handler that shuts persistent workers down, which hid this; CPU runs have none.)

        Done here, in the main process, rather than by letting workers obey some later SIGTERM: a worker cannot tell
        the SIGTERM sent to the whole group (to be ignored) from the one multiprocessing sends at exit, and after
        ``kill <main pid>`` the exit one is the first it gets; the main process knows when its workers are done."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        for loaders in (trainer.train_dataloader, trainer.val_dataloaders, trainer.test_dataloaders,
                        trainer.predict_dataloaders):
            for loader in _flat_loaders(loaders):
                shut_down_workers(loader)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_pairs,
            worker_init_fn=leave_signals_to_main_process,
            **kwargs,
        )


def leave_signals_to_main_process(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: a signal sent to the whole process group (Ctrl-C in a
    terminal, Slurm or ``kill -- -PGID`` at the end of a job) reaches the main process, which finishes its step,
    saves ``last.ckpt`` and shuts the workers down; a killed worker would crash the step instead. Workers still
    exit on their own when the main process dies. Ignoring SIGTERM also defeats multiprocessing's exit handler
    (terminate(), then join() without a timeout, of every daemonic child still running): the main process must
    shut its workers down itself before it exits, which Lightning does when a stage ends and
    LowLightDataModule.on_exception does when one fails (see :func:`shut_down_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shut_down_workers(loader: DataLoader) -> None:
    """Stop the worker processes of ``loader`` (persistent or not; nothing to do without workers), as Lightning
    does when a loop ends: torch's own shutdown (a done event and a None per worker's queue: a worker exits once
    it has finished the item it is reading; joined for up to 2 x 5 s), then SIGKILL for a worker still running,
    since it ignores the SIGTERM torch sends last (:func:`leave_signals_to_main_process`). A worker left running
    would hang the main process at exit; killing a worker loses nothing, it only reads training data. The next
    iteration of ``loader`` starts new workers."""
    iterator = getattr(loader, "_iterator", None)  # DataLoader keeps persistent workers' iterator there
    if isinstance(iterator, _MultiProcessingDataLoaderIter):
        workers = list(iterator._workers)
        iterator._shutdown_workers()  # also stops torch's SIGCHLD check of these pids: a kill is no "crash"
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        loader._iterator = None


def _flat_loaders(loaders: Any) -> list[DataLoader]:
    """The DataLoaders in what a Trainer's ``*_dataloader(s)`` property holds (a loader, or lists / dicts of them)."""
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [loader for item in loaders for loader in _flat_loaders(item)]
    return []


def _sub_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed for the index-th training dataset."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def datamodule_from_config(data: DataConfig, seed: int) -> LowLightDataModule:
    """The datamodule described by a config's ``data`` section."""
    return LowLightDataModule(
        use_dataset=data.use_dataset,
        roots={"LOL": data.lol_root, "LOLv2": data.lolv2_root, "VELOL": data.velol_root},
        extra_train_folders=data.extra_train_folders,
        val_folder=data.val_folder,
        test_folder=data.test_folder,
        image_size=data.image_size,
        train_batch_size=data.train_batch_size,
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        seed=seed,
        exposure=ExposureSynthesis(data.synth_prob, data.synth_kinds) if data.synth_prob > 0 else None,
    )
