"""bench/gpu_check.py, the prepared check of the CUDA path: its --tiny rehearsal on the CPU runs every check and
reports them in the JSON and the table, its measurements compute what they say, and its device command is the one
the docs give."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import default_signals, load_bench
from utils.cli import run_cli
from utils.lpips import converted_weights_path, torchvision_weights_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    return load_bench("gpu_check", monkeypatch)


@pytest.mark.slow
def test_tiny_rehearsal_runs_every_check(tmp_path: Path, gpu_check) -> None:
    """The one command in --tiny mode, as the device runs it (the repository on PYTHONPATH, only the AlexNet LPIPS
    backbone given): every check runs without error, and the table printed is the JSON's."""
    lpips_dir = tmp_path / "lpips"
    lpips_dir.mkdir()
    alex = converted_weights_path("alex")
    if alex.is_file():
        (lpips_dir / alex.name).symlink_to(alex)
    out = tmp_path / "report" / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--lpips-dir", str(lpips_dir), "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=default_signals)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["device"] == "cpu" and report["complete"]
    assert report["memory"] == "process peak RSS"
    rows = report["rows"]
    assert [r["error"] for r in rows] == [None] * len(rows)
    assert {r["section"] for r in rows} == set(gpu_check.SECTIONS)
    settings = report["settings"]
    steps, warmup = settings["steps"], settings["warmup"]

    train = [r for r in rows if r["section"] == "train"]
    assert sorted((r["config"], r["precision"], r["batch"], r["crop"]) for r in train) == [
        ("cfg/train/faithful.yaml", "32-true", 2, 32), ("cfg/train/faithful.yaml", "bf16-mixed", 2, 32),
        ("checkpoints/default_config.yaml", "32-true", 2, 128),
        ("checkpoints/default_config.yaml", "bf16-mixed", 2, 128)]  # the bundled model's own precision
    (ddp,) = [r for r in rows if r["section"] == "ddp"]
    assert ddp["ranks"] == 1 and ddp["precision"] == "bf16-mixed" and ddp["steps"] == settings["ddp_steps"]
    for row in [*train, ddp]:
        assert row["steps"] in (steps, settings["ddp_steps"])
        assert row["timed_steps"] == row["steps"] - 1 - warmup  # records of steps warmup .. steps - 1, logged each
        assert row["steps_per_s"] > 0 and row["peak_memory_gib"] > 0
        assert row["images_per_s"] == pytest.approx(row["steps_per_s"] * row["batch"] * row["ranks"], rel=1e-3)
    data = [r for r in rows if r["section"] == "data"]
    assert sorted(r["config"] for r in data) == ["cfg/train/faithful.yaml", "checkpoints/default_config.yaml"]
    assert all(r["batches_per_s"] > 0 and r["num_workers"] == 0 for r in data)

    tests = [r for r in rows if r["section"] == "test.py"]
    assert sorted((r["checkpoint"], r["setting"]) for r in tests) == [
        ("FS", "DDPM-10, bf16"), ("FS", "DDPM-10, fp32"), ("bundled", "its defaults, fp32")]
    assert all(r["images"] == settings["pairs"] == 2 and r["s_per_image"] > 0 and r["size"] == "64x48"
               for r in tests)
    agreement = [r for r in rows if r["section"] == "agreement"]
    assert sorted((r["checkpoint"], r["images"]) for r in agreement) == [("FS", 1), ("bundled", 2)]
    # CPU against CPU: the same bytes
    assert all(r["agree"] and r["psnr_db_min"] is None and r["max_abs_diff_uint8"] == 0 for r in agreement)
    (unpaired,) = [r for r in rows if r["section"] == "test_unpaired.py"]
    assert unpaired["size"] == "200x150" and unpaired["tile"] is None and unpaired["s_per_image"] > 0

    projection = report["projection"]
    assert projection["steps_per_epoch"] == math.ceil((485 + 689 + 400) / 2)
    assert projection["epochs"] == 1000 and projection["val_sampler"] == "DDPM-10"
    assert set(projection["hours"]) == {"32-true", "bf16-mixed"}
    fs_fp32 = next(r for r in train if r["config"] == "cfg/train/faithful.yaml" and r["precision"] == "32-true")
    hours = projection["hours"]["32-true"]
    assert hours["train"] == pytest.approx(1000 * 787 / fs_fp32["steps_per_s"] / 3600, rel=1e-2)
    assert hours["total"] == pytest.approx(hours["train"] + hours["validation"], abs=0.011)

    assert report["lpips"]["alex"].startswith("real" if alex.is_file() else "random stand-in")
    assert report["lpips"]["vgg"].startswith("real" if torchvision_weights_path("vgg").is_file() else "random stand-in")
    assert gpu_check.table(report) in done.stdout
    log = out.with_suffix(".log").read_text()
    assert log.count("=====") == len(rows) and "max_steps=6` reached" in log


def test_a_failing_check_is_recorded_and_the_others_go_on(tmp_path: Path, gpu_check,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(out=tmp_path / "r.json", log=tmp_path / "r.log", deadline=None, overwrite=False)
    args.log.write_text("")
    check = gpu_check.Check(args, torch.device("cpu"), gpu_check.Sizes(True, None, None, None, None), tmp_path)

    def fails() -> dict:
        os.write(2, b"what the run printed\n")
        raise ValueError("broken\nsecond line")

    assert check.run("train", "a", "b", fails)["error"] == "ValueError: broken"
    check.run("data", "c", "d", lambda: {"batches_per_s": 2.0, "images_per_s": 4.0, "_path": tmp_path})
    rows = json.loads(args.out.read_text())["rows"]
    assert [(r["section"], r["error"]) for r in rows] == [("train", "ValueError: broken"), ("data", None)]
    assert "_path" not in rows[1] and rows[1]["batches_per_s"] == 2.0
    assert "what the run printed" in args.log.read_text()  # the runs' output goes to the log, not the console
    console = capfd.readouterr()
    assert "FAILED: ValueError: broken" in console.out and "2.00 batches/s" in console.out
    assert "what the run printed" not in console.out + console.err


def test_training_rate_reads_the_runs_tensorboard_log(tmp_path: Path, gpu_check) -> None:
    writer = SummaryWriter(str(tmp_path))
    for step, wall in [(0, 100.0), (1, 105.0), (2, 106.0), (3, 106.5), (4, 107.0)]:
        writer.add_scalar("train/loss", 0.5, step, walltime=wall)
    writer.close()
    assert gpu_check.training_rate(tmp_path, warmup=2) == (2 / 1.0, 2)  # steps 2..4 in one second
    with pytest.raises(RuntimeError, match="fewer than two"):
        gpu_check.training_rate(tmp_path, warmup=4)


def test_seconds_per_image_and_psnr_between_output_folders(tmp_path: Path, gpu_check) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    shifted = image.copy()
    shifted[0, 0, 0] += 10  # MSE 100 / 192
    for name, first, second in [("x.png", image, image), ("y.png", image, shifted)]:
        Image.fromarray(first).save(a / name)
        Image.fromarray(second).save(b / name)
    os.utime(a / "x.png", (50.0, 50.0))
    os.utime(a / "y.png", (53.5, 53.5))
    assert gpu_check.seconds_per_image(a) == 3.5
    psnr, largest, count = gpu_check.psnr_between(a, b)
    assert psnr == pytest.approx(10 * math.log10(255**2 / (100 / 192)), abs=1e-3) and largest == 10 and count == 2
    (b / "y.png").unlink()
    Image.fromarray(image).save(b / "y.png")
    assert gpu_check.psnr_between(a, b) == (None, 0, 2)


def test_projection_is_epochs_of_measured_steps_plus_validation(gpu_check) -> None:
    rows = [{"section": "train", "error": None, "config": "cfg/train/faithful.yaml", "precision": "32-true",
             "steps_per_s": 11.0},
            {"section": "train", "error": None, "config": "checkpoints/default_config.yaml", "precision": "32-true",
             "steps_per_s": 99.0}]
    inference = {"fp32": {"s_per_image": 2.0}, "bf16": {"error": "failed"}}
    projected = gpu_check.projection(rows, inference, [])
    assert projected["steps_per_epoch"] == 66 and projected["batch"] == 24 and projected["val_sampler"] == "DDPM-100"
    assert projected["hours"] == {"32-true": {"train": round(1000 * 66 / 11.0 / 3600, 2),
                                              "validation": round(1000 * 15 * 2.0 / 3600, 2),
                                              "total": round(1000 * 66 / 11.0 / 3600 + 1000 * 15 * 2.0 / 3600, 2)}}


def test_device_command_is_the_documented_one(gpu_check, capsys: pytest.CaptureFixture[str]) -> None:
    command = gpu_check.DEVICE_COMMAND
    assert len(command) < 2000 and "--device cuda" in command and "--lpips-dir .lpips" in command
    flat = " ".join(command.split())
    assert flat in " ".join(gpu_check.__doc__.split())
    assert flat in " ".join((ROOT / "README.md").read_text().split())
    assert gpu_check.main(["--device-command"]) == 0
    assert capsys.readouterr().out == f"carry: .whl .lpips\n{command}\n"
    ignored = subprocess.run(["git", "check-ignore", *gpu_check.DEVICE_CARRY], cwd=ROOT, capture_output=True,
                             text=True)
    assert ignored.stdout.split() == list(gpu_check.DEVICE_CARRY)  # carried, never committed


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "cpu", "--tiny", "--pairs", "1"], "--pairs must be at least 2"),
    (["--device", "cpu", "--tiny", "--steps", "3"], "leaves too few steps after --warmup"),
    (["--device", "nonsense"], "unknown device"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, gpu_check, argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(gpu_check.main, gpu_check.USER_ERRORS, [*argv, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def test_an_existing_report_is_kept(tmp_path: Path, gpu_check, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert run_cli(gpu_check.main, gpu_check.USER_ERRORS, ["--device", "cpu", "--tiny", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == "{}"


def test_a_child_past_its_time_is_killed_with_its_group(gpu_check) -> None:
    """The DDP run's process, and the ranks it started, end when its time is up."""
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                              "print(p.pid, flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(child.stdout.readline())
    with pytest.raises(RuntimeError, match="killed after 1 s"):
        gpu_check.wait_for(child, 1.0)
    assert child.returncode == -9
    for _ in range(50):
        if not alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child's own child outlived it")
    child.stdout.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and waiting to be reaped, does not)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
