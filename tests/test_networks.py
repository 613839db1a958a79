import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from models.anchor import color_map, condition_features, equalized, grad_map
from models.build import build_networks
from utils.config import Config, ConfigError, config_from_dict


def test_faithful_parameter_counts():
    encoder, diffusion = build_networks(Config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(diffusion.unet) / 1e6, 2) == 42.50
    assert round(count(encoder) / 1e6, 2) == 37.77


def test_state_dict_layout_matches_the_official_checkpoint():
    encoder, diffusion = build_networks(Config())
    ours = {f"model.{k}": tuple(v.shape) for k, v in diffusion.state_dict().items()}
    ours |= {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    legacy = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v for k, v in ours.items()}
    from pathlib import Path
    rows = (Path(__file__).parent / "data" / "official_state_dict_keys.tsv").read_text().splitlines()[1:]
    official = {k: tuple(int(x) for x in s.strip("()").split(",") if x.strip())
                for k, s, _ in (row.split("\t") for row in rows)}
    assert legacy == official


def test_shapes_and_features(tiny_config):
    encoder, diffusion = build_networks(tiny_config)
    low = torch.rand(2, 3, 16, 24)
    center, feats = encoder(low)
    assert center.shape == low.shape
    assert [f.shape[1] for f in feats] == [8, 16, 16, 16, 8]
    eps = diffusion.unet(torch.randn_like(low), torch.tensor([1, 7]), low, feats)
    assert eps.shape == low.shape


def test_condition_features_channels():
    img = torch.rand(1, 3, 8, 8) * 0.3
    features = condition_features(img)
    assert features.shape == (1, 12, 8, 8)
    assert torch.equal(features[:, :3], img)
    assert torch.equal(features[:, 3:6], equalized(img))
    assert torch.equal(features[:, 9:], grad_map(color_map(img)))


def test_equalize_matches_pillow_on_truncated_uint8():
    img = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(0)) ** 3
    as_uint8 = (img * 255).to(torch.uint8)  # truncation, as the reference
    pillow = np.asarray(ImageOps.equalize(Image.fromarray(as_uint8[0].permute(1, 2, 0).numpy())))
    expected = torch.from_numpy(pillow).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(equalized(img), expected)
    assert equalized(img).max() == 1.0


def test_color_and_grad_maps():
    img = torch.tensor([[[[0.3]], [[0.6]], [[0.9]]]])
    assert torch.allclose(color_map(img).flatten(), torch.tensor([0.3, 0.6, 0.9]) / 0.6 / 3)
    ramp = torch.arange(4.0).repeat(1, 1, 4, 1)  # x-gradient 1, y-gradient 0
    g = grad_map(ramp)
    assert torch.equal(g[..., :-1], torch.ones(1, 1, 4, 3)) and torch.equal(g[..., -1], torch.zeros(1, 1, 4))


@pytest.mark.parametrize("use_wn", [True, False])
def test_weight_norm_switch(tiny_config, use_wn):
    tiny_config.model.use_wn = use_wn
    _, diffusion = build_networks(tiny_config)
    has = any("parametrizations" in k for k in diffusion.unet.state_dict())
    assert has == use_wn


@pytest.mark.parametrize("use_wn", [True, False])
def test_zero_residual_anchor_is_the_equalised_image_and_stays_trainable(tiny_config, use_wn):
    img = torch.rand(1, 3, 16, 16) * 0.3
    tiny_config.model.cond_use_wn = use_wn
    random_encoder, _ = build_networks(tiny_config)
    assert not torch.allclose(random_encoder(img)[0], equalized(img), atol=1e-3)  # the reference's init
    tiny_config.model.cond_zero_residual = True
    encoder, _ = build_networks(tiny_config)
    center, _ = encoder(img)
    assert torch.equal(center, equalized(img))
    center.square().sum().backward()
    conv = encoder.final_conv[-1]
    scale = conv.parametrizations.weight.original0 if use_wn else conv.weight
    assert scale.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0  # train_encoder can still move it


def test_zero_residual_needs_the_residual_anchor():
    with pytest.raises(ConfigError, match="cond_zero_residual needs model.cond_on_res"):
        config_from_dict({"model": {"cond_zero_residual": True, "cond_on_res": False}})
