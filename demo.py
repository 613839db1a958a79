"""Web demo: ``python demo.py`` serves a page that enhances low-light photos in the browser.

Needs the optional packages of requirements-demo.txt (gradio). The page enhances through the same
``AnlightenDiff.enhance`` path as test_unpaired.py; this file holds only the user interface.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models import AnlightenDiff, CheckpointError, load_for_inference
from models.brightness import BRIGHTNESS_RANGE, check_target, match_brightness
from models.tiling import automatic_tiling, tile_count, tile_overlap_for
from models.tiling import check_tile as check_tile_size
from utils.cli import UserError, add_inference_args, check_precision, resolve_device, run_cli, sampler_from_args
from utils.config import SamplerConfig
from utils.image_io import ImageReadError, LoadedImage, list_images, read_image, save_png, to_array, to_tensor
from utils.memory import retain_freed_memory_for

try:
    import gradio as gr
except ImportError:  # the demo's packages are optional: say how to get them instead of a traceback
    raise SystemExit("error: the demo needs gradio: pip install -r requirements-demo.txt") from None

DEFAULT_MAX_PIXELS = 32 * 1024 * 1024
"""Largest upload accepted by default: a 24-megapixel photo or an 8K frame. Memory stays bounded at any size
(large images are tiled automatically); the cap bounds how long one request holds the queue."""
IMAGE_HEIGHT = 280
MAX_TILE_OVERLAP = 64
PREVIEW_MAX_SIDE = 2048
"""Longest side of the images shown on the page (the download is always full resolution)."""
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLER_INFO = "anchor: one network pass, fastest; ddim: few steps; ddpm: the paper's sampler, all timesteps"
EnhanceResult = tuple[tuple[np.ndarray, np.ndarray], np.ndarray, str]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serve a web page that enhances low-light photos: upload one (or pick a sample from "
                    "samples/), compare before and after, download the result as a full-resolution PNG. "
                    "The sampler flags set the page's initial controls.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves other machines too (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest image (width x height) accepted, a cap on the time one request takes; "
                             "images too large for one piece are tiled automatically, so memory stays bounded "
                             f"(default: {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--samples", type=Path, default=SAMPLES_DIR,
                        help="folder of sample images offered on the page (default: samples/ beside demo.py)")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    if args.max_pixels < 1:
        parser.error(f"--max-pixels must be positive, got {args.max_pixels}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    return args


def sample_images(folder: Path) -> list[Path]:
    """The images directly in ``folder``; none when it is missing or empty."""
    return list_images([folder], recursive=False) if folder.is_dir() else []


def checked_sampler(model: AnlightenDiff, base: SamplerConfig, sampler: str, steps: int) -> SamplerConfig:
    """``base`` with this sampler and step count (ddpm: every timestep), validated like the command-line
    flags and refused (UserError) where ``model`` cannot run it."""
    try:
        model.require_sampler(sampler)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    timesteps = model.config.diffusion.timesteps
    chosen = argparse.Namespace(sampler=sampler, steps=timesteps if sampler == "ddpm" else steps, eta=None,
                                seed=None, detail=None)
    return sampler_from_args(chosen, base, timesteps)


def initial_sampler(model: AnlightenDiff, args: argparse.Namespace | None = None) -> SamplerConfig:
    """The page's initial sampler: the checkpoint's recommended one, changed by the sampler flags in ``args``
    (:func:`utils.cli.add_inference_args`) where given; a UserError if this model cannot run it."""
    recommended = model.config.sampler
    flags = vars(args) if args is not None else {}
    base = dataclasses.replace(recommended, **{k: flags[k] for k in ("eta", "seed") if flags.get(k) is not None})
    return checked_sampler(model, base, flags.get("sampler") or recommended.sampler,
                           flags.get("steps") or recommended.steps)


def refusal(message: str) -> gr.Error:
    """An error shown on the page (not a server traceback: the user's input, not the server, is at fault)."""
    return gr.Error(message, title="Cannot enhance this image", print_exception=False)


def upload_path(upload: dict[str, Any] | None) -> tuple[Path, str]:
    """(file on the server, the user's name for it) of the page's upload (gradio's FileData as a dict)."""
    if not upload or not upload.get("path"):
        raise refusal("Upload an image (or pick a sample) first.")
    path = Path(upload["path"])
    return path, upload.get("orig_name") or path.name


def load_upload(path: Path, name: str, max_pixels: int) -> LoadedImage:
    """The uploaded image; a page error saying why if it is unreadable or above the demo's size limit."""
    try:
        loaded = read_image(path)
    except (ImageReadError, FileNotFoundError) as err:
        reason = err.reason if isinstance(err, ImageReadError) else "the upload did not arrive"
        raise refusal(f"Cannot read {name}: {reason}.") from None
    height, width = loaded.rgb.shape[:2]
    if height * width > max_pixels:
        raise refusal(f"{name} is {width}x{height} = {height * width:,} pixels, more than this demo's limit "
                      f"of {max_pixels:,}. Upload a smaller image.")
    return loaded


def preview(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (HxWx3 in [0, 1]) as shown on the page: itself, or shrunk to a longest side of
    PREVIEW_MAX_SIDE (a 24-megapixel PNG would be slow to encode and to send)."""
    height, width = rgb.shape[:2]
    scale = PREVIEW_MAX_SIDE / max(height, width)
    if scale >= 1:
        return rgb
    small = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return np.asarray(small.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                   Image.Resampling.LANCZOS))


def check_tile(tile: int, pad_multiple: int) -> int:
    """The tile field's value (0: automatic); a page error for a size the model cannot tile with."""
    if tile:
        try:
            check_tile_size(tile, tile_overlap_for(tile, MAX_TILE_OVERLAP), pad_multiple, ("The tile size", ""))
        except ValueError as err:
            raise refusal(f"{err} (or 0 for automatic).") from None
    return tile


def tile_options(tile: int, model: AnlightenDiff, height: int, width: int) -> dict[str, int]:
    """Keyword arguments of tiled enhancement for a ``height`` x ``width`` image (overlap: a quarter of the
    tile, at most 64 px): tiles of ``tile`` px, or for 0 those of :func:`models.tiling.automatic_tiling`, which
    leaves images that fit in one piece untiled (no arguments)."""
    if tile == 0:
        tile = automatic_tiling(height, width, model.config.model, model.config.diffusion.pad_multiple,
                                MAX_TILE_OVERLAP)[0] or 0
    return {"tile": tile, "tile_overlap": tile_overlap_for(tile, MAX_TILE_OVERLAP)} if tile else {}


def progress_callback(progress: Callable[..., Any], tiling: dict[str, int], size: tuple[int, int],
                      pad_multiple: int) -> Callable[[int, int], None]:
    """The enhancement callback (steps done of all steps) that moves the page's progress bar, labelled with
    the tile being enhanced when tiled."""
    if not tiling:
        return lambda i, n: progress((i, n), desc="sampling")
    count = tile_count(*size, tiling["tile"], tiling["tile_overlap"], pad_multiple)
    return lambda i, n: progress((i, n), desc=f"tile {(max(i, 1) - 1) * count // n + 1} of {count}")


def brightness_target(value: float | None) -> float | None:
    """The brightness slider's value as :func:`models.brightness.match_brightness`'s target: None (automatic)
    for 0, else a mean luminance in the valid range; a page error otherwise."""
    value = round(float(value or 0), 4)  # the slider's steps of 0.05 arrive as 0.15000000000000002
    if value == 0:
        return None
    try:
        return check_target(value)
    except ValueError:
        low, high = BRIGHTNESS_RANGE
        raise refusal(f"Brightness must be 0 (automatic) or between {low} and {high}, got {value}.") from None


def make_enhance_fn(model: AnlightenDiff, defaults: SamplerConfig, max_pixels: int,
                    precision: str = "fp32") -> Callable[..., EnhanceResult]:
    """The page's handler: (upload, sampler, steps, tile, brightness) -> ((before, after), anchor, PNG path).
    It gets the page's raw values (``preprocess=False``), so that read_image, not gradio, decodes and judges
    the file. ``brightness``: 0 keeps the model's brightness, else the target mean luminance of the result and
    of the anchor shown (:func:`models.brightness.match_brightness`)."""
    pad_multiple = model.config.diffusion.pad_multiple
    outputs = tempfile.TemporaryDirectory(prefix="anlightendiff-demo-")  # removed when the server exits

    def enhance_upload(upload: dict[str, Any] | None, sampler: str, steps: float, tile: float | None,
                       brightness: float | None = 0, progress: gr.Progress = gr.Progress()  # noqa: B008
                       ) -> EnhanceResult:
        path, name = upload_path(upload)
        tile_size = check_tile(int(tile or 0), pad_multiple)
        luminance = brightness_target(brightness)
        loaded = load_upload(path, name, max_pixels)
        try:
            config = checked_sampler(model, defaults, sampler, int(steps))
        except UserError as err:
            raise refusal(str(err)) from None
        tiling = tile_options(tile_size, model, *loaded.rgb.shape[:2])
        progress(0, desc="sampling")
        result = model.enhance(to_tensor(loaded.rgb, model.device), config, precision=precision,
                               callback=progress_callback(progress, tiling, loaded.rgb.shape[:2], pad_multiple),
                               **tiling)
        image = to_array(match_brightness(result.image, luminance))
        anchor = preview(to_array(match_brightness(result.anchor, luminance)))
        del result
        target = Path(tempfile.mkdtemp(dir=outputs.name)) / f"{Path(name).stem}_enhanced.png"
        save_png(target, image, loaded.alpha)
        return (preview(loaded.rgb), preview(image)), anchor, str(target)

    return enhance_upload


def steps_control(sampler: str, timesteps: int) -> dict:
    """ddpm always runs every timestep: lock the steps slider there; anchor runs none; ddim may choose."""
    if sampler == "ddpm":
        return gr.update(value=timesteps, interactive=False)
    return gr.update(interactive=sampler == "ddim")


def build_app(model: AnlightenDiff, defaults: SamplerConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
              samples: Sequence[Path] = (), precision: str = "fp32") -> gr.Blocks:
    """The page: upload or sample, sampler controls (``defaults``: a valid sampler for ``model``),
    before/after slider, anchor, PNG download; the networks run at ``precision``."""
    timesteps, pad_multiple = model.config.diffusion.timesteps, model.config.diffusion.pad_multiple
    with gr.Blocks(title="AnlightenDiff", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# AnlightenDiff: low-light image enhancement\nUpload a dark photo (or pick a sample), "
                    "press **Enhance**, drag the slider to compare, and download the full-resolution PNG.")
        with gr.Row():
            with gr.Column():
                upload = gr.Image(label="Low-light image", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], height=IMAGE_HEIGHT, elem_id="upload")
                if samples:
                    gr.Examples([[str(p)] for p in samples], inputs=[upload], label="Samples")
                sampler = gr.Radio(list(model.samplers), value=defaults.sampler, label="Sampler",
                                   info=SAMPLER_INFO if len(model.samplers) > 1 else
                                   "anchor: this model's only sampler (its noise predictor was never trained)")
                steps = gr.Slider(1, timesteps, value=defaults.steps, step=1, label="Sampling steps",
                                  interactive=defaults.sampler == "ddim")
                tile = gr.Number(0, precision=0, minimum=0, step=pad_multiple,
                                 label="Tile size (pixels, 0 = automatic)",
                                 info=f"A multiple of {pad_multiple}: enhance in overlapping tiles of this size. "
                                      "Automatic tiles only images too large for one piece (bounded memory); "
                                      f"the limit is {max_pixels:,} pixels")
                brightness = gr.Slider(0, BRIGHTNESS_RANGE[1], value=0, step=0.05, elem_id="brightness",
                                       label="Brightness (0 = automatic)",
                                       info="Mean luminance of the result, from 0.05 (dark) to 0.95 (bright); "
                                            "0 keeps the model's own choice")
                run = gr.Button("Enhance", variant="primary", elem_id="enhance")
            with gr.Column():
                compare = gr.ImageSlider(label="Before / after", format="png", max_height=2 * IMAGE_HEIGHT,
                                         elem_id="compare")
                anchor = gr.Image(label="Anchor (the model's colour and brightness guide)", format="png",
                                  height=IMAGE_HEIGHT, elem_id="anchor")
                download = gr.DownloadButton("Download PNG (full resolution)", elem_id="download")
        sampler.change(lambda name: steps_control(name, timesteps), sampler, steps)
        run.click(make_enhance_fn(model, defaults, max_pixels, precision),
                  [upload, sampler, steps, tile, brightness], [compare, anchor, download], api_name="enhance",
                  concurrency_limit=1, preprocess=False)
    return app.queue(default_concurrency_limit=1)


def launch(app: gr.Blocks, host: str, port: int, samples_dir: Path, block: bool = True) -> str:
    """Start serving ``app`` (returns its URL); ``block`` waits until interrupted."""
    _, url, _ = app.launch(server_name=host, server_port=port, allowed_paths=[str(samples_dir)],
                           prevent_thread_lock=not block, show_error=True, quiet=not block)
    return url


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    precision = check_precision(args.precision, device)
    model = load_for_inference(args.ckpt, device)
    retain_freed_memory_for(device)  # this script owns the process: keep freed memory (CPU)
    defaults = initial_sampler(model, args)
    samples = sample_images(args.samples)
    app = build_app(model, defaults, args.max_pixels, samples, precision)
    print(f"{len(samples)} sample image(s) from {args.samples}; Ctrl+C stops the server")
    try:
        launch(app, args.host, args.port, args.samples)
    except OSError as err:  # the address is taken or not this machine's
        raise UserError(f"cannot serve on {args.host}:{args.port}: {err}") from None
    return 0


USER_ERRORS = (CheckpointError,)
"""The project's own errors for what the user can fix (with UserError): one line, exit 2. Anything else is a bug
and keeps its traceback."""

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
