"""Brightness control (models/brightness.py, test_unpaired.py --brightness): the target mean luminance is hit,
the output rises monotonically with it, highlights roll off instead of clipping, bad values are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import test_unpaired
from models import AnlightenDiff, load_for_inference
from models import brightness as brightness_module
from models.brightness import expose, linear_to_srgb, match_brightness, mean_luminance, srgb_to_linear
from models.checkpoint import export_checkpoint
from tests.conftest import ROOT
from utils.cli import run_cli

CHECKPOINT = ROOT / "checkpoints" / "default.ckpt"

PHOTO = ROOT / "samples" / "lol_6.png"
TARGETS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)


def photo(size: tuple[int, int] = (200, 136)) -> torch.Tensor:
    """samples/lol_6.png downscaled to ``size`` (W, H), as (1, 3, H, W) in [0, 1]."""
    img = Image.open(PHOTO).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def enhanced() -> torch.Tensor:
    """The bundled checkpoint's output for the downscaled real photo (its recommended sampler)."""
    model = load_for_inference(None, torch.device("cpu"))
    return model.enhance(photo(), model.config.sampler).image


def clipped(img: torch.Tensor) -> float:
    """Fraction of pixels with a channel at 255 once written as 8 bits."""
    return ((img * 255).round() >= 255).any(dim=1).float().mean().item()


def test_mean_luminance_hits_the_target_and_rises_monotonically(enhanced):
    outputs = [match_brightness(enhanced, target) for target in TARGETS]
    achieved = [mean_luminance(out).item() for out in outputs]
    assert achieved == pytest.approx(TARGETS, abs=1e-3)
    assert all(a < b for a, b in zip(achieved, achieved[1:], strict=False))
    for darker, brighter in zip(outputs, outputs[1:], strict=False):  # monotone per pixel, not only on average
        assert (brighter >= darker - 1e-6).all()
    written = [np.asarray(out[0].permute(1, 2, 0).numpy() * 255).round() / 255 for out in outputs]
    assert [float((w @ np.array([0.2126, 0.7152, 0.0722])).mean()) for w in written] == pytest.approx(TARGETS,
                                                                                                        abs=3e-3)


def test_raising_brightness_rolls_highlights_off_instead_of_clipping(enhanced):
    """Raising the mean luminance from the model's own to 0.7: under 2% of the pixels newly reach 255 (measured
    0% with the bundled checkpoint), where a plain linear gain clipped at white reaching the same mean clips 9%."""
    target = 0.7
    assert mean_luminance(enhanced).item() < target - 0.1
    rolled = match_brightness(enhanced, target)
    assert clipped(rolled) - clipped(enhanced) < 0.02
    gain = brightness_module.solve_gain(enhanced, target)  # only to bracket; bisect the plain gain itself
    low, high = torch.tensor(0.0), torch.log2(gain) + 8
    linear = srgb_to_linear(enhanced)
    for _ in range(40):
        mid = (low + high) / 2
        too_bright = mean_luminance(linear_to_srgb(linear * torch.exp2(mid))).item() >= target
        low, high = (low, mid) if too_bright else (mid, high)
    plain = linear_to_srgb(linear * torch.exp2(high))
    assert mean_luminance(plain).item() == pytest.approx(target, abs=1e-3)
    assert clipped(plain) - clipped(enhanced) > 0.05


def test_expose_is_smooth_and_keeps_white():
    x = torch.linspace(0, 1, 1001).expand(1, 3, 1001)[..., None]
    assert torch.allclose(expose(x, 1.0), x, atol=1e-5)  # gain 1 changes nothing
    assert torch.allclose(expose(x, 0.5), linear_to_srgb(srgb_to_linear(x) * 0.5), atol=1e-6)  # darker: a gain
    previous = expose(x, 1.0)
    for gain in (1.5, 2.0, 4.0, 16.0, 256.0):
        out = expose(x, gain)
        assert (out >= previous - 1e-6).all()  # non-decreasing in the gain
        assert (out[..., 1:, :] >= out[..., :-1, :] - 1e-6).all()  # and in the input
        assert out[..., -1, :].min() > 1 - 1e-5  # white stays white
        assert (out[..., :-1, :] < 1).all()  # nothing else is pushed to white
        previous = out


def test_large_images_solve_on_a_subsample(monkeypatch, enhanced):
    monkeypatch.setattr(brightness_module, "SAMPLE_PIXELS", 1000)
    monkeypatch.setattr(brightness_module, "CHUNK_PIXELS", 777)
    out = match_brightness(enhanced, 0.4)
    assert mean_luminance(out).item() == pytest.approx(0.4, abs=5e-3)


def test_automatic_is_the_model_output_and_batches_get_their_own_gain(enhanced):
    assert match_brightness(enhanced, None) is enhanced
    batch = torch.cat((enhanced, enhanced * 0.5))
    assert mean_luminance(match_brightness(batch, 0.3)).tolist() == pytest.approx([0.3, 0.3], abs=1e-3)


def test_cli_writes_the_chosen_brightness_with_every_sampler(tmp_path, tiny_config):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(PHOTO).convert("RGB").resize((96, 64)).save(inputs / "dark.png")
    diffusion = AnlightenDiff(tiny_config)  # the bundled checkpoint recommends the anchor alone: a diffusion model
    torch.save({"state_dict": diffusion.state_dict(), "hyper_parameters": dict(diffusion.hparams)},
               tmp_path / "run.ckpt")
    tiny = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "tiny.ckpt")
    for sampler, ckpt in (("anchor", CHECKPOINT), ("ddim", tiny)):
        out = tmp_path / sampler
        argv = ["--input", str(inputs), "--output", str(out), "--sampler", sampler, "--brightness", "0.3",
                "--device", "cpu", "--grid", str(tmp_path / f"{sampler}_grid.png"), "--ckpt", str(ckpt)]
        assert test_unpaired.main(argv) == 0
        written = np.asarray(Image.open(out / "dark.png"), dtype=np.float64) / 255
        assert float((written @ np.array([0.2126, 0.7152, 0.0722])).mean()) == pytest.approx(0.3, abs=3e-3)
        grid = np.asarray(Image.open(tmp_path / f"{sampler}_grid.png"), dtype=np.float64) / 255
        anchor = grid[:, 304:604]  # input | anchor | output, each resized to 300x200, 4 px apart
        assert float((anchor @ np.array([0.2126, 0.7152, 0.0722])).mean()) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("value", ["1.5", "0.01", "-0.3", "bright", "nan", ""])
def test_cli_refuses_bad_brightness_before_any_work(tmp_path, capsys, value):
    """Checked first: the missing input folder and checkpoint are not even looked at."""
    argv = ["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "--ckpt",
            str(tmp_path / "none.ckpt"), "--brightness", value]
    assert run_cli(test_unpaired.main, test_unpaired.USER_ERRORS, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --brightness must be auto or a number in [0.05, 0.95]")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
