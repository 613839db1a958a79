"""Enhance your own low-light photos: ``python test_unpaired.py --input DARK_DIR --output OUT_DIR``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models import CheckpointError, load_for_inference
from models.brightness import BRIGHTNESS_RANGE, check_target, match_brightness
from utils.cli import (
    UserError,
    add_inference_args,
    check_precision,
    ensure_output_dir,
    resolve_device,
    run_cli,
    sampler_from_args,
)
from utils.config import FAST_SAMPLER
from utils.image_io import (
    ImagePathNotFoundError,
    ImageReadError,
    NotAnImageFileError,
    OutputExistsError,
    list_images,
    read_image,
    save_grid,
    save_png,
)

DEFAULT_MAX_PIXELS = 4096 * 1024
"""Largest image (width x height) enhanced in one piece by default: its activations alone take several GB."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Enhance low-light images (PNG, JPEG, BMP, TIFF, WebP; any size; greyscale, RGBA with alpha "
                    "kept, 16-bit; EXIF orientation honoured). Writes <name>.png into --output; never overwrites "
                    "or deletes anything unless --overwrite.")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files and/or folders (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the enhanced PNGs (created if needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--grid", metavar="FILE.png",
                        help="also write a side-by-side grid PNG, one row per image: input | anchor | output")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="refuse (before anything runs) images of more than N pixels, which need too much memory "
                             f"in one piece, unless tiling (--tile) is on (default: {DEFAULT_MAX_PIXELS:,})")
    add_inference_args(parser, FAST_SAMPLER)
    parser.add_argument("--tile", type=int, metavar="SIZE",
                        help="enhance in overlapping SIZE x SIZE tiles with blended seams (bounded memory for large "
                             "photos; SIZE a multiple of the model's padding, e.g. 768)")
    parser.add_argument("--tile-overlap", type=int, default=64, metavar="PX",
                        help="overlap between neighbouring tiles in pixels (default 64)")
    low, high = BRIGHTNESS_RANGE
    parser.add_argument("--brightness", default="auto", metavar="Y",
                        help="auto (default: the model's own brightness) or the output's target mean luminance Y "
                             f"in [{low}, {high}] (Rec. 709 luma of the sRGB values, 0 black to 1 white; e.g. 0.45), "
                             "reached by one exposure gain in linear light with a highlight roll-off")
    return parser.parse_args(argv)


def parse_brightness(text: str) -> float | None:
    """``--brightness``: None for ``auto``, else the target mean luminance; a UserError for anything else."""
    if text.strip().lower() == "auto":
        return None
    try:
        return check_target(text)
    except ValueError:
        low, high = BRIGHTNESS_RANGE
        raise UserError(f"--brightness must be auto or a number in [{low}, {high}] (the output's mean luminance, "
                        f"0 black to 1 white), got {text!r}") from None


def check_sizes(files: Sequence[Path], max_pixels: int) -> None:
    """Refuse images of more than ``max_pixels`` pixels, read off their headers (unreadable files are left to
    read_image, which reports them)."""
    if max_pixels < 1:
        raise UserError(f"--max-pixels must be positive, got {max_pixels}")
    too_big = []
    for file in files:
        try:
            with Image.open(file) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - reported when the file is read
            continue
        if width * height > max_pixels:
            too_big.append(f"{file} ({width}x{height} = {width * height:,} pixels)")
    if too_big:
        raise UserError(f"{len(too_big)} image(s) larger than --max-pixels {max_pixels:,}, too big to enhance in one "
                        f"piece (e.g. {too_big[0]}); pass --tile SIZE to enhance them in tiles, or raise "
                        "--max-pixels if this machine has the memory")


def check_tiling(tile: int | None, overlap: int, pad_multiple: int) -> None:
    """Refuse a --tile the model cannot tile with (a positive multiple of its padding) or an overlap outside
    [0, tile)."""
    if tile is None:
        return
    if tile < pad_multiple or tile % pad_multiple:
        raise UserError(f"--tile must be a positive multiple of {pad_multiple} (the model's padding), got {tile}")
    if not 0 <= overlap < tile:
        raise UserError(f"--tile-overlap must be in [0, --tile) = [0, {tile}), got {overlap}")


def output_paths(inputs: Sequence[str], files: Sequence[Path], output: Path) -> dict[Path, Path]:
    """Map each input file to ``output/<relative folder>/<stem>.png``, keeping the folder structure of
    folder inputs so that equal names from different folders do not collide."""
    mapping: dict[Path, Path] = {}
    roots = [Path(p) for p in inputs if Path(p).is_dir()]
    for file in files:
        root = next((r for r in roots if file.is_relative_to(r)), file.parent)
        target = output / file.relative_to(root).with_suffix(".png")
        if target in mapping.values():
            raise UserError(f"two inputs would both be written to {target}; pass them in separate runs")
        mapping[file] = target
    return mapping


def to_array(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) tensor -> HxWx3 float32 array clipped to [0, 1]."""
    return np.clip(img[0].permute(1, 2, 0).float().cpu().numpy(), 0, 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    brightness = parse_brightness(args.brightness)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    files = list_images(args.input)
    if not files:
        raise UserError(f"no images found in {' '.join(args.input)}")
    if not args.tile:
        check_sizes(files, args.max_pixels)
    targets = output_paths(args.input, files, output)
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{len(existing)} output file(s) already exist (e.g. {existing[0]}); pass --overwrite "
                        "to replace them or choose another --output")
    device = resolve_device(args.device)
    precision = check_precision(args.precision, device)
    model = load_for_inference(args.ckpt, device)
    sampler = sampler_from_args(args, FAST_SAMPLER, model.config.diffusion.timesteps)
    check_tiling(args.tile, args.tile_overlap, model.config.diffusion.pad_multiple)
    if args.grid and Path(args.grid).exists() and not args.overwrite:
        raise UserError(f"--grid {args.grid} already exists; pass --overwrite to replace it")
    ensure_output_dir(output, "--output")
    failures, grid_rows = 0, []
    for file in tqdm(files, desc="enhancing", unit="image"):
        try:
            loaded = read_image(file)
        except ImageReadError as err:
            tqdm.write(f"skipped: {err}")
            failures += 1
            continue
        img = torch.from_numpy(loaded.rgb).permute(2, 0, 1)[None].to(device)
        result = model.enhance(img, sampler, precision=precision, tile=args.tile, tile_overlap=args.tile_overlap)
        enhanced, anchor = (to_array(match_brightness(t, brightness)) for t in (result.image, result.anchor))
        save_png(targets[file], enhanced, loaded.alpha, overwrite=args.overwrite)
        if args.grid:
            grid_rows.append([loaded.rgb, anchor, enhanced])
    if args.grid and grid_rows:
        save_grid(args.grid, grid_rows, overwrite=args.overwrite)
    done = len(files) - failures
    print(f"wrote {done} image(s) to {output}" + (f"; {failures} unreadable file(s) skipped" if failures else ""))
    return 1 if failures else 0


USER_ERRORS = (CheckpointError, ImagePathNotFoundError, NotAnImageFileError, OutputExistsError, ImageReadError)
"""The project's own errors for what the user can fix (with UserError): one line, exit 2. Anything else is a bug
and keeps its traceback."""

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
