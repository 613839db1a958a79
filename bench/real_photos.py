"""Real photographs without ground truth: naturalness (NIQE), exposure and colour fidelity, against baselines.

``python bench/real_photos.py --dark ../shared/data/real-dark --lit train_data/lit_val [--ckpt CKPT]``

For each method (the input as is, histogram equalisation of HSV's V channel, gamma 0.4, CLAHE, and this project's
model with its recommended sampler) it prints, in one Markdown table:

- NIQE (Mittal et al. 2013; lower = more natural) over all photos and over the dark ones, computed by the NIQE
  implementation given with ``--niqe`` (default ``../shared/tools/niqe.py``);
- the dark photos' mean output luminance Y (BT.709 on sRGB values, 0-255);
- the well-lit photos' mean brightness change (Y, 0-255), the share of pixels newly blown out (Y >= 250, output
  minus input; negative = fewer than in the input) and the colour shift (mean CIELAB (a, b) distance to the input).

``--grid FILE`` also writes a grid of the dark photos (input | histogram equalisation | this project) downscaled to
``--grid-height`` pixels per row, for README.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from skimage import color, exposure
from tqdm import tqdm

from models import CheckpointError, load_for_inference
from utils.cli import UserError, ensure_output_dir, run_cli
from utils.config import DetailName, SamplerName
from utils.image_io import ImageReadError, OutputExistsError, list_images, read_image, save_grid, to_array, to_tensor
from utils.memory import retain_freed_memory_for

BLOWN_Y = 250.0
"""A pixel is blown out when its luminance (0-255) is at least this."""


def equalise_v(rgb: np.ndarray) -> np.ndarray:
    """Histogram equalisation of the HSV value channel (hue and saturation kept). HxWx3 in [0, 1]."""
    hsv = color.rgb2hsv(rgb)
    hsv[..., 2] = exposure.equalize_hist(hsv[..., 2])
    return color.hsv2rgb(hsv)


BASELINES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "input as is": lambda x: x,
    "histogram equalisation (V)": equalise_v,
    "gamma 0.4": lambda x: x**0.4,
    "CLAHE": lambda x: exposure.equalize_adapthist(x, clip_limit=0.01),
}


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.709 luma of sRGB values, HxWx3 in [0, 1] -> HxW in [0, 255]."""
    return 255.0 * (rgb @ np.array([0.2126, 0.7152, 0.0722]))


def lit_figures(out: np.ndarray, src: np.ndarray) -> dict[str, float]:
    """How much a method changed a well-lit photo: brightness change, newly blown-out share (%), colour shift."""
    y_out, y_src = luminance(out), luminance(src)
    ab_out, ab_src = color.rgb2lab(out)[..., 1:], color.rgb2lab(src)[..., 1:]
    return {"brightness_change": float(y_out.mean() - y_src.mean()),
            "newly_blown_pct": 100.0 * float((y_out >= BLOWN_Y).mean() - (y_src >= BLOWN_Y).mean()),
            "colour_shift": float(np.linalg.norm(ab_out - ab_src, axis=-1).mean())}


def load_niqe(path: Path) -> ModuleType:
    if not path.is_file():
        raise SystemExit(f"error: no NIQE implementation at {path}; pass --niqe PATH/TO/niqe.py")
    spec = importlib.util.spec_from_file_location("niqe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_method(ckpt: str | None, sampler: str | None, tile_pixels: int, tile: int,
                 detail: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The checkpoint with its recommended sampler settings (``sampler`` and ``detail`` override them) as a
    function of an HxWx3 float image in [0, 1]; tiled above ``tile_pixels``."""
    device = torch.device("cpu")
    model = load_for_inference(ckpt, device)
    retain_freed_memory_for(device)  # this script owns the process: keep freed memory (CPU)
    config = model.config.sampler
    if sampler is not None:
        config = dataclasses.replace(config, sampler=sampler)
    if detail is not None:
        config = dataclasses.replace(config, detail=detail)
    model.require_sampler(config.sampler)

    def enhance(rgb: np.ndarray) -> np.ndarray:
        img = to_tensor(rgb)
        big = img.shape[-1] * img.shape[-2] > tile_pixels
        with torch.inference_mode():
            return to_array(model.enhance(img, config, tile=tile if big else None).image).astype(np.float64)

    return enhance


def evaluate(method: Callable[[np.ndarray], np.ndarray], dark: Sequence[Path], lit: Sequence[Path],
             niqe: ModuleType, keep: dict[str, np.ndarray] | None = None) -> dict[str, float | None]:
    niqe_dark, niqe_lit, y_dark, lit_rows = [], [], [], []
    for path in tqdm(list(dark) + list(lit), leave=False, desc="photos"):
        src = read_image(path).rgb.astype(np.float64)
        out = np.clip(method(src), 0, 1)
        score = float(niqe.niqe(niqe.y_channel(np.round(out * 255).astype(np.uint8))))
        if path in dark:
            niqe_dark.append(score)
            y_dark.append(float(luminance(out).mean()))
            if keep is not None:
                keep[str(path)] = out
        else:
            niqe_lit.append(score)
            lit_rows.append(lit_figures(out, src))
    return {"niqe_all": _mean(niqe_dark + niqe_lit), "niqe_dark": _mean(niqe_dark), "dark_Y": _mean(y_dark),
            **{k: _mean([r[k] for r in lit_rows]) for k in ("brightness_change", "newly_blown_pct", "colour_shift")}}


def _mean(values: Sequence[float]) -> float | None:
    """The mean, or None for a group of photos that was not given."""
    return float(np.mean(values)) if values else None


def table_row(name: str, r: dict[str, float | None]) -> str:
    """One markdown row of :func:`evaluate`'s figures; ``-`` where a group of photos was not given."""
    def cell(key: str, spec: str) -> str:
        return "-" if r[key] is None else format(r[key], spec)

    cells = [cell("niqe_all", ".2f"), cell("niqe_dark", ".2f"), cell("dark_Y", ".1f"),
             cell("brightness_change", "+.1f"), cell("newly_blown_pct", "+.1f"), cell("colour_shift", ".1f")]
    return f"| {name} | " + " | ".join(cells) + " |"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dark", nargs="*", default=[], help="folders/files of dark photos")
    parser.add_argument("--lit", nargs="*", default=[], help="folders/files of well-lit photos")
    parser.add_argument("--ckpt", help="checkpoint (default: the bundled one)")
    parser.add_argument("--sampler", choices=typing.get_args(SamplerName), help="override the checkpoint's sampler")
    parser.add_argument("--detail", choices=typing.get_args(DetailName), help="override the checkpoint's detail")
    parser.add_argument("--niqe", type=Path, default=Path("../shared/tools/niqe.py"), help="NIQE implementation")
    parser.add_argument("--no-baselines", action="store_true", help="the model only")
    parser.add_argument("--tile-pixels", type=int, default=2_500_000, help="tile images larger than this")
    parser.add_argument("--tile", type=int, default=768, help="tile size for large images")
    parser.add_argument("--grid", type=Path, help="write input | HE | model grid of the dark photos here")
    parser.add_argument("--grid-height", type=int, default=160, help="grid row height in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    niqe = load_niqe(args.niqe)
    dark, lit = list_images(args.dark) if args.dark else [], list_images(args.lit) if args.lit else []
    if not dark and not lit:
        raise UserError("no photos: give --dark and/or --lit folders")
    if args.grid is not None:  # checked before hours of work, not after
        if args.grid.exists() and not args.overwrite:
            raise UserError(f"{args.grid} exists; pass --overwrite to replace it")
        ensure_output_dir(args.grid.parent, "--grid")
    methods = {} if args.no_baselines else dict(BASELINES)
    methods["this project"] = model_method(args.ckpt, args.sampler, args.tile_pixels, args.tile, args.detail)
    print(f"{len(dark)} dark + {len(lit)} well-lit photos")
    print("| method | NIQE all | NIQE dark | dark: mean Y | lit: brightness change | lit: newly blown out (%) "
          "| lit: colour shift |\n|---|---|---|---|---|---|---|")
    kept: dict[str, dict[str, np.ndarray]] = {}
    for name, method in methods.items():
        kept[name] = {}
        r = evaluate(method, dark, lit, niqe, kept[name])
        print(table_row(name, r), flush=True)
    if args.grid is not None and dark:
        he = kept.get("histogram equalisation (V)") or {}
        rows = [[read_image(p).rgb, he.get(str(p), equalise_v(read_image(p).rgb.astype(np.float64))),
                 kept["this project"][str(p)]] for p in dark]
        save_grid(args.grid, rows, height=args.grid_height, overwrite=args.overwrite)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, (CheckpointError, ImageReadError, OutputExistsError)))
