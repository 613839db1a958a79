"""Detail-transfer settings (models/detail.py) against real-photo NIQE and held-out LOL quality.

``python bench/detail_settings.py --dark ../shared/data/real-dark --pairs train_data/lol/val [--ckpt CKPT]``

Runs the checkpoint once (``--detail model``) on every photo and pair, then applies each setting of
:class:`models.detail.DetailTransfer` to the cached outputs and prints one Markdown row per setting: mean NIQE of
the dark photos and PSNR / SSIM / LPIPS-Alex on the pairs (:func:`utils.metrics.score_pairs`, what test.py
reports). README's "Real photos" table was measured this way; the shipped setting is the sharpest that keeps
the LOL figures where they are without detail transfer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from real_photos import load_niqe, model_method  # bench/ is on sys.path when run as a script
from tqdm import tqdm

from data.datasets import pair_files
from models import CheckpointError
from models.detail import DetailTransfer, transfer_detail
from utils.cli import UserError, run_cli
from utils.image_io import ImageReadError, list_images, read_image, to_array, to_tensor
from utils.lpips import build_lpips, lpips_available
from utils.metrics import mean_scores, score_pairs

ALWAYS = (-2.0, -1.0)
"""A ``lit_range`` for which every pixel counts as lit."""
NO_DETAIL = 1e9
"""A ``noise_k`` that passes no detail (except on an image whose noise estimate is 0)."""
SETTINGS: dict[str, DetailTransfer | None] = {
    "none (--detail model)": None,
    "re-exposed input everywhere": DetailTransfer(lit_range=ALWAYS),
    "re-exposed input where lit, else the model": DetailTransfer(noise_k=NO_DETAIL),
    "... lit from 0.02-0.12": DetailTransfer(lit_range=(0.02, 0.12), noise_k=NO_DETAIL),
    "lit, else the model + detail above 0.5 noise sigma": DetailTransfer(noise_k=0.5),
    "... above 1 sigma": DetailTransfer(noise_k=1.0),
    "... above 2 sigma (default)": DetailTransfer(),
    "... above 3 sigma": DetailTransfer(noise_k=3.0),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dark", nargs="*", default=[], help="folders/files of dark photos (NIQE)")
    parser.add_argument("--pairs", type=Path, help="a folder with low/ and high/ (PSNR, SSIM, LPIPS)")
    parser.add_argument("--ckpt", help="checkpoint (default: the bundled one)")
    parser.add_argument("--niqe", type=Path, default=Path("../shared/tools/niqe.py"), help="NIQE implementation")
    args = parser.parse_args(argv)
    if not args.dark and args.pairs is None:
        raise UserError("nothing to measure: give --dark and/or --pairs")
    niqe = load_niqe(args.niqe) if args.dark else None
    enhance = model_method(args.ckpt, None, 2_500_000, 768, detail="model")
    photos = [(src, enhance(src)) for src in
              (read_image(p).rgb.astype(np.float64) for p in tqdm(list_images(args.dark) if args.dark else [],
                                                                  desc="photos"))]
    pairs = []
    if args.pairs is not None:
        for low, high in tqdm(pair_files(args.pairs / "low", args.pairs / "high"), desc="pairs"):
            src = read_image(low).rgb.astype(np.float64)
            pairs.append((src, enhance(src), read_image(high).rgb))
    lpips_model = build_lpips("alex") if pairs and lpips_available("alex") else None
    print("| detail transfer | NIQE (dark) | PSNR | SSIM | LPIPS-Alex |\n|---|---|---|---|---|")
    for name, params in SETTINGS.items():
        def apply(src: np.ndarray, out: np.ndarray, params: DetailTransfer | None = params) -> np.ndarray:
            if params is None:
                return out
            return to_array(transfer_detail(to_tensor(src), to_tensor(out), params))
        scores = [float(niqe.niqe(niqe.y_channel(np.round(np.clip(apply(s, o), 0, 1) * 255).astype(np.uint8))))
                  for s, o in photos] if niqe else []
        quality = mean_scores(score_pairs([(apply(s, o).astype(np.float32), h) for s, o, h in pairs], lpips_model),
                              ("psnr", "ssim", "lpips")) if pairs else {}
        cells = [f"{np.mean(scores):.2f}" if scores else "",
                 *(f"{quality[k]:.{d}f}" if quality.get(k) is not None else "" for k, d in
                   (("psnr", 2), ("ssim", 3), ("lpips", 3)))]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, (CheckpointError, ImageReadError)))
