r"""The CUDA path in one unattended run: training throughput, DDP, test.py, test_unpaired.py, agreement of GPU and
CPU outputs and a projection of the paper's training time, printed as one table and written as JSON.

    python bench/gpu_check.py [--device cuda] [--out results/gpu_check.json] [--steps 250] [--deadline 330]
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json   # the rehearsal the tests run

What runs, each through the project's own entry points (train.py, test.py and test_unpaired.py, their main functions
in this process, so that the peak memory of each can be read; utils.config; models.load_for_inference):

- training: train.py with the paper's FS config (cfg/train/faithful.yaml: width 64, dim_mults [1, 2, 2, 4, 4, 8],
  batch 24, 160 px crops) and with the bundled model's (checkpoints/default_config.yaml), each at its own batch and
  crop size, in 32-true and bf16-mixed, without validation, on LOL-shaped pairs made here (600x400 PNGs from
  samples/, hard-linked into one folder long enough that the run is one epoch). Steps/s is read off the wall times
  of the train/loss records in the run's own TensorBoard log, after --warmup steps; images/s is steps/s x batch x
  ranks; peak memory is torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on the CPU.
- DDP: train.py in a process of its own (Lightning's DDP launcher re-runs the command for ranks > 0) with
  trainer.strategy=ddp on all GPUs present (one is enough: the strategy's path runs), FS config, bf16-mixed.
- test.py: the FS checkpoint trained above (speed does not depend on the weights) with the paper's DDPM-100 in
  fp32 and bf16, and the bundled checkpoint with its defaults, on --pairs 600x400 pairs; s/image is read off the
  times test.py wrote its output PNGs, from the first to the last (loading, set-up and the first image's warm-up
  come before the first); peak memory is the whole run's.
- agreement: the same test.py runs on the CPU, and the PSNR between GPU and CPU outputs (uint8 PNGs): the
  bundled checkpoint on every pair, the FS checkpoint with deterministic DDIM-4 on one (DDPM's noise comes from the
  device's own generator, so its outputs differ by design). Passes above 40 dB.
- test_unpaired.py on a 24 Mpix JPEG with the bundled checkpoint: s/image (the whole run: load, decode, enhance,
  PNG), peak memory, and the tiling test_unpaired.py chooses on its own.
- projection: hours to train the paper's schedule (1000 epochs of LOL + LOL-v2 + VE-LOL at batch 24, validating
  LOL eval15 with DDPM-100 every epoch) on this device, from the figures above.

Training under torch.compile is not measured: train.py has no switch for it.

Output of the runs goes to a log beside the JSON (--log); the console gets one line per check and the table. The
JSON is rewritten after every check, so a run stopped by a time limit still leaves what it measured. A check that
fails is recorded with its error and the others go on; the exit status is 1 when any failed, disagreed or was
skipped.

On the device machine, which is bare and reaches no network: its python3 has torch, Lightning, torchvision,
torchmetrics, scikit-image, tensorboard, pyyaml, tqdm and pillow; lion-pytorch and lpips travel as wheels in .whl/
and the AlexNet LPIPS weights in .lpips/, both prepared here by ``bash bench/gpu_check_prepare.sh``. LPIPS-VGG's
backbone (59 MB) cannot travel: a call carries 64 MiB in all and the working tree takes about 51 of them. Where a
backbone is missing this check writes a random stand-in of the same shape for the runs (same compute, so the same
speed; its LPIPS values mean nothing and none is reported) and says so in the JSON. The device command (what
``python bench/gpu_check.py --device-command`` prints; carry .whl and .lpips, timeout_s 480):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --device cuda --lpips-dir .lpips --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from utils.cli import UserError, resolve_device, run_cli
from utils.config import ConfigError, load_config
from utils.image_io import OutputExistsError, atomic_write
from utils.lpips import ENV_VAR, NETS, converted_weights_path, lpips_cache_dir, torchvision_weights_path

ROOT = Path(__file__).resolve().parents[1]
FS_CONFIG = ROOT / "cfg" / "train" / "faithful.yaml"
BUNDLED_CONFIG = ROOT / "checkpoints" / "default_config.yaml"
BUNDLED_CHECKPOINT = ROOT / "checkpoints" / "default.ckpt"
TEST_CONFIG = ROOT / "cfg" / "test" / "LOL.yaml"
GIB = 1024**3
AGREEMENT_DB = 40.0
"""GPU and CPU outputs of one checkpoint agree when their PSNR (uint8) is above this, in fp32."""

DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\\n"
    "    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\\n"
    "PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --device cuda --lpips-dir .lpips --out $OUT/gpu_check.json"
)
"""The command for the device machine (carry .whl and .lpips): installs the carried wheels, then runs the check."""
DEVICE_CARRY = (".whl", ".lpips")

SECTIONS = ("train", "data", "ddp", "test.py", "agreement", "test_unpaired.py")
"""The table's order of the checks (the JSON keeps the order they ran in)."""

PAPER_TRAIN_PAIRS = 485 + 689 + 400
"""The training splits of use_dataset LOL+LOLv2+VELOL: LOL our485 (485 pairs), LOL-v2 Real_captured/Train (689) and
VE-LOL-L-Cap-Full/train (400). None of them is at hand, so the count is written here."""
PAPER_VAL_IMAGES = 15
"""LOL eval15, which the paper's config validates on (with its val_sampler, DDPM-100) every epoch."""


# ------------------------------------------------------------------------------------------------ sizes
class Sizes:
    """What one mode runs: full sizes for a GPU, or --tiny sizes that rehearse every check on a CPU in seconds."""

    def __init__(self, tiny: bool, steps: int | None, warmup: int | None, pairs: int | None, workers: int | None):
        self.tiny = tiny
        self.steps = steps or (6 if tiny else 250)
        self.warmup = warmup if warmup is not None else (2 if tiny else 50)
        self.ddp_steps = self.steps if tiny else max(self.warmup + 20, self.steps // 2)
        self.log_every = 1 if tiny else 10
        self.pairs = pairs or (2 if tiny else 4)
        self.pair_size = (160, 128) if tiny else (600, 400)  # training pairs, width x height
        self.test_size = (64, 48) if tiny else (600, 400)  # test.py's pairs
        self.photo_size = (200, 150) if tiny else (6000, 4000)
        # all CPUs but two (the training process, the pinning thread) decode PNGs: 600x400 pairs at batch 24 need many
        self.workers = workers if workers is not None else (0 if tiny else max(1, min(14, (os.cpu_count() or 2) - 2)))
        # The FS model shrunk to a few thousand parameters and 10 timesteps; the bundled model keeps its size (the
        # smallest crop its 4-scale MS-SSIM loss takes is about 100 px, so its own 128 px crops stay).
        self.fs_overrides = (["model.unet_dim=8", "model.dim_mults=[1,2,2]", "diffusion.pad_multiple=8",
                              "diffusion.timesteps=10", "sampler.steps=10", "val_sampler.steps=10",
                              "data.image_size=32", "data.train_batch_size=2"] if tiny else [])
        self.bundled_overrides = ["data.train_batch_size=2"] if tiny else []
        if self.steps < self.warmup + 2 * self.log_every:
            raise UserError(f"--steps {self.steps} leaves too few steps after --warmup {self.warmup} to time")


# ------------------------------------------------------------------------------------------------ memory
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on the CPU the process's peak RSS (Linux clear_refs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    """GiB since :func:`reset_peak_memory`: torch.cuda.max_memory_allocated, or the process's peak RSS (VmHWM; the
    lifetime peak of getrusage where /proc has none)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"


# ------------------------------------------------------------------------------------------------ inputs
def sample_photos() -> list[np.ndarray]:
    """The repository's sample photos (samples/*.png) as uint8 RGB arrays."""
    files = sorted((ROOT / "samples").glob("*.png"))
    if not files:
        raise UserError(f"no sample photos in {ROOT / 'samples'}")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def make_pairs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` LOL-shaped pairs in folder/low and folder/high (8-bit RGB PNGs of ``size`` = (width, height)): the
    sample photos resized and brightened as targets, 8x darker copies with sensor-like noise as inputs."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    for sub in ("low", "high"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = Image.fromarray(photos[index % len(photos)]).resize(size, Image.BICUBIC)
        high = np.asarray(photo, dtype=np.float32)
        high = np.roll(high, index * 37, axis=1) * (110.0 / max(float(high.mean()), 1.0))
        low = high / 8 + rng.normal(0.0, 2.0, high.shape)
        for sub, image in (("high", high), ("low", low)):
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / sub / f"{index:05d}.png")
    return folder


def fill_with_links(source: Path, folder: Path, count: int) -> Path:
    """A pairs folder of ``count`` pairs whose files are hard links to the pairs in ``source``, cycled: an epoch as
    long as the run needs, with no epoch boundary (a DataLoader restart) in the timed steps."""
    names = sorted(p.name for p in (source / "low").iterdir())
    for sub in ("low", "high"):
        (folder / sub).mkdir(parents=True)
        for index in range(count):
            os.link(source / sub / names[index % len(names)], folder / sub / f"{index:06d}.png")
    return folder


def make_photo(path: Path, size: tuple[int, int]) -> Path:
    """A large dark JPEG: samples/lol_6.png upscaled to ``size`` (width, height)."""
    Image.open(ROOT / "samples" / "lol_6.png").convert("RGB").resize(size, Image.BICUBIC).save(path, quality=92)
    return path


def prepare_lpips(source: Path | None, folder: Path) -> dict[str, str]:
    """``folder``, for $ANLIGHTENDIFF_LPIPS_DIR during the runs: each LPIPS backbone linked from ``source`` (default:
    the usual folder) where it is there, else a random stand-in of the same shape (the speed of real weights, none of
    their values). torchvision's own cache, which utils.lpips reads first, counts as real. Returns net -> what the runs
    use."""
    source = lpips_cache_dir(source)
    folder.mkdir(parents=True)
    used: dict[str, str] = {}
    for net in NETS:
        real, target = converted_weights_path(net, source), converted_weights_path(net, folder)
        if torchvision_weights_path(net).is_file():
            used[net] = f"real ({torchvision_weights_path(net)})"
        elif real.is_file():
            target.symlink_to(real.resolve())
            used[net] = f"real ({real})"
        else:
            torch.save(random_backbone(net), target)
            used[net] = "random stand-in (speed only: LPIPS values meaningless, none reported)"
    return used


def random_backbone(net: str) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision backbone (``features``) in the converted layout utils.lpips loads."""
    from torchvision.models import alexnet, vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = {"alex": alexnet, "vgg": vgg16}[net]().features
    return {f"features.{key}": value for key, value in features.state_dict().items()}


# ------------------------------------------------------------------------------------------------ running
def load_script(name: str) -> ModuleType:
    """The checkout's ``<name>.py`` as a module (by file: ``test`` would otherwise find Python's own package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2: Python, tqdm, Lightning, C libraries) to
    the end of ``log`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("ab", buffering=0) as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def training_rate(run_dir: Path, warmup: int) -> tuple[float, int]:
    """(steps per second, steps timed): between the first train/loss record at or after step ``warmup`` and the last
    one, by the wall times the run's TensorBoard log holds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    events = [e for e in accumulator.Scalars("train/loss") if e.step >= warmup]
    if len(events) < 2 or events[-1].wall_time <= events[0].wall_time:
        raise RuntimeError(f"{run_dir}: fewer than two train/loss records after step {warmup} to time")
    return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time), \
        events[-1].step - events[0].step


def seconds_per_image(folder: Path) -> float:
    """Seconds per image of the run that wrote the PNGs in ``folder`` one after another, by their modification
    times: loading, set-up and the first image's warm-up come before the first one and are left out."""
    times = sorted(p.stat().st_mtime for p in folder.glob("*.png"))
    if len(times) < 2:
        raise RuntimeError(f"{folder}: fewer than two outputs to time")
    return (times[-1] - times[0]) / (len(times) - 1)


def psnr_between(folder_a: Path, folder_b: Path) -> tuple[float | None, int, int]:
    """(lowest PSNR in dB over the PNGs of ``folder_a`` and their namesakes in ``folder_b``, None when all are
    identical; largest difference in uint8 levels; images compared)."""
    files = sorted(folder_a.glob("*.png"))
    if not files:
        raise RuntimeError(f"no PNG outputs in {folder_a}")
    psnrs, largest = [], 0
    for file in files:
        a, b = (torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)) for f in
                (file, folder_b / file.name))
        largest = max(largest, int((a - b).abs().max()))
        if not torch.equal(a, b):
            psnrs.append(float(peak_signal_noise_ratio(a, b, data_range=255.0)))
    return (min(psnrs) if psnrs else None), largest, len(files)


class Check:
    """The checks, run in order; each adds rows to the report, which is rewritten after each."""

    def __init__(self, args: argparse.Namespace, device: torch.device, sizes: Sizes, work: Path):
        self.args, self.device, self.sizes, self.work = args, device, sizes, work
        self.start = time.perf_counter()
        self.log = Path(args.log)
        self.report: dict[str, Any] = {
            "mode": "tiny" if sizes.tiny else "full", "device": str(device), "complete": False,
            "environment": environment(device), "memory": memory_kind(device),
            "settings": {"steps": sizes.steps, "warmup": sizes.warmup, "ddp_steps": sizes.ddp_steps,
                         "log_every": sizes.log_every, "pairs": sizes.pairs,
                         "pair_size": "{}x{}".format(*sizes.pair_size), "test_size": "{}x{}".format(*sizes.test_size),
                         "photo_size": "{}x{}".format(*sizes.photo_size),
                         "num_workers": sizes.workers, "deadline_s": args.deadline},
            "lpips": {}, "rows": [], "projection": None,
            "left_out": ["training under torch.compile: train.py has no switch for it"],
        }
        self.scripts = {name: load_script(name) for name in ("train", "test", "test_unpaired")}
        self.fs_checkpoint: Path | None = None
        self.written = False

    # -------------------------------------------------------------------- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        text = json.dumps(self.report, indent=2) + "\n"
        atomic_write(self.args.out, lambda tmp: tmp.write_text(text), overwrite=self.written or self.args.overwrite)
        self.written = True

    def run(self, section: str, name: str, setting: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """One check: ``measure()``'s figures (its output to the log) as a row of the report, where keys starting
        with "_" stay out (paths in the work folder); an error or the deadline as the row's ``error``. Returns the
        whole row."""
        row: dict[str, Any] = {"section": section, "name": name, "setting": setting, "error": None}
        number = len(self.report["rows"]) + 1
        print(f"[{number:2d}] {section}: {name}, {setting} ...", end=" ", flush=True)
        if self.args.deadline and self.elapsed() > self.args.deadline:
            row["error"] = f"skipped: past --deadline {self.args.deadline} s"
        else:
            with self.log.open("a") as log:
                log.write(f"\n===== [{number}] {section}: {name}, {setting}\n")
            started = time.perf_counter()
            try:
                with output_to(self.log):
                    row.update(measure())
            except Exception as err:  # noqa: BLE001 - recorded; the other checks go on
                row["error"] = error_text(err)
            except SystemExit as err:  # Lightning ends some failures with sys.exit
                row["error"] = f"SystemExit({err.code})"
            finally:
                self.clean_up()
            row["wall_s"] = round(time.perf_counter() - started, 2)
        self.report["rows"].append({k: v for k, v in row.items() if not k.startswith("_")})
        self.write()
        print(figure(row), flush=True)
        return row

    def clean_up(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -------------------------------------------------------------------- training
    def train_overrides(self, cfg: Path, extra: Sequence[str], run_name: str, steps: int, precision: str | None,
                        devices: int = 1, strategy: str = "auto") -> list[str]:
        """train.py's overrides of ``cfg`` for a timed run: the pairs made here, no validation, no test, no periodic
        checkpoint, ``steps`` steps logged every ``log_every``, into the work folder."""
        s = self.sizes
        overrides = [
            "data.use_dataset=folder", f"data.extra_train_folders=[{self.work / 'train'}]", "data.val_folder=null",
            f"data.num_workers={s.workers}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            f"trainer.log_every_n_steps={s.log_every}", "trainer.checkpoint_every_n_steps=0",
            f"trainer.output_dir={self.work / 'runs'}", f"trainer.run_name={run_name}",
            f"trainer.accelerator={'gpu' if self.device.type == 'cuda' else 'cpu'}", f"trainer.devices={devices}",
            f"trainer.strategy={strategy}", *([f"trainer.precision={precision}"] if precision else []), *extra,
        ]
        if cfg == BUNDLED_CONFIG:  # its init_from is relative to the checkout
            overrides.append(f"init_from={BUNDLED_CHECKPOINT}")
        return overrides

    def train(self, label: str, cfg: Path, extra: Sequence[str], run_name: str, precision: str | None) -> dict:
        overrides = self.train_overrides(cfg, extra, run_name, self.sizes.steps, precision)
        config = load_config(cfg, overrides)
        batch, crop, used_precision = config.data.train_batch_size, config.data.image_size, config.trainer.precision

        def measure() -> dict[str, Any]:
            reset_peak_memory(self.device)
            code = self.scripts["train"].main(["--cfg", str(cfg), "--no-test", *overrides])
            peak = peak_memory_gib(self.device)
            if code:
                raise RuntimeError(f"train.py exited with {code}")
            run_dir = self.work / "runs" / run_name / "version_0"
            rate, timed = training_rate(run_dir, self.sizes.warmup)
            return {"config": str(cfg.relative_to(ROOT)), "precision": used_precision, "batch": batch, "crop": crop,
                    "ranks": 1, "steps": self.sizes.steps, "timed_steps": timed, "steps_per_s": round(rate, 3),
                    "images_per_s": round(rate * batch, 2), "peak_memory_gib": round(peak, 3),
                    "_checkpoint": run_dir / "checkpoints" / "last.ckpt"}

        return self.run("train", f"{label} {batch} x {crop} px", used_precision, measure)

    def data(self, label: str, cfg: Path, extra: Sequence[str]) -> dict:
        """The training DataLoader alone (data.datamodule, as train.py builds it): batches/s over up to 100 batches
        after --warmup ones (which take the workers' start and first prefetch). Training near this rate is bound by
        loading, not by the device."""
        config = load_config(cfg, self.train_overrides(cfg, extra, "data", self.sizes.steps, None))
        batch, crop = config.data.train_batch_size, config.data.image_size

        def measure() -> dict[str, Any]:
            from data.datamodule import datamodule_from_config

            module = datamodule_from_config(config.data, config.seed)
            batches = iter(module.train_dataloader())
            for _ in range(self.sizes.warmup):
                next(batches)
            count = min(100, self.sizes.steps - self.sizes.warmup)
            started = time.perf_counter()
            for _ in range(count):
                next(batches)
            rate = count / (time.perf_counter() - started)
            del batches
            return {"config": str(cfg.relative_to(ROOT)), "batch": batch, "crop": crop,
                    "num_workers": config.data.num_workers, "batches_per_s": round(rate, 3),
                    "images_per_s": round(rate * batch, 2)}

        return self.run("data", f"{label} {batch} x {crop} px", f"{config.data.num_workers} workers", measure)

    def ddp(self, label: str, cfg: Path, extra: Sequence[str], precision: str) -> dict:
        devices = torch.cuda.device_count() if self.device.type == "cuda" else 1
        overrides = self.train_overrides(cfg, extra, "ddp", self.sizes.ddp_steps, precision, devices, "ddp")
        config = load_config(cfg, overrides)
        batch, crop = config.data.train_batch_size, config.data.image_size

        def measure() -> dict[str, Any]:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if self.sizes.tiny else {})}
            with self.log.open("ab") as log:
                command = [sys.executable, str(ROOT / "train.py"), "--cfg", str(cfg), "--no-test", *overrides]
                process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=log, start_new_session=True)  # its ranks in its own group
            code, usage = wait_for(process, self.child_timeout())
            if code:
                raise RuntimeError(f"train.py (DDP) exited with {code}; see {self.log}")
            rate, timed = training_rate(self.work / "runs" / "ddp" / "version_0", self.sizes.warmup)
            peak = None if self.device.type == "cuda" else usage.ru_maxrss * 1024 / GIB  # rank 0's process
            return {"config": str(cfg.relative_to(ROOT)), "precision": precision, "batch": batch, "crop": crop,
                    "ranks": devices, "steps": self.sizes.ddp_steps, "timed_steps": timed,
                    "steps_per_s": round(rate, 3), "images_per_s": round(rate * batch * devices, 2),
                    "peak_memory_gib": None if peak is None else round(peak, 3)}

        return self.run("ddp", f"{label} {batch} x {crop} px, {devices} rank(s)", f"ddp, {precision}", measure)

    def child_timeout(self) -> float:
        """Seconds a child process may take: what is left before --deadline, plus 90 s."""
        if not self.args.deadline:
            return 3600.0
        return max(0.0, self.args.deadline - self.elapsed()) + 90.0

    # -------------------------------------------------------------------- inference
    def test_py(self, ckpt: Path, folder: Path, output: Path, device: str, precision: str = "fp32",
                sampler: Sequence[str] = ()) -> float:
        """Seconds of one test.py run (its outputs into ``output``)."""
        argv = ["--cfg", str(TEST_CONFIG), "--test-folder", str(folder), "--output", str(output), "--ckpt",
                str(ckpt), "--device", device, "--precision", precision, *sampler]
        started = time.perf_counter()
        code = self.scripts["test"].main(argv)
        if code:
            raise RuntimeError(f"test.py exited with {code}")
        return time.perf_counter() - started

    def inference(self, label: str, ckpt: Path | None, setting: str, precision: str = "fp32",
                  sampler: Sequence[str] = ()) -> dict:
        def measure() -> dict[str, Any]:
            if ckpt is None:
                raise RuntimeError("no checkpoint: its training failed")
            output = self.work / "out" / f"{label}-{precision}".replace(" ", "_")
            reset_peak_memory(self.device)
            seconds = self.test_py(ckpt, self.work / "pairs", output, str(self.device), precision, sampler)
            peak = peak_memory_gib(self.device)
            return {"checkpoint": label, "precision": precision, "images": self.sizes.pairs,
                    "size": "{}x{}".format(*self.sizes.test_size), "s_per_image": round(seconds_per_image(output), 4),
                    "run_s": round(seconds, 3), "peak_memory_gib": round(peak, 3), "_outputs": output}

        return self.run("test.py", f"{label} {'{}x{}'.format(*self.sizes.test_size)}", setting, measure)

    def agreement(self, label: str, ckpt: Path | None, setting: str, device_outputs: Path | None,
                  folder: Path, sampler: Sequence[str] = ()) -> dict:
        """PSNR between test.py's outputs on this device (``device_outputs``, else a run made here) and on the CPU."""

        def measure() -> dict[str, Any]:
            if ckpt is None:
                raise RuntimeError("no checkpoint: its training failed")
            tag = f"agree-{label}".replace(" ", "_")
            outputs = device_outputs
            if outputs is None:
                outputs = self.work / "out" / f"{tag}-device"
                self.test_py(ckpt, folder, outputs, str(self.device), "fp32", sampler)
            self.test_py(ckpt, folder, self.work / "out" / f"{tag}-cpu", "cpu", "fp32", sampler)
            psnr, largest, count = psnr_between(outputs, self.work / "out" / f"{tag}-cpu")
            return {"checkpoint": label, "images": count, "psnr_db_min": None if psnr is None else round(psnr, 2),
                    "max_abs_diff_uint8": largest, "agree": psnr is None or psnr > AGREEMENT_DB}

        return self.run("agreement", f"{label}, {self.device.type} vs cpu", setting, measure)

    def unpaired(self, photo: Path) -> dict:
        def measure() -> dict[str, Any]:
            from models import load_for_inference

            script = self.scripts["test_unpaired"]
            output = self.work / "out" / "unpaired"
            args = script.parse_args(["--input", str(photo), "--output", str(output)])
            args.tile = script.parse_tile(args.tile)
            width, height = Image.open(photo).size
            tile, overlap = script.tiling_for(args, load_for_inference(None, self.device), height, width)
            reset_peak_memory(self.device)
            started = time.perf_counter()
            code = script.main(["--input", str(photo), "--output", str(output), "--device", str(self.device)])
            seconds = time.perf_counter() - started
            peak = peak_memory_gib(self.device)
            if code:
                raise RuntimeError(f"test_unpaired.py exited with {code}")
            return {"checkpoint": "bundled", "size": f"{width}x{height}", "megapixels": round(width * height / 1e6, 2),
                    "tile": tile, "tile_overlap": overlap if tile else None, "s_per_image": round(seconds, 3),
                    "s_per_megapixel": round(seconds / (width * height / 1e6), 4), "peak_memory_gib": round(peak, 3)}

        width, height = self.sizes.photo_size
        return self.run("test_unpaired.py", f"bundled {width}x{height} JPEG", "its defaults, automatic tiling",
                        measure)

    # -------------------------------------------------------------------- all of it
    def all(self) -> None:
        s = self.sizes
        print(f"gpu_check: {self.report['environment']['device_name']}, work folder {self.work}, log {self.log}",
              flush=True)
        self.report["lpips"] = prepare_lpips(self.args.lpips_dir, self.work / "lpips")
        os.environ[ENV_VAR] = str(self.work / "lpips")
        make_pairs(self.work / "distinct", 8, s.pair_size)
        batches = [load_config(cfg, extra).data.train_batch_size
                   for cfg, extra in ((FS_CONFIG, s.fs_overrides), (BUNDLED_CONFIG, s.bundled_overrides))]
        ranks = torch.cuda.device_count() if self.device.type == "cuda" else 1  # the DDP run's ranks share an epoch
        fill_with_links(self.work / "distinct", self.work / "train", s.steps * max(batches) * ranks)
        make_pairs(self.work / "pairs", s.pairs, s.test_size, seed=1)
        fill_with_links(self.work / "pairs", self.work / "pairs_1", 1)
        photo = make_photo(self.work / "photo.jpg", s.photo_size)
        self.write()

        # The most telling checks first, so that a slow device skips (--deadline) the least telling ones.
        fs = "FS (paper)"
        fs_sampler = load_config(FS_CONFIG, s.fs_overrides).sampler  # the paper's DDPM-100 (--tiny: DDPM-10)
        fs_setting = f"{fs_sampler.sampler.upper()}-{fs_sampler.steps}"
        row = self.train(fs, FS_CONFIG, s.fs_overrides, "fs_fp32", "32-true")
        self.fs_checkpoint = None if row["error"] else row["_checkpoint"]
        fs_rows = {"fp32": self.inference("FS", self.fs_checkpoint, f"{fs_setting}, fp32")}
        bundled_row = self.inference("bundled", BUNDLED_CHECKPOINT, "its defaults, fp32")
        bundled_outputs = None if bundled_row["error"] else bundled_row["_outputs"]
        self.agreement("bundled", BUNDLED_CHECKPOINT, "its defaults, fp32", bundled_outputs, self.work / "pairs")
        self.agreement("FS", self.fs_checkpoint, "DDIM-4, fp32", None, self.work / "pairs_1",
                       ["--sampler", "ddim", "--steps", "4"])
        self.unpaired(photo)
        row = self.train(fs, FS_CONFIG, s.fs_overrides, "fs_bf16", "bf16-mixed")
        if self.fs_checkpoint is None and not row["error"]:
            self.fs_checkpoint = row["_checkpoint"]
        fs_rows["bf16"] = self.inference("FS", self.fs_checkpoint, f"{fs_setting}, bf16", "bf16")
        self.data(fs, FS_CONFIG, s.fs_overrides)
        self.train("bundled", BUNDLED_CONFIG, s.bundled_overrides, "bundled_own", None)  # its own: bf16-mixed
        self.train("bundled", BUNDLED_CONFIG, s.bundled_overrides, "bundled_fp32", "32-true")
        self.data("bundled", BUNDLED_CONFIG, s.bundled_overrides)
        self.ddp(fs, FS_CONFIG, s.fs_overrides, "bf16-mixed")
        self.report["projection"] = projection(self.report["rows"], fs_rows, s.fs_overrides)
        self.report["complete"] = True
        self.write()


def wait_for(process: subprocess.Popen, timeout: float) -> tuple[int, Any]:
    """(exit code, resource usage) of ``process``. After ``timeout`` seconds, or when this process is interrupted, it
    is killed with its process group (a DDP run's other ranks), which it leads."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return process.returncode, usage
            if time.monotonic() > deadline:
                raise RuntimeError(f"killed after {timeout:.0f} s")
            time.sleep(0.2)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def projection(rows: list[dict], fs_inference: dict[str, dict], fs_overrides: Sequence[str]) -> dict[str, Any]:
    """Hours to train the paper's schedule on this device in each precision measured: its epochs of
    ceil(PAPER_TRAIN_PAIRS / batch) steps at the measured steps/s, plus validating PAPER_VAL_IMAGES images with the
    val sampler (DDPM-100) at test.py's measured s/image."""
    config = load_config(FS_CONFIG, fs_overrides)
    epochs, batch = config.trainer.max_epochs, config.data.train_batch_size
    steps_per_epoch = math.ceil(PAPER_TRAIN_PAIRS / batch)  # the DataLoader keeps the last, smaller batch
    validations = epochs // (config.trainer.check_val_every_n_epoch or 1)
    result: dict[str, Any] = {"epochs": epochs, "train_pairs": PAPER_TRAIN_PAIRS, "batch": batch,
                              "steps_per_epoch": steps_per_epoch, "validations": validations,
                              "val_images": PAPER_VAL_IMAGES,
                              "val_sampler": f"{config.val_sampler.sampler.upper()}-{config.val_sampler.steps}",
                              "hours": {}}
    val_fp32 = fs_inference["fp32"].get("s_per_image")
    for row in rows:
        if row["section"] != "train" or row["error"] or row.get("config") != str(FS_CONFIG.relative_to(ROOT)):
            continue
        val = fs_inference["bf16" if row["precision"].startswith("bf16") else "fp32"].get("s_per_image") or val_fp32
        train_h = epochs * steps_per_epoch / row["steps_per_s"] / 3600
        val_h = None if val is None else validations * PAPER_VAL_IMAGES * val / 3600
        result["hours"][row["precision"]] = {"train": round(train_h, 2),
                                             "validation": None if val_h is None else round(val_h, 2),
                                             "total": round(train_h + (val_h or 0.0), 2)}
    return result


# ------------------------------------------------------------------------------------------------ report
def environment(device: torch.device) -> dict[str, Any]:
    import pytorch_lightning

    cuda = device.type == "cuda"
    return {"device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "pytorch_lightning": pytorch_lightning.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None}


def figure(row: dict[str, Any]) -> str:
    """A row's figures in words."""
    if row["error"]:
        return row["error"] if row["error"].startswith("skipped") else f"FAILED: {row['error']}"
    section = row["section"]
    if section == "data":
        return f"{row['batches_per_s']:.2f} batches/s, {row['images_per_s']:.1f} images/s"
    if section in ("train", "ddp"):
        return f"{row['steps_per_s']:.2f} steps/s, {row['images_per_s']:.1f} images/s"
    if section == "agreement":
        psnr = "identical" if row["psnr_db_min"] is None else f"PSNR >= {row['psnr_db_min']:.1f} dB"
        verdict = "agree" if row["agree"] else f"DISAGREE (<= {AGREEMENT_DB:.0f} dB)"
        return f"{psnr}, max diff {row['max_abs_diff_uint8']}/255 over {row['images']} image(s): {verdict}"
    if section == "test_unpaired.py":
        tiling = f"tiles {row['tile']} px, overlap {row['tile_overlap']}" if row["tile"] else "one piece"
        return f"{row['s_per_image']:.2f} s/image ({row['s_per_megapixel']:.3f} s/Mpix), {tiling}"
    return f"{row['s_per_image']:.3f} s/image ({row['images']} images)"


def table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"gpu_check ({report['mode']}): {env['device_name']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"Lightning {env['pytorch_lightning']}; peak memory: {report['memory']}"]
    header = ("check", "what", "setting", "figure", "peak GiB")
    ordered = sorted(report["rows"], key=lambda r: SECTIONS.index(r["section"]))  # stable: run order within one
    rows = [(r["section"], r["name"], r["setting"], figure(r),
             "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.2f}") for r in ordered]
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for cells in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    projected = report.get("projection")
    if projected:
        parts = [f"{precision}: {h['total']:.1f} h (train {h['train']:.1f}"
                 + ("" if h["validation"] is None else f" + validation {h['validation']:.1f}") + ")"
                 for precision, h in projected["hours"].items()]
        lines.append(f"projection, the paper's schedule ({projected['epochs']} epochs x {projected['steps_per_epoch']} "
                     f"steps of batch {projected['batch']}, {projected['val_images']} validation images with "
                     f"{projected['val_sampler']} after each): " + ("; ".join(parts) or "no FS training figure"))
    stand_ins = [net for net, used in report["lpips"].items() if used.startswith("random")]
    if stand_ins:
        lines.append(f"LPIPS backbones as random stand-ins (speed only): {', '.join(stand_ins)}")
    if report["mode"] == "tiny":
        lines.append("tiny sizes: a rehearsal of the checks, not figures of this machine")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One unattended check of the CUDA path: training throughput (FS paper config and the bundled "
                    "model's, fp32 and bf16-mixed), DDP, test.py and test_unpaired.py speed and memory, GPU/CPU "
                    "agreement and the paper's training time projected; one table, one JSON.")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes and a few steps: rehearses every check in about a minute on a CPU")
    parser.add_argument("--out", default="results/gpu_check.json", help="the JSON report (default %(default)s)")
    parser.add_argument("--log", help="the runs' output (default: --out with .log)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and --log")
    parser.add_argument("--lpips-dir", type=Path,
                        help="folder of converted LPIPS backbones (default: $ANLIGHTENDIFF_LPIPS_DIR or "
                             "~/.cache/anlightendiff/lpips); a missing one is replaced by a random stand-in")
    parser.add_argument("--steps", type=int, help="training steps per run (default 250; --tiny 6)")
    parser.add_argument("--warmup", type=int, help="training steps left out of the timing (default 50; --tiny 2)")
    parser.add_argument("--pairs", type=int, help="test pairs, at least 2 (default 4; --tiny 2)")
    parser.add_argument("--num-workers", type=int,
                        help="DataLoader workers of the training runs (default: the CPUs less two, at most 14; "
                             "--tiny 0)")
    parser.add_argument("--deadline", type=float,
                        help="seconds after which the remaining checks are skipped (default 330; --tiny none)")
    parser.add_argument("--device-command", action="store_true",
                        help="print the command for the device machine and the folders it carries, and exit")
    args = parser.parse_args(argv)
    if args.deadline is None:
        args.deadline = None if args.tiny else 330.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device_command:
        print(f"carry: {' '.join(DEVICE_CARRY)}\n{DEVICE_COMMAND}")
        return 0
    device = resolve_device(args.device)
    sizes = Sizes(args.tiny, args.steps, args.warmup, args.pairs, args.num_workers)
    if sizes.pairs < 2:
        raise UserError(f"--pairs must be at least 2 (s/image is timed over the pairs after the first), got "
                        f"{sizes.pairs}")
    args.out = Path(args.out).absolute()
    args.log = Path(args.log or args.out.with_suffix(".log")).absolute()
    for path in (args.out, args.log):
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} exists; pass --overwrite or choose another --out/--log")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny networks gain nothing from intra-op threads, which stall on a busy CPU
    saved_lpips_dir = os.environ.get(ENV_VAR)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            check = Check(args, device, sizes, Path(work))
            check.all()
    finally:
        if saved_lpips_dir is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved_lpips_dir
    print()
    print(table(check.report))
    print(f"report: {args.out}; the runs' output: {args.log}")
    failed = [r for r in check.report["rows"] if r["error"] or r.get("agree") is False]
    if failed:
        names = "; ".join(f"{r['section']} {r['name']}" for r in failed)
        print(f"{len(failed)} check(s) failed, disagreed or were skipped: {names}")
    return 1 if failed else 0


USER_ERRORS = (ConfigError, OutputExistsError)
"""The project's own errors for what the user can fix (with UserError): one line, exit 2."""

if __name__ == "__main__":
    sys.exit(run_cli(main, USER_ERRORS))
