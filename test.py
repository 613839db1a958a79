"""Benchmark metrics on paired test sets: ``python test.py --cfg cfg/test/LOL.yaml [--ckpt PATH]``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.datamodule import datamodule_from_config
from data.datasets import DatasetError, DatasetNotFoundError
from models import CheckpointError, load_for_inference, resolve_checkpoint
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
from utils.config import ConfigError, load_config
from utils.image_io import ImagePathNotFoundError, ImageReadError, OutputExistsError, atomic_write, read_image, save_png
from utils.lpips import MIN_SIZES, build_lpips, lpips_available, missing_weights_message
from utils.memory import retain_freed_memory_for
from utils.metrics import METRICS, SSIM_MIN_SIZE, center_crop_boxes, mean_scores, quantize_output, score_pair


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Enhance a paired test set and report PSNR, SSIM, grey SSIM and LPIPS-AlexNet per image and "
                    "on average (uint8 RGB, the reference's protocol without its defects), plus GT-mean-corrected "
                    "PSNR/SSIM in separate fields. Writes the enhanced PNGs, metrics.csv and metrics.json.")
    parser.add_argument("--cfg", default="cfg/test/LOL.yaml",
                        help="test config: dataset, test geometry and, with its checkpoint key, the model (default "
                             "cfg/test/LOL.yaml; the paper's configs: cfg/test/FS/, cfg/test/TS/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    parser.add_argument("--test-folder", help="a folder with low/ and high/ to test on instead of the config's set")
    parser.add_argument("--output", help="results folder (default: results/<the config's path under cfg/test, "
                                         "without .yaml>, e.g. results/LOL, results/FS/test_VELOL)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    parser.add_argument("--reference-protocol", action="store_true",
                        help="reproduce the paper's numbers exactly: truncate outputs to uint8, BGR swap before "
                             "grey SSIM and LPIPS, column-wise grey SSIM, and with data.test_geometry: center_crop "
                             "(cfg/test/LOL_TS.yaml) the TS code's input and ground-truth crop offsets (see "
                             "utils/metrics.py)")
    add_inference_args(parser, config_checkpoint=True)
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the flags


def default_output(cfg: str) -> Path:
    """results/<path of ``cfg`` under ./cfg/test, without .yaml> (results/LOL, results/FS/test_VELOL): configs of
    the same name in different folders write to different places; results/<file name> for a config elsewhere."""
    path = Path(cfg).with_suffix("")
    try:
        return Path("results") / path.resolve().relative_to(Path("cfg", "test").resolve())
    except ValueError:
        return Path("results") / path.name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    """Package versions and machine, recorded beside the numbers."""
    import pytorch_lightning
    import skimage

    return {"python": platform.python_version(), "torch": torch.__version__,
            "pytorch_lightning": pytorch_lightning.__version__, "scikit_image": skimage.__version__,
            "numpy": np.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_reports(output: Path, rows: list[dict[str, Any]], summary: dict[str, Any], overwrite: bool) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["name", *METRICS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output / "metrics.csv", lambda tmp: tmp.write_text(buffer.getvalue()), overwrite=overwrite)
    text = json.dumps(summary, indent=2)
    atomic_write(output / "metrics.json", lambda tmp: tmp.write_text(text + "\n"), overwrite=overwrite)


def print_table(rows: list[dict[str, Any]], means: dict[str, Any]) -> None:
    fmt = lambda v: "   n/a" if v is None else f"{v:7.4f}"  # noqa: E731
    print(f"{'image':<24}" + "".join(f"{k:>14}" for k in METRICS))
    for row in [*rows, {"name": "MEAN", **means}]:
        print(f"{row['name'][:24]:<24}" + "".join(f"{fmt(row[k]):>14}" for k in METRICS))


def fit_geometry(item: dict[str, Any], geometry: str, multiple: int, reference_protocol: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, ground truth) of a test item, (3, H, W) each, as ``data.test_geometry`` scores them: ``pad`` as
    they are (the model pads internally), ``center_crop`` the TS reference's centred crops to multiples of
    ``multiple`` (:func:`utils.metrics.center_crop_boxes`)."""
    low, high = item["low"], item["high"]
    if geometry == "pad":
        return low, high
    try:
        boxes = center_crop_boxes(*low.shape[-2:], multiple, reference_protocol)
    except ValueError as err:
        raise UserError(f"{item['name']}: {err} (data.test_geometry: center_crop)") from None
    (top, left, h, w), (gt_top, gt_left, _, _) = boxes
    return low[:, top:top + h, left:left + w], high[:, gt_top:gt_top + h, gt_left:gt_left + w]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"data.test_folder={args.test_folder}"] if args.test_folder else [])
    config = load_config(args.cfg, overrides)
    ckpt_arg = checkpoint_for(args.ckpt, config, args.cfg)  # a config's missing checkpoint: before any work
    output = Path(args.output) if args.output else default_output(args.cfg)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    if (output / "metrics.json").exists() and not args.overwrite:
        raise UserError(f"{output} already holds results; pass --overwrite or choose another --output")
    datamodule = datamodule_from_config(config.data, config.seed)
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    existing = [str(t) for t in (output / f"{low.stem}.png" for low, _ in dataset.pairs) if t.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{len(existing)} output file(s) already exist (e.g. {existing[0]}); pass --overwrite or "
                        "choose another --output")
    for path in (path for pair in dataset.pairs for path in pair):
        read_image(path)  # an unreadable image is refused before anything is computed or written
    device = resolve_device(args.device)
    precision = check_precision(args.precision, device)
    ckpt = resolve_checkpoint(ckpt_arg)
    if ckpt_arg is None:  # benchmark numbers name their model
        print("checkpoint: the bundled checkpoints/default.ckpt (--ckpt PATH runs another; the paper's FS_final.ckpt: "
              "--cfg cfg/test/FS/test.yaml)", file=sys.stderr)
    model = load_for_inference(ckpt, device)
    retain_freed_memory_for(device)  # this script owns the process: keep freed memory (CPU)
    sampler = sampler_from_args(args, model.config.sampler, model.config.diffusion.timesteps)  # its recommended one
    model.require_sampler(sampler.sampler)  # before any output is written
    lpips_model = build_lpips("alex", device=device) if lpips_available("alex") else None
    if lpips_model is None:
        print(f"LPIPS: null ({missing_weights_message('alex').splitlines()[0]})", file=sys.stderr)
    ensure_output_dir(output, "--output")
    rows = []
    for index in tqdm(range(len(dataset)), desc="testing", unit="image"):
        item = dataset[index]
        low, high = fit_geometry(item, config.data.test_geometry, model.config.diffusion.pad_multiple,
                                 args.reference_protocol)
        result = model.enhance(low[None].to(device), sampler, precision=precision)
        out_u8 = quantize_output(result.image[0].float().cpu(), args.reference_protocol)
        save_png(output / f"{Path(item['name']).stem}.png", out_u8, overwrite=args.overwrite)
        scores = score_pair(out_u8, high, lpips_model, reference_protocol=args.reference_protocol)
        rows.append({"name": item["name"], **scores})
    means = mean_scores(rows)
    lpips_note = None if lpips_model else missing_weights_message("alex").splitlines()[0]
    too_small = [r["name"] for r in rows if r["lpips"] is None] if lpips_model else []
    if too_small:
        lpips_note = (f"LPIPS-AlexNet is undefined on images smaller than {MIN_SIZES['alex']}x{MIN_SIZES['alex']} "
                      f"pixels: null for {len(too_small)} image(s) ({', '.join(too_small)}), so the mean LPIPS is null")
        print(f"note: {lpips_note}", file=sys.stderr)
    tiny = [r["name"] for r in rows if r["ssim"] is None]
    ssim_note = None
    if tiny:
        ssim_note = (f"SSIM is undefined on images smaller than its {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} window: null for "
                     f"{len(tiny)} image(s) ({', '.join(tiny)}), so the mean SSIMs are null")
        print(f"note: {ssim_note}", file=sys.stderr)
    summary = {**means, "n": len(rows), "per_image": rows,
               "lpips_note": lpips_note, "ssim_note": ssim_note,
               "protocol": "reference" if args.reference_protocol else "fixed",
               "sampler": dataclasses.asdict(sampler),
               "precision": precision,
               "checkpoint": {"path": str(ckpt), "sha256": sha256(ckpt)},
               "config": config.to_dict(), "model_config": model.config.to_dict(), "environment": environment()}
    write_reports(output, rows, summary, args.overwrite)
    print_table(rows, means)
    print(f"results in {output}")
    return 0


USER_ERRORS = (ConfigError, CheckpointError, ImageReadError, ImagePathNotFoundError, OutputExistsError, DatasetError,
               DatasetNotFoundError)
"""The project's own errors for what the user can fix (with UserError): one line, exit 2. Anything else is a bug
and keeps its traceback."""

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
