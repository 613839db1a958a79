from pathlib import Path

import pytest

from models import AnlightenDiff
from utils.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

CFG = Path(__file__).resolve().parents[1] / "cfg"


def test_defaults_are_the_reference_settings():
    c = Config()
    assert (c.seed, c.model.unet_dim, c.model.dim_mults, c.diffusion.timesteps) == (3407, 64, (1, 2, 2, 4, 4, 8), 100)
    assert (c.optim.optimizer, c.optim.lr, c.optim.loss_type, c.optim.dfpl_image_loss) == ("lion", 4e-4, "dfpl",
                                                                                            "lpips_vgg")
    assert (c.data.image_size, c.data.train_batch_size, c.trainer.gradient_clip_val) == (160, 24, 1.0)
    assert c.optim.train_encoder is False and c.sampler.sampler == "ddpm" and c.sampler.steps == 100


def test_misspelt_key_names_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.unet_dimm' \(did you mean 'unet_dim'\?\)"):
        config_from_dict({"model": {"unet_dimm": 32}})
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        config_from_dict({"optimm": {}})


@pytest.mark.parametrize("data, message", [
    ({"model": {"unet_dim": "64"}}, "model.unet_dim: expected int"),
    ({"model": {"use_wn": 1}}, "model.use_wn: expected bool"),
    ({"model": {"dim_mults": 3}}, "expected a list"),
    ({"optim": {"optimizer": "sgd"}}, "not one of"),
    ({"sampler": {"sampler": "ddpm", "steps": 10}}, "use sampler.sampler=ddim"),
    ({"optim": {"ref_prob": 2}}, "ref_prob"),
])
def test_types_and_values_are_checked(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_int_to_float_and_list_to_tuple():
    c = config_from_dict({"optim": {"lr": 1}, "model": {"dim_mults": [1, 2]}})
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float) and c.model.dim_mults == (1, 2)


def test_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {unet_dim: 16}\n")
    c = load_config(path, ["model.unet_dim=32", "optim.scheduler=cosine", "data.val_folder=null"])
    assert c.model.unet_dim == 32 and c.optim.scheduler == "cosine" and c.data.val_folder is None
    with pytest.raises(ConfigError, match="did you mean 'unet_dim'"):
        load_config(path, ["model.unetdim=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["model.unet_dim"])


def test_round_trip_through_dict():
    c = config_from_dict({"model": {"unet_dim": 8}})
    assert config_from_dict(c.to_dict()) == c


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(CFG.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CFG)))
def test_every_config_loads_and_builds(path):
    config = load_config(path)
    if config.model.unet_dim <= 16:
        module = AnlightenDiff(config)
        assert sum(p.numel() for p in module.parameters()) > 0
    else:
        assert config.model.unet_dim == 64
