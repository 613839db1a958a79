"""Detail transfer (models/detail.py): lit photos keep their own pixels, dark ones get detail back but not noise."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import scipy.ndimage
import torch

from models import AnlightenDiff, load_checkpoint
from models.brightness import linear_to_srgb, srgb_to_linear
from models.checkpoint import CheckpointError, export_checkpoint
from models.detail import DetailTransfer, gaussian_blur, luma, transfer_detail
from utils.cli import add_inference_args, sampler_from_args
from utils.config import SamplerConfig


def texture(height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """(1, 3, H, W) smooth colourful texture in about [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=g)
    return (0.1 + 0.8 * torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic",
                                                        align_corners=False)).clamp(0, 1)


def test_gaussian_blur_is_scipy_with_nearest_borders():
    img = torch.rand(1, 2, 40, 50, generator=torch.Generator().manual_seed(1))
    ours = gaussian_blur(img, 3.0)[0].numpy()
    theirs = np.stack([scipy.ndimage.gaussian_filter(c.numpy(), 3.0, mode="nearest", truncate=4.0) for c in img[0]])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_lit_photo_keeps_its_own_pixels():
    """The model's soft, slightly tinted output of a well-lit photo is replaced by the photo itself (re-exposed
    by the model's brightness change, none here)."""
    photo = texture()
    soft_tinted = (gaussian_blur(photo, 2.0) * photo.new_tensor([1.05, 1.0, 0.93]).view(1, 3, 1, 1)).clamp(0, 1)
    out = transfer_detail(photo, soft_tinted)
    assert float((soft_tinted - photo).abs().mean()) > 0.02
    assert float((out - photo).abs().mean()) < 0.01


def test_the_model_brightening_is_kept_as_an_exposure_of_the_input():
    """A model output that is the input twice as exposed in linear light comes back as exactly that."""
    photo = texture() * 0.6
    brighter = linear_to_srgb(srgb_to_linear(photo) * 2)
    out = transfer_detail(photo, gaussian_blur(brighter, 1.5))
    assert float((out - brighter).abs().mean()) < 0.01


def test_dark_noise_stays_out_and_strong_edges_come_back():
    """A dark, noisy input with one strong edge; the model's output is clean but blurred. The output keeps the
    model's smoothness in the flat areas (the amplified noise is below the threshold) and sharpens the edge."""
    g = torch.Generator().manual_seed(2)
    clean = torch.full((1, 3, 64, 96), 0.02)
    clean[..., 48:] = 0.04  # an edge at column 48
    noisy = (clean + 0.002 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    model = gaussian_blur(linear_to_srgb(srgb_to_linear(clean) * 30), 3.0)  # bright, clean, soft
    out = transfer_detail(noisy, model)
    flat = (slice(None), slice(None), slice(8, 56), slice(4, 36))
    reexposed_noise = linear_to_srgb(srgb_to_linear(noisy) * 30)[flat].std()
    assert float(out[flat].std()) < 0.25 * float(reexposed_noise)
    step = lambda img: float((luma(img)[..., 48] - luma(img)[..., 47]).mean())  # noqa: E731
    assert step(out) > 3 * step(model)  # across the edge's two middle pixels: 0.050 against 0.013 (clean: 0.098)


def test_parameters_change_the_result_and_shapes_must_match():
    photo, soft = texture(), gaussian_blur(texture(), 2.0)
    keep_all = transfer_detail(photo * 0.2, soft, DetailTransfer(noise_k=0.0))
    keep_none = transfer_detail(photo * 0.2, soft, DetailTransfer(noise_k=1e6))
    assert float((keep_all - keep_none).abs().mean()) > 1e-3
    with pytest.raises(ValueError, match="shape"):
        transfer_detail(photo, soft[..., :-1])


def test_the_model_applies_it_when_its_sampler_config_asks(tiny_config):
    torch.manual_seed(0)
    module = AnlightenDiff(tiny_config).eval()
    img = texture(64, 64) * 0.3
    plain = module.enhance(img, SamplerConfig(sampler="anchor", steps=1)).image
    detailed = module.enhance(img, SamplerConfig(sampler="anchor", steps=1, detail="input")).image
    torch.testing.assert_close(detailed, transfer_detail(img, plain))
    assert float((detailed - plain).abs().mean()) > 1e-3


def test_the_flag_overrides_the_checkpoint_and_export_sets_it(tiny_config, tmp_path):
    parser = argparse.ArgumentParser()
    add_inference_args(parser)
    base = SamplerConfig(sampler="anchor", steps=1, detail="input")
    assert sampler_from_args(parser.parse_args([]), base, 10).detail == "input"
    assert sampler_from_args(parser.parse_args(["--detail", "model"]), base, 10).detail == "model"
    with pytest.raises(SystemExit):
        parser.parse_args(["--detail", "sharp"])

    module = AnlightenDiff(tiny_config)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "run.ckpt")
    target = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "out.ckpt", ["sampler.detail=input"])
    assert load_checkpoint(target).config.sampler.detail == "input"
    assert load_checkpoint(export_checkpoint(tmp_path / "run.ckpt", tmp_path / "plain.ckpt")).config.sampler.detail \
        == "model"
    with pytest.raises(CheckpointError, match="sampler.detail"):
        export_checkpoint(tmp_path / "run.ckpt", tmp_path / "bad.ckpt", ["sampler.detail=sharp"])
    assert not (tmp_path / "bad.ckpt").exists()
