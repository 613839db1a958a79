"""Tests for data.degradation (synthetic low light) and the data.make_synthetic CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.degradation import (
    DegradationParams,
    LowLightDegradation,
    linear_to_srgb,
    quantize_8bit,
    srgb_to_linear,
)
from data.make_synthetic import parse_size, random_view
from utils.image_io import read_image

ROOT = Path(__file__).resolve().parents[1]


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colourful float image in [0.05, 0.95]."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    channels = [0.5 + 0.45 * np.sin(6 * xx + 4 * yy + p) for p in phases]
    return np.stack(channels, axis=-1).astype(np.float32)


def _flat(value: float, size: int = 128) -> np.ndarray:
    return np.full((size, size, 3), value, np.float32)


# ---------------------------------------------------------------- colour transfer functions


def test_srgb_transfer_functions():
    assert srgb_to_linear(np.array(0.5)) == pytest.approx(0.21404, abs=1e-5)
    assert srgb_to_linear(np.array(0.02)) == pytest.approx(0.02 / 12.92)
    x = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-9)
    quantised = quantize_8bit(np.array([0.0, 0.2, 0.203, 1.2]))
    np.testing.assert_allclose(quantised * 255, [0, 51, 52, 255], atol=1e-4)


# ---------------------------------------------------------------- LowLightDegradation


def test_deterministic_for_a_seed():
    deg = LowLightDegradation()
    img = _photo()
    a, pa = deg.degrade(img, 7)
    b, pb = deg.degrade(img, np.random.default_rng(7))
    c, pc = deg.degrade(img, 8)
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    assert pa != pc and not np.array_equal(a, c)
    np.testing.assert_array_equal(deg(img, 7), a)


def test_output_is_8bit_quantised_float_in_range():
    out = LowLightDegradation()(_photo(), 3)
    assert out.dtype == np.float32 and out.shape == (48, 64, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)


def test_parameters_drawn_within_ranges():
    deg = LowLightDegradation(cast_strength=0.1)
    rng = np.random.default_rng(0)
    draws = [deg.sample_params(rng) for _ in range(300)]
    exposures = np.array([p.exposure for p in draws])
    assert exposures.min() >= 3 and exposures.max() <= 30
    # log-uniform: the median is near the geometric mean sqrt(3 * 30) ~ 9.5, not the midpoint 16.5
    assert 7.5 < np.median(exposures) < 12
    assert all(1000 <= p.full_well <= 20000 and 1 <= p.read_noise <= 10 for p in draws)
    gains = np.array([p.channel_gains for p in draws])
    np.testing.assert_allclose(gains.mean(axis=1), 1.0, atol=1e-12)
    assert gains.min() > 0.8 and gains.max() < 1.2 and gains.std() > 0.02


def test_darker_by_expected_amount():
    deg = LowLightDegradation()
    img = _photo()
    for seed in range(20):
        low, params = deg.degrade(img, seed)
        ratio = low.mean() / img.mean()
        # a 3x-30x cut in linear light is roughly a 0.6x-0.2x cut of sRGB values
        assert 0.12 < ratio < 0.75, (seed, ratio, params)


def test_exposure_scales_linear_light():
    deg = LowLightDegradation(
        exposure_range=(10, 10), full_well_range=(1e9, 1e9), read_noise_range=(0, 0), cast_strength=0
    )
    img = _photo()
    low = deg(img, 0)
    ratio = srgb_to_linear(low).mean() / srgb_to_linear(img).mean()
    assert ratio == pytest.approx(0.1, rel=0.02)


@pytest.mark.parametrize("full_well,read_noise", [(1000.0, 0.0), (1000.0, 6.0), (4000.0, 3.0)])
def test_poisson_gaussian_noise_statistics(full_well, read_noise):
    deg = LowLightDegradation(
        exposure_range=(4, 4),
        full_well_range=(full_well, full_well),
        read_noise_range=(read_noise, read_noise),
        cast_strength=0,
    )
    low = srgb_to_linear(deg(_flat(0.5), 1))
    signal = srgb_to_linear(np.array(0.5)) / 4  # linear light after the exposure cut
    expected_var = (signal * full_well + read_noise**2) / full_well**2
    assert low.mean() == pytest.approx(signal, rel=0.03)
    assert low.var() == pytest.approx(expected_var, rel=0.15)


def test_colour_cast_applies_channel_gains():
    deg = LowLightDegradation(exposure_range=(2, 2), full_well_range=(1e9, 1e9), read_noise_range=(0, 0))
    params = DegradationParams(exposure=2.0, full_well=1e9, read_noise=0.0, channel_gains=(1.1, 1.0, 0.9))
    low = srgb_to_linear(deg.apply(_flat(0.6, 32), params, np.random.default_rng(0)))
    means = low.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(means / means[1], [1.1, 1.0, 0.9], rtol=0.01)


def test_no_cast_when_strength_zero():
    params = LowLightDegradation(cast_strength=0).sample_params(np.random.default_rng(0))
    assert params.channel_gains == (1.0, 1.0, 1.0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="exposure_range"):
        LowLightDegradation(exposure_range=(0.5, 2))
    with pytest.raises(ValueError, match="read_noise_range"):
        LowLightDegradation(read_noise_range=(5, 1))
    with pytest.raises(ValueError, match="cast_strength"):
        LowLightDegradation(cast_strength=1.5)
    deg = LowLightDegradation()
    with pytest.raises(TypeError, match="float"):
        deg(np.zeros((4, 4, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="HxWx3"):
        deg(np.zeros((3, 4, 4), np.float32)[0], 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        deg(np.full((4, 4, 3), 2.0, np.float32), 0)


# ---------------------------------------------------------------- make_synthetic


def test_parse_size():
    assert parse_size("400x600") == (400, 600)
    assert parse_size("16X24") == (16, 24)
    for bad in ("400", "ax6", "0x5", "4x5x6"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)


def test_random_view_shape_and_identity():
    rng = np.random.default_rng(0)
    img = _photo(40, 60)
    view = random_view(img, (20, 30), rng)
    assert view.shape == (20, 30, 3) and view.dtype == np.float32
    assert 0.0 <= view.min() and view.max() <= 1.0
    np.testing.assert_array_equal(random_view(img, (40, 60), rng), img)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data.make_synthetic", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def source_photo(tmp_path) -> Path:
    path = tmp_path / "src" / "photo.png"
    path.parent.mkdir()
    Image.fromarray((_photo(40, 60) * 255).astype(np.uint8)).save(path)
    return path


def test_cli_writes_pairs_and_refuses_to_overwrite(tmp_path, source_photo):
    out = tmp_path / "out"
    args = [
        "--src",
        str(source_photo.parent),
        "--out",
        str(out),
        "--size",
        "16x24",
        "--crops-per-image",
        "2",
        "--seed",
        "5",
    ]
    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr
    names = ["photo_000.png", "photo_001.png"]
    assert sorted(p.name for p in (out / "low").iterdir()) == names
    assert sorted(p.name for p in (out / "high").iterdir()) == names
    for name in names:
        high = read_image(out / "high" / name).rgb
        low = read_image(out / "low" / name).rgb
        assert high.shape == low.shape == (16, 24, 3)
        assert 0.1 < low.mean() / high.mean() < 0.8
    before = {n: (out / "low" / n).read_bytes() for n in names}

    again = _run_cli(*args)
    assert again.returncode == 2
    assert "already exist" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert {n: (out / "low" / n).read_bytes() for n in names} == before

    forced = _run_cli(*args, "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert {n: (out / "low" / n).read_bytes() for n in names} == before  # same seed, same files
    assert sorted(p.name for p in (out / "low").iterdir()) == names  # no temp files left


def test_cli_help_lists_every_flag():
    result = _run_cli("--help")
    assert result.returncode == 0
    for flag in ("--src", "--out", "--crops-per-image", "--size", "--seed", "--overwrite"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "make_args,code,message",
    [
        (lambda tmp: ["--src", str(tmp / "missing"), "--out", str(tmp / "o")], 2, "no such file or folder"),
        (lambda tmp: ["--src", str(tmp), "--out", str(tmp / "o"), "--size", "big"], 2, "HEIGHTxWIDTH"),
        (lambda tmp: ["--src", str(tmp), "--out", str(tmp / "o"), "--crops-per-image", "0"], 2, "positive"),
    ],
)
def test_cli_bad_arguments(tmp_path, make_args, code, message):
    result = _run_cli(*make_args(tmp_path))
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_unreadable_source(tmp_path):
    bad = tmp_path / "src" / "broken.png"
    bad.parent.mkdir()
    bad.write_text("not an image")
    result = _run_cli("--src", str(bad), "--out", str(tmp_path / "o"), "--size", "8x8")
    assert result.returncode == 1
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr


def test_cli_source_smaller_than_size(tmp_path, source_photo):
    result = _run_cli("--src", str(source_photo), "--out", str(tmp_path / "o"), "--size", "400x600")
    assert result.returncode == 1
    assert "skipped" in result.stderr and "smaller" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "low").exists()
