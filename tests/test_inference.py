"""Inference preparation (weight-norm folding, channels_last, autocast), tiling, determinism, bench smoke."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from models import inference, load_checkpoint, load_for_inference
from models.anchor import condition_features
from models.anchored_diffusion import AnchoredDiffusion
from models.build import build_networks
from models.diffusion import GaussianDiffusion
from models.inference import encode, enhance
from models.precision import autocast_dtype, bf16_supported
from models.preparation import fold_weight_norm, prepare_for_inference
from models.samplers import make_sampler
from models.tiling import blend_weights, tile_boxes, tile_starts
from models.unet import NoiseUNet
from tests.conftest import ROOT, TINY, load_bench
from utils.memory import retain_freed_memory


class X0Predictor(nn.Module):
    """Reads the UNet's output as x0 = tanh(out) and returns the noise that implies it, so that x0_hat is a
    smooth function of the inputs, as with a trained model (a random eps-predictor saturates x0_hat at +-1,
    which turns every small perturbation into a flipped pixel)."""

    def __init__(self, unet: NoiseUNet, diffusion: GaussianDiffusion):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", diffusion.alphas_cumprod.clone())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, img_lr: torch.Tensor, feats: list[torch.Tensor],
                anchor: torch.Tensor | None = None) -> torch.Tensor:
        x0 = torch.tanh(self.unet(x_t, t, img_lr, feats, anchor))
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run many tiny ops: one thread avoids OpenMP barrier waits (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smooth(config):
    torch.manual_seed(0)
    encoder, diffusion = build_networks(config)
    diffusion.unet = X0Predictor(diffusion.unet, diffusion)
    return encoder, diffusion


@pytest.fixture
def networks(tiny_config):
    torch.manual_seed(0)
    return build_networks(tiny_config)


@pytest.fixture
def smooth_networks(tiny_config):
    return _smooth(tiny_config)


@pytest.fixture
def smooth_networks_without_norm(tiny_config):
    """Without instance norm a tile's network sees what the untiled one sees, apart from the receptive field
    at tile borders: what is left is the tiling machinery itself."""
    return _smooth(dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model,
                                                                                use_instance_norm=False)))


@pytest.fixture
def dark_image():
    """(1, 3, 64, 96) smooth dark image in [0, 0.35]: a gradient plus mild texture."""
    generator = torch.Generator().manual_seed(1)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    base = torch.stack((ys, xs, (ys + xs) / 2))[None] * 0.25
    return (base + 0.1 * torch.rand(1, 3, 64, 96, generator=generator)).clamp(0, 1)


def _enhance(networks, img, sampler="ddim", steps=3, eta=0.0, **kwargs):
    encoder, diffusion = networks
    return enhance(encoder, diffusion, img, sampler=make_sampler(diffusion, sampler, steps, eta), pad_multiple=8,
                   **kwargs)


# ------------------------------------------------------------------------------------------- preparation
def test_fold_weight_norm_keeps_outputs_and_leaves_the_original_working(networks, dark_image):
    before = _enhance(networks, dark_image)
    folded = copy.deepcopy(networks)
    counts = [fold_weight_norm(net) for net in folded]
    assert counts[0] > 0 and counts[1] > 0
    keys = [k for net in folded for k in net.state_dict()]
    assert not any("parametrizations" in k for k in keys)
    after = _enhance(folded, dark_image)
    assert torch.allclose(after.image, before.image, atol=1e-5)
    assert torch.allclose(after.anchor, before.anchor, atol=1e-5)
    assert torch.equal(_enhance(networks, dark_image).image, before.image)  # the deep-copied original works
    assert any("parametrizations" in k for k in networks[1].state_dict())


def test_channels_last_matches_contiguous(smooth_networks, dark_image):
    before = _enhance(smooth_networks, dark_image)
    prepared = [prepare_for_inference(copy.deepcopy(n), channels_last=True)
                for n in smooth_networks]
    conv = prepared[1].unet.unet.final_conv[1]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    after = _enhance(prepared, dark_image)
    assert (after.image - before.image).abs().max() < 1e-4  # measured 3.1e-6 (rounding only)


def test_loading_and_preparing_leave_the_allocator_alone(libc_calls):
    """The library never changes the process's allocator; the command-line scripts opt in."""
    load_for_inference(None, torch.device("cpu"))
    prepare_for_inference(load_checkpoint(ROOT / "checkpoints" / "default.ckpt"))
    assert libc_calls == []


def test_bf16_autocast_stays_close_to_fp32(smooth_networks, dark_image):
    fp32 = _enhance(smooth_networks, dark_image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 on CPUs without it
        bf16 = _enhance(smooth_networks, dark_image, precision="bf16")
    diff = (bf16.image - fp32.image).abs()
    assert diff.max() > 0  # autocast did run in bf16
    assert diff.mean() < 5e-3 and diff.max() < 3e-2  # measured mean 1.2e-3, max 8.3e-3


def test_precision_names_are_checked():
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="valid"):
        autocast_dtype("fp64", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        autocast_dtype("fp16", torch.device("cpu"))


def test_native_bf16_is_read_from_the_cpu_capabilities(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    assert not bf16_supported(cpu)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True})
    assert bf16_supported(cpu) == torch.backends.mkldnn.is_available()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert not bf16_supported(cpu)  # a torch that cannot tell: taken as emulated


def test_encode_equals_the_encoder_forward(networks, dark_image):
    encoder = networks[0]
    center, feats = encode(encoder, condition_features(dark_image))
    expected_center, expected_feats = encoder(dark_image)
    assert torch.equal(center, expected_center)
    assert all(torch.equal(a, b) for a, b in zip(feats, expected_feats, strict=True))


# ------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(("height", "width", "tile", "overlap"),
                         [(64, 96, 48, 16), (37, 53, 16, 5), (8, 200, 32, 0), (13, 13, 32, 8)])
def test_tiles_cover_every_pixel_and_overlap_enough(height, width, tile, overlap):
    boxes = tile_boxes(height, width, tile, overlap)
    covered = torch.zeros(height, width, dtype=torch.int64)
    weight_sum = torch.zeros(height, width)
    for top, left, h, w in boxes:
        assert top >= 0 and left >= 0 and top + h <= height and left + w <= width
        assert h == min(tile, height) and w == min(tile, width)
        covered[top: top + h, left: left + w] += 1
        weight_sum[top: top + h, left: left + w] += blend_weights((top, left, h, w), height, width, overlap)[0, 0]
    assert covered.min() >= 1 and weight_sum.min() > 0
    for length in (height, width):
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tile_arguments_are_checked(networks, dark_image):
    with pytest.raises(ValueError, match="tile_overlap"):
        tile_boxes(64, 64, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        _enhance(networks, dark_image, tile=20)


def test_blending_reassembles_a_pointwise_pipeline_exactly(monkeypatch, dark_image):
    """With a per-pixel 'pipeline' (image plus its noise), tiled equals untiled exactly: crops, blending
    weights and the per-tile noise (the untiled noise, cropped) are all consistent."""

    def pointwise(encoder, diffusion, sampler, img, features, *, precision, generator, noise_fn, callback):
        noise = noise_fn(img) if noise_fn is not None else torch.randn(img.shape, generator=generator)
        return img + noise, features[:, 3:6]

    monkeypatch.setattr(inference, "_enhance_full", pointwise)
    diffusion = _StubDiffusion()
    sampler = make_sampler(diffusion, "ddim", 1)
    full = enhance(None, diffusion, dark_image, sampler=sampler, pad_multiple=8,
                   generator=torch.Generator().manual_seed(5))
    tiled = enhance(None, diffusion, dark_image, sampler=sampler, pad_multiple=8,
                    generator=torch.Generator().manual_seed(5), tile=32, tile_overlap=12)
    assert torch.allclose(tiled.image, full.image, atol=1e-6)
    assert torch.allclose(tiled.anchor, full.anchor, atol=1e-6)


class _StubDiffusion:
    """All a sampler needs of the diffusion to set its timesteps."""

    num_timesteps = 10


def test_tiled_matches_untiled_closely(smooth_networks_without_norm, dark_image):
    full = _enhance(smooth_networks_without_norm, dark_image)
    tiled = _enhance(smooth_networks_without_norm, dark_image, tile=48, tile_overlap=16)
    diff = (tiled.image - full.image).abs()
    assert diff.mean() < 5e-5 and diff.max() < 2e-3  # measured mean 5.9e-6, max 1.8e-4
    assert (tiled.anchor - full.anchor).abs().max() < 5e-3  # measured 5.5e-4
    single = _enhance(smooth_networks_without_norm, dark_image, tile=96)
    assert torch.equal(single.image, full.image)  # one tile covering everything is the untiled run


def test_tiled_with_instance_norm_stays_near_untiled(smooth_networks, dark_image):
    """With instance norm each tile is normalised on its own statistics: the gap is inherent, and largest
    for tiles this small relative to the image (2 tiles of 64 px here; measured mean 1.6e-2, against 6e-2
    between the untiled outputs of the image and of the image shifted by one pixel)."""
    full = _enhance(smooth_networks, dark_image)
    tiled = _enhance(smooth_networks, dark_image, tile=64, tile_overlap=32)
    assert (tiled.image - full.image).abs().mean() < 3e-2


def test_tiled_stochastic_sampling_uses_the_untiled_noise(smooth_networks_without_norm, dark_image):
    nets = smooth_networks_without_norm
    generators = [torch.Generator().manual_seed(7) for _ in range(3)]
    full = _enhance(nets, dark_image, sampler="ddpm", steps=10, generator=generators[0])
    tiled = _enhance(nets, dark_image, sampler="ddpm", steps=10, generator=generators[1], tile=48,
                     tile_overlap=16)
    other = _enhance(nets, dark_image, sampler="ddpm", steps=10, generator=torch.Generator().manual_seed(8))
    tiled_gap = (tiled.image - full.image).abs().mean()
    assert tiled_gap < 0.25 * (other.image - full.image).abs().mean()  # measured ratio 0.14
    _enhance(nets, dark_image, sampler="ddpm", steps=10, generator=generators[2])
    assert torch.equal(generators[1].get_state(), generators[2].get_state())  # left as by one untiled run


def test_odd_sizes_work_tiled(networks):
    img = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(2)) * 0.3
    out = _enhance(networks, img, tile=16, tile_overlap=5, steps=2)
    assert out.image.shape == img.shape and out.anchor.shape == img.shape
    assert out.image.min() >= 0 and out.image.max() <= 1 and torch.isfinite(out.image).all()


# ------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(("sampler", "steps", "eta"), [("ddpm", 10, 0.0), ("ddim", 4, 0.5)])
def test_enhance_is_deterministic_with_a_seeded_generator(networks, dark_image, sampler, steps, eta):
    def run(seed):
        return _enhance(networks, dark_image, sampler=sampler, steps=steps, eta=eta,
                        generator=torch.Generator().manual_seed(seed)).image

    first, second = run(0), run(0)
    assert first.numpy().tobytes() == second.numpy().tobytes()
    assert not torch.equal(first, run(1))


# ------------------------------------------------------------------------------------------- bench
def test_bench_quick_smoke_prints_a_speedup(capsys, monkeypatch):
    bench = load_bench("speed", monkeypatch)
    overrides = [f"model.unet_dim={TINY['model']['unet_dim']}", "model.dim_mults=[1,2,2]",
                 "diffusion.timesteps=10", "diffusion.pad_multiple=8", "sampler.steps=10", "val_sampler.steps=10"]
    try:
        assert bench.main(["--quick", "--size", "24x16", "--device", "cpu", *overrides]) == 0
    finally:
        retain_freed_memory(False)  # the bench switches glibc's allocator mode for the whole process
    name, value = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert name == "speedup" and float(value) > 0


def test_bench_quality_rows_score_as_test_py_does(networks, dark_image, monkeypatch):
    """bench/speed.py's quality table: one row per sampler, the anchor row included, scored with
    utils.metrics.score_pairs (what test.py and validation report) on the enhanced images."""
    from utils.metrics import mean_scores, score_pairs, to_uint8

    bench = load_bench("speed", monkeypatch)
    modules = AnchoredDiffusion(networks[0], networks[1], pad_multiple=8).eval()
    high = to_uint8((dark_image[0] * 2.5).clamp(0, 1))
    rows = bench.quality_rows(modules, [(dark_image, high)], 8, [("anchor", 1), ("ddim", 2)])
    assert [row["name"] for row in rows] == ["anchor", "ddim-2"]
    for row, (sampler, steps) in zip(rows, [("anchor", 1), ("ddim", 2)], strict=True):
        image = _enhance(networks, dark_image, sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(0)).image
        expected = mean_scores(score_pairs([(image[0], high)]), ("psnr", "ssim", "lpips"))
        assert row["psnr"] == pytest.approx(expected["psnr"]) and row["ssim"] == pytest.approx(expected["ssim"])
    assert rows[0]["psnr"] != pytest.approx(rows[1]["psnr"])
