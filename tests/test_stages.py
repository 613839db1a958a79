"""Staged training (the anchor encoder alone, then the diffusion on a frozen encoder), the ``anchor`` sampler,
exposure synthesis and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train
from data.exposure import ExposureSynthesis
from data.holdout import split_pairs
from models import AnlightenDiff, CheckpointError
from models.losses import AnchorLoss
from tests.conftest import TINY, train_steps
from utils.cli import UserError
from utils.config import ConfigError, config_from_dict

ANCHOR_STAGE = {**TINY, "stage": "anchor", "model": {**TINY["model"], "cond_on_res": False},
                "optim": {**TINY["optim"], "anchor_target": "hr", "anchor_loss": ["l1"], "anchor_loss_weights": [1.0]}}


def _module(overrides: dict) -> AnlightenDiff:
    torch.manual_seed(0)
    module = AnlightenDiff(config_from_dict(overrides))
    module.log = lambda *a, **k: None
    return module


def test_anchor_stage_trains_the_encoder_alone_and_lowers_its_loss(images):
    module = _module(ANCHOR_STAGE)
    optimizer = module.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.encoder.parameters()}
    unet_before = [p.detach().clone() for p in module.model.parameters()]
    batch = {"low": images[0], "high": images[1], "name": ["a", "b"]}
    losses = train_steps(module, optimizer, batch, 15)
    assert losses[-1] < 0.93 * losses[0]
    center, _ = module.encoder(images[0])
    assert torch.nn.functional.l1_loss(center, images[1]).item() == pytest.approx(
        module.training_step(batch, 0).item(), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(unet_before, module.model.parameters(), strict=True))


def test_chroma_target_is_the_colour_map_of_hr():
    module = _module({**ANCHOR_STAGE, "optim": {**ANCHOR_STAGE["optim"], "anchor_target": "chroma"}})
    hr = torch.tensor([0.6, 0.3, 0.3]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    expected = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1)
    assert torch.allclose(module.objective.target(hr), expected.expand(1, 3, 2, 2), atol=1e-6)


def test_anchor_loss_weights_and_msssim():
    img = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    other = (img * 0.5 + 0.2).clamp(0, 1)
    assert AnchorLoss(["msssim"], [1.0])(img, img).total.item() == pytest.approx(0.0, abs=1e-5)
    l1 = (img - other).abs().mean().item()
    assert AnchorLoss(["l1", "l1"], [2.0, 0.5])(img, other).total.item() == pytest.approx(2.5 * l1, rel=1e-5)
    assert 0.01 < AnchorLoss(["msssim"], [1.0])(other, img).total.item() < 1.0


def test_anchor_loss_is_float32_under_bf16_autocast():
    """Training autocasts to bf16; the loss itself (MS-SSIM's small powers) must still be computed in float32."""
    img = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    other = (img * 0.5 + 0.2).clamp(0, 1)
    loss = AnchorLoss(["l1", "msssim"], [1.0, 1.0])
    expected = loss(other, img).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss(other.bfloat16(), img).total
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "encoder"}, "stage"),
    ({"optim": {"anchor_loss": ["l1", "ssim"], "anchor_loss_weights": [1.0, 1.0]}}, "ssim"),
    ({"optim": {"anchor_loss": ["l1", "l2"]}}, "anchor_loss_weights"),
    ({"model": {"cond_dim": 32}}, "stronger_cond"),
    ({"data": {"synth_prob": 1.5}}, "synth_prob"),
    ({"data": {"synth_kinds": ["dark", "night"]}}, "night"),
    ({"sampler": {"sampler": "euler"}}, "sampler"),
])
def test_bad_stage_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides)


def test_anchor_sampler_returns_the_clamped_anchor(images):
    module = _module({**ANCHOR_STAGE, "stage": "diffusion"}).eval()
    with torch.no_grad():
        center, _ = module.method.anchor(images[0])
        anchor_sampler = config_from_dict({"sampler": {"sampler": "anchor"}}).sampler
        result = module.enhance(images[0], anchor_sampler)
        assert torch.allclose(result.image, center.clamp(0, 1), atol=1e-6)
        assert torch.allclose(result.anchor, center.clamp(0, 1), atol=1e-6)
        tiled = module.enhance(images[0], anchor_sampler, tile=8, tile_overlap=4)  # the tiles' own anchors
        assert torch.allclose(tiled.image, tiled.anchor, atol=1e-6)
        assert not torch.allclose(tiled.image, result.image, atol=1e-3)


def test_init_from_loads_the_earlier_encoder_and_refuses_mismatches(tmp_path):
    earlier = _module(ANCHOR_STAGE)
    path = tmp_path / "anchor.ckpt"
    torch.save({"state_dict": earlier.state_dict()}, path)
    later = _module({**ANCHOR_STAGE, "stage": "diffusion", "init_from": str(path)})
    torch.manual_seed(5)
    later.encoder.apply(lambda m: torch.nn.init.normal_(m.weight) if isinstance(m, torch.nn.Linear) else None)
    train.init_from_earlier_stage(later, str(path))
    for key, value in earlier.encoder.state_dict().items():
        assert torch.equal(value, later.encoder.state_dict()[key]), key
    assert not any(p.requires_grad for p in later.encoder.parameters())
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train.init_from_earlier_stage(later, str(tmp_path / "missing.ckpt"))
    wider = _module({**ANCHOR_STAGE, "model": {**ANCHOR_STAGE["model"], "unet_dim": 16}})
    with pytest.raises(CheckpointError, match="does not hold an anchor encoder matching"):
        train.init_from_earlier_stage(wider, str(path))


def test_exposure_synthesis_kinds():
    rng = np.random.default_rng(0)
    high = np.random.default_rng(1).uniform(0.2, 0.8, size=(32, 32, 3)).astype(np.float32)
    low = high * 0.1
    assert ExposureSynthesis(0.0)(low, high, rng)[0] is low
    same, target = ExposureSynthesis(1.0, ["identity"])(low, high, rng)
    assert np.array_equal(same, high) and target is high
    dark, _ = ExposureSynthesis(1.0, ["dark"])(low, high, rng)
    assert dark.mean() < 0.6 * high.mean() and dark.dtype == np.float32
    assert np.allclose(dark * 255, np.round(dark * 255), atol=1e-3)  # 8-bit grid
    bright, _ = ExposureSynthesis(1.0, ["bright"])(low, high, rng)
    assert bright.mean() > high.mean() + 0.05 and bright.max() <= 1.0
    picks = [ExposureSynthesis(0.25, ["identity"])(low, high, rng)[0] is not low for _ in range(2000)]
    assert 0.2 < np.mean(picks) < 0.3
    with pytest.raises(ValueError, match="kinds"):
        ExposureSynthesis(0.5, ["night"])


def test_holdout_links_every_nth_pair_and_never_overwrites(tmp_path):
    src = tmp_path / "src"
    for side in ("low", "high"):
        (src / side).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((4, 4, 3), 20 * i, dtype=np.uint8)).save(src / side / f"{i}.png")
    held = split_pairs(src, tmp_path / "out", every=4, offset=1)
    val = sorted(p.name for p in (tmp_path / "out/val/low").iterdir())
    train_names = sorted(p.name for p in (tmp_path / "out/train/high").iterdir())
    assert sorted(held) == val and len(val) == 3 and len(train_names) == 7
    assert not set(val) & set(train_names)
    assert (tmp_path / "out/val/high" / val[0]).resolve() == (src / "high" / val[0]).resolve()
    with pytest.raises(UserError, match="not empty"):
        split_pairs(src, tmp_path / "out", every=4, offset=1)


def test_an_anchor_stage_model_refuses_its_untrained_noise_predictor(images):
    module = _module(ANCHOR_STAGE).eval()
    ddim = config_from_dict({"sampler": {"sampler": "ddim", "steps": 2}}).sampler
    with pytest.raises(CheckpointError, match="never trained"):
        module.enhance(images[0], ddim)
    anchor = config_from_dict({"sampler": {"sampler": "anchor"}}).sampler
    assert module.enhance(images[0], anchor).image.shape == images[0].shape


def test_scripts_default_to_the_checkpoints_recommended_sampler(tmp_path):
    import test_unpaired
    from models.checkpoint import export_checkpoint
    from utils.cli import run_cli

    trained = _module({**ANCHOR_STAGE, "sampler": {"sampler": "anchor", "steps": 1}})
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, tmp_path / "r.ckpt")
    ckpt = export_checkpoint(tmp_path / "r.ckpt", tmp_path / "anchor.ckpt")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((16, 24, 3), 30, dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--ckpt", str(ckpt)]
    assert run_cli(test_unpaired.main, test_unpaired.USER_ERRORS, argv) == 0  # ddim would be refused
    assert run_cli(test_unpaired.main, test_unpaired.USER_ERRORS, [*argv, "--sampler", "ddim", "--steps", "2",
                                                                   "--overwrite"]) == 2
    refused = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "new"), "--ckpt", str(ckpt),
               "--sampler", "ddim", "--steps", "2"]
    assert run_cli(test_unpaired.main, test_unpaired.USER_ERRORS, refused) == 2
    assert not (tmp_path / "new").exists()  # refused before any output was made
