"""Reliability: bad input is refused clearly, nothing is lost, training survives interruption.

The scripts run the way a user runs them: in-process through ``run_cli`` (exactly what their ``__main__`` does)
or, where exit codes, signals and the absence of tracebacks are the point, as real subprocesses. Every case checks
the exit code, the message, and that each file that existed before (inputs, earlier results, an earlier run's
folder and checkpoint) is byte-identical afterwards.

What an interrupted training run guarantees (see utils.training.ResumableRandomness): resuming at an epoch
boundary reproduces the uninterrupted run exactly (losses, learning rates, weights, optimizer state) with
``data.num_workers=0``; resuming mid-epoch restores weights, optimizer state, step count and LR schedule exactly,
but Lightning restarts a non-resumable DataLoader, so the rest of that epoch re-reads the epoch's shuffled order
from its start and the losses of those steps differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

import models.losses
import test as test_script
import test_unpaired
import train
from models import AnlightenDiff, CheckpointError, load_checkpoint
from models.checkpoint import read_checkpoint
from tests.conftest import default_signals
from utils.cli import run_cli
from utils.config import config_from_dict, load_config
from utils.training import AtomicCheckpointIO, GracefulStop, SaveRunConfig, build_callbacks, build_trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = ROOT / "cfg" / "train" / "tiny.yaml"
TEST_CFG = ROOT / "cfg" / "test" / "LOL.yaml"
TINY_MODEL = {"model": {"unet_dim": 8, "dim_mults": [1, 2, 2]},
              "diffusion": {"timesteps": 10, "pad_multiple": 8},
              "sampler": {"sampler": "ddim", "steps": 2}, "val_sampler": {"sampler": "ddim", "steps": 2}}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SCRIPTS = {"train.py": train, "test.py": test_script, "test_unpaired.py": test_unpaired}


# ----------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, str], root: Path, nothing_new: bool = False) -> None:
    """Every file of ``before`` is still there, byte for byte; no temporary file is left behind."""
    after = snapshot(root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"changed or deleted: {changed}"
    assert not [k for k in after if k.endswith(".tmp")], "a temporary file was left behind"
    if nothing_new:
        assert sorted(set(after) - set(before)) == [], "a refused run wrote files"


def assert_one_error(err: str, pattern: str) -> None:
    """Exactly one ``error: ...`` line on stderr, matching ``pattern``, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


def noise(size: tuple[int, int], seed: int = 0, scale: float = 255) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * scale).astype(np.uint8)


def make_pairs(root: Path, n: int = 3, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        high = noise(size, seed + i)
        Image.fromarray(high).save(root / "high" / f"{i}.png")
        Image.fromarray((high * 0.2).astype(np.uint8)).save(root / "low" / f"{i}.png")
    return root


def save_tiny_checkpoint(path: Path, model: dict[str, Any] | None = None, claimed: dict[str, Any] | None = None,
                         seed: int = 0) -> Path:
    """Weights of a tiny model; ``claimed``: another config written into the checkpoint (a mismatch)."""
    torch.manual_seed(seed)
    module = AnlightenDiff(config_from_dict(model or TINY_MODEL))
    config = config_from_dict(claimed).to_dict() if claimed else module.config.to_dict()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}}, path)
    return path


def truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass
class World:
    """A tmp tree: paired data, unpaired inputs, a tiny checkpoint, an earlier run and earlier results."""

    root: Path
    pairs: Path
    inputs: Path
    ckpt: Path
    runs: Path
    results: Path


@pytest.fixture
def world(tmp_path: Path) -> World:
    pairs = make_pairs(tmp_path / "pairs")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(noise((24, 32), 10 + i, 60)).save(inputs / name)
    earlier_run = tmp_path / "runs" / "tiny" / "version_0"
    (earlier_run / "checkpoints").mkdir(parents=True)
    write(earlier_run / "config.yaml", "seed: 1\n")
    (earlier_run / "checkpoints" / "last.ckpt").write_bytes(os.urandom(256))
    results = tmp_path / "results"
    results.mkdir()
    Image.fromarray(noise((8, 8), 3)).save(results / "0.png")
    write(results / "metrics.json", '{"psnr": 1.0}\n')
    return World(tmp_path, pairs, inputs, save_tiny_checkpoint(tmp_path / "tiny.ckpt"), tmp_path / "runs", results)


BAD_DATA: dict[str, Callable[[Path], None]] = {
    "missing": lambda root: shutil.rmtree(root),
    "empty": lambda root: [f.unlink() for sub in ("low", "high") for f in (root / sub).iterdir()],
    "unmatched": lambda root: (root / "high" / "1.png").rename(root / "high" / "7.png"),
    "corrupt": lambda root: (root / "low" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
    "truncated": lambda root: truncated_copy(root / "low" / "1.png", root / "low" / "1.png"),
    "zero_bytes": lambda root: (root / "low" / "1.png").write_bytes(b""),
    "text_named_png": lambda root: write(root / "low" / "1.png", "notes, not pixels\n"),
    "smaller_than_crop": lambda root: [Image.fromarray(noise((20, 20))).save(root / sub / f"{i}.png")
                                       for sub in ("low", "high") for i in range(3)],
}
BAD_DATA_MESSAGES = {
    "missing": r"folder dataset not found: missing folder\(s\) .*bad/low",
    "empty": r"no images \(.*\) in folder .*bad/low",
    "unmatched": r"2 file\(s\) without a counterpart .*bad/high/7\.png, .*bad/low/1\.png",
    "corrupt": r"cannot read image '.*bad/low/1\.png': ",
    "truncated": r"cannot read image '.*bad/low/1\.png': corrupt or truncated image data",
    "zero_bytes": r"cannot read image '.*bad/low/1\.png': the file is empty \(0 bytes\)",
    "text_named_png": r"cannot read image '.*bad/low/1\.png': not a recognised image format",
    "smaller_than_crop": r"image '.*bad/low/\d\.png' is 20x20 \(width x height\), smaller than the 32x32 training crop",
}


def bad_data(world: World, kind: str) -> Path:
    root = make_pairs(world.root / "bad")
    BAD_DATA[kind](root)
    return root


def fake_training_checkpoint(world: World, **model: Any) -> Path:
    """Looks like a Lightning training checkpoint of another architecture."""
    claimed = {**TINY_MODEL, "model": {**TINY_MODEL["model"], **model}}
    path = world.root / "other_arch.ckpt"
    torch.save({"state_dict": {}, "optimizer_states": [{}], "loops": {}, "global_step": 5,
                "hyper_parameters": {"config": load_config(TINY_CFG, [f"model.{k}={v}" for k, v in
                                                                      claimed["model"].items()]).to_dict()}}, path)
    return path


def read_only_dir(world: World) -> Path:
    if IS_ROOT:
        pytest.skip("runs as root, which writes into read-only folders anyway (other cases cover unwritable paths)")
    folder = world.root / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def a_file(world: World) -> Path:
    return write(world.root / "a_file", "not a folder\n")


def run_in_process(module: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_cli(module.main, module.USER_ERRORS, argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------- bad input
def train_argv(w: World, *extra: str, data: Path | None = None, cfg: Path = TINY_CFG) -> list[str]:
    return ["--cfg", str(cfg), f"trainer.output_dir={w.runs}", "trainer.max_steps=1", "--no-test",
            f"data.extra_train_folders=[{data or w.pairs}]", *extra]


def evaluate_argv(w: World, *extra: str, folder: Path | None = None, ckpt: Path | None = None,
              output: Path | None = None, cfg: Path = TEST_CFG, sampler: tuple[str, ...] = ("ddim", "2")) -> list[str]:
    return ["--cfg", str(cfg), "--ckpt", str(ckpt or w.ckpt), "--test-folder", str(folder or w.pairs),
            "--output", str(output or w.root / "new_results"), "--device", "cpu", "--sampler", sampler[0],
            "--steps", sampler[1], *extra]


def unpaired_argv(w: World, *extra: str, inputs: Path | None = None, ckpt: Path | None = None,
                  output: Path | None = None, sampler: tuple[str, ...] = ("ddim", "2")) -> list[str]:
    return ["--input", str(inputs or w.inputs), "--output", str(output or w.root / "enhanced"),
            "--ckpt", str(ckpt or w.ckpt), "--device", "cpu", "--sampler", sampler[0], "--steps", sampler[1], *extra]


def huge_input(w: World) -> Path:
    folder = w.root / "huge"
    folder.mkdir()
    Image.new("RGB", (2100, 2000), (9, 9, 9)).save(folder / "big.png")
    return folder


def train_on(kind: str) -> Callable[[World], list[str]]:
    """Training on bad data, all three pairs in one batch: the first step reads every file."""
    return lambda w: train_argv(w, "data.train_batch_size=3", data=bad_data(w, kind))


def evaluate_on(kind: str) -> Callable[[World], list[str]]:
    return lambda w: evaluate_argv(w, folder=bad_data(w, kind))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
MISSPELT_YAML = "model: {unet_dim: 8, dim_mults: [1, 2, 2]}\noptim: {lrr: 1.0e-3}\n"
MISTYPED_YAML = "model: {unet_dim: eight}\n"

# (id, script, argv from the world, message pattern, nothing new may be written)
CASES: list[Any] = [
    *[pytest.param("train.py", train_on(kind), BAD_DATA_MESSAGES[kind], kind in ("missing", "empty", "unmatched"),
                   id=f"train-{kind}") for kind in BAD_DATA],
    pytest.param("train.py", lambda w: train_argv(w, "data.num_workers=1", "data.train_batch_size=3",
                                                  data=bad_data(w, "corrupt")),
                 BAD_DATA_MESSAGES["corrupt"], False, id="train-corrupt_in_a_dataloader_worker"),
    pytest.param("train.py", lambda w: train_argv(w, cfg=write(w.root / "misspelt.yaml", MISSPELT_YAML)),
                 r"misspelt\.yaml: unknown config key 'optim\.lrr' \(did you mean 'lr'\?\)", True,
                 id="train-misspelt_key"),
    pytest.param("train.py", lambda w: train_argv(w, cfg=write(w.root / "mistyped.yaml", MISTYPED_YAML)),
                 r"mistyped\.yaml: model\.unet_dim: expected int, got 'eight' \(str\)", True, id="train-mistyped_key"),
    pytest.param("train.py", lambda w: train_argv(w, "--resume", str(fake_training_checkpoint(w, unet_dim=16))),
                 r"--resume .*other_arch\.ckpt: the config does not match the checkpoint's \(model\.unet_dim: "
                 r"checkpoint 16, config 8\)", True, id="train-resume_architecture_mismatch"),
    pytest.param("train.py", lambda w: train_argv(w, "--resume", str(truncated_copy(w.ckpt, w.root / "half.ckpt"))),
                 r"half\.ckpt: not a readable PyTorch checkpoint \(truncated or another format\)", True,
                 id="train-resume_truncated_checkpoint"),
    pytest.param("train.py", lambda w: train_argv(w, "--resume", str(write(w.root / "notes.ckpt", "hello\n"))),
                 r"notes\.ckpt: not a readable PyTorch checkpoint", True, id="train-resume_not_a_checkpoint"),
    pytest.param("train.py", lambda w: train_argv(w, "--resume", str(w.ckpt)),
                 r"tiny\.ckpt: not a training checkpoint \(no optimizer or loop state\)", True,
                 id="train-resume_weights_only_checkpoint"),
    pytest.param("train.py", lambda w: train_argv(w, "--resume", str(w.root / "pairs")),
                 r"--resume .*pairs: no checkpoint at .*pairs/checkpoints/last\.ckpt", True,
                 id="train-resume_folder_without_checkpoint"),
    pytest.param("train.py", lambda w: train_argv(w, "trainer.accelerator=cuda"),
                 r"trainer settings: .*CUDAAccelerator.* not available", True, id="train-cuda_without_cuda",
                 marks=NO_CUDA),
    pytest.param("train.py", lambda w: train_argv(w, f"trainer.output_dir={a_file(w) / 'runs'}"),
                 r"trainer\.output_dir .*a_file/runs/tiny: cannot write there \(Not a directory", True,
                 id="train-output_under_a_file"),
    pytest.param("train.py", lambda w: train_argv(w, f"trainer.output_dir={read_only_dir(w)}"),
                 r"trainer\.output_dir .*read_only/tiny: cannot write there \(Permission denied", True,
                 id="train-read_only_output"),
    pytest.param("train.py", lambda w: train_argv(w, "trainer.monitor=val/psnrr", f"data.val_folder={w.pairs}"),
                 r"trainer\.monitor: 'val/psnrr' is never logged; training logs train/loss, val/psnr, ", True,
                 id="train-monitor_never_logged"),
    pytest.param("train.py", lambda w: train_argv(w, "trainer.monitor=val/psnrr"),
                 r"trainer\.monitor: 'val/psnrr' is never logged", True, id="train-monitor_never_logged_no_validation"),
    pytest.param("train.py", lambda w: train_argv(w, "trainer.monitor=val/lpipss", "optim.scheduler=plateau"),
                 r"trainer\.monitor: 'val/lpipss' is never logged", True, id="train-plateau_on_a_typo"),
    pytest.param("train.py", lambda w: train_argv(w, "optim.scheduler=plateau"),
                 r"trainer\.monitor: 'val/psnr', which optim\.scheduler: plateau follow\(s\), is never logged by this "
                 r"configuration \(no validation: data\.val_folder is null\)", True,
                 id="train-plateau_on_a_val_metric_without_validation"),
    pytest.param("train.py", lambda w: train_argv(w, "val_sampler.eta=-3"),
                 r"val_sampler\.eta must be a number >= 0", True, id="train-bad_val_sampler"),
    *[pytest.param("test.py", evaluate_on(kind), BAD_DATA_MESSAGES[kind], True, id=f"test-{kind}")
      for kind in BAD_DATA if kind != "smaller_than_crop"],
    pytest.param("test.py", lambda w: evaluate_argv(w, ckpt=truncated_copy(w.ckpt, w.root / "half.ckpt")),
                 r"half\.ckpt: not a readable PyTorch checkpoint", True, id="test-truncated_checkpoint"),
    pytest.param("test.py", lambda w: evaluate_argv(w, ckpt=write(w.root / "notes.ckpt", "hello\n")),
                 r"notes\.ckpt: not a readable PyTorch checkpoint", True, id="test-not_a_checkpoint"),
    pytest.param("test.py", lambda w: evaluate_argv(w, ckpt=save_tiny_checkpoint(
                     w.root / "liar.ckpt", claimed={**TINY_MODEL, "model": {"unet_dim": 16, "dim_mults": [1, 2, 2]}})),
                 r"liar\.ckpt: does not fit the model built from its config", True,
                 id="test-checkpoint_architecture_mismatch"),
    pytest.param("test.py", lambda w: evaluate_argv(w, "--device", "cuda"), r"--device cuda: CUDA is not available",
                 True, id="test-cuda_without_cuda", marks=NO_CUDA),
    pytest.param("test.py", lambda w: evaluate_argv(w, "--precision", "fp16"),
                 r"--precision fp16 needs a CUDA device, not cpu", True, id="test-fp16_on_cpu"),
    pytest.param("test.py", lambda w: evaluate_argv(w, output=a_file(w)),
                 r"--output .*a_file exists and is not a folder", True, id="test-output_is_a_file"),
    pytest.param("test.py", lambda w: evaluate_argv(w, output=a_file(w) / "results"),
                 r"--output .*a_file/results: cannot write there \(Not a directory", True,
                 id="test-output_under_a_file"),
    pytest.param("test.py", lambda w: evaluate_argv(w, output=read_only_dir(w) / "results"),
                 r"--output .*read_only/results: cannot write there \(Permission denied", True,
                 id="test-read_only_output"),
    pytest.param("test.py", lambda w: evaluate_argv(w, output=w.results),
                 r"results already holds results; pass --overwrite", True, id="test-earlier_results"),
    pytest.param("test.py", lambda w: evaluate_argv(w, output=(w.results / "metrics.json").unlink() or w.results),
                 r"1 output file\(s\) already exist \(e\.g\. .*results/0\.png\); pass --overwrite", True,
                 id="test-earlier_partial_results"),
    pytest.param("test.py", lambda w: evaluate_argv(w, cfg=write(w.root / "misspelt.yaml", "sampler: {stpes: 3}\n")),
                 r"unknown config key 'sampler\.stpes' \(did you mean 'steps'\?\)", True, id="test-misspelt_key"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, inputs=w.root / "nowhere"),
                 r"no such file or folder: '.*nowhere'", True, id="unpaired-missing_input"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, inputs=(w.root / "empty").mkdir() or w.root / "empty"),
                 r"no images found in .*empty", True, id="unpaired-empty_folder"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, inputs=write(w.root / "notes.txt", "hi\n")),
                 r"'.*notes\.txt' is not an image file", True, id="unpaired-not_an_image_extension"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, "--max-pixels", "4000000", inputs=huge_input(w)),
                 r"1 image\(s\) larger than --max-pixels 4,000,000, the limit given .*huge/big\.png \(2100x2000 = "
                 r"4,200,000 pixels\)\); raise --max-pixels or leave it out: large images are tiled", True,
                 id="unpaired-huge_image_above_a_given_cap"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, "--max-pixels", "700"),
                 r"2 image\(s\) larger than --max-pixels 700, .*a\.png \(32x24 = 768 pixels\)", True,
                 id="unpaired-above_max_pixels"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, "--tile", "large"),
                 r"--tile must be auto, off or a tile size in pixels, got 'large'", True, id="unpaired-bad_tile"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, "--brightness", "2"),
                 r"--brightness must be auto or a number in \[0\.05, 0\.95\] .*got '2'", True,
                 id="unpaired-brightness_out_of_range"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, ckpt=truncated_copy(w.ckpt, w.root / "half.ckpt")),
                 r"half\.ckpt: not a readable PyTorch checkpoint", True, id="unpaired-truncated_checkpoint"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, ckpt=save_tiny_checkpoint(
                     w.root / "liar.ckpt", claimed={**TINY_MODEL, "diffusion": {"timesteps": 20, "pad_multiple": 8}})),
                 r"liar\.ckpt: does not fit the model built from its config", True,
                 id="unpaired-checkpoint_architecture_mismatch"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, "--device", "cuda"),
                 r"--device cuda: CUDA is not available", True, id="unpaired-cuda_without_cuda", marks=NO_CUDA),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, "--precision", "fp16"),
                 r"--precision fp16 needs a CUDA device, not cpu", True, id="unpaired-fp16_on_cpu"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, output=a_file(w)),
                 r"--output .*a_file exists and is not a folder", True, id="unpaired-output_is_a_file"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, output=a_file(w) / "out"),
                 r"--output .*a_file/out: cannot write there \(Not a directory", True,
                 id="unpaired-output_under_a_file"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, output=read_only_dir(w) / "out"),
                 r"--output .*read_only/out: cannot write there \(Permission denied", True,
                 id="unpaired-read_only_output"),
    pytest.param("test_unpaired.py", lambda w: unpaired_argv(w, output=shutil.copytree(w.inputs, w.root / "done")),
                 r"2 output file\(s\) already exist .*pass --overwrite", True, id="unpaired-earlier_outputs"),
]


@pytest.mark.parametrize("script, make_argv, message, nothing_new", CASES)
def test_bad_input_is_refused_clearly_and_nothing_is_lost(world, capsys, script, make_argv, message, nothing_new):
    argv = make_argv(world)
    before = snapshot(world.root)
    try:
        code, _, err = run_in_process(SCRIPTS[script], argv, capsys)
    finally:
        for folder in world.root.glob("read_only"):
            folder.chmod(0o755)
    assert code == 2, err[-3000:]
    assert_one_error(err, message)
    assert_kept(before, world.root, nothing_new=nothing_new)


def test_load_checkpoint_refuses_what_it_cannot_load(world):
    cases = {
        "missing.ckpt": (None, r"checkpoint not found"),
        "empty.ckpt": (b"", r"not a readable PyTorch checkpoint"),
        "half.ckpt": (world.ckpt.read_bytes()[:1000], r"not a readable PyTorch checkpoint"),
        "notes.ckpt": (b"some text\n", r"not a readable PyTorch checkpoint"),
    }
    for name, (data, message) in cases.items():
        if data is not None:
            (world.root / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(world.root / name)
    torch.save({"state_dict": {}, "extra": argparse.Namespace(lr=1.0)}, world.root / "code.ckpt")
    with pytest.raises(CheckpointError, match="refused, it needs arbitrary unpickling"):
        load_checkpoint(world.root / "code.ckpt")
    torch.save({"weights": {}}, world.root / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint \\(no 'state_dict' mapping\\)"):
        load_checkpoint(world.root / "plain.ckpt")
    wider = config_from_dict({**TINY_MODEL, "model": {"unet_dim": 16, "dim_mults": [1, 2, 2]}})
    with pytest.raises(CheckpointError, match=r"does not fit the model(.|\n)*wrong shape \(\d+\): "):
        load_checkpoint(world.ckpt, config=wider)
    checkpoint = torch.load(world.ckpt, weights_only=True)
    del checkpoint["state_dict"]["model.unet.final_conv.1.bias"]
    torch.save(checkpoint, world.root / "incomplete.ckpt")
    with pytest.raises(CheckpointError, match=r"missing \(1\): model\.unet\.final_conv\.1\.bias"):
        load_checkpoint(world.root / "incomplete.ckpt")


def test_unreadable_inputs_are_skipped_the_rest_enhanced(world, capsys):
    inputs = world.inputs
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    truncated_copy(inputs / "a.png", inputs / "truncated.png")
    (inputs / "zero_bytes.png").write_bytes(b"")
    write(inputs / "text_named_png.png", "notes\n")
    out = world.root / "enhanced"
    before = snapshot(world.root)
    code, stdout, err = run_in_process(test_unpaired, unpaired_argv(world, output=out), capsys)
    assert code == 1
    skipped = sorted(re.findall(r"skipped: cannot read image '.*/(\w+)\.png'", stdout + err))
    assert skipped == ["corrupt", "text_named_png", "truncated", "zero_bytes"]
    assert "wrote 2 image(s)" in stdout and "4 unreadable file(s) skipped" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert "Traceback" not in err
    assert_kept(before, world.root)


def test_every_image_kind_is_enhanced(world, capsys):
    """Greyscale, grey + alpha, 1-bit, RGBA, 16-bit grey, CMYK, palette with and without transparency."""
    folder = world.root / "kinds"
    folder.mkdir()
    rgb = noise((18, 22), 5, 80)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(rgb[..., 0]).convert("1").save(folder / "bilevel.png")
    Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1] * 3])).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette_transparent.png", transparency=0)
    out = world.root / "enhanced"
    before = snapshot(world.root)
    code, stdout, err = run_in_process(test_unpaired, unpaired_argv(world, inputs=folder, output=out), capsys)
    assert code == 0, err[-3000:]
    modes = {p.stem: (Image.open(p).mode, Image.open(p).size) for p in out.iterdir()}
    with_alpha = {"grey_alpha", "rgba", "palette_transparent"}
    assert modes == {stem: ("RGBA" if stem in with_alpha else "RGB", (22, 18)) for stem in
                     ("grey", "bilevel", "grey_alpha", "rgba", "deep16", "cmyk", "palette", "palette_transparent")}
    assert_kept(before, world.root)


@pytest.mark.parametrize("sampler", [("ddpm", "4"), ("ddim", "2"), ("ddim", "2", "--eta", "0.7")],
                         ids=["ddpm", "ddim_eta0", "ddim_eta0.7"])
def test_same_seed_checkpoint_and_input_give_the_same_bytes(world, capsys, sampler):
    four_steps = {**TINY_MODEL, "diffusion": {"timesteps": 4, "pad_multiple": 8}}
    ckpt = save_tiny_checkpoint(world.root / "t4.ckpt", four_steps)

    def enhance(name: str, seed: str) -> dict[str, bytes]:
        out = world.root / name
        argv = [*unpaired_argv(world, inputs=world.inputs / "a.png", ckpt=ckpt, output=out, sampler=sampler[:2]),
                *sampler[2:], "--seed", seed]
        assert run_in_process(test_unpaired, argv, capsys)[0] == 0
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = enhance("first", "5")
    assert list(first) == ["a.png"] and first == enhance("second", "5")
    stochastic = sampler[0] == "ddpm" or "--eta" in sampler
    assert (enhance("other_seed", "6") != first) == stochastic  # the seed is what fixes the noise


def test_test_py_records_config_checkpoint_versions_and_machine(world, capsys):
    out = world.root / "new_results"
    before = snapshot(world.root)
    code, _, err = run_in_process(test_script, evaluate_argv(world, output=out), capsys)
    assert code == 0, err[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["checkpoint"] == {"path": str(world.ckpt),
                                    "sha256": hashlib.sha256(world.ckpt.read_bytes()).hexdigest()}
    assert report["config"]["data"]["test_folder"] == str(world.pairs)
    assert report["config"]["sampler"]["sampler"] == "ddpm"  # the config's, as loaded; the run's sampler below
    assert report["sampler"] == {"sampler": "ddim", "steps": 2, "eta": 0.0, "seed": 0, "detail": "model"}
    assert report["model_config"]["model"]["unet_dim"] == 8
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["pytorch_lightning"] == pytorch_lightning.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["numpy"] == np.__version__
    assert env["machine"] and "processor" in env and "cuda" in env
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "metrics.csv", "metrics.json"]
    assert_kept(before, world.root)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_a_failing_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()

    def disk_full(obj: Any, target: Path) -> None:
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match=r"non-finite weights \(w\) at step 3: .*last\.ckpt not written"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 3}, path)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_the_trainer_saves_through_the_atomic_plugin(world):
    config = load_config(TINY_CFG, [f"data.extra_train_folders=[{world.pairs}]"])
    logger = TensorBoardLogger(save_dir=str(world.root / "tb"), name="x", version=0)
    trainer = build_trainer(config, logger, build_callbacks(config, world.root / "ck", has_validation=False))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, GracefulStop) for c in trainer.callbacks)


def test_resumed_runs_add_config_files_and_never_replace_one(tmp_path):
    config = config_from_dict(TINY_MODEL)
    fake_trainer = type("T", (), {"is_global_zero": True})()
    names = []
    for resumed in (False, True, True):
        saver = SaveRunConfig(config, tmp_path, resumed)
        saver.setup(fake_trainer, None, "fit")
        names.append(saver.path.name)
        saver.setup(fake_trainer, None, "fit")  # idempotent within a run
    assert names == ["config.yaml", "config_resumed.yaml", "config_resumed_2.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert load_config(tmp_path / "config.yaml").to_dict() == config.to_dict()
    other_rank = type("T", (), {"is_global_zero": False})()
    SaveRunConfig(config, tmp_path / "rank1", False).setup(other_rank, None, "fit")
    assert not (tmp_path / "rank1").exists()


# ----------------------------------------------------------------------------------------------- interrupted training
RUN = ["trainer.max_epochs=3", "trainer.max_steps=-1", "trainer.checkpoint_every_n_steps=1",
       "trainer.log_every_n_steps=1", "trainer.deterministic=true", "optim.scheduler=cosine", "--no-test"]
"""4 pairs, batch 2: 2 steps per epoch, 6 steps; the cosine schedule makes every step's learning rate differ."""


class SignalAt(Callback):
    """Sends ``signum`` (``times`` times) to this very process when the batch after ``step`` optimizer steps
    starts, through the handler GracefulStop installed (checked first: a missing handler must fail the test, not
    kill pytest)."""

    def __init__(self, step: int, signum: int, times: int = 1):
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            handler = signal.getsignal(self.signum)
            assert isinstance(getattr(handler, "__self__", None), GracefulStop), handler
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class CheckpointHash(Callback):
    """Records the sha256 of last.ckpt when the batch after ``step`` optimizer steps starts."""

    def __init__(self, step: int):
        self.step, self.sha256 = step, None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()


def with_callbacks(monkeypatch: pytest.MonkeyPatch, *extra: Callback) -> None:
    """train.py builds its callbacks with utils.training.build_callbacks: add test-only ones."""
    original = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *a, **k: [*original(*a, **k), *extra])


def logged(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar over all TensorBoard event files of a run folder, sorted by step.

    Sorted here because the reader visits event files in name order, and a name ends in a per-process writer
    counter that sorts as text ("10" before "9"), so a resumed run's file can be read before the first one's.
    The sort is stable: a step logged twice stays twice.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return sorted(((e.step, e.value) for e in accumulator.Scalars(tag)), key=lambda pair: pair[0])


def final_state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_tensors(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Any]:
    """One uninterrupted 6-step run; what interrupted and resumed runs are compared to."""
    root = tmp_path_factory.mktemp("uninterrupted")
    pairs = make_pairs(root / "pairs", n=4)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        argv = ["--cfg", str(TINY_CFG), f"data.extra_train_folders=[{pairs}]", f"trainer.output_dir={root / 'runs'}"]
        assert train.main([*argv, *RUN]) == 0
    finally:
        torch.use_deterministic_algorithms(deterministic)
    run = root / "runs" / "tiny" / "version_0"
    return {"argv": argv, "run": run, "loss": logged(run, "train/loss"), "lr": logged(run, "lr-AdamW"),
            "state": final_state(run)}


@pytest.fixture
def restore_determinism():
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(uninterrupted, monkeypatch, capsys,
                                                                      restore_determinism):
    a = uninterrupted
    assert [s for s, _ in a["loss"]] == list(range(6)) and a["state"]["global_step"] == 6
    assert len({v for _, v in a["lr"]}) == 6
    earlier = snapshot(a["run"])
    with_callbacks(monkeypatch, SignalAt(step=1, signum=signal.SIGTERM))  # stops after step 2: the epoch's end
    code, _, err = run_in_process(train, [*a["argv"], *RUN], capsys)
    run = a["run"].parent / "version_1"  # a new run never reuses an earlier run's folder
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert re.search(rf"interrupted: SIGTERM received: stopped after step 2; saved {run}/checkpoints/last\.ckpt; "
                     rf"continue with --resume {run}", err)
    assert final_state(run)["global_step"] == 2
    config_before = snapshot(run)["config.yaml"]
    monkeypatch.undo()
    assert run_in_process(train, [*a["argv"], *RUN, "--resume", str(run)], capsys)[0] == 0
    assert logged(run, "train/loss") == a["loss"]
    assert logged(run, "lr-AdamW") == a["lr"]
    resumed = final_state(run)
    assert resumed["global_step"] == 6
    assert_same_tensors(resumed["state_dict"], a["state"]["state_dict"])
    assert_same_tensors(resumed["optimizer_states"], a["state"]["optimizer_states"])
    assert_same_tensors(resumed["lr_schedulers"], a["state"]["lr_schedulers"])
    assert snapshot(run)["config.yaml"] == config_before and (run / "config_resumed.yaml").is_file()
    assert_kept(earlier, a["run"])


@pytest.mark.slow
def test_resume_mid_epoch_restores_step_optimizer_and_schedule(uninterrupted, monkeypatch, capsys,
                                                               restore_determinism):
    a = uninterrupted
    root = a["run"].parent.parent.parent / "mid_epoch"
    # no periodic checkpoints: the one to resume from is the one saved on the signal
    argv = [*a["argv"][:-1], f"trainer.output_dir={root}", *RUN, "trainer.checkpoint_every_n_steps=0"]
    with_callbacks(monkeypatch, SignalAt(step=2, signum=signal.SIGINT))  # stops after step 3, mid-epoch 1
    code, _, err = run_in_process(train, argv, capsys)
    run = root / "tiny" / "version_0"
    assert code == 130, err[-3000:]
    assert f"interrupted: SIGINT received: stopped after step 3; saved {run}/checkpoints/last.ckpt" in err
    assert "Traceback" not in err
    assert final_state(run)["global_step"] == 3
    monkeypatch.undo()
    assert run_in_process(train, [*argv, "--resume", str(run)], capsys)[0] == 0
    loss = logged(run, "train/loss")
    assert [s for s, _ in loss] == list(range(6))  # every step once: none lost, none repeated
    assert loss[:3] == a["loss"][:3]
    assert logged(run, "lr-AdamW") == a["lr"]  # the schedule continued from the step it stopped at
    resumed = final_state(run)
    assert resumed["global_step"] == 6
    steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert steps == {6.0}  # AdamW's moments were restored, not restarted (that would give 3)
    # What differs: the rest of epoch 1 re-read the epoch's order from its start (Lightning restarts a DataLoader
    # that cannot resume mid-epoch), so the losses of steps 3.. and the final weights are not the uninterrupted ones.


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(world, monkeypatch, capsys,
                                                                     restore_determinism):
    recorder = CheckpointHash(step=2)
    with_callbacks(monkeypatch, recorder, SignalAt(step=2, signum=signal.SIGINT, times=2))
    before = snapshot(world.root)
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when the suite runs under nohup
    argv = train_argv(world, "trainer.max_steps=5", "trainer.max_epochs=5", "trainer.checkpoint_every_n_steps=1")
    code, _, err = run_in_process(train, argv, capsys)
    assert code == 130, err[-3000:]
    assert "interrupted: nothing was left half-written" in err and "Traceback" not in err
    last = world.runs / "tiny" / "version_1" / "checkpoints" / "last.ckpt"
    assert hashlib.sha256(last.read_bytes()).hexdigest() == recorder.sha256  # step 2's, not a half-done step 3
    assert signal.getsignal(signal.SIGINT) == handler  # restored
    assert_kept(before, world.root)


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(world, monkeypatch, capsys,
                                                                            restore_determinism):
    calls = []
    original = models.losses.DFPL.__call__

    def dfpl_then_nan(*args: Any) -> models.losses.LossTerms:
        calls.append(1)
        loss = original(*args)
        return models.losses.LossTerms.single("dfpl", loss.total * float("nan")) if len(calls) == 4 else loss

    monkeypatch.setattr(models.losses.DFPL, "__call__", dfpl_then_nan)
    recorder = CheckpointHash(step=3)
    with_callbacks(monkeypatch, recorder)
    data = make_pairs(world.root / "four", n=4)
    before = snapshot(world.root)
    code, _, err = run_in_process(train, train_argv(world, *RUN, "trainer.max_steps=10", data=data), capsys)
    assert code == 2
    run = world.runs / "tiny" / "version_1"
    assert_one_error(err, rf"non-finite training loss nan at step 3; training stopped, the last good checkpoint "
                          rf"{run}/checkpoints/last\.ckpt is kept")
    last = run / "checkpoints" / "last.ckpt"
    assert hashlib.sha256(last.read_bytes()).hexdigest() == recorder.sha256
    state = final_state(run)
    assert state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert_kept(before, world.root)


# ----------------------------------------------------------------------------------------------- real processes
def start(argv: list[str], logs: Path, own_group: bool = False) -> subprocess.Popen:
    """A script as a user starts it; its output goes to files (a full pipe would stall it). ``own_group``: in a
    new session, whose process group (the script and its DataLoader workers) can be signalled as a whole."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=(logs / "out.txt").open("w"),
                            stderr=(logs / "err.txt").open("w"), start_new_session=own_group,
                            preexec_fn=default_signals)


def finish(proc: subprocess.Popen, logs: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (logs / "err.txt").read_text()


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool], logs: Path, timeout: float = 300,
                   signal_group: int | None = None) -> None:
    """SIGINT (what Ctrl-C sends) once ``ready()``: the process has started working. ``signal_group``: send this
    signal to the process's whole group instead (started with ``own_group``)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"finished (exit {proc.returncode}) before it could be interrupted: "
                        f"{(logs / 'err.txt').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("never started working")
        time.sleep(0.02)
    if signal_group is None:
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal_group)


@pytest.mark.slow
def test_scripts_exit_2_with_one_line_and_no_traceback(world):
    """The three scripts as real processes (started together: each spends most of its time importing)."""
    runs = {
        "train.py": (train_argv(world, cfg=write(world.root / "misspelt.yaml", MISSPELT_YAML)),
                     r"unknown config key 'optim\.lrr'"),
        "test.py": (evaluate_argv(world, folder=world.root / "nowhere"), r"folder dataset not found: .*nowhere/low"),
        "test_unpaired.py": (unpaired_argv(world, inputs=world.root / "nowhere"), r"no such file or folder"),
    }
    before = snapshot(world.root)
    procs = {s: start([s, *argv], world.root.parent / f"logs-{s}") for s, (argv, _) in runs.items()}
    for script, proc in procs.items():
        code, err = finish(proc, world.root.parent / f"logs-{script}")
        assert code == 2, err[-3000:]
        assert_one_error(err, runs[script][1])
        assert err.rstrip().splitlines()[-1].startswith("error: ")
    assert_kept(before, world.root, nothing_new=True)


@pytest.mark.slow
def test_ctrl_c_stops_training_with_a_checkpoint_to_resume_from(world, capsys, restore_determinism):
    data = make_pairs(world.root / "four", n=4)
    argv = train_argv(world, "trainer.max_steps=100000", "trainer.max_epochs=100000",
                      "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1", data=data)
    run = world.runs / "tiny" / "version_1"
    logs = world.root.parent / "logs"
    before = snapshot(world.root)
    proc = start(["train.py", *argv], logs)
    interrupt_when(proc, lambda: (run / "checkpoints" / "last.ckpt").exists(), logs)
    code, err = finish(proc, logs)
    assert code == 130, err[-3000:]
    stopped = re.search(rf"interrupted: SIGINT received: stopped after step (\d+); saved {run}/checkpoints/last\.ckpt",
                        err)
    assert stopped and "Traceback" not in err, err[-3000:]
    step = int(stopped.group(1))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == step >= 1
    assert_kept(before, world.root)
    resume = [a for a in argv if not a.startswith("trainer.max_steps")]
    assert run_in_process(train, [*resume, f"trainer.max_steps={step + 2}", "--resume", str(run)], capsys)[0] == 0
    assert final_state(run)["global_step"] == step + 2
    assert [s for s, _ in logged(run, "train/loss")] == list(range(step + 2))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_stops_training_cleanly(world, signum):
    """Slurm at the end of a job, ``kill -- -PGID`` and Ctrl-C in a terminal signal every process of the group,
    DataLoader workers included: the workers leave it to the main process, which stops as for its own signal."""
    data = make_pairs(world.root / "four", n=4)
    argv = train_argv(world, "trainer.max_steps=100000", "trainer.max_epochs=100000", "data.num_workers=1",
                      "trainer.checkpoint_every_n_steps=1", data=data)
    run = world.runs / "tiny" / "version_1"
    logs = world.root.parent / "logs"
    proc = start(["train.py", *argv], logs, own_group=True)
    interrupt_when(proc, lambda: (run / "checkpoints" / "last.ckpt").exists(), logs, signal_group=signum)
    code, err = finish(proc, logs)
    assert code == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    stopped = re.search(rf"interrupted: {name} received: stopped after step (\d+); saved {run}/checkpoints/last\.ckpt",
                        err)
    assert stopped and "Traceback" not in err, err[-3000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == int(stopped.group(1)) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "test_unpaired.py"])
def test_ctrl_c_leaves_only_complete_outputs(world, script):
    """The first image is small, the others 16 times larger: Ctrl-C comes as soon as the first output appears,
    while the second image is being enhanced, on a fast machine as on a slow one."""
    pairs = make_pairs(world.root / "many", n=6, size=(64, 64))
    make_pairs(pairs, n=1, size=(16, 16))
    model = {**TINY_MODEL, "diffusion": {"timesteps": 25, "pad_multiple": 8}}
    ckpt = save_tiny_checkpoint(world.root / "slow.ckpt", model=model)
    out = world.root / "out"
    if script == "test.py":
        argv = evaluate_argv(world, folder=pairs, ckpt=ckpt, output=out, sampler=("ddpm", "25"))
    else:
        argv = unpaired_argv(world, inputs=pairs / "low", ckpt=ckpt, output=out, sampler=("ddpm", "25"))
    logs = world.root.parent / "logs"
    before = snapshot(world.root)
    proc = start([script, *argv], logs)
    interrupt_when(proc, lambda: any(out.glob("*.png")), logs)
    code, err = finish(proc, logs)
    assert code == 130, err[-3000:]
    assert "interrupted: nothing was left half-written" in err and "Traceback" not in err
    written = sorted(out.iterdir())
    assert written and all(p.suffix == ".png" for p in written)  # no metrics.json, no temporary file
    assert len(written) < 6
    for path in written:
        with Image.open(path) as img:
            img.load()  # complete: decodes to the end
            assert img.size == ((16, 16) if path.name == "0.png" else (64, 64))
    assert_kept(before, world.root)


def test_the_best_checkpoint_holds_the_weights_its_validation_scored(world, capsys, restore_determinism):
    """Validation every 2 steps, last.ckpt every 3: the best checkpoint is saved right after the best validation,
    not at the next periodic save with that validation's score."""
    data = make_pairs(world.root / "four", n=4)
    argv = train_argv(world, "trainer.max_steps=8", "trainer.max_epochs=100", "trainer.val_check_interval=2",
                      "trainer.check_val_every_n_epoch=null", "trainer.checkpoint_every_n_steps=3",
                      f"data.val_folder={data}", data=data)
    assert run_in_process(train, argv, capsys)[0] == 0
    run = world.runs / "tiny" / "version_1"
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    state = read_checkpoint(best)
    psnr = dict(logged(run, "val/psnr"))  # a validation after step N is logged at N - 1
    step = state["global_step"]
    assert best.name == f"best-step={step}.ckpt"
    assert step - 1 in psnr and psnr[step - 1] == max(psnr.values())  # saved right after the best validation
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 8


# ----------------------------------------------------------------------------------------------- start-up checks
@pytest.mark.parametrize("extra, net", [
    (("optim.dfpl_image_loss=lpips_vgg",), "vgg"),
    (("optim.loss_type=l2", "trainer.monitor=val/combined", "data.val_folder={pairs}"), "alex"),
], ids=["dfpl_backbone", "lpips_alex_for_the_monitor"])
def test_missing_lpips_weights_stop_training_before_the_run_folder_exists(world, capsys, monkeypatch, extra, net):
    """The LPIPS networks a run needs are built at start-up: missing weights end it with the command that fetches
    them, before its run folder exists (not in the first training step, nor as a traceback after validation)."""
    monkeypatch.setenv("ANLIGHTENDIFF_LPIPS_DIR", str(world.root.parent / "no_lpips"))
    monkeypatch.setenv("TORCH_HOME", str(world.root.parent / "no_torch_home"))
    before = snapshot(world.root)
    argv = train_argv(world, *(e.format(pairs=world.pairs) for e in extra))
    code, _, err = run_in_process(train, argv, capsys)
    assert code == 2, err[-3000:]
    assert_one_error(err, rf"LPIPS-{net} needs the ImageNet backbone weights.*Run `python -m utils\.lpips_weights`")
    assert_kept(before, world.root, nothing_new=True)
    assert not (world.runs / "tiny" / "version_1").exists()


# ----------------------------------------------------------------------------------------------- user errors
BUILTIN_ERRORS = [ValueError("x"), FileNotFoundError("x"), FileExistsError("x"), FloatingPointError("x"),
                  OSError("x"), RuntimeError("x"), KeyError("x"), TypeError("x")]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_only_the_projects_own_errors_are_user_errors(script, world, capsys, monkeypatch):
    """A builtin exception is a bug wherever it comes from: it keeps its traceback instead of becoming one tidy
    ``error:`` line. The user errors are the project's own types, raised on purpose with a message for the user."""
    module = SCRIPTS[script]
    for cls in module.USER_ERRORS:
        assert cls.__module__.split(".")[0] in ("utils", "models", "data"), cls
    for error in BUILTIN_ERRORS:
        def bug(argv: Any, error: Exception = error) -> int:
            raise error

        with pytest.raises(type(error)):
            run_cli(bug, module.USER_ERRORS, [])
    assert capsys.readouterr().err == ""

    def internal_bug(*args: Any, **kwargs: Any) -> None:  # in the scripts' own code path
        raise ValueError("internal: bad array layout")

    monkeypatch.setattr(module, "check_monitor" if script == "train.py" else "save_png", internal_bug)
    argv = {"train.py": train_argv(world), "test.py": evaluate_argv(world), "test_unpaired.py": unpaired_argv(world)}
    with pytest.raises(ValueError, match="internal: bad array layout"):
        run_cli(module.main, module.USER_ERRORS, argv[script])
    assert "error: " not in capsys.readouterr().err


@pytest.mark.parametrize("ignored", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_scripts_started_by_the_tests_get_default_signal_dispositions(tmp_path, ignored):
    """However the suite was started (here: with the signal ignored, as under ``nohup`` or in a background job),
    the processes the signal tests start handle SIGINT as Ctrl-C (KeyboardInterrupt) and SIGTERM by default."""
    previous = signal.signal(ignored, signal.SIG_IGN)
    try:
        probe = ("import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
                 "signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)")
        code, err = finish(start(["-c", probe], tmp_path), tmp_path, timeout=60)
    finally:
        signal.signal(ignored, previous)
    assert code == 0, err
    assert (tmp_path / "out.txt").read_text().split() == ["True", "True"]


class _GradientSpike(pytorch_lightning.LightningModule):
    """One weight vector; at step ``spike`` the loss stays finite but its gradient is NaN: d/dw |w - w|^0.5 is
    inf * 0, as a power below 1 of a term that reaches 0 gives."""

    def __init__(self, spike: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.spike = spike
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(self.w.detach().clone())
        loss = ((self.w - batch.mean()) ** 2).sum()
        if self.global_step == self.spike:
            loss = loss + (self.w - self.w.detach()).abs().pow(0.5).sum()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2)


@pytest.mark.parametrize("skip", [True, False])
def test_a_step_with_non_finite_gradients_is_skipped(skip: bool, capsys: pytest.CaptureFixture[str]) -> None:
    from utils.training import SkipNonFiniteGradients

    module, callback = _GradientSpike(spike=1), SkipNonFiniteGradients()
    trainer = pytorch_lightning.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         callbacks=[callback] if skip else [])
    trainer.fit(module)
    before_spike, after_spike, last = module.seen
    if not skip:  # what the callback prevents: one such step and the weights are NaN for good
        assert torch.isnan(last).all()
        return
    assert callback.skipped == 1 and "step 1: non-finite gradients, step skipped" in capsys.readouterr().err
    assert torch.isfinite(module.w).all()
    assert torch.equal(after_spike, last)  # the spiking step left the weights as they were
    assert not torch.equal(before_spike, after_spike) and not torch.equal(last, module.w.detach())
