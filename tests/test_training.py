from pathlib import Path

import pytest
import torch

import models.module
import train
from models import AnlightenDiff
from models.losses import DFPL, build_image_loss
from models.stages import has_unused_trained_parameters, required_lpips_nets
from tests.conftest import ROOT, TINY, train_steps
from tests.test_scripts import make_pairs
from utils.config import ConfigError, config_from_dict
from utils.lpips import LPIPSWeightsMissing
from utils.training import AtomicCheckpointIO, build_strategy, check_monitor, logged_metrics


def _batch(images):
    low, high = images
    return {"low": low, "high": high, "name": ["a", "b"]}


def test_training_steps_lower_the_loss(tiny_config, images, monkeypatch):
    torch.manual_seed(0)
    module = AnlightenDiff(tiny_config)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    losses = train_steps(module, module.configure_optimizers(), _batch(images), 15, seed=0)
    assert losses[-1] < 0.9 * losses[0]


def test_dfpl_training_steps_lower_the_loss(tiny_config, images, monkeypatch):
    tiny_config.optim.loss_type = "dfpl"
    tiny_config.optim.dfpl_image_loss = "l1"
    torch.manual_seed(0)
    module = AnlightenDiff(tiny_config)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    losses = train_steps(module, module.configure_optimizers(), _batch(images), 15, seed=0)
    assert losses[-1] < 0.9 * losses[0]


def test_encoder_is_frozen_unless_configured(tiny_config):
    module = AnlightenDiff(tiny_config)
    trained = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.model.parameters()}
    tiny_config.optim.train_encoder = True
    module = AnlightenDiff(tiny_config)
    trained = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in module.encoder.parameters()} <= trained


def test_dfpl_compares_images_rebuilt_from_noise(tiny_config, images):
    module = AnlightenDiff(tiny_config)
    d = module.model
    low, high = images
    x0 = d.img2res(high, low)
    t = torch.tensor([3, 7])
    eps_star = torch.randn_like(x0)
    l1 = DFPL(build_image_loss("l1"))
    assert l1(d, x0, t, high, low, eps_star, eps_star).total.item() == 0.0
    shifted = l1(d, x0, t, high, low, eps_star + 0.1, eps_star).total.item()
    assert shifted > 0
    # the two images are q_sample(x0, t, c, eps_hat) and q_sample(x0, t, c, eps*), mapped to [0, 1]
    rebuilt = [d.res2img(d.q_sample(x0, t, high, eps), low) for eps in (eps_star + 0.1, eps_star)]
    expected = l1.image_loss(*rebuilt)
    assert shifted == expected.item()


def test_non_finite_loss_names_the_step(tiny_config, images, monkeypatch):
    module = AnlightenDiff(tiny_config)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    batch = _batch(images)
    batch["high"] = batch["high"] * float("nan")
    try:
        module.training_step(batch, 0)
    except FloatingPointError as err:
        assert "step 0" in str(err)
    else:
        raise AssertionError("a NaN loss must stop training")


@pytest.mark.lpips_weights
def test_lpips_networks_stay_out_of_the_state_dict(tiny_config, images, monkeypatch):
    tiny_config.optim.loss_type = "dfpl"
    tiny_config.optim.dfpl_image_loss = "lpips_alex"
    module = AnlightenDiff(tiny_config)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    keys = set(module.state_dict())
    assert module._lpips_model() is not None
    high = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert module.training_step({"low": high * 0.2, "high": high, "name": ["a", "b"]}, 0).item() > 0
    assert set(module.state_dict()) == keys
    assert all(k.startswith(("model.", "encoder.")) for k in keys)


def test_training_without_drda_uses_no_anchor_and_no_encoder_features(images, monkeypatch):
    """use_center false (with stronger_cond false, the only combination the reference runs): the loss is plain
    DDPM's, mse(UNet(sqrt(abar) x0 + sqrt(1 - abar) eps, t, lr), eps), and the anchor encoder is not run."""
    config = config_from_dict({"model": {"unet_dim": 8, "dim_mults": [1, 2, 2], "stronger_cond": False},
                               "diffusion": {"timesteps": 10, "pad_multiple": 8, "use_center": False},
                               "sampler": {"sampler": "ddpm", "steps": 10},
                               "val_sampler": {"sampler": "ddim", "steps": 2},
                               "optim": {"loss_type": "l2", "optimizer": "adamw", "ref_prob": 1.0}})
    torch.manual_seed(0)
    module = AnlightenDiff(config)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)

    def no_encoder(*args):
        raise AssertionError("the anchor encoder ran in a training step without DRDA")

    monkeypatch.setattr(module.encoder, "forward", no_encoder)
    low, high = images
    torch.manual_seed(5)
    loss = module.training_step(_batch(images), 0)
    torch.manual_seed(5)  # the same draws, in the reference's order: t, then eps
    d = module.model
    t = torch.randint(0, 10, (2,))
    eps = torch.randn(2, 3, 16, 24)
    x0 = 2 * (high - low) - 1
    abar = d.alphas_cumprod[t].reshape(2, 1, 1, 1)
    eps_hat = d.unet(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, low, [])
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(eps_hat, eps).item(), rel=1e-6)


UNUSED_CASES = {
    "frozen_encoder": {},
    "frozen_encoder_no_stronger_cond": {"model": {"stronger_cond": False}},
    "no_drda": {"model": {"stronger_cond": False}, "diffusion": {"use_center": False}},
    "trained_encoder": {"optim": {"train_encoder": True}},
    "trained_encoder_no_drda": {"model": {"stronger_cond": False}, "diffusion": {"use_center": False},
                                "optim": {"train_encoder": True}},
    "anchor_stage": {"stage": "anchor", "optim": {"anchor_target": "hr", "anchor_loss": ["l1"],
                                                  "anchor_loss_weights": [1.0]}},
    "he_stage": {"stage": "he", "model": {"he_network": True, "stronger_cond": False, "cond_on_res": False},
                 "optim": {"he_loss": ["l1"], "he_loss_weights": [1.0]}},
}


@pytest.mark.parametrize("case", list(UNUSED_CASES))
def test_ddp_looks_for_unused_parameters_exactly_when_a_trained_one_goes_unused(case, images, monkeypatch):
    """Training steps with and without teacher forcing: the trained parameters left without a gradient decide
    whether DDP needs find_unused_parameters (it costs a graph traversal per step when set needlessly)."""
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in TINY.items()}
    for section, values in UNUSED_CASES[case].items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    config = config_from_dict(data)
    torch.manual_seed(0)
    module = AnlightenDiff(config)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    unused = set()
    for ref_prob in (0.0, 1.0):
        module.config.optim.ref_prob = ref_prob
        module.prepare_training(has_validation=False)  # the objective of the changed config
        module.zero_grad(set_to_none=True)
        module.training_step(_batch(images), 0).backward()
        unused |= {name for name, p in module.named_parameters() if p.requires_grad and p.grad is None}
    config.trainer.strategy = "ddp"
    strategy = build_strategy(config, has_unused_trained_parameters(config))
    assert strategy._ddp_kwargs["find_unused_parameters"] == bool(unused), sorted(unused)[:5]
    assert has_unused_trained_parameters(config) == bool(unused)


@pytest.mark.lpips_weights
def test_validation_logs_exactly_the_metrics_a_monitor_may_follow(tiny_config, images, monkeypatch):
    """check_monitor refuses what logged_metrics leaves out: validation must log every one of them, and no other."""
    module = AnlightenDiff(tiny_config)
    names: set[str] = set()
    monkeypatch.setattr(module, "log_dict", lambda values, **k: names.update(values))
    monkeypatch.setattr(module, "_log_grid", lambda *a: None)
    low, high = (torch.nn.functional.interpolate(x, size=(64, 64)) for x in images)
    module.validation_step({"low": low, "high": high, "name": ["a", "b"]}, 0)
    assert names == set(logged_metrics(True)) - {"train/loss"}
    for name in logged_metrics(True):
        tiny_config.trainer.monitor = name
        check_monitor(tiny_config, has_validation=True)
    tiny_config.trainer.monitor, tiny_config.optim.scheduler = "val/psnr", "plateau"
    with pytest.raises(ConfigError, match=r"trainer\.monitor: 'val/psnr'.*no validation"):
        check_monitor(tiny_config, has_validation=False)


@pytest.mark.parametrize("overrides, validation, nets", [
    ({"optim": {"loss_type": "dfpl"}}, True, ["alex", "vgg"]),  # the faithful DFPL-VGG, monitor val/combined
    ({"optim": {"loss_type": "dfpl"}}, False, ["vgg"]),  # nothing follows val/combined without validation
    ({"optim": {"loss_type": "dfpl", "dfpl_image_loss": "l1"}, "trainer": {"monitor": "val/psnr"}}, True, []),
    ({"optim": {"loss_type": "l2"}, "trainer": {"monitor": "val/lpips"}}, True, ["alex"]),
    ({"optim": {"loss_type": "l2"}, "trainer": {"monitor": "val/lpips", "save_top_k": 0}}, True, []),
    ({"optim": {"loss_type": "dfpl", "dfpl_image_loss": "lpips_alex"}, "trainer": {"monitor": "val/ssim"}}, True,
     ["alex"]),
])
def test_the_lpips_networks_a_run_needs_are_checked_before_it_starts(overrides, validation, nets, monkeypatch):
    config = config_from_dict({**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in overrides.items()}})
    assert required_lpips_nets(config, validation) == nets
    module = AnlightenDiff(config)
    monkeypatch.setattr(models.module, "lpips_available", lambda net: False)
    if nets:
        with pytest.raises(LPIPSWeightsMissing, match=rf"LPIPS-{nets[0]} .*python -m utils\.lpips_weights"):
            module.prepare_training(validation)
    else:
        module.prepare_training(validation)


@pytest.mark.parametrize("max_steps, saved_at", [(3, [2, 3]), (4, [2, 4])])
def test_last_ckpt_is_saved_every_period_and_at_the_final_step_once(tmp_path, monkeypatch, max_steps, saved_at):
    """The ModelCheckpoint saves last.ckpt every trainer.checkpoint_every_n_steps; SaveFinalCheckpoint adds the final
    step when it is not one of those, and does not write it twice when it is."""
    steps, save = [], AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt":
            steps.append(checkpoint["global_step"])
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    data = make_pairs(tmp_path / "pairs", n=2, size=(40, 48))  # one step per epoch
    assert train.main(["--cfg", str(ROOT / "cfg/train/tiny.yaml"), f"data.extra_train_folders=[{data}]",
                       f"trainer.output_dir={tmp_path / 'runs'}", "trainer.max_epochs=100",
                       f"trainer.max_steps={max_steps}", "trainer.checkpoint_every_n_steps=2", "--no-test"]) == 0
    assert steps == saved_at
