"""One scoring path (utils.metrics.score_pairs): validation, test.py and the benchmark report the same numbers for
the same images and the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import test as test_script
from data.datamodule import LowLightDataModule
from data.datasets import pair_files
from models import load_for_inference
from tests.conftest import load_bench
from tests.test_scripts import make_pairs, tiny_ckpt  # noqa: F401  (tiny_ckpt: a fixture)
from utils.lpips import build_lpips, lpips_available
from utils.metrics import METRICS, mean_scores, score_pair


def test_validation_test_py_and_the_benchmark_agree(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    data = make_pairs(tmp_path / "pairs", n=2, size=(40, 48))  # LPIPS-AlexNet (31x31) and SSIM (7x7) are defined
    out = tmp_path / "results"
    assert test_script.main(["--ckpt", str(tiny_ckpt), "--test-folder", str(data), "--output", str(out),
                             "--sampler", "ddim", "--steps", "2", "--device", "cpu"]) == 0
    reported = json.loads((out / "metrics.json").read_text())

    model = load_for_inference(tiny_ckpt, torch.device("cpu"))  # what test.py ran; its val_sampler is DDIM, 2 steps
    assert (model.config.val_sampler.sampler, model.config.val_sampler.steps) == ("ddim", 2)
    datamodule = LowLightDataModule("folder", extra_train_folders=[str(data)], val_folder=str(data), num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)[0]

    baselines = load_bench("baselines", monkeypatch)

    def enhance(rgb: np.ndarray) -> np.ndarray:
        img = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        return model.enhance(img, model.config.val_sampler).image[0].permute(1, 2, 0).numpy()

    lpips_model = build_lpips("alex") if lpips_available("alex") else None
    benchmarked = baselines.evaluate(enhance, pair_files(data / "low", data / "high"), lpips_model)

    assert reported["psnr"] is not None and reported["ssim"] is not None
    for key in METRICS:
        if reported[key] is None:  # LPIPS without its weights on this machine: missing everywhere
            assert f"val/{key}" not in validated and benchmarked.get(key) is None
            continue
        assert validated[f"val/{key}"] == pytest.approx(reported[key], rel=1e-5, abs=1e-6)
        if key in baselines.COLUMNS:
            assert benchmarked[key] == pytest.approx(reported[key], rel=1e-9, abs=1e-12)


def test_mean_scores_are_null_where_a_metric_is_undefined_on_any_image():
    rng = np.random.default_rng(0)
    big, small = (rng.random((40, 48, 3)) * 255).astype(np.uint8), (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    rows = [score_pair(big, big[::-1].copy()), score_pair(small, small[::-1].copy())]
    means = mean_scores(rows)
    assert means["psnr"] == pytest.approx((rows[0]["psnr"] + rows[1]["psnr"]) / 2)
    assert means["lpips"] is None  # no LPIPS model given
    assert mean_scores([]) == dict.fromkeys(METRICS)
