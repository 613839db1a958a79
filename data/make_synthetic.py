"""Make synthetic low-light / normal-light training pairs from well-exposed photographs.

    python -m data.make_synthetic --src PHOTOS_DIR more.jpg --out data/synthetic --crops-per-image 4

For every source photo and crop, DIR/high/<stem>_<k>.png is a random view of the photo resized to
--size (covering between a quarter and all of the photo's limiting side, downscaled with Lanczos) and
DIR/low/<stem>_<k>.png is that exact 8-bit image degraded by data.degradation.LowLightDegradation.
The output is a "folder" layout usable as ``extra_train_folders`` of the datamodule.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.degradation import LowLightDegradation, quantize_8bit
from utils.image_io import ImageReadError, list_images, read_image, save_png

_MIN_ZOOM_FRACTION = 0.25


class _TooSmall(Exception):
    """A source image is smaller than the output size."""


def parse_size(text: str) -> tuple[int, int]:
    """``"400x600"`` -> (height 400, width 600)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH, e.g. 400x600; got {text!r}")
    height, width = (int(p) for p in parts)
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m data.make_synthetic",
        description="Write synthetic low-light training pairs (OUT/low/*.png, OUT/high/*.png) made from "
        "well-exposed photographs: high = a clean random view of the photo, low = the same view "
        "darkened 3-30x in linear light with Poisson-Gaussian sensor noise, a slight colour cast and "
        "8-bit quantisation.",
    )
    parser.add_argument(
        "--src",
        nargs="+",
        required=True,
        metavar="PATH",
        help="source photographs: image files and/or folders (searched recursively for "
        "PNG, JPEG, BMP, TIFF and WebP files)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder; pairs go to DIR/low and DIR/high (created if missing)",
    )
    parser.add_argument(
        "--crops-per-image",
        type=_positive_int,
        default=1,
        metavar="N",
        help="number of pairs made from each source photo (default: 1)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=(400, 600),
        metavar="HxW",
        help="output size, HEIGHTxWIDTH in pixels (default: 400x600, LOL's size); "
        "smaller sources are skipped with a warning",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="random seed; the same seed and sources give identical files (default: 0)",
    )
    parser.add_argument(
        "--exposure",
        type=float,
        nargs=2,
        default=(3.0, 30.0),
        metavar=("MIN", "MAX"),
        help="range of the exposure reduction in linear light, drawn log-uniformly (default: 3 30; the real "
        "LOL pairs are about 15-55x darker)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (by default the run stops before writing "
        "anything if one of its output files already exists)",
    )
    return parser


def random_view(rgb: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random window of ``rgb`` (float HxWx3 in [0, 1]) with the aspect of ``size`` (H, W), resized
    to ``size``. The window spans between a quarter and all of the limiting side (log-uniform zoom).
    Returns float32 HxWx3 in [0, 1]; raises _TooSmall when the source is smaller than ``size``.
    """
    out_h, out_w = size
    height, width = rgb.shape[:2]
    max_zoom = min(height / out_h, width / out_w)
    if max_zoom < 1.0:
        raise _TooSmall(f"{width}x{height} is smaller than {out_w}x{out_h} (width x height)")
    zoom = math.exp(rng.uniform(math.log(max(1.0, max_zoom * _MIN_ZOOM_FRACTION)), math.log(max_zoom)))
    crop_h, crop_w = min(height, round(out_h * zoom)), min(width, round(out_w * zoom))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    window = rgb[top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (out_h, out_w):
        return window.astype(np.float32)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(window[..., c], dtype=np.float32)).resize(
                (out_w, out_h), Image.Resampling.LANCZOS
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def _output_names(sources: Sequence[Path], crops: int) -> list[list[str]]:
    """File names per source; raises ValueError when two sources share a stem."""
    by_stem: dict[str, list[Path]] = {}
    for src in sources:
        by_stem.setdefault(src.stem, []).append(src)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        listing = "; ".join(", ".join(map(str, paths)) for paths in clashes.values())
        raise ValueError(f"source files share a name, so their outputs would collide: {listing}")
    return [[f"{src.stem}_{k:03d}.png" for k in range(crops)] for src in sources]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure while processing, 2 bad input)."""
    args = build_parser().parse_args(argv)
    prog = "make_synthetic"
    try:
        sources = list_images(args.src, recursive=True)
        if not sources:
            raise ValueError(f"no images found in {', '.join(args.src)}")
        names = _output_names(sources, args.crops_per_image)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    low_dir, high_dir = args.out / "low", args.out / "high"
    if not args.overwrite:
        existing = [d / n for group in names for n in group for d in (low_dir, high_dir) if (d / n).exists()]
        if existing:
            shown = ", ".join(map(str, existing[:5])) + (" ..." if len(existing) > 5 else "")
            print(
                f"{prog}: error: {len(existing)} output file(s) already exist ({shown}); "
                "use another --out, or --overwrite to replace them",
                file=sys.stderr,
            )
            return 2

    if not 1.0 <= args.exposure[0] <= args.exposure[1]:
        print(f"{prog}: error: --exposure needs 1 <= MIN <= MAX, got {args.exposure}", file=sys.stderr)
        return 2
    degradation = LowLightDegradation(exposure_range=tuple(args.exposure))
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(args.seed).spawn(len(sources))]
    written, skipped = 0, []
    progress = tqdm(total=len(sources) * args.crops_per_image, unit="pair", desc=prog)
    try:
        for src, group, rng in zip(sources, names, rngs, strict=True):
            rgb = read_image(src).rgb
            for name in group:
                try:
                    high = quantize_8bit(random_view(rgb, args.size, rng))
                except _TooSmall as err:
                    skipped.append(f"{src} ({err})")
                    progress.update(len(group))
                    break
                low = degradation(high, rng)
                save_png(high_dir / name, high, overwrite=args.overwrite)
                save_png(low_dir / name, low, overwrite=args.overwrite)
                written += 1
                progress.update(1)
    except (ImageReadError, OSError) as err:
        progress.close()
        print(f"{prog}: error: {err} ({written} pair(s) written before the failure)", file=sys.stderr)
        return 1
    progress.close()
    for item in skipped:
        print(f"{prog}: warning: skipped {item}", file=sys.stderr)
    if written == 0:
        print(f"{prog}: error: no pairs written: every source is smaller than --size", file=sys.stderr)
        return 1
    print(f"wrote {written} pair(s) to {low_dir} and {high_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
