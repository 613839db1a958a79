"""Enhance your own low-light photos: ``python test_unpaired.py --input DARK_DIR --output OUT_DIR``, or with the
folders (and the checkpoint) of a config file: ``python test_unpaired.py --cfg cfg/test/test_unpaired.yaml``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from models import AnlightenDiff, CheckpointError, load_for_inference
from models.brightness import BRIGHTNESS_RANGE, check_target, match_brightness
from models.tiling import automatic_tiling, check_tile, tile_count
from utils.cli import (
    UserError,
    add_inference_args,
    check_precision,
    checkpoint_for,
    ensure_output_dir,
    resolve_device,
    run_cli,
    sampler_from_args,
)
from utils.config import Config, ConfigError, load_config
from utils.image_io import (
    ImagePathNotFoundError,
    ImageReadError,
    NotAnImageFileError,
    OutputExistsError,
    list_images,
    read_image,
    save_grid,
    save_png,
    to_array,
    to_tensor,
)
from utils.memory import retain_freed_memory_for


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Enhance low-light images (PNG, JPEG, BMP, TIFF, WebP; any size; greyscale, RGBA with alpha "
                    "kept, 16-bit; EXIF orientation honoured). Writes <name>.png into --output; never overwrites "
                    "or deletes anything unless --overwrite.")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="image files and/or folders (searched recursively); default: the --cfg file's "
                             "test_folder_unpaired")
    parser.add_argument("--output", help="folder for the enhanced PNGs (created if needed); default: the --cfg file's "
                                         "results_folder_unpaired")
    parser.add_argument("--cfg", metavar="FILE.yaml",
                        help="a config whose test_folder_unpaired and results_folder_unpaired stand for --input and "
                             "--output, and whose checkpoint for --ckpt, where those flags are not given (the paper's: "
                             "cfg/test/test_unpaired.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--grid", metavar="FILE.png",
                        help="also write a side-by-side grid PNG, one row per image: input | anchor | output")
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help="refuse (before anything runs) images of more than N pixels (default: no limit; large "
                             "photos are tiled automatically, see --tile)")
    add_inference_args(parser, config_checkpoint=True)
    parser.add_argument("--tile", default="auto", metavar="SIZE",
                        help="auto (default): images too large for about 1.25 GiB of network memory are enhanced in "
                             "overlapping tiles sized to fit, with blended seams and the whole image's histogram "
                             "equalisation; SIZE: tiles of SIZE x SIZE (a multiple of the model's padding, e.g. "
                             "768); off: always in one piece")
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


def parse_tile(text: str) -> int | str | None:
    """``--tile``: "auto", None for "off" (or 0), else the tile size; a UserError for anything else."""
    text = text.strip().lower()
    if text in ("auto", "off", "0"):
        return None if text != "auto" else "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--tile must be auto, off or a tile size in pixels, got {text!r}") from None


def folders(args: argparse.Namespace, config: Config | None) -> tuple[list[str], str, str, str]:
    """(inputs, output folder, and the names messages give them): --input and --output, else the --cfg file's
    test_folder_unpaired and results_folder_unpaired; a UserError when neither gives one."""
    if config is None and (args.input is None or args.output is None):
        raise UserError("--input and --output are required (or --cfg FILE.yaml setting test_folder_unpaired and "
                        "results_folder_unpaired, e.g. cfg/test/test_unpaired.yaml)")

    def pick(flag: str, given: Any, key: str, what: str, example: str) -> tuple[Any, str]:
        if given is not None:
            return given, flag
        if getattr(config, key) is None:
            raise UserError(f"{args.cfg} sets no {key}: write {what} there ({key}: {example}) or pass {flag}")
        return getattr(config, key), key

    inputs, input_name = pick("--input", args.input, "test_folder_unpaired", "the folder of your images",
                              "my_image_folder")
    output, output_name = pick("--output", args.output, "results_folder_unpaired", "the folder for the results",
                               "my_image_results")
    return [inputs] if isinstance(inputs, str) else inputs, output, input_name, output_name


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
        raise UserError(f"{len(too_big)} image(s) larger than --max-pixels {max_pixels:,}, the limit given (e.g. "
                        f"{too_big[0]}); raise --max-pixels or leave it out: large images are tiled automatically")


def check_tiling(tile: int | str | None, overlap: int, pad_multiple: int) -> None:
    """Refuse a --tile the model cannot tile with (a positive multiple of its padding) or an overlap outside
    [0, tile) (with automatic tiles, a negative overlap)."""
    if tile == "auto" and overlap < 0:
        raise UserError(f"--tile-overlap must be >= 0, got {overlap}")
    if tile is None or tile == "auto":
        return
    try:
        check_tile(tile, overlap, pad_multiple, names=("--tile", "--tile-overlap"))
    except ValueError as err:
        raise UserError(str(err)) from None


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


def tiling_for(args: argparse.Namespace, model: AnlightenDiff, height: int, width: int) -> tuple[int | None, int]:
    """(tile size or None, overlap) for a ``height`` x ``width`` image: --tile's, or with ``auto``
    :func:`models.tiling.automatic_tiling`'s choice (the overlap at most a quarter of the tile)."""
    if args.tile != "auto":
        return args.tile, args.tile_overlap
    return automatic_tiling(height, width, model.config.model, model.config.diffusion.pad_multiple, args.tile_overlap)


def tile_progress(height: int, width: int, pad_multiple: int, tile: int, overlap: int, name: str
                  ) -> tuple[tqdm, Callable[[int, int], None]]:
    """A progress bar counting the tiles of a ``height`` x ``width`` image and the enhancement callback (steps
    done of all tiles' steps) that advances it."""
    count = tile_count(height, width, tile, overlap, pad_multiple)
    bar = tqdm(total=count, desc=f"{name}: tiles", unit="tile", leave=False)

    def advance(done: int, total: int) -> None:
        bar.update(done * count // total - bar.n)

    return bar, advance


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    brightness = parse_brightness(args.brightness)
    args.tile = parse_tile(args.tile)
    config = load_config(args.cfg) if args.cfg is not None else None
    inputs, output, input_name, output_name = folders(args, config)
    ckpt = args.ckpt if config is None else checkpoint_for(args.ckpt, config, args.cfg)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output_name} {output} exists and is not a folder")
    try:
        files = list_images(inputs)
    except ImagePathNotFoundError as err:
        raise ImagePathNotFoundError(f"{input_name}: {err}") from None
    if not files:
        raise UserError(f"no images found in {' '.join(inputs)} ({input_name})")
    if args.max_pixels is not None:
        check_sizes(files, args.max_pixels)
    targets = output_paths(inputs, files, output)
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{len(existing)} output file(s) already exist (e.g. {existing[0]}); pass --overwrite "
                        f"to replace them or choose another {output_name}")
    device = resolve_device(args.device)
    precision = check_precision(args.precision, device)
    model = load_for_inference(ckpt, device)
    retain_freed_memory_for(device)  # this script owns the process: keep freed memory (CPU)
    sampler = sampler_from_args(args, model.config.sampler, model.config.diffusion.timesteps)  # its recommended one
    model.require_sampler(sampler.sampler)  # before any output is written
    check_tiling(args.tile, args.tile_overlap, model.config.diffusion.pad_multiple)
    if args.grid and Path(args.grid).exists() and not args.overwrite:
        raise UserError(f"--grid {args.grid} already exists; pass --overwrite to replace it")
    ensure_output_dir(output, output_name)
    failures, grid_rows = 0, []
    for file in tqdm(files, desc="enhancing", unit="image"):
        try:
            loaded = read_image(file)
        except ImageReadError as err:
            tqdm.write(f"skipped: {err}")
            failures += 1
            continue
        img = to_tensor(loaded.rgb, device)
        tile, overlap = tiling_for(args, model, *img.shape[-2:])
        bar, progress = (None, None) if tile is None else tile_progress(
            *img.shape[-2:], model.config.diffusion.pad_multiple, tile, overlap, file.name)
        result = model.enhance(img, sampler, precision=precision, tile=tile, tile_overlap=overlap, callback=progress)
        if bar is not None:
            bar.close()
        enhanced = to_array(match_brightness(result.image, brightness))
        anchor = to_array(match_brightness(result.anchor, brightness)) if args.grid else None
        del img, result  # a large photo's buffers, before the PNG encoder needs memory
        save_png(targets[file], enhanced, loaded.alpha, overwrite=args.overwrite)
        if args.grid:
            grid_rows.append([loaded.rgb, anchor, enhanced])
    if args.grid and grid_rows:
        save_grid(args.grid, grid_rows, overwrite=args.overwrite)
    done = len(files) - failures
    print(f"wrote {done} image(s) to {output}" + (f"; {failures} unreadable file(s) skipped" if failures else ""))
    return 1 if failures else 0


USER_ERRORS = (ConfigError, CheckpointError, ImagePathNotFoundError, NotAnImageFileError, OutputExistsError,
               ImageReadError)
"""The project's own errors for what the user can fix (with UserError): one line, exit 2. Anything else is a bug
and keeps its traceback."""

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
