import argparse
import typing
from pathlib import Path

import pytest
import torch

from data.datamodule import DATASET_COMBINATIONS
from data.exposure import KINDS
from models import AnlightenDiff
from models.build import build_networks
from models.samplers import make_sampler
from utils.cli import UserError, sampler_from_args
from utils.config import (
    Config,
    ConfigError,
    DatasetName,
    SamplerConfig,
    SamplerName,
    SynthKind,
    apply_overrides,
    config_from_dict,
    load_config,
)

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


def test_base_files_come_first_section_by_section(tmp_path):
    """``base`` files (relative to the file that names them) are merged in order, each section key by key, then
    the file's own settings, then the overrides; ``null`` replaces a value, an empty section changes nothing."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "small.yaml").write_text("model: {unet_dim: 8, dim_mults: [1, 2, 2]}\ndiffusion: {pad_multiple: 8}\n"
                                         "data: {use_dataset: LOL, image_size: 32}\ncheckpoint: a.ckpt\n")
    (tmp_path / "velol.yaml").write_text("base: small.yaml\ndata: {use_dataset: VELOL, image_size: 40}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: [../small.yaml, ../velol.yaml]\ndata: {image_size: 48}\nmodel:\ncheckpoint: null\n")
    c = load_config(child)
    assert (c.model.unet_dim, c.model.dim_mults, c.diffusion.pad_multiple) == (8, (1, 2, 2), 8)
    assert (c.data.use_dataset, c.data.image_size, c.checkpoint) == ("VELOL", 48, None)
    assert load_config(child, ["data.image_size=64"]).data.image_size == 64
    assert load_config(tmp_path / "velol.yaml").checkpoint == "a.ckpt"


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: [a.yaml]\n"},
     r"b\.yaml: base a\.yaml: the base files form a cycle: .*/a\.yaml -> .*/b\.yaml -> .*/a\.yaml$"),
    ({"a.yaml": "base: a.yaml\n"}, r"a\.yaml: base a\.yaml: the base files form a cycle: .*/a\.yaml -> .*/a\.yaml$"),
    ({"a.yaml": "base: [b.yaml, nowhere.yaml]\n", "b.yaml": "seed: 1\n"},
     r"a\.yaml: base nowhere\.yaml: config file not found: .*/nowhere\.yaml$"),
    ({"a.yaml": "base: 3\n"}, r"a\.yaml: base: expected a config file name or a list of them"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "model: {unet_dimm: 8}\n"},
     r"b\.yaml: unknown config key 'model\.unet_dimm' \(did you mean 'unet_dim'\?\)$"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "data: [LOL]\n"}, r"b\.yaml: data\.: expected a mapping"),
    ({"a.yaml": "base: b.yaml\nsampler: {steps: 5}\n", "b.yaml": "seed: 1\n"},
     r"a\.yaml: sampler\.steps: the ddpm sampler visits all 100 timesteps"),
])
def test_base_errors_name_the_file_and_the_problem(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")


def test_a_file_reached_twice_through_different_bases_is_no_cycle(tmp_path):
    for name, text in {"a.yaml": "base: [b.yaml, c.yaml]\n", "b.yaml": "base: d.yaml\nseed: 2\n",
                       "c.yaml": "base: d.yaml\n", "d.yaml": "seed: 1\n"}.items():
        (tmp_path / name).write_text(text)
    assert load_config(tmp_path / "a.yaml").seed == 1  # c's base d comes after b


@pytest.mark.parametrize("path", sorted(CFG.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CFG)))
def test_every_config_loads_and_builds(path):
    config = load_config(path)
    with torch.device("meta"):  # shapes only: the paper's size builds as fast as a tiny one
        module = AnlightenDiff(config)
    assert sum(p.numel() for p in module.parameters()) > 0


BAD_SAMPLERS = [
    pytest.param({"sampler": "ddim", "steps": 2, "eta": -3.0}, "eta", id="negative_eta"),
    pytest.param({"sampler": "ddim", "steps": 2, "eta": float("nan")}, "eta", id="nan_eta"),
    pytest.param({"sampler": "ddim", "steps": 11}, "steps", id="more_steps_than_timesteps"),
    pytest.param({"sampler": "ddim", "steps": 0}, "steps", id="no_steps"),
    pytest.param({"sampler": "ddpm", "steps": 5}, "steps", id="ddpm_skipping_timesteps"),
    pytest.param({"sampler": "euler", "steps": 5}, "sampler", id="unknown_name"),
]
SMALL = {"model": {"unet_dim": 8, "dim_mults": [1, 2, 2]}, "diffusion": {"timesteps": 10, "pad_multiple": 8}}


@pytest.mark.parametrize("section", ["sampler", "val_sampler"])
@pytest.mark.parametrize("settings, key", BAD_SAMPLERS)
def test_sampler_and_val_sampler_are_validated_alike(section, settings, key):
    good = {"sampler": "ddim", "steps": 2}
    data = {**SMALL, "sampler": good, "val_sampler": good, section: settings}
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}\b"):
        config_from_dict(data)


@pytest.mark.parametrize("settings, key", BAD_SAMPLERS)
def test_the_flags_and_make_sampler_refuse_what_the_config_refuses(settings, key):
    args = argparse.Namespace(sampler=settings["sampler"], steps=settings["steps"], eta=settings.get("eta"), seed=None,
                              detail=None)
    with pytest.raises(UserError, match=rf"^--{key}\b"):
        sampler_from_args(args, SamplerConfig(), 10)
    _, diffusion = build_networks(config_from_dict({**SMALL, "sampler": {"sampler": "ddim", "steps": 2},
                                                    "val_sampler": {"sampler": "ddim", "steps": 2}}))
    with pytest.raises(ValueError, match=key):  # the samplers refuse what they cannot compute, in their words
        make_sampler(diffusion, settings["sampler"], settings["steps"], settings.get("eta", 0.0))


def test_every_sampler_name_of_the_choices_is_accepted():
    for name in typing.get_args(SamplerName):
        steps = 10 if name == "ddpm" else 2
        config = config_from_dict({**SMALL, "sampler": {"sampler": name, "steps": steps},
                                   "val_sampler": {"sampler": name, "steps": steps, "eta": 0.5}})
        assert config.val_sampler.sampler == name


def test_use_center_off_needs_stronger_cond_off():
    with pytest.raises(ConfigError, match=r"diffusion\.use_center: false needs model\.stronger_cond: false"):
        config_from_dict({"diffusion": {"use_center": False}})
    config = config_from_dict({"diffusion": {"use_center": False}, "model": {"stronger_cond": False}})
    assert not config.diffusion.use_center and not config.model.stronger_cond


def test_choices_are_declared_once_and_read_by_the_modules_that_own_them():
    assert set(typing.get_args(DatasetName)) == set(DATASET_COMBINATIONS)  # the datamodule maps every name
    assert KINDS == typing.get_args(SynthKind)
    with pytest.raises(ConfigError, match=r"^optim\.scheduler: expected one of \['cosine', 'plateau'\] or null"):
        config_from_dict({"optim": {"scheduler": "step"}})
    with pytest.raises(ConfigError, match=r"^optim\.he_loss\[1\]: 'ssim' is not one of \['msssim', 'lpips_vgg'"):
        config_from_dict({"optim": {"he_loss": ["l1", "ssim"], "he_loss_weights": [1.0, 1.0]}})
