"""Inference speed of each optimisation and sampler on this machine, and quality vs steps with a checkpoint.

    python bench/speed.py [--ckpt PATH] [--size 600x400] [--device auto] [--steps 5,10,20] [--quick]
                          [--pairs DIR] [--tile 768] [--compile] [--bf16] [section.key=value ...]

Without --ckpt the model is built from the config (paper size by default) with random weights; speed does
not depend on the weights. Prints, per optimisation setting, the anchor encoder's time, the time of one
sampling step (UNet + sampler update) and the peak memory; then seconds per image for faithful DDPM-T
(measured end to end; estimated from encoder + T steps with --quick) and for DDIM at a few step counts,
with the speed-up measured in the same run. With --ckpt and --pairs DIR (low/ and high/) it also prints
PSNR/SSIM/LPIPS per sampler (DDPM-T, the anchor alone, DDIM-k; only the anchor for an anchor- or he-stage
checkpoint) and their difference to the first row. --tile SIZE measures a 3840x2160 image
enhanced on tiles. The last line is always ``speedup <x>``: DDPM-T time / default fast time.

    python bench/speed.py --large 4000x3000,6000x4000 [--ckpt PATH] [--threads N]

measures only large photos instead, as test_unpaired.py enhances them by default (the default fast sampler
and setting, automatic tiling): tiles, seconds, seconds per megapixel and the process's peak memory for each
size; its last line is ``s/Mpix <x>`` of the last size.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import DatasetError, DatasetNotFoundError, pair_files
from models import CheckpointError, load_checkpoint
from models.anchor import condition_features
from models.anchored_diffusion import AnchoredDiffusion
from models.build import build_method
from models.inference import encode, sample
from models.padding import pad_to_multiple
from models.precision import bf16_supported
from models.preparation import prepare_for_inference
from models.stages import runnable_samplers
from models.tiling import automatic_tiling, tile_count
from utils.cli import UserError, resolve_device, run_cli
from utils.config import FAST_SAMPLER, Config, ConfigError, load_config
from utils.image_io import ImagePathNotFoundError, ImageReadError, read_image, to_tensor
from utils.lpips import build_lpips, lpips_available
from utils.memory import release_memory, retain_freed_memory
from utils.metrics import mean_scores, score_pairs, to_uint8

GIB = 1024**3


@dataclass(frozen=True)
class Setting:
    """One combination of the switchable optimisations of inference (models/preparation.py, models/inference.py,
    models/precision.py, utils/memory.py)."""

    name: str
    fold: bool = True
    inference_mode: bool = True
    retain_memory: bool = True
    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False


FAITHFUL = Setting("faithful: weight norm, no_grad, glibc malloc", fold=False, inference_mode=False,
                   retain_memory=False)
DEFAULT = Setting("default: fold+inference_mode+retain_memory")


@dataclass
class Timing:
    """Wall seconds of the anchor encoder and of one sampling step, and process CPU seconds (all threads)
    of one step, which other load on the machine disturbs less (best of the timed rounds); seconds of the
    first encoder + step call (includes compilation) and its working memory in bytes (peak minus resident
    before: activations and temporaries, not the weights)."""

    encoder_s: float
    step_s: float
    step_cpu_s: float
    first_call_s: float
    work_bytes: int

    def estimate(self, steps: int) -> float:
        """Seconds per image for ``steps`` sampling steps."""
        return self.encoder_s + steps * self.step_s


# ------------------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), wall seconds), synchronising CUDA around it."""
    result, wall, _ = timed_cpu(fn, device)
    return result, wall


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(fn(), wall seconds, process CPU seconds), synchronising CUDA around it."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> int:
    """Start a new peak (CUDA allocator statistics; on CPU, free memory returned to the OS and the peak
    RSS reset through Linux clear_refs); returns the memory in use now, in bytes."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    release_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status_bytes("VmRSS") or 0


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max allocated, or the process's peak RSS since :func:`reset_peak_memory` (VmHWM; the
    lifetime peak from getrusage where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepared_copy(networks: AnchoredDiffusion, setting: Setting, device: torch.device) -> AnchoredDiffusion:
    """A deep copy of the networks with the setting's optimisations applied (the original is untouched)."""
    return prepare_for_inference(copy.deepcopy(networks), device, fold=setting.fold,
                                 channels_last=setting.channels_last, compile=setting.compile)


def apply_allocator(setting: Setting, device: torch.device) -> None:
    """The setting's glibc allocator mode (process-wide, so set before each measurement)."""
    if device.type == "cpu":
        retain_freed_memory(setting.retain_memory)


def time_once(networks: AnchoredDiffusion, setting: Setting, img: torch.Tensor, pad_multiple: int,
              timed_steps: int) -> tuple[float, float, float]:
    """(encoder seconds, seconds and CPU seconds per sampling step) of one encoder run and ``timed_steps``
    DDIM steps."""
    device = img.device
    encoder, diffusion = networks.encoder, networks.model
    padded = pad_to_multiple(img, pad_multiple)
    steps = networks.sampler("ddim", timed_steps)
    apply_allocator(setting, device)
    with torch.inference_mode() if setting.inference_mode else torch.no_grad():
        (anchor, feats), encoder_s = timed(lambda: encode(encoder, condition_features(padded), setting.precision,
                                                          networks.he_network), device)
        _, steps_s, steps_cpu_s = timed_cpu(lambda: sample(
            diffusion, steps, padded, anchor, feats, precision=setting.precision,
            inference_mode=setting.inference_mode), device)
    return encoder_s, steps_s / timed_steps, steps_cpu_s / timed_steps


def first_call(networks: AnchoredDiffusion, setting: Setting, img: torch.Tensor, pad_multiple: int
               ) -> tuple[float, int]:
    """(seconds, working-memory bytes) of the first encoder + one-step call, from a trimmed heap."""
    apply_allocator(setting, img.device)
    before = reset_peak_memory(img.device)
    encoder_s, step_s, _ = time_once(networks, setting, img, pad_multiple, timed_steps=1)
    return encoder_s + step_s, peak_memory(img.device) - before


def round_order(settings: list[Setting], round_index: int) -> list[Setting]:
    """Settings without retained memory first (retention keeps glibc's heap warm for what follows); the
    others rotated every round so that none always pays for re-growing the heap."""
    plain = [s for s in settings if not s.retain_memory]
    retaining = [s for s in settings if s.retain_memory]
    shift = round_index % len(retaining) if retaining else 0
    return plain + retaining[shift:] + retaining[:shift]


def measure_settings(networks: AnchoredDiffusion, settings: list[Setting], img: torch.Tensor, pad_multiple: int,
                     rounds: int, timed_steps: int) -> dict[Setting, Timing]:
    """A first call of every setting, then ``rounds`` round-robin timed rounds (load changes on a shared
    machine then hit all settings alike); best times."""
    prepared = {s: prepared_copy(networks, s, img.device) for s in settings}
    first = {s: first_call(prepared[s], s, img, pad_multiple) for s in round_order(settings, 0)}
    times: dict[Setting, list[tuple[float, float, float]]] = {s: [] for s in settings}
    for index in range(rounds):
        for setting in round_order(settings, index):
            times[setting].append(time_once(prepared[setting], setting, img, pad_multiple, timed_steps))
        print(f"  round {index + 1}/{rounds} done", flush=True)
    return {s: Timing(*(min(t[i] for t in times[s]) for i in range(3)), *first[s]) for s in settings}


def time_enhance(networks: AnchoredDiffusion, setting: Setting, img: torch.Tensor, pad_multiple: int,
                 sampler: str, steps: int, **kwargs: Any) -> tuple[torch.Tensor, float]:
    """(enhanced image, seconds) of one end-to-end :func:`enhance` call."""
    apply_allocator(setting, img.device)
    generator = torch.Generator(device=img.device).manual_seed(0)
    result, seconds = timed(lambda: networks.enhance(
        img, networks.sampler(sampler, steps), generator=generator, precision=setting.precision,
        inference_mode=setting.inference_mode, **kwargs), img.device)
    return result.image, seconds


# ------------------------------------------------------------------------------------------- settings
def settings_to_measure(args: argparse.Namespace, device: torch.device) -> tuple[list[Setting], list[str]]:
    """Faithful and default always; with all of them (not --quick) each default optimisation switched off
    and each optional one switched on. Also returns notes on settings skipped."""
    if args.quick:
        return [FAITHFUL, DEFAULT], []
    settings = [FAITHFUL, DEFAULT,
                dataclasses.replace(DEFAULT, name="default - fold", fold=False),
                dataclasses.replace(DEFAULT, name="default - inference_mode (no_grad)", inference_mode=False),
                dataclasses.replace(DEFAULT, name="default + channels_last", channels_last=True)]
    notes = []
    if device.type == "cpu":
        settings.insert(2, dataclasses.replace(DEFAULT, name="default - retain_memory", retain_memory=False))
    if bf16_supported(device) or args.bf16:
        settings.append(dataclasses.replace(DEFAULT, name="default + bf16 autocast", precision="bf16"))
    else:
        notes.append("bf16: skipped, no native bf16 on this device (emulated, much slower); --bf16 forces it")
    if device.type == "cuda":
        settings.append(dataclasses.replace(DEFAULT, name="default + fp16 autocast", precision="fp16"))
    if args.compile:
        settings.append(dataclasses.replace(DEFAULT, name="default + torch.compile", compile=True))
    else:
        notes.append("torch.compile: skipped (minutes of compilation); --compile measures it")
    return settings, notes


# ------------------------------------------------------------------------------------------- report
def header(networks: AnchoredDiffusion, device: torch.device, size: tuple[int, int], config: Config) -> list[str]:
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in networks.named_children()}
    weights = sum(p.numel() * p.element_size() for p in networks.parameters()) / GIB
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return [f"machine: {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            f"model: UNet {params['model'] / 1e6:.2f} M + encoder {params['encoder'] / 1e6:.2f} M"
            + (f" + HE network {params['he_network'] / 1e6:.2f} M" if "he_network" in params else "") + " parameters "
            f"({weights:.2f} GiB as built), T={config.diffusion.timesteps}; image {size[1]}x{size[0]} (WxH) "
            f"on {device}"]


def cpu_share_line(wall_start: float, cpu_start: float) -> str:
    """How much of the machine this run got: process CPU seconds per wall second, and the load average."""
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"cpu share: {cpu:.0f} CPU-s in {wall:.0f} s wall = {cpu / wall:.2f} of {os.cpu_count()} cores "
            f"(torch threads {torch.get_num_threads()}); load average now {load:.2f}")


def timing_table(timings: dict[Setting, Timing], timesteps: int, fast_steps: int) -> list[str]:
    base = timings[FAITHFUL]
    lines = [f"{'setting':<44}{'encoder s':>10}{'step s':>9}{'step cpu-s':>11}{'first s':>9}{'work GiB':>10}"
             f"{f'DDPM-{timesteps} s':>12}{f'DDIM-{fast_steps} s':>11}{'step x':>8}{'cpu x':>7}{'image x':>9}"]
    for setting, t in timings.items():
        image_ratio = base.estimate(fast_steps) / t.estimate(fast_steps)
        lines.append(f"{setting.name:<44}{t.encoder_s:>10.3f}{t.step_s:>9.3f}{t.step_cpu_s:>11.3f}"
                     f"{t.first_call_s:>9.2f}{t.work_bytes / GIB:>10.2f}{t.estimate(timesteps):>12.1f}"
                     f"{t.estimate(fast_steps):>11.2f}{base.step_s / t.step_s:>8.2f}"
                     f"{base.step_cpu_s / t.step_cpu_s:>7.2f}{image_ratio:>9.2f}")
    return lines


# ------------------------------------------------------------------------------------------- quality
def load_pairs(folder: Path, limit: int | None, device: torch.device) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(low (1, 3, H, W) on device, high uint8 (H, W, 3)) pairs of ``folder``/low and ``folder``/high."""
    pairs = pair_files(folder / "low", folder / "high")[:limit]
    loaded = []
    for low_path, high_path in pairs:
        low = to_tensor(read_image(low_path).rgb, device)
        loaded.append((low, to_uint8(read_image(high_path).rgb)))
    return loaded


def quality_rows(networks: AnchoredDiffusion, pairs: list[tuple[torch.Tensor, np.ndarray]], pad_multiple: int,
                 samplers: list[tuple[str, int]], detail: str = "model") -> list[dict[str, Any]]:
    """Mean PSNR/SSIM/LPIPS (:func:`utils.metrics.score_pairs`, what test.py reports) and seconds per image of
    each (sampler, steps) with the default setting, ``detail`` as the checkpoint recommends (``sampler.detail``)."""
    lpips_model = build_lpips("alex", device=pairs[0][0].device) if lpips_available("alex") else None
    rows = []
    for sampler, steps in samplers:
        outputs, seconds = [], 0.0
        for low, high in pairs:
            image, spent = time_enhance(networks, DEFAULT, low, pad_multiple, sampler, steps, detail=detail)
            outputs.append((image[0].float().cpu(), high))
            seconds += spent
        mean = mean_scores(score_pairs(outputs, lpips_model), ("psnr", "ssim", "lpips"))
        name = "anchor" if sampler == "anchor" else f"{sampler}-{steps}"
        rows.append({"name": name, **mean, "seconds": seconds / len(pairs)})
    return rows


def quality_table(rows: list[dict[str, Any]]) -> list[str]:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    ref = rows[0]
    lines = [f"{'sampler':<12}{'PSNR':>8}{'SSIM':>8}{'LPIPS':>8}{'dPSNR':>8}{'dSSIM':>8}{'dLPIPS':>8}"
             f"{'s/image':>9}   (d = minus {ref['name']})"]
    for row in rows:
        deltas = [None if row[k] is None else row[k] - ref[k] for k in ("psnr", "ssim", "lpips")]
        lines.append(f"{row['name']:<12}{fmt(row['psnr'], '.3f'):>8}{fmt(row['ssim'], '.4f'):>8}"
                     f"{fmt(row['lpips'], '.4f'):>8}{fmt(deltas[0], '+.3f'):>8}{fmt(deltas[1], '+.4f'):>8}"
                     f"{fmt(deltas[2], '+.4f'):>8}{row['seconds']:>9.2f}")
    return lines


# ------------------------------------------------------------------------------------------- main
def parse_size(text: str) -> tuple[int, int]:
    """``"600x400"`` (width x height) -> (height, width)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size '{text}' must look like WIDTHxHEIGHT, e.g. 600x400") from None
    if width < 1 or height < 1:
        raise UserError(f"size '{text}' must be positive")
    return height, width


def parse_steps(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--steps '{text}' must be comma-separated integers, e.g. 5,10,20") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="checkpoint to time (default: random weights from the config)")
    parser.add_argument("--cfg", help="config YAML for the random-weight model (default: paper size)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    parser.add_argument("--size", default="600x400", help="image WIDTHxHEIGHT (default 600x400)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--steps", default="5,10,20", help="DDIM step counts to time (default 5,10,20)")
    parser.add_argument("--fast-steps", type=int, default=FAST_SAMPLER.steps,
                        help=f"DDIM steps of the default fast setting (default: the project's FAST_SAMPLER, "
                             f"{FAST_SAMPLER.steps})")
    parser.add_argument("--quick", action="store_true", help="faithful and default settings only, one timed "
                        "round of 2 steps, DDPM-T estimated, only the default fast sampler timed end to end "
                        "(--pairs still compares every --steps)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per setting without --quick")
    parser.add_argument("--estimate-ddpm", action="store_true",
                        help="estimate DDPM-T from the measured step time instead of running it")
    parser.add_argument("--pairs", type=Path, help="folder with low/ and high/: quality per sampler (needs --ckpt)")
    parser.add_argument("--max-pairs", type=int, help="use only the first N pairs")
    parser.add_argument("--tile", type=int, metavar="SIZE", help="also enhance a --tile-image on SIZE tiles")
    parser.add_argument("--tile-image", default="3840x2160", help="image size for --tile (default 3840x2160)")
    parser.add_argument("--tile-overlap", type=int, default=64, help="tile overlap in px (default 64)")
    parser.add_argument("--large", metavar="WxH[,WxH]",
                        help="only measure these large image sizes, automatically tiled as test_unpaired.py does "
                             "(seconds per megapixel and peak memory), e.g. 4000x3000,6000x4000")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--bf16", action="store_true", help="time bf16 even where it is not native")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device) -> tuple[AnchoredDiffusion, Config]:
    """The method (from --ckpt, else random weights from the config) and its config: the anchor encoder, the
    diffusion and, for the TS variant, the HE network."""
    if args.ckpt:
        module = load_checkpoint(args.ckpt, map_location="cpu")
        method, config = module.method, module.config
    else:
        config = load_config(args.cfg, args.overrides)
        torch.manual_seed(config.seed)
        method = build_method(config)
    return method.to(device).eval(), config


def test_image(height: int, width: int, device: torch.device) -> torch.Tensor:
    """A reproducible dark (1, 3, H, W) image in [0, 0.3]."""
    return (torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 0.3).to(device)


def end_to_end(networks: AnchoredDiffusion, setting: Setting, img: torch.Tensor, pad_multiple: int, sampler: str,
               steps: int, repeats: int) -> tuple[float, int]:
    """(best seconds of ``repeats`` :func:`enhance` calls, process peak memory in bytes)."""
    reset_peak_memory(img.device)
    seconds = min(time_enhance(networks, setting, img, pad_multiple, sampler, steps)[1] for _ in range(repeats))
    return seconds, peak_memory(img.device)


def sampler_lines(networks: AnchoredDiffusion, img: torch.Tensor, pad_multiple: int, step_counts: list[int],
                  ddpm: tuple[str, float], repeats: int) -> tuple[list[str], dict[int, float]]:
    """End-to-end seconds per image of DDIM at each step count (default setting) and the speed-up."""
    label, ddpm_s = ddpm
    lines = [f"{'sampler (end to end)':<28}{'s/image':>9}{'speed-up':>10}{'peak GiB':>10}",
             f"{label:<28}{ddpm_s:>9.1f}{1:>10.1f}"]
    measured = {}
    for steps in step_counts:
        seconds, peak = end_to_end(networks, DEFAULT, img, pad_multiple, "ddim", steps, repeats)
        measured[steps] = seconds
        lines.append(f"{f'ddim-{steps}, default':<28}{seconds:>9.2f}{ddpm_s / seconds:>10.1f}{peak / GIB:>10.2f}")
    return lines, measured


def faithful_ddpm(networks: AnchoredDiffusion, timings: dict[Setting, Timing], img: torch.Tensor,
                  pad_multiple: int, timesteps: int, estimate: bool) -> tuple[str, float]:
    """(label, seconds per image) of faithful DDPM-T: estimated from encoder + T steps, or measured."""
    if estimate:
        return f"ddpm-{timesteps}, faithful (est.)", timings[FAITHFUL].estimate(timesteps)
    _, seconds = time_enhance(prepared_copy(networks, FAITHFUL, img.device), FAITHFUL, img, pad_multiple, "ddpm",
                              timesteps)
    return f"ddpm-{timesteps}, faithful", seconds


def tile_lines(networks: AnchoredDiffusion, args: argparse.Namespace, pad_multiple: int, fast_steps: int,
               device: torch.device) -> list[str]:
    height, width = parse_size(args.tile_image)
    img = test_image(height, width, device)
    count = tile_count(height, width, args.tile, args.tile_overlap, pad_multiple)
    apply_allocator(DEFAULT, device)
    reset_peak_memory(device)
    _, seconds = time_enhance(networks, DEFAULT, img, pad_multiple, "ddim", fast_steps, tile=args.tile,
                              tile_overlap=args.tile_overlap)
    return [f"tiled {width}x{height}: {count} tiles of {args.tile} px (overlap {args.tile_overlap}), "
            f"ddim-{fast_steps}, default setting: {seconds:.1f} s, process peak memory "
            f"{peak_memory(device) / GIB:.2f} GiB"]


def large_lines(networks: AnchoredDiffusion, config: Config, sizes: list[tuple[int, int]], fast_steps: int,
                device: torch.device) -> tuple[list[str], float]:
    """Each (height, width) enhanced as test_unpaired.py does by default (automatic tiling, 64 px overlap at
    most a quarter of the tile): one line each, and the last size's seconds per megapixel."""
    pad_multiple, lines, per_mpix = config.diffusion.pad_multiple, [], float("nan")
    for height, width in sizes:
        img = test_image(height, width, device)
        tile, overlap = automatic_tiling(height, width, config.model, pad_multiple)
        if tile is None:
            how = "in one piece"
        else:
            count = tile_count(height, width, tile, overlap, pad_multiple)
            how = f"{count} tiles of {tile} px (overlap {overlap})"
        apply_allocator(DEFAULT, device)
        reset_peak_memory(device)
        cpu_start = time.process_time()
        _, seconds = time_enhance(networks, DEFAULT, img, pad_multiple, "ddim", fast_steps, tile=tile,
                                  tile_overlap=overlap, detail=config.sampler.detail)
        cpu = time.process_time() - cpu_start
        mpix = height * width / 1e6
        per_mpix = seconds / mpix
        lines.append(f"large {width}x{height} ({mpix:.1f} Mpix), {how}, ddim-{fast_steps}: {seconds:.1f} s = "
                     f"{per_mpix:.2f} s/Mpix ({cpu / mpix:.2f} CPU-s/Mpix), process peak memory "
                     f"{peak_memory(device) / GIB:.2f} GiB")
        print(lines[-1], flush=True)
        del img
    return lines, per_mpix


def main(argv: Sequence[str] | None = None) -> int:
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = parse_size(args.size)
    large = [parse_size(text) for text in args.large.split(",")] if args.large else []
    if args.pairs and not args.ckpt:
        raise UserError("--pairs needs --ckpt: quality of random weights means nothing")
    networks, config = build(args, device)
    if large:
        print("\n".join(header(networks, device, large[0], config)), flush=True)
        default = prepared_copy(networks, DEFAULT, device)
        del networks
        _, per_mpix = large_lines(default, config, large, min(args.fast_steps, config.diffusion.timesteps), device)
        print(cpu_share_line(wall_start, cpu_start))
        print(f"s/Mpix {per_mpix:.2f}")
        return 0
    timesteps, pad_multiple = config.diffusion.timesteps, config.diffusion.pad_multiple
    fast_steps = min(args.fast_steps, timesteps)
    step_counts = sorted({s for s in parse_steps(args.steps) if 1 <= s <= timesteps} | {fast_steps})
    img = test_image(height, width, device)
    print("\n".join(header(networks, device, (height, width), config)), flush=True)
    settings, notes = settings_to_measure(args, device)
    rounds, timed_steps = (1, 2) if args.quick else (args.rounds, 2)
    timings = measure_settings(networks, settings, img, pad_multiple, rounds, timed_steps)
    print("\n".join(timing_table(timings, timesteps, fast_steps) + notes), flush=True)
    ddpm = faithful_ddpm(networks, timings, img, pad_multiple, timesteps, args.quick or args.estimate_ddpm)
    default = prepared_copy(networks, DEFAULT, device)
    del networks, timings
    time_enhance(default, DEFAULT, img, pad_multiple, "ddim", 1)
    lines, measured = sampler_lines(default, img, pad_multiple, [fast_steps] if args.quick else step_counts, ddpm,
                                    1 if args.quick else 2)
    print("\n".join(lines), flush=True)
    if args.pairs:
        pairs = load_pairs(args.pairs, args.max_pairs, device)
        samplers = [("ddpm", timesteps), ("anchor", 1)] + [("ddim", s) for s in step_counts]
        samplers = [(name, steps) for name, steps in samplers if name in runnable_samplers(config)]
        rows = quality_rows(default, pairs, pad_multiple, samplers, config.sampler.detail)
        print("\n".join(quality_table(rows)), flush=True)
    if args.tile:
        print("\n".join(tile_lines(default, args, pad_multiple, fast_steps, device)), flush=True)
    print(cpu_share_line(wall_start, cpu_start))
    print(f"speedup {ddpm[1] / measured[fast_steps]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, (CheckpointError, ConfigError, ImageReadError, ImagePathNotFoundError, DatasetError,
                            DatasetNotFoundError)))
