"""Paired low-light / normal-light image datasets, and the folder layouts the public datasets ship with.

Items are dicts ``{"low": float32 3xHxW in [0, 1], "high": same shape, "name": low file's name}``.
Training items are an identical random square crop of both images followed by the reference's
augmentation (horizontal flip with p=1/2; then with p=1/2 either a vertical flip or a 90-degree
rotation, each p=1/4 overall), applied identically to both. Evaluation items are full images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from data.exposure import ExposureSynthesis
from utils.image_io import IMAGE_EXTENSIONS, list_images, read_image


class DatasetError(ValueError):
    """A dataset cannot be used as configured (no images, unpaired files, images smaller than the crop, ...);
    the message names the files or folders and what to change."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing; the message names it and the layout expected."""


LAYOUTS: dict[str, dict[str, str]] = {
    "LOL": {"train": "our485", "test": "eval15"},
    "LOLv2": {"train": "Real_captured/Train", "test": "Real_captured/Test"},
    "LOLv2_synthetic": {"train": "Synthetic/Train", "test": "Synthetic/Test"},
    "VELOL": {"train": "VE-LOL-L-Cap-Full/train", "test": "VE-LOL-L-Cap-Full/test"},
    "folder": {"train": ".", "test": "."},
}
"""Layout kind -> split -> folder (relative to the dataset root) holding the low and high folders."""

_LOW_DIR_NAMES = ("low",)
_HIGH_DIR_NAMES = ("high", "normal")
_NAME_PREFIX = re.compile(r"^(?:low|normal|high)[-_ ]?(?=.)")


def find_pairs_dirs(kind: str, root: str | os.PathLike[str], split: str = "train") -> tuple[Path, Path]:
    """(low folder, high folder) of ``split`` ("train" or "test") of a dataset in layout ``kind``.

    Layouts (LAYOUTS): LOL ``<root>/{our485,eval15}/{low,high}``; LOLv2 ``<root>/Real_captured/{Train,Test}/
    {Low,Normal}``; LOLv2_synthetic ``<root>/Synthetic/{Train,Test}/{Low,Normal}``; VELOL
    ``<root>/VE-LOL-L-Cap-Full/{train,test}/{low,high}``; folder ``<root>/{low,high}`` (split ignored).
    Folder names match case-insensitively and the high folder may be called ``high`` or ``normal``, so
    both the shipped and the reference's renamed layouts work. A missing folder raises
    DatasetNotFoundError (a FileNotFoundError) naming the expected path and the layout.
    """
    if kind not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {kind!r}; expected one of {sorted(LAYOUTS)}")
    if split not in LAYOUTS[kind]:
        raise DatasetError(f"unknown split {split!r}; expected one of {sorted(LAYOUTS[kind])}")
    root = Path(root)
    relative = LAYOUTS[kind][split]
    expected = root / relative
    split_dir = _resolve_dir(root, relative)
    low = None if split_dir is None else _find_child_dir(split_dir, _LOW_DIR_NAMES)
    high = None if split_dir is None else _find_child_dir(split_dir, _HIGH_DIR_NAMES)
    if low is None or high is None:
        missing = [str(expected / "low")] if low is None else []
        missing += [str(expected / "high")] if high is None else []
        which = "folder dataset" if kind == "folder" else f"{kind} dataset ({split} split)"  # a folder has no split
        raise DatasetNotFoundError(
            f"{which} not found: missing folder(s) {', '.join(missing)}. "
            f"Expected layout: {_describe_layout(kind, root)}"
        )
    return low, high


def _describe_layout(kind: str, root: Path) -> str:
    splits = LAYOUTS[kind]
    if kind == "folder":
        return f"{root}/low and {root}/high (the high folder may also be named 'normal')"
    return " and ".join(f"{root}/{rel}/{{low,high}} ({split})" for split, rel in splits.items())


def _resolve_dir(root: Path, relative: str) -> Path | None:
    """``root / relative`` matching each component case-insensitively; None if absent or ambiguous."""
    current = root
    if not current.is_dir():
        return None
    for part in Path(relative).parts:
        if part == ".":
            continue
        found = _find_child_dir(current, (part,))
        if found is None:
            return None
        current = found
    return current


def _find_child_dir(parent: Path, names: Sequence[str]) -> Path | None:
    """First of ``names`` that exists under ``parent`` (exact spelling first, then case-insensitive)."""
    for name in names:
        if (parent / name).is_dir():
            return parent / name
        matches = [p for p in parent.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
        if len(matches) == 1:
            return matches[0]
    return None


def pair_key(path: str | os.PathLike[str]) -> str:
    """The name two files of a pair share: lower-case stem without a leading low/normal/high prefix.

    ``low00001.png`` and ``normal00001.png`` (LOL-v2, VE-LOL) both give ``00001``; ``2.png`` gives ``2``.
    """
    return _NAME_PREFIX.sub("", Path(path).stem.lower(), count=1)


def pair_files(low_dir: str | os.PathLike[str], high_dir: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """Match the images of two folders by ``pair_key``; sorted by low file.

    Raises DatasetNotFoundError for a missing folder, and DatasetError for a folder without images, two files
    of one folder with the same key, or files without a counterpart (all of them are listed).
    """
    low_files = _keyed_images(Path(low_dir))
    high_files = _keyed_images(Path(high_dir))
    unpaired = [str(low_files[k]) for k in low_files.keys() - high_files.keys()]
    unpaired += [str(high_files[k]) for k in high_files.keys() - low_files.keys()]
    if unpaired:
        raise DatasetError(
            f"{len(unpaired)} file(s) without a counterpart between {str(low_dir)!r} and {str(high_dir)!r} "
            f"(pairs share a name up to case and a low/normal/high prefix): {', '.join(sorted(unpaired))}"
        )
    return sorted(((low_files[k], high_files[k]) for k in low_files), key=lambda pair: pair[0])


def _keyed_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder not found: {str(folder)!r}")
    files = list_images([folder], recursive=False)
    if not files:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {str(folder)!r}")
    keyed: dict[str, Path] = {}
    for path in files:
        key = pair_key(path)
        if key in keyed:
            raise DatasetError(
                f"ambiguous pairing: {str(keyed[key])!r} and {str(path)!r} have the same name key {key!r}"
            )
        keyed[key] = path
    return keyed


class PairedImageDataset(Dataset):
    """Aligned low/high image pairs from two folders (see the module docstring for the item format).

    crop_size: side of the identical random square crop (None: full images). An image smaller than
    the crop raises DatasetError naming it (no padding: padded borders would be fake training content).
    augment: the reference's flips / 90-degree rotation, identical on both images (on a non-square
    image the rotation becomes a 180-degree one, so shapes never change). exposure: replaces a share of the
    inputs by synthetic exposures of the target (see data.exposure), after cropping. seed: fixes the crop and
    augmentation stream; each DataLoader worker, each of its incarnations (worker seed) and each
    distributed rank gets its own stream. With seed=None the stream follows torch's seed
    (``pl.seed_everything``). Greyscale/RGBA files become RGB (alpha dropped); an unreadable file
    raises ImageReadError naming it.
    """

    def __init__(
        self,
        root_low: str | os.PathLike[str],
        root_high: str | os.PathLike[str],
        *,
        crop_size: int | None = None,
        augment: bool = False,
        seed: int | None = None,
        exposure: ExposureSynthesis | None = None,
    ):
        if crop_size is not None and crop_size <= 0:
            raise DatasetError(f"crop_size must be a positive integer or None, got {crop_size}")
        self.pairs = pair_files(root_low, root_high)
        self.crop_size = crop_size
        self.augment = augment
        self.exposure = exposure
        self.seed = seed
        self._epoch: int | None = None
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int | None] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Restart this process's crop and augmentation stream from (seed, rank, epoch), so that an epoch's crops
        do not depend on how many epochs the process ran before (a run resumed at an epoch boundary crops like an
        uninterrupted one). DataLoader workers already started keep their own streams."""
        self._epoch = epoch
        self._rng = None

    @classmethod
    def from_layout(
        cls, kind: str, root: str | os.PathLike[str], split: str = "train", **kwargs: Any
    ) -> PairedImageDataset:
        """The dataset of ``split`` of a dataset stored in layout ``kind`` (see find_pairs_dirs)."""
        return cls(*find_pairs_dirs(kind, root, split), **kwargs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        low_path, high_path = self.pairs[index]
        low = read_image(low_path).rgb
        high = read_image(high_path).rgb
        if low.shape != high.shape:
            raise DatasetError(
                f"pair sizes differ: {str(low_path)!r} is {low.shape[1]}x{low.shape[0]}, "
                f"{str(high_path)!r} is {high.shape[1]}x{high.shape[0]} (width x height)"
            )
        if self.crop_size is not None:
            low, high = _random_crop(low, high, self.crop_size, self._generator(), low_path)
        if self.augment:
            low, high = _augment(low, high, self._generator())
        if self.exposure is not None:
            low, high = self.exposure(low, high, self._generator())
        return {"low": _to_tensor(low), "high": _to_tensor(high), "name": low_path.name}

    def _generator(self) -> np.random.Generator:
        """This process's random stream, (re)created when first used in a new process or worker."""
        info = get_worker_info()
        worker_seed = None if info is None else int(info.seed)
        key = (os.getpid(), worker_seed)
        if self._rng is None or self._rng_key != key:
            base = self.seed if self.seed is not None else torch.initial_seed()
            entropy = [base, _distributed_rank()] + ([] if worker_seed is None else [worker_seed])
            if self._epoch is not None:
                entropy = [base, _distributed_rank(), worker_seed or 0, _EPOCH_TAG, self._epoch]
            self._rng = np.random.default_rng(np.random.SeedSequence(entropy))
            self._rng_key = key
        return self._rng


def _distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


_EPOCH_TAG = 0x45504F4348
"""Marks epoch-keyed crop streams (``set_epoch``) apart from the others in their SeedSequence entropy."""


def _random_crop(
    low: np.ndarray, high: np.ndarray, size: int, rng: np.random.Generator, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The same random size x size window of two HxWxC arrays."""
    height, width = low.shape[:2]
    if height < size or width < size:
        raise DatasetError(
            f"image {str(path)!r} is {width}x{height} (width x height), smaller than the "
            f"{size}x{size} training crop; lower image_size or remove the image"
        )
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return low[window], high[window]


def _augment(low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Reference augmentation on HxWxC arrays: h-flip (1/2), then v-flip (1/4) or rotation (1/4)."""
    ops = []
    if rng.random() < 0.5:
        ops.append(lambda x: x[:, ::-1])
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            ops.append(lambda x: x[::-1])
        elif low.shape[0] == low.shape[1]:
            ops.append(lambda x: np.rot90(x, k=1, axes=(0, 1)))  # counter-clockwise, as the reference
        else:
            ops.append(lambda x: x[::-1, ::-1])
    for op in ops:
        low, high = op(low), op(high)
    return low, high


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 float array -> contiguous float32 3xHxW tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
