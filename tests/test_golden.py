"""Golden test of the path users run: ``test_unpaired.py`` with the bundled ``checkpoints/default.ckpt`` on
``samples/``, compared with statistics recorded for that exact checkpoint (by sha256) in
``tests/data/golden_default_checkpoint.json``.

The statistics of each written PNG (in [0, 1]): per-channel mean and standard deviation, and the grey mean of a
4 x 4 grid of blocks. Float arithmetic that differs between machines moves them by far less than 1e-4; a real
regression moves them by more than the tolerances (measured: sampling 5 DDIM steps instead of 4 shifts a channel
mean by up to 5.6e-3 and a standard deviation by 1.6e-2; even bf16 instead of fp32 networks shifts a mean by 1.2e-3).

When the bundled checkpoint is replaced, record its row (the old rows stay, keyed by their sha256):
``python -m tests.test_golden --record``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import test_unpaired
from utils.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "default.ckpt"
GOLDEN = Path(__file__).resolve().parent / "data" / "golden_default_checkpoint.json"
IMAGES = ("lol_2.png", "synthetic_rocket.png")
"""A LOL input and a synthetic one whose size (640 x 427) is padded to a multiple of 32 and cropped back."""
SAMPLER = {"sampler": "anchor", "steps": 1, "eta": 0.0, "seed": 0}
"""The bundled checkpoint's recommended sampler when recorded, passed explicitly so the recorded numbers
stay valid if the default changes."""
TOLERANCE = {"mean": 5e-4, "std": 5e-4, "blocks": 3e-3}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_statistics(path: Path) -> dict[str, Any]:
    """Per-channel mean and std, and 4 x 4 block means of the grey image, of a PNG in [0, 1]."""
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    grey = img.mean(axis=2)
    h, w = (grey.shape[0] // 4) * 4, (grey.shape[1] // 4) * 4
    blocks = grey[:h, :w].reshape(4, h // 4, 4, w // 4).mean(axis=(1, 3))
    return {"mean": img.mean(axis=(0, 1)).round(6).tolist(), "std": img.std(axis=(0, 1)).round(6).tolist(),
            "blocks": blocks.round(5).flatten().tolist()}


def enhance_samples(output: Path, sampler: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run test_unpaired.py (in-process, as its ``__main__`` does) on IMAGES; statistics of each output."""
    argv = ["--input", *(str(ROOT / "samples" / name) for name in IMAGES), "--output", str(output),
            "--ckpt", str(CHECKPOINT), "--device", "cpu", "--sampler", sampler["sampler"],
            "--steps", str(sampler["steps"]), "--eta", str(sampler["eta"]), "--seed", str(sampler["seed"])]
    assert run_cli(test_unpaired.main, test_unpaired.USER_ERRORS, argv) == 0
    return {name: image_statistics(output / name) for name in IMAGES}


@pytest.mark.slow
def test_bundled_checkpoint_on_the_samples_matches_its_recorded_statistics(tmp_path):
    digest = sha256(CHECKPOINT)
    table = json.loads(GOLDEN.read_text())["checkpoints"]
    if digest not in table:
        pytest.skip(f"no golden statistics recorded for checkpoints/default.ckpt with sha256 {digest} (the bundled "
                    f"checkpoint was replaced): record them with `python -m tests.test_golden --record`")
    row = table[digest]
    measured = enhance_samples(tmp_path / "out", row["sampler"])
    for name, expected in row["images"].items():
        for key, tolerance in TOLERANCE.items():
            assert measured[name][key] == pytest.approx(expected[key], abs=tolerance), (name, key)


def record() -> None:
    """Add (or replace) the row of the current checkpoint in the golden file."""
    import tempfile

    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"checkpoints": {}}
    with tempfile.TemporaryDirectory() as folder:
        images = enhance_samples(Path(folder), SAMPLER)
    data["about"] = ("Statistics of test_unpaired.py's outputs for samples/ (see tests/test_golden.py), one row per "
                     "sha256 of checkpoints/default.ckpt; add a row with `python -m tests.test_golden --record`.")
    data["checkpoints"][sha256(CHECKPOINT)] = {"sampler": SAMPLER, "images": images}
    rows = ",\n".join(f'  "{digest}": {{\n   "sampler": {json.dumps(row["sampler"])},\n   "images": {{\n'
                      + ",\n".join(f'    "{name}": {json.dumps(stats)}' for name, stats in row["images"].items())
                      + "\n   }\n  }" for digest, row in data["checkpoints"].items())
    GOLDEN.write_text(f'{{\n "about": {json.dumps(data["about"])},\n "checkpoints": {{\n{rows}\n }}\n}}\n')
    assert json.loads(GOLDEN.read_text()) == data
    print(f"recorded {GOLDEN} for sha256 {sha256(CHECKPOINT)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.test_golden --record")
    record()
