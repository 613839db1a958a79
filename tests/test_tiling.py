"""Large photos: per-tile features with the whole image's equalisation, the automatic tiling decision, and
how far tiled output is from untiled (test_unpaired.py and the demo tile on their own above a measured size).

The networks use instance norm, so a tile is normalised on its own statistics and tiled output does not
equal untiled output; what is exact is that every tile sees the untiled network inputs and that, away from
the seams, the output is that tile's own enhancement. With the bundled checkpoint on a real photo the gap is
measured and bounded against the model's own sensitivity to a one-pixel shift.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import equalize

import test_unpaired
from models import load_for_inference, tiling
from models.anchor import apply_luts, condition_features, equalization_luts
from models.inference import encode, enhance, sample
from models.padding import PaddedImage, pad_to_multiple
from models.samplers import make_sampler
from models.tiling import auto_tile, network_width, tile_boxes, tile_features
from tests.conftest import ROOT, load_bench
from tests.test_inference import _smooth
from utils.memory import retain_freed_memory


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_image(height: int, width: int, seed: int = 0, scale: float = 0.35) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed)) * scale


def real_photo(size: tuple[int, int]) -> torch.Tensor:
    """samples/lol_6.png resized to ``size`` (W, H), (1, 3, H, W) in [0, 1]."""
    img = Image.open(ROOT / "samples" / "lol_6.png").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]


# ------------------------------------------------------------------------------------ whole-image features
@pytest.mark.parametrize("img", [random_image(2, 37, seed=1) ** 3, torch.zeros(1, 3, 6, 6),
                                 torch.full((1, 3, 5, 7), 0.5), torch.cat((random_image(9, 8), random_image(9, 8, 2)))],
                         ids=["skewed", "black", "constant", "batch"])
def test_equalization_tables_reproduce_torchvision(img):
    expected = equalize((img * 255).to(torch.uint8)).float() / 255
    assert torch.equal(apply_luts(img, equalization_luts(img)), expected)


@pytest.mark.parametrize(("height", "width", "tile", "overlap"),
                         [(37, 53, 16, 5), (37, 53, 24, 0), (37, 53, 64, 8), (5, 70, 16, 4), (40, 48, 16, 4)],
                         ids=["reflected", "no-overlap", "one-tile", "replicated", "unpadded"])
def test_tile_features_are_the_crop_of_the_padded_whole_image_features(height, width, tile, overlap):
    """Tiles are gathered from the unpadded image as pad_to_multiple would pad it (reflected, or replicated
    where the image is too small to reflect), and equalised with the padded image's histogram."""
    img = random_image(height, width) ** 2
    padded = pad_to_multiple(img, 8)
    whole, luts = condition_features(padded), equalization_luts(padded)
    lazily = PaddedImage(img, 8)
    assert lazily.shape == padded.shape and torch.equal(lazily.luts(), luts)
    for box in tile_boxes(*padded.shape[-2:], tile, overlap):
        top, left, h, w = box
        pixels, features = tile_features(lazily, box, lazily.luts())
        assert torch.equal(pixels, padded[..., top: top + h, left: left + w])
        assert torch.equal(features, whole[..., top: top + h, left: left + w])
        assert torch.equal(tile_features(padded, box, luts)[1], features)


# ------------------------------------------------------------------------------------ agreement with untiled
def test_away_from_the_seams_the_output_is_the_tile_enhanced_on_its_own(tiny_config):
    """With instance norm: where one tile alone covers a pixel, the tiled output is exactly that tile's
    enhancement (on the whole image's features), which differs from the untiled output."""
    encoder, diffusion = _smooth(tiny_config)
    img = random_image(64, 96, seed=3)
    ddim = make_sampler(diffusion, "ddim", 3)
    tiled = enhance(encoder, diffusion, img, sampler=ddim, pad_multiple=8, tile=48, tile_overlap=16)
    untiled = enhance(encoder, diffusion, img, sampler=ddim, pad_multiple=8)
    boxes = tile_boxes(64, 96, 48, 16)
    cover = torch.zeros(64, 96, dtype=torch.int64)
    for top, left, h, w in boxes:
        cover[top: top + h, left: left + w] += 1
    luts, sampler = equalization_luts(img), make_sampler(diffusion, "ddim", 3, 0.0)
    checked = 0
    with torch.inference_mode():
        for box in boxes:
            top, left, h, w = box
            crop = img[..., top: top + h, left: left + w]
            anchor, feats = encode(encoder, tile_features(img, box, luts)[1])
            alone = sample(diffusion, sampler, crop, anchor, feats)
            only = cover[top: top + h, left: left + w] == 1
            region = tiled.image[..., top: top + h, left: left + w]
            assert torch.allclose(region[..., only], alone[..., only], atol=1e-6)
            checked += int(only.sum())
    assert checked >= 0.25 * 64 * 96  # a quarter of the image is covered by one tile alone
    assert (tiled.image - untiled.image).abs().mean() > 1e-3  # instance norm: per-tile statistics


def test_tiling_the_bundled_model_on_a_real_photo_stays_within_its_own_shift_sensitivity():
    """samples/lol_6.png at 300x200, two 256 px tiles, the bundled model with its recommended sampler. Enhancing
    the photo shifted by one pixel changes the output by 0.024 on average; tiling changes it by less than half of
    that (measured 0.006), and its local averages (8x8) by under 0.03 (measured 0.005). The anchor is computed per
    tile too (instance norm), so it obeys the same bound. The network's own output (``detail="model"``): detail
    transfer runs on the whole image after tiling and takes its detail from the input, which a shift moves exactly
    (it halves the shift gap, to 0.017)."""
    model = load_for_inference(None, torch.device("cpu"))
    sampler = dataclasses.replace(model.config.sampler, detail="model")
    img = real_photo((300, 200))
    untiled = model.enhance(img, sampler)
    tiled = model.enhance(img, sampler, tile=256, tile_overlap=64)
    shifted = model.enhance(img[..., 1:, 1:], sampler).image
    shift_gap = (shifted - untiled.image[..., 1:, 1:]).abs().mean()
    gap = (tiled.image - untiled.image).abs()
    assert 0 < gap.mean() < 0.5 * shift_gap
    assert (F.avg_pool2d(tiled.image, 8) - F.avg_pool2d(untiled.image, 8)).abs().mean() < 0.03
    assert (tiled.anchor - untiled.anchor).abs().mean() < 0.5 * shift_gap


# ------------------------------------------------------------------------------------ the automatic choice
def test_automatic_tiling_engages_above_the_threshold_and_not_below():
    per_pixel = tiling.NETWORK_BYTES_PER_PIXEL[0] + tiling.NETWORK_BYTES_PER_PIXEL[1] * 8
    memory = per_pixel * 64 * 64  # room for 4096 pixels
    choose = lambda h, w: auto_tile(h, w, model_width=8, pad_multiple=8, memory=memory)  # noqa: E731
    assert choose(64, 64) is None and choose(1, 1) is None and choose(57, 64) is None  # pads to 64 x 64
    assert choose(64, 65) == 64 and choose(65, 64) == 64 and choose(2000, 3000) == 64
    assert auto_tile(64, 72, model_width=8, pad_multiple=16, memory=memory) == 64
    assert auto_tile(64, 72, model_width=16, pad_multiple=8, memory=memory) == 48  # wider networks: smaller
    assert auto_tile(5000, 5000, model_width=8, pad_multiple=8, memory=1) == 8  # never below the padding


def test_default_choice_for_the_shipped_models():
    """1.25 GiB for the networks: the bundled checkpoint (width 16) enhances up to 1.23 megapixels in one
    piece and a 12- or 24-megapixel photo on 1088 px tiles; the paper's model (width 64) tiles above 0.45
    megapixels, on 640 px tiles."""
    assert auto_tile(900, 1200, model_width=16, pad_multiple=32) is None
    assert [auto_tile(h, w, model_width=16, pad_multiple=32) for h, w in [(1200, 1200), (3000, 4000),
                                                                          (4000, 6000)]] == [1088] * 3
    assert auto_tile(600, 600, model_width=64, pad_multiple=32) is None
    assert [auto_tile(h, w, model_width=64, pad_multiple=32) for h, w in [(700, 700), (3000, 4000)]] == [640] * 2
    # end to end, the CLI's own decision for the bundled checkpoint and its default flags
    model = load_for_inference(None, torch.device("cpu"))
    assert network_width(model.config.model) == 16
    args = test_unpaired.parse_args(["--input", "x", "--output", "y"])
    args.tile = test_unpaired.parse_tile(args.tile)
    assert test_unpaired.tiling_for(args, model, 3000, 4000) == (1088, 64)
    assert test_unpaired.tiling_for(args, model, 2160, 3840) == (1088, 64)
    assert test_unpaired.tiling_for(args, model, 400, 600) == (None, 0)
    off = argparse.Namespace(tile=None, tile_overlap=64)
    assert test_unpaired.tiling_for(off, model, 3000, 4000) == (None, 64)


def test_padding_is_part_of_the_decision():
    img = random_image(33, 33)
    assert pad_to_multiple(img, 8).shape[-2:] == (40, 40)
    per_pixel = tiling.NETWORK_BYTES_PER_PIXEL[0] + tiling.NETWORK_BYTES_PER_PIXEL[1] * 8
    assert auto_tile(33, 33, model_width=8, pad_multiple=8, memory=per_pixel * 33 * 33) == 32
    assert auto_tile(33, 33, model_width=8, pad_multiple=8, memory=per_pixel * 40 * 40) is None


def test_bench_large_prints_seconds_per_megapixel(capsys, monkeypatch):
    """bench/speed.py --large: the large-image section alone, tiled as test_unpaired.py tiles."""
    bench = load_bench("speed", monkeypatch)
    per_pixel = tiling.NETWORK_BYTES_PER_PIXEL[0] + tiling.NETWORK_BYTES_PER_PIXEL[1] * 8
    monkeypatch.setattr(tiling, "AUTO_TILE_MEMORY", per_pixel * 32 * 32)
    overrides = ["model.unet_dim=8", "model.dim_mults=[1,2,2]", "diffusion.timesteps=10", "diffusion.pad_multiple=8",
                 "sampler.steps=10", "val_sampler.steps=10"]
    try:
        assert bench.main(["--large", "24x16,72x40", "--fast-steps", "2", "--device", "cpu", *overrides]) == 0
    finally:
        retain_freed_memory(False)  # the bench switches glibc's allocator mode for the whole process
    lines = capsys.readouterr().out.strip().splitlines()
    assert "large 24x16 (0.0 Mpix), in one piece, ddim-2" in lines[-4]
    assert "large 72x40 (0.0 Mpix), 6 tiles of 32 px (overlap 8), ddim-2" in lines[-3]
    assert "s/Mpix" in lines[-3] and "peak memory" in lines[-3] and lines[-2].startswith("cpu share")
    name, value = lines[-1].split()
    assert name == "s/Mpix" and float(value) > 0
