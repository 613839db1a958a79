"""End-to-end runs of train.py, test.py and test_unpaired.py on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import test as test_script
import test_unpaired
import train
from models import AnlightenDiff, tiling
from tests.conftest import load_bench
from utils.cli import UserError, run_cli
from utils.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"model": {"unet_dim": 8, "dim_mults": [1, 2, 2]},
              "diffusion": {"timesteps": 10, "pad_multiple": 8},
              "sampler": {"sampler": "ddim", "steps": 2}, "val_sampler": {"sampler": "ddim", "steps": 2}}


def make_pairs(root: Path, n: int = 2, size: tuple[int, int] = (24, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        high = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(high).save(root / "high" / f"{i}.png")
        Image.fromarray((high * 0.2).astype(np.uint8)).save(root / "low" / f"{i}.png")
    return root


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    module = AnlightenDiff(config_from_dict(TINY_MODEL))
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.parametrize("script", ["train.py", "test.py", "test_unpaired.py"])
def test_help_explains_every_flag(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.returncode == 0 and "usage:" in out.stdout
    for flag in {"train.py": ["--cfg", "--resume"], "test.py": ["--ckpt", "--reference-protocol", "--steps"],
                 "test_unpaired.py": ["--input", "--output", "--overwrite", "--sampler"]}[script]:
        assert flag in out.stdout


def test_train_fast_dev_run(tmp_path):
    data = make_pairs(tmp_path / "pairs", n=3, size=(40, 48))
    code = train.main(["--cfg", str(ROOT / "cfg/train/tiny.yaml"), f"data.extra_train_folders=[{data}]",
                       f"data.val_folder={data}", f"trainer.output_dir={tmp_path / 'runs'}", "--fast-dev-run"])
    assert code == 0


def test_train_writes_a_versioned_run_and_resumes(tmp_path):
    data = make_pairs(tmp_path / "pairs", n=3, size=(40, 48))
    args = ["--cfg", str(ROOT / "cfg/train/tiny.yaml"), f"data.extra_train_folders=[{data}]",
            f"trainer.output_dir={tmp_path / 'runs'}", "trainer.max_epochs=100", "trainer.max_steps=2", "--no-test"]
    assert train.main(args) == 0
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2
    assert train.main([*args[:-2], "trainer.max_steps=4", "--no-test", "--resume", str(run)]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    assert train.main(args) == 0  # a new run never reuses an earlier run's folder
    assert (tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_test_py_metrics_match_scikit_image(tmp_path, tiny_ckpt):
    data = make_pairs(tmp_path / "pairs", size=(64, 80))  # LPIPS-AlexNet needs images of some size
    out = tmp_path / "results"
    code = test_script.main(["--cfg", str(ROOT / "cfg/test/LOL.yaml"), "--ckpt", str(tiny_ckpt), "--test-folder",
                             str(data), "--output", str(out), "--sampler", "ddim", "--steps", "2", "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == 2 and len(report["per_image"]) == 2
    psnrs, ssims = [], []
    for row in report["per_image"]:
        enhanced = np.asarray(Image.open(out / row["name"]))
        gt = np.asarray(Image.open(data / "high" / row["name"]))
        psnrs.append(peak_signal_noise_ratio(gt, enhanced, data_range=255))
        ssims.append(structural_similarity(gt, enhanced, channel_axis=2, data_range=255))
        assert row["psnr"] == pytest.approx(psnrs[-1], abs=1e-9)
        assert row["ssim"] == pytest.approx(ssims[-1], abs=1e-9)
    assert report["psnr"] == pytest.approx(np.mean(psnrs)) and report["ssim"] == pytest.approx(np.mean(ssims))
    assert report["checkpoint"]["sha256"] and report["environment"]["torch"] == torch.__version__
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("name,psnr,ssim")
    with pytest.raises(UserError, match="already holds results"):
        test_script.main(["--ckpt", str(tiny_ckpt), "--test-folder", str(data), "--output", str(out)])


@pytest.mark.lpips_weights
def test_test_py_scores_pairs_smaller_than_the_metrics_windows(tmp_path, tiny_ckpt, capsys):
    """16x12 pairs are smaller than LPIPS-AlexNet's input (31x31) and 5x6 ones than SSIM's 7x7 window: every pair
    is enhanced and scored, the undefined metrics are null with a note, and a large pair keeps every metric."""
    data = make_pairs(tmp_path / "pairs", n=1, size=(48, 40))
    make_pairs(tmp_path / "small", n=2, size=(12, 16), seed=1)
    make_pairs(tmp_path / "tiny", n=1, size=(6, 5), seed=2)
    for sub in ("low", "high"):
        (tmp_path / "small" / sub / "0.png").rename(data / sub / "small_a.png")
        (tmp_path / "small" / sub / "1.png").rename(data / sub / "small_b.png")
        (tmp_path / "tiny" / sub / "0.png").rename(data / sub / "tiny.png")
    out = tmp_path / "results"
    argv = ["--cfg", str(ROOT / "cfg/test/LOL.yaml"), "--ckpt", str(tiny_ckpt), "--test-folder", str(data),
            "--output", str(out), "--sampler", "ddim", "--steps", "2", "--device", "cpu"]
    assert run_cli(test_script.main, test_script.USER_ERRORS, argv) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    rows = {row["name"]: row for row in report["per_image"]}
    assert sorted(rows) == ["0.png", "small_a.png", "small_b.png", "tiny.png"]
    assert all(value is not None for value in rows["0.png"].values())
    for name in ("small_a.png", "small_b.png"):
        assert rows[name]["lpips"] is None and rows[name]["ssim"] is not None and rows[name]["psnr"] is not None
    assert rows["tiny.png"]["lpips"] is None and rows["tiny.png"]["ssim"] is None
    assert rows["tiny.png"]["ssim_gray"] is None and rows["tiny.png"]["psnr"] is not None
    assert report["lpips"] is None and report["ssim"] is None and report["psnr"] is not None
    assert "smaller than 31x31 pixels: null for 3 image(s) (small_a.png, small_b.png, tiny.png)" in report["lpips_note"]
    assert "null for 1 image(s) (tiny.png)" in report["ssim_note"]
    assert "note: LPIPS-AlexNet is undefined" in err and "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.png")) == sorted(rows)


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((13, 21, 3)) * 60).astype(np.uint8)).save(folder / "odd.png")
    Image.fromarray((rng.random((17, 9)) * 60).astype(np.uint8), mode="L").save(folder / "grey.jpg")
    rgba = (rng.random((10, 12, 4)) * 60).astype(np.uint8)
    rgba[..., 3] = np.arange(12, dtype=np.uint8)[None, :] * 20
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    Image.fromarray((rng.random((8, 8)) * 3000).astype(np.uint16)).save(folder / "deep16.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_test_unpaired_handles_every_kind_of_input(tmp_path, tiny_ckpt, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(inputs)
    grid = tmp_path / "grid.png"
    code = test_unpaired.main(["--input", str(inputs), "--output", str(out), "--ckpt", str(tiny_ckpt),
                               "--steps", "2", "--device", "cpu", "--grid", str(grid)])
    assert code == 1  # the corrupt file is reported and makes the exit status non-zero
    captured = capsys.readouterr()
    assert "corrupt.png" in captured.err + captured.out
    written = {p.name: Image.open(p) for p in out.iterdir()}
    assert sorted(written) == ["alpha.png", "deep16.png", "grey.png", "odd.png"]
    assert written["odd.png"].size == (21, 13) and written["odd.png"].mode == "RGB"
    assert written["grey.png"].size == (9, 17)
    assert written["alpha.png"].mode == "RGBA"
    assert Image.open(grid).size[1] == 4 * 200 + 3 * 4  # one row (input | anchor | output) per image
    alpha_in = np.asarray(Image.open(inputs / "alpha.png"))[..., 3]
    assert np.array_equal(np.asarray(written["alpha.png"])[..., 3], alpha_in)
    before = np.asarray(Image.open(inputs / "odd.png")).astype(int)
    assert (np.asarray(written["odd.png"]).astype(int) >= before - 1).all()  # the model only brightens


def test_test_unpaired_never_overwrites(tmp_path, tiny_ckpt):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(np.full((8, 8, 3), 20, np.uint8)).save(inputs / "a.png")
    out.mkdir()
    (out / "a.png").write_bytes(b"precious")
    with pytest.raises(UserError, match="already exist"):
        test_unpaired.main(["--input", str(inputs), "--output", str(out), "--ckpt", str(tiny_ckpt), "--steps", "2"])
    assert (out / "a.png").read_bytes() == b"precious"
    assert test_unpaired.main(["--input", str(inputs), "--output", str(out), "--ckpt", str(tiny_ckpt), "--steps",
                               "2", "--overwrite"]) == 0
    assert Image.open(out / "a.png").size == (8, 8)


@pytest.mark.parametrize("argv, message", [
    (["--input", "nowhere", "--output", "o"], "no such file"),
    (["--input", "{inputs}", "--output", "{file}"], "not a folder"),
    (["--input", "{inputs}", "--output", "o", "--sampler", "ddpm", "--steps", "3"], "ddpm"),
    (["--input", "{inputs}", "--output", "o", "--device", "cuda:7"], "cuda"),
    (["--input", "{inputs}", "--output", "o", "--ckpt", "{file}"], "not a readable PyTorch checkpoint"),
    (["--input", "{inputs}", "--output", "o", "--tile", "12"], "--tile must be a positive multiple of 8"),
    (["--input", "{inputs}", "--output", "o", "--tile", "16", "--tile-overlap", "16"], "--tile-overlap must be in"),
])
def test_test_unpaired_errors_are_one_line(tmp_path, tiny_ckpt, capsys, argv, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((8, 8, 3), 20, np.uint8)).save(inputs / "a.png")
    file = tmp_path / "file.txt"
    file.write_text("x")
    argv = [a.format(inputs=inputs, file=file) for a in argv]
    if "--ckpt" not in argv:
        argv += ["--ckpt", str(tiny_ckpt)]
    code = run_cli(test_unpaired.main, test_unpaired.USER_ERRORS, argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_test_unpaired_tiles_large_images_by_itself(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """No flags: an image above the automatic threshold (shrunk here to a 16 px tile's memory, so that a
    20x28 image is large) is enhanced on tiles, with a progress bar counting them, and a small one in one
    piece; --tile off and --tile SIZE override the choice; --max-pixels is a cap only when given."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((np.random.default_rng(3).random((20, 28, 3)) * 50).astype(np.uint8)).save(inputs / "big.png")
    Image.fromarray((np.random.default_rng(4).random((8, 8, 3)) * 50).astype(np.uint8)).save(inputs / "small.png")
    per_pixel = tiling.NETWORK_BYTES_PER_PIXEL[0] + tiling.NETWORK_BYTES_PER_PIXEL[1] * 8
    monkeypatch.setattr(tiling, "AUTO_TILE_MEMORY", per_pixel * 16 * 16)
    tiles = []
    enhance = AnlightenDiff.enhance
    monkeypatch.setattr(AnlightenDiff, "enhance", lambda self, img, *a, **k: tiles.append(
        (img.shape[-1], k["tile"], k["tile_overlap"])) or enhance(self, img, *a, **k))
    base = ["--input", str(inputs), "--ckpt", str(tiny_ckpt), "--steps", "2"]

    assert test_unpaired.main([*base, "--output", str(tmp_path / "auto")]) == 0
    assert tiles == [(28, 16, 4), (8, None, 0)]  # overlap: a quarter of the tile at most
    err = capsys.readouterr().err
    assert "big.png: tiles" in err and "0/6" in err and "small.png: tiles" not in err  # 2 x 3 tiles of 24 x 32
    tiled = np.asarray(Image.open(tmp_path / "auto" / "big.png"))
    assert tiled.shape == (20, 28, 3)
    assert (tiled.astype(int) >= np.asarray(Image.open(inputs / "big.png")).astype(int) - 1).all()

    tiles.clear()
    assert test_unpaired.main([*base, "--output", str(tmp_path / "explicit"), "--tile", "16", "--tile-overlap",
                               "4"]) == 0
    assert test_unpaired.main([*base, "--output", str(tmp_path / "off"), "--tile", "off"]) == 0
    assert tiles == [(28, 16, 4), (8, 16, 4), (28, None, 64), (8, None, 64)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "explicit" / "big.png")), tiled)
    with pytest.raises(UserError, match=r"--max-pixels 100, .*big\.png \(28x20 = 560 pixels\).*leave it out"):
        test_unpaired.main([*base, "--output", str(tmp_path / "capped"), "--max-pixels", "100"])
    with pytest.raises(UserError, match="--tile must be a positive multiple of 8"):  # refused before any work
        test_unpaired.main([*base, "--output", str(tmp_path / "o2"), "--tile", "15"])
    with pytest.raises(UserError, match="--tile must be auto, off or a tile size"):
        test_unpaired.main([*base, "--output", str(tmp_path / "o3"), "--tile", "big"])
    assert not any((tmp_path / name).exists() for name in ("capped", "o2", "o3"))


def test_test_unpaired_opts_in_to_keeping_freed_memory(tmp_path, tiny_ckpt, libc_calls):
    """The command-line scripts, not the library, set glibc's allocator to keep freed memory (CPU)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((8, 8, 3), 20, np.uint8)).save(inputs / "a.png")
    argv = ["--input", str(inputs), "--output", str(tmp_path / "out"), "--ckpt", str(tiny_ckpt), "--steps", "1",
            "--device", "cpu"]
    assert test_unpaired.main(argv) == 0
    assert sorted(libc_calls) == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]  # M_MMAP_MAX, M_TRIM_THRESHOLD


def test_test_unpaired_bf16_stays_close_to_fp32(tmp_path, tiny_ckpt):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((np.random.default_rng(4).random((24, 32, 3)) * 60).astype(np.uint8)).save(inputs / "a.png")
    outputs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = ["--input", str(inputs), "--output", str(out), "--ckpt", str(tiny_ckpt), "--steps", "3",
                "--precision", precision]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 is emulated (slow) on CPUs without native bf16
            assert test_unpaired.main(argv) == 0
        outputs[precision] = np.asarray(Image.open(out / "a.png")).astype(int)
    difference = np.abs(outputs["bf16"] - outputs["fp32"])
    assert 0 < difference.max() and difference.mean() < 3  # bf16 really ran, and changed little (8-bit levels)


def test_real_photos_table_marks_a_group_not_given(monkeypatch):
    """bench/real_photos.py with only dark (or only well-lit) photos: '-' in the other group's columns, not nan."""
    bench = load_bench("real_photos", monkeypatch)
    dark_only = {"niqe_all": 5.444, "niqe_dark": 5.444, "dark_Y": 112.24, "brightness_change": None,
                 "newly_blown_pct": None, "colour_shift": None}
    assert bench.table_row("m", dark_only) == "| m | 5.44 | 5.44 | 112.2 | - | - | - |"
    lit_only = {"niqe_all": 4.0, "niqe_dark": None, "dark_Y": None, "brightness_change": 1.44,
                "newly_blown_pct": -0.66, "colour_shift": 5.27}
    assert bench.table_row("m", lit_only) == "| m | 4.00 | - | - | +1.4 | -0.7 | 5.3 |"
