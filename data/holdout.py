"""Split a paired folder into training and held-out validation folders (symbolic links, nothing copied).

``python -m data.holdout --src ../shared/data/LOL/our485 --out train_data/lol --every 14`` puts every 14th
pair (in natural name order, starting at the ``--offset``-th) into ``OUT/val/{low,high}`` and the rest into
``OUT/train/{low,high}``, and prints the held-out names: name them in the training config so that nothing is
ever selected on a pair it trained on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from data.datasets import DatasetError, DatasetNotFoundError, find_pairs_dirs, pair_files
from utils.cli import UserError, run_cli


def split_pairs(src: Path, out: Path, every: int, offset: int) -> list[str]:
    """Link the pairs of ``src`` into ``out/train`` and ``out/val``; returns the held-out low file names."""
    pairs = pair_files(*find_pairs_dirs("folder", src))
    held = [p for i, p in enumerate(pairs) if i % every == offset % every]
    for part in ("train", "val"):
        for side in ("low", "high"):
            folder = out / part / side
            folder.mkdir(parents=True, exist_ok=True)
            if any(folder.iterdir()):
                raise UserError(f"{folder} is not empty; remove it or choose another --out")
    for pair in pairs:
        part = "val" if pair in held else "train"
        for side, path in zip(("low", "high"), pair, strict=True):
            (out / part / side / path.name).symlink_to(path.resolve())
    return [low.name for low, _ in held]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, type=Path, help="folder with low/ and high/ pairs")
    parser.add_argument("--out", required=True, type=Path, help="where train/ and val/ are created")
    parser.add_argument("--every", type=int, default=14, help="hold out one pair in this many (default 14)")
    parser.add_argument("--offset", type=int, default=7, help="index of the first held-out pair (default 7)")
    args = parser.parse_args(argv)
    if args.every < 2:
        raise UserError("--every must be at least 2")
    held = split_pairs(args.src, args.out, args.every, args.offset)
    print(f"held out {len(held)} pairs: {' '.join(held)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, (UserError, DatasetError, DatasetNotFoundError)))
