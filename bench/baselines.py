"""Classical baselines on paired images, with the project's metrics: ``python bench/baselines.py --pairs DIR``.

DIR holds ``low/`` and ``high/`` (paired by name). Prints one row per method: identity, histogram
equalisation, gamma, CLAHE (scikit-image), averaged over the pairs, with the same metrics as test.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from skimage import exposure

from data.datasets import pair_files
from utils.image_io import read_image
from utils.lpips import build_lpips, lpips_available
from utils.metrics import mean_scores, score_pairs

METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity (input as is)": lambda x: x,
    "histogram equalisation": lambda x: np.stack([exposure.equalize_hist(x[..., c]) for c in range(3)], -1),
    "gamma 0.4": lambda x: x**0.4,
    "CLAHE": lambda x: exposure.equalize_adapthist(x, clip_limit=0.01),
}
COLUMNS = ("psnr", "ssim", "lpips", "psnr_gt_mean", "ssim_gt_mean")


def evaluate(method: Callable[[np.ndarray], np.ndarray], pairs: list[tuple[Path, Path]], lpips_model) -> dict:
    outputs = ((np.clip(method(read_image(low).rgb), 0, 1), read_image(high).rgb) for low, high in pairs)
    return mean_scores(score_pairs(outputs, lpips_model), COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="folder with low/ and high/")
    args = parser.parse_args(argv)
    pairs = pair_files(Path(args.pairs) / "low", Path(args.pairs) / "high")
    lpips_model = build_lpips("alex") if lpips_available("alex") else None
    print(f"{len(pairs)} pairs from {args.pairs}")
    print(f"| method | {' | '.join(COLUMNS)} |\n|---|{'---|' * len(COLUMNS)}")
    for name, method in METHODS.items():
        scores = evaluate(method, pairs, lpips_model)
        print(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in scores.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
