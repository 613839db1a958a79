"""The paper's two-step (TS) variant: the HE network H, the screen-blend anchor, the three training stages, the TS
checkpoint layout and the TS test geometry (REFERENCE_SEMANTICS_TS.md)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import models.anchored_diffusion
import models.inference
import models.module
import models.tiling
import test as test_script
import train
from models import AnlightenDiff, CheckpointError, load_checkpoint
from models.anchor import HENetwork, anchor_from_features, condition_features, equalized, screen_blend
from models.anchored_diffusion import AnchoredDiffusion
from models.build import build_he_network, build_networks
from models.checkpoint import export_checkpoint
from models.inference import encode
from models.stages import missing_earlier_stage
from tests.conftest import TINY, load_bench, train_steps
from tests.test_checkpoint import SCALE, _official_layout
from utils.cli import UserError
from utils.config import Config, ConfigError, config_from_dict, load_config
from utils.memory import retain_freed_memory
from utils.metrics import center_crop_boxes

ROOT = Path(__file__).resolve().parents[1]
TS_MODEL = {"cond_on_res": False, "stronger_cond": False, "he_network": True}
TS_TINY = {**TINY, "model": {**TINY["model"], **TS_MODEL}, "optim": {**TINY["optim"], "ref_prob": 0.0}}
HE_STAGE = {**TS_TINY, "stage": "he", "init_from": "unused.ckpt",
            "optim": {**TS_TINY["optim"], "he_loss": ["l1"], "he_loss_weights": [1.0]}}
ANCHOR_STAGE = {**TINY, "stage": "anchor", "model": {**TINY["model"], "cond_on_res": False, "stronger_cond": False},
                "optim": {**TINY["optim"], "anchor_loss": ["l1"], "anchor_loss_weights": [1.0]}}


def _module(config: dict) -> AnlightenDiff:
    torch.manual_seed(0)
    module = AnlightenDiff(config_from_dict(config))
    module.log = lambda *a, **k: None
    return module


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _image(height: int = 16, width: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 0.3


# ------------------------------------------------------------------------------------------- networks
def test_faithful_ts_parameter_counts():
    """The spec's table (section 2), on the meta device: no memory, no time."""
    config = load_config(ROOT / "cfg/train/ts_diffusion.yaml")
    with torch.device("meta"):
        encoder, diffusion = build_networks(config)
        he_network = build_he_network(config)
    assert _count(diffusion.unet) == 37_769_798
    assert _count(encoder) == 37_773_638
    assert _count(he_network) == 37_769_798
    entries = [len(diffusion.unet.state_dict()), len(encoder.state_dict()), len(he_network.state_dict())]
    assert entries == [254, 254, 254]
    assert len(diffusion.state_dict()) - entries[0] == 14  # the schedule buffers


def test_he_network_is_a_clamped_residual_on_the_equalised_image():
    torch.manual_seed(0)
    net = HENetwork(dim=8, dim_mults=(1, 2, 2))
    he, img_c = equalized(_image()), torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        net.final_conv[-1].bias.fill_(0.6)  # push part of the output past 1
        out, _ = net.run(torch.cat((he, img_c), dim=1))
        zeta = net(he, img_c)
    assert torch.equal(zeta, (out + he).clamp(0, 1))
    assert zeta.max() == 1.0 and (out + he).max() > 1.05  # the clamp did act
    net.on_res = False
    with torch.no_grad():
        assert torch.equal(net(he, img_c), torch.sigmoid(out))
        net.on_res = True
        conv = net.final_conv[-1]
        conv.parametrizations.weight.original0.zero_()
        conv.bias.zero_()
        assert torch.equal(net(he, img_c), he)  # a zero residual gives HE(lr) itself


def test_screen_blend_values():
    zeta = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.9])
    img_c = torch.tensor([0.3, 0.3, 0.5, 0.25, 0.0])
    expected = torch.tensor([0.3, 1.0, 0.75, 0.4, 0.9])
    assert torch.allclose(screen_blend(zeta, img_c), expected, atol=1e-7)
    grid = torch.rand(2, 1000, generator=torch.Generator().manual_seed(0))
    blended = screen_blend(grid[0], grid[1])
    assert torch.allclose(blended, 1 - (1 - grid[0]) * (1 - grid[1]), atol=1e-6)
    assert (blended >= torch.maximum(grid[0], grid[1]) - 1e-7).all() and blended.max() <= 1.0


def test_ts_anchor_is_the_screen_blend_of_h_on_the_sigmoid_encoder():
    module = _module(TS_TINY).eval()
    low = _image()
    with torch.no_grad():
        center, feats = module.method.anchor(low)
        features = condition_features(low)
        out, expected_feats = module.encoder.run(features)
        img_c = torch.sigmoid(out)
        he_out, _ = module.he_network.run(torch.cat((equalized(low), img_c), dim=1))
        zeta = (he_out + equalized(low)).clamp(0, 1)
    assert torch.allclose(center, zeta + (1 - zeta) * img_c, atol=1e-6)
    assert not torch.allclose(center, img_c, atol=1e-2)  # H does change the anchor
    assert all(torch.equal(a, b) for a, b in zip(feats, expected_feats, strict=True))
    fs_like = _module({**TINY, "model": {**TINY["model"], "cond_on_res": False, "stronger_cond": False}}).eval()
    with torch.no_grad():  # the same function without H: the encoder's own output
        assert torch.equal(fs_like.method.anchor(low)[0], anchor_from_features(fs_like.encoder, features)[0])


def test_the_ts_unet_ignores_the_encoder_features():
    module = _module(TS_TINY).eval()
    low = _image()
    x_t, t = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(3)), torch.tensor([4])
    with torch.no_grad():
        _, feats = module.method.anchor(low)
        with_feats = module.model.unet(x_t, t, low, feats)
        garbage = module.model.unet(x_t, t, low, [torch.full_like(f, 7.0) for f in feats])
        without = module.model.unet(x_t, t, low, [])
    assert torch.equal(with_feats, without) and torch.equal(garbage, without)


def test_untiled_enhance_and_encode_give_the_modules_anchor():
    module = _module(TS_TINY).eval()
    low = _image(16, 24)  # a multiple of pad_multiple 8: no padding
    with torch.no_grad():
        center, feats = module.method.anchor(low)
        encoded, encoded_feats = encode(module.encoder, condition_features(low), he_network=module.he_network)
        anchored = module.enhance(low, config_from_dict({"sampler": {"sampler": "anchor"}}).sampler)
        sampled = module.enhance(low, config_from_dict({"sampler": {"sampler": "ddim", "steps": 2}}).sampler)
        without_h, _ = encode(module.encoder, condition_features(low))
    assert torch.equal(encoded, center)
    assert all(torch.equal(a, b) for a, b in zip(encoded_feats, feats, strict=True))
    assert torch.equal(anchored.anchor, center.clamp(0, 1)) and torch.equal(sampled.anchor, center.clamp(0, 1))
    assert not torch.allclose(without_h, center, atol=1e-2)


def test_no_copy_of_the_anchor_formula_outside_models_anchor():
    """One function computes the anchor; the module and the tiling path call it."""
    for source in (inspect.getsource(module) for module in (models.inference, models.tiling, models.module,
                                                            models.anchored_diffusion)):
        assert "sigmoid" not in source and "3:6" not in source and "(1 - zeta)" not in source
    assert "anchor_from_features" in inspect.getsource(models.inference.encode)
    assert "anchor_from_features" in inspect.getsource(AnchoredDiffusion.anchor)


# ------------------------------------------------------------------------------------------- configs
def test_ts_stage_configs():
    encoder, he, diffusion = (load_config(ROOT / f"cfg/train/ts_{n}.yaml") for n in ("encoder", "he", "diffusion"))
    assert (encoder.stage, he.stage, diffusion.stage) == ("anchor", "he", "diffusion")
    optim = encoder.optim
    assert (optim.anchor_target, optim.anchor_loss, optim.optimizer) == ("chroma", ("msssim",), "lion")
    assert (he.optim.he_loss, he.optim.optimizer, he.optim.weight_decay) == (("lpips_vgg",), "adamw", 0.01)
    assert (diffusion.optim.loss_type, diffusion.optim.ref_prob, diffusion.optim.optimizer) == ("l2", 0.0, "lion")
    assert not diffusion.optim.train_encoder
    assert {c.optim.lr for c in (encoder, he, diffusion)} == {4e-4}
    assert he.init_from.startswith("runs/ts_encoder/") and diffusion.init_from.startswith("runs/ts_he/")
    assert he.model == diffusion.model and he.model.he_network and he.model.he_on_res
    assert encoder.model == config_from_dict({"model": {**he.model.__dict__, "he_network": False}}).model
    assert not he.model.cond_on_res and not he.model.stronger_cond
    assert he.model.dim_mults == (1, 2, 2, 4, 4, 8) and he.model.unet_dim == 64
    assert {c.data.train_batch_size for c in (encoder, he, diffusion)} == {32}
    test = load_config(ROOT / "cfg/test/LOL_TS.yaml")
    assert test.data.test_geometry == "center_crop" and test.sampler.sampler == "ddpm"


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"he_network": True}}, "cond_on_res: false"),
    ({"model": {**TS_MODEL}, "diffusion": {"use_center": False}}, "use_center"),
    ({"stage": "he"}, "he_network: true"),
    ({"stage": "he", "model": TS_MODEL, "optim": {"train_encoder": True}}, "train_encoder: false"),
    ({"stage": "anchor", "model": TS_MODEL}, "he_network"),
    ({"optim": {"he_loss": ["lpips_vgg", "l1"]}}, "he_loss_weights"),
    ({"optim": {"he_loss": ["ssim"]}}, "he_loss"),
    ({"data": {"test_geometry": "crop"}}, "test_geometry"),
])
def test_bad_ts_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides)


def test_later_stages_need_init_from(tmp_path):
    assert "init_from" in missing_earlier_stage(config_from_dict({**HE_STAGE, "init_from": None}))
    assert "ts_he.yaml" in missing_earlier_stage(config_from_dict(TS_TINY))
    assert missing_earlier_stage(config_from_dict(TINY)) is None  # FS: the reference's frozen random encoder
    assert missing_earlier_stage(config_from_dict(HE_STAGE)) is None
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="stage he trains the HE network on a frozen anchor encoder"):
        train.main(["--cfg", str(ROOT / "cfg/train/ts_he.yaml"), "init_from=null", f"trainer.output_dir={runs}"])
    assert not runs.exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------- stages
def test_he_stage_trains_h_alone_and_lowers_its_loss(images):
    module = _module(HE_STAGE)
    optimizer = module.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.he_network.parameters()}
    assert not any(p.requires_grad for p in [*module.encoder.parameters(), *module.model.parameters()])
    frozen = [p.detach().clone() for p in [*module.encoder.parameters(), *module.model.parameters()]]
    batch = {"low": images[0], "high": images[1], "name": ["a", "b"]}
    losses = train_steps(module, optimizer, batch, 15)
    assert losses[-1] < 0.9 * losses[0]
    with torch.no_grad():
        zeta = module.method.he_output(images[0])
        assert module.training_step(batch, 0).item() == pytest.approx(
            torch.nn.functional.l1_loss(zeta, images[1]).item(), rel=1e-5)
    after = [*module.encoder.parameters(), *module.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))


def test_diffusion_stage_uses_the_ts_anchor_and_trains_the_unet_alone(images):
    module = _module(TS_TINY)
    optimizer = module.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.model.unet.parameters()}
    low, high = images
    torch.manual_seed(5)
    loss = module.training_step({"low": low, "high": high, "name": ["a", "b"]}, 0)
    torch.manual_seed(5)  # the same draws: t, then eps (ref_prob 0: no teacher forcing)
    d = module.model
    t = torch.randint(0, 10, (2,))
    eps = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        center, _ = module.method.anchor(low)
        eps_star = eps + d.extra_term_coef1[t].reshape(2, 1, 1, 1) * (2 * center - 1)
        abar = d.alphas_cumprod[t].reshape(2, 1, 1, 1)
        x_t = abar.sqrt() * (2 * (high - low) - 1) + (1 - abar).sqrt() * eps_star
        expected = torch.nn.functional.mse_loss(d.unet(x_t, t, low, []), eps_star)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _save(module: AnlightenDiff, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _perturb(network: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_init_from_hands_the_encoder_then_both_networks_on(tmp_path):
    first = _module(ANCHOR_STAGE)
    _perturb(first.encoder, 1)
    first_ckpt = _save(first, tmp_path / "encoder.ckpt")
    he_stage = _module({**HE_STAGE, "init_from": str(first_ckpt)})
    he_before = {k: v.clone() for k, v in he_stage.he_network.state_dict().items()}
    assert train.init_from_earlier_stage(he_stage, str(first_ckpt)) == ["encoder"]
    assert all(torch.equal(v, he_stage.encoder.state_dict()[k]) for k, v in first.encoder.state_dict().items())
    assert all(torch.equal(v, he_stage.he_network.state_dict()[k]) for k, v in he_before.items())  # H untouched
    _perturb(he_stage.he_network, 2)
    he_ckpt = _save(he_stage, tmp_path / "he.ckpt")
    final = _module({**TS_TINY, "init_from": str(he_ckpt)})
    assert train.init_from_earlier_stage(final, str(he_ckpt)) == ["encoder", "he_network"]
    for network, source in ((final.encoder, first.encoder), (final.he_network, he_stage.he_network)):
        assert all(torch.equal(v, network.state_dict()[k]) for k, v in source.state_dict().items())
        assert not any(p.requires_grad for p in network.parameters())
    with pytest.raises(CheckpointError, match=r"holds no HE network \(he_network\.\*\), which stage diffusion"):
        train.init_from_earlier_stage(final, str(first_ckpt))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train.init_from_earlier_stage(final, str(tmp_path / "missing.ckpt"))
    wider = _module({**TS_TINY, "model": {**TS_TINY["model"], "unet_dim": 16, "cond_dim": 8}})
    with pytest.raises(CheckpointError, match="does not hold an HE network matching"):
        train.init_from_earlier_stage(wider, str(he_ckpt))


def test_the_last_stages_checkpoint_is_the_inference_checkpoint(tmp_path):
    module = _module(TS_TINY).eval()
    _perturb(module.he_network, 3)
    path = _save(module, tmp_path / "ts_diffusion.ckpt")
    low = _image(16, 24)
    small = export_checkpoint(path, tmp_path / "small.ckpt")
    for loaded in (load_checkpoint(path), load_checkpoint(small)):
        assert loaded.he_network is not None and loaded.config.model.he_network
        assert set(loaded.state_dict()) == set(module.state_dict())
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.state_dict().items())
        with torch.no_grad():
            assert torch.equal(loaded.method.anchor(low)[0], module.method.anchor(low)[0])
    assert any(k.startswith("he_network.") for k in torch.load(small, weights_only=True)["state_dict"])


def test_bench_speed_runs_a_ts_checkpoint_with_its_he_network(tmp_path, monkeypatch):
    """bench/speed.py --ckpt on a TS checkpoint times and scores the anchor with H in it, as test.py enhances
    (without H it would report the anchor and the samplers of another model)."""
    from utils.metrics import mean_scores, score_pairs, to_uint8

    bench = load_bench("speed", monkeypatch)
    module = _module(TS_TINY).eval()
    _perturb(module.he_network, 4)
    networks, _ = bench.build(SimpleNamespace(ckpt=str(_save(module, tmp_path / "ts.ckpt"))), torch.device("cpu"))
    assert {name for name, _ in networks.named_children()} == {"encoder", "model", "he_network"}
    low = _image(16, 24)
    high = to_uint8((low[0] * 2.5).clamp(0, 1))
    try:
        rows = bench.quality_rows(networks, [(low, high)], module.config.diffusion.pad_multiple, [("anchor", 1)])
    finally:
        retain_freed_memory(False)  # the bench switches glibc's allocator mode for the whole process
    with torch.no_grad():
        expected = mean_scores(score_pairs([(module.method.anchor(low)[0].clamp(0, 1)[0], high)]), ("psnr", "ssim"))
        without_h = mean_scores(score_pairs([(module.encoder(low)[0].clamp(0, 1)[0], high)]),
                                ("psnr",))
    assert rows[0]["psnr"] == pytest.approx(expected["psnr"], abs=1e-3)
    assert rows[0]["ssim"] == pytest.approx(expected["ssim"], abs=1e-4)
    assert rows[0]["psnr"] != pytest.approx(without_h["psnr"], abs=1e-3)


@pytest.mark.slow
def test_the_three_stages_run_through_train_py(tmp_path):
    """ts_encoder -> ts_he -> ts_diffusion with tiny overrides: each stage's last.ckpt feeds the next, and the
    last one loads for inference with the first stage's encoder and the second stage's HE network."""
    data = tmp_path / "pairs"
    rng = np.random.default_rng(0)
    for sub in ("low", "high"):
        (data / sub).mkdir(parents=True)
    for i in range(3):
        high = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(high).save(data / "high" / f"{i}.png")
        Image.fromarray((high * 0.2).astype(np.uint8)).save(data / "low" / f"{i}.png")
    tiny = ["model.unet_dim=8", "model.dim_mults=[1,2,2]", "diffusion.timesteps=10", "diffusion.pad_multiple=8",
            "sampler.steps=10", "val_sampler={sampler: ddim, steps: 2}", "data.use_dataset=folder",
            f"data.extra_train_folders=[{data}]", f"data.val_folder={data}", "data.image_size=32",
            "data.train_batch_size=2", "data.num_workers=0", "trainer.max_steps=2", "trainer.max_epochs=1",
            "trainer.monitor=val/psnr", f"trainer.output_dir={tmp_path / 'runs'}", "--no-test"]
    last = {}
    for name in ("encoder", "he", "diffusion"):
        extra = {"encoder": ["optim.anchor_loss=[l1]"],  # 4-scale MS-SSIM needs crops over 90 px
                 "he": ["optim.he_loss=[l1]", f"init_from={last.get('encoder')}"],
                 "diffusion": [f"init_from={last.get('he')}"]}[name]
        assert train.main(["--cfg", str(ROOT / f"cfg/train/ts_{name}.yaml"), *tiny, *extra]) == 0
        last[name] = tmp_path / "runs" / f"ts_{name}" / "version_0" / "checkpoints" / "last.ckpt"
        assert last[name].is_file()
    encoder, he, final = (load_checkpoint(last[name]) for name in ("encoder", "he", "diffusion"))
    assert final.config.stage == "diffusion" and final.he_network is not None
    for network, source in ((final.encoder, encoder.encoder), (final.he_network, he.he_network)):
        assert all(torch.equal(v, network.state_dict()[k]) for k, v in source.state_dict().items())
    assert any(not torch.equal(v, he.model.state_dict()[k]) for k, v in final.model.state_dict().items())


# ------------------------------------------------------------------------------------------- TS layout
def _expected_ts_layout() -> dict[str, tuple[int, ...]]:
    """The TS checkpoint's entries derived from the FS key list by the spec's rules (section 6): the UNet loses
    downs.k.1.res_conv and downs.k.1.block1 takes d_out channels; E appears twice, H has the TS UNet's names."""
    fs = _official_layout()
    unet = {}
    for key, shape in fs.items():
        if not key.startswith("model.unet."):
            continue
        suffix = key.removeprefix("model.unet.")
        parts = suffix.split(".")
        if parts[0] == "downs" and parts[2] == "1" and parts[3] == "res_conv":
            continue
        if parts[0] == "downs" and parts[2] == "1" and suffix.endswith("block1.block.1.weight_v"):
            shape = (shape[0], shape[1] // 2, *shape[2:])
        unet[suffix] = shape
    layout = {k: v for k, v in fs.items() if k.startswith("model.") and not k.startswith("model.unet.")}
    layout |= {f"model.unet.{k}": v for k, v in unet.items()}
    layout |= {f"histroEncoder.model.{k}": v for k, v in unet.items()}
    for key, shape in fs.items():
        if key.startswith("encoder."):
            layout[f"encoder.model.{key.removeprefix('encoder.')}"] = shape
            layout[f"histroEncoder.encoder.model.{key.removeprefix('encoder.')}"] = shape
    return layout


def _legacy(key: str) -> str:
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


TS_PREFIXES = {"model.": "model.", "encoder.": "encoder.model.", "he_network.": "histroEncoder.model."}


def _write_two_step(path: Path, module: AnlightenDiff, *, with_h: bool = True, with_hparams: bool = True,
                    tamper_copy: bool = False) -> Path:
    """Save ``module`` the way the TS reference's Lightning 1.x LitDiffusion would: its attribute paths, E twice,
    legacy weight-norm names, LPIPS modules, a flat hparams dict."""
    state = {}
    for key, value in module.state_dict().items():
        ours = next(p for p in TS_PREFIXES if key.startswith(p))
        if ours == "he_network." and not with_h:
            continue
        state[_legacy(TS_PREFIXES[ours] + key.removeprefix(ours))] = value
        if ours == "encoder.":
            copy = value.clone()
            if tamper_copy and key.endswith("final_conv.1.bias"):
                copy += 1e-3
            state[_legacy("histroEncoder.encoder.model." + key.removeprefix(ours))] = copy
    state["lpips.net.slice1.0.weight"] = torch.zeros(4, 3, 3, 3)
    state["loss_fn_alex.net.lin0.model.1.weight"] = torch.zeros(1, 4, 1, 1)
    checkpoint = {"epoch": 937, "global_step": 4321, "pytorch-lightning_version": "1.9.4", "state_dict": state,
                  "loops": {}, "callbacks": {}, "optimizer_states": [{}], "lr_schedulers": []}
    if with_hparams:
        checkpoint["hyper_parameters"] = {
            "unet_dim": 64 // SCALE, "dim_mults": (1, 2, 2, 4, 4, 8), "in_dim": 6, "timesteps": 100, "use_wn": True,
            "cond_use_wn": True, "stronger_cond": False, "cond_on_res": False, "on_res": True, "loss_type": "l2",
            "on_center": "img_c", "on_cond": "img_lr", "zeta": "h_theta(img_lr)", "he_lr": 4e-4}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def ts_module() -> AnlightenDiff:
    torch.manual_seed(0)
    module = AnlightenDiff(config_from_dict({"model": {"unet_dim": 64 // SCALE, **TS_MODEL}})).eval()
    with torch.no_grad():  # weight norm's g away from ||v||, so a mis-mapped key would show
        for name, p in module.named_parameters():
            if name.endswith("original0"):
                p.mul_(1.5)
    return module


def test_synthetic_ts_layout_is_the_specs(ts_module, tmp_path):
    path = _write_two_step(tmp_path / "twostep_final.ckpt", ts_module)
    state = torch.load(path, weights_only=True)["state_dict"]
    model_keys = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(("lpips.", "loss_fn_alex."))}
    expected = _expected_ts_layout()
    assert len(expected) == 1030
    assert model_keys == expected


@pytest.mark.parametrize("with_hparams", [True, False])
def test_ts_checkpoint_loads_strictly_and_reproduces_outputs(ts_module, tmp_path, with_hparams):
    loaded = load_checkpoint(_write_two_step(tmp_path / "twostep_final.ckpt", ts_module, with_hparams=with_hparams))
    m = loaded.config.model
    assert (m.he_network, m.cond_on_res, m.stronger_cond, m.he_on_res, m.unet_dim) == (True, False, False, True, 8)
    low = _image(64, 64, seed=4)
    t = torch.tensor([37])
    with torch.no_grad():
        c1, f1 = ts_module.method.anchor(low)
        c2, f2 = loaded.method.anchor(low)
        e1 = ts_module.model.unet(2 * c1 - 1, t, low, f1)
        e2 = loaded.model.unet(2 * c2 - 1, t, low, f2)
    assert torch.equal(c1, c2) and torch.equal(e1, e2)  # H and the UNet, same names and shapes, not swapped


def test_ts_checkpoint_without_h_is_refused(ts_module, tmp_path):
    path = _write_two_step(tmp_path / "no_h.ckpt", ts_module, with_h=False)
    with pytest.raises(CheckpointError, match=r"no_h.ckpt: .*without the HE network H \(histroEncoder\.model\.\*\)"):
        load_checkpoint(path)


def test_ts_checkpoint_with_differing_encoder_copies_is_refused(ts_module, tmp_path):
    path = _write_two_step(tmp_path / "tampered.ckpt", ts_module, tamper_copy=True)
    with pytest.raises(CheckpointError, match=r"two copies of the anchor encoder .* differ in 1 tensor.*final_conv"):
        load_checkpoint(path)


def test_ts_checkpoint_exports_to_this_projects_layout(ts_module, tmp_path):
    small = export_checkpoint(_write_two_step(tmp_path / "twostep_final.ckpt", ts_module), tmp_path / "small.ckpt")
    keys = set(torch.load(small, weights_only=True)["state_dict"])
    assert keys == set(ts_module.state_dict()) and len(keys) == 14 + 3 * 254
    loaded = load_checkpoint(small)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ts_module.state_dict().items())


# ------------------------------------------------------------------------------------------- geometry
def test_center_crop_boxes_for_lol_and_the_two_rounding_rules():
    assert center_crop_boxes(400, 600, 32) == ((8, 12, 384, 576), (8, 12, 384, 576))
    assert center_crop_boxes(400, 600, 32, reference_protocol=True) == ((8, 12, 384, 576), (8, 12, 384, 576))
    # margins 3 and 7 (3 mod 4): torchvision rounds 1.5 -> 2 and 3.5 -> 4, the metric floors to 1 and 3
    assert center_crop_boxes(35, 39, 32, reference_protocol=True) == ((2, 4, 32, 32), (1, 3, 32, 32))
    assert center_crop_boxes(35, 39, 32) == ((1, 3, 32, 32), (1, 3, 32, 32))
    img = torch.arange(3 * 80 * 80, dtype=torch.float32).reshape(3, 80, 80)
    for height, width in ((45, 71), (33, 70), (64, 64), (43, 35), (79, 80)):
        (top, left, h, w), _ = center_crop_boxes(height, width, 32, reference_protocol=True)
        crop = img[:, :height, :width]
        assert torch.equal(crop[:, top:top + h, left:left + w], TF.center_crop(crop, [h, w]))
    with pytest.raises(ValueError, match="no centred crop"):
        center_crop_boxes(31, 600, 32)


def test_fit_geometry_crops_input_and_ground_truth():
    low, high = torch.rand(3, 400, 600), torch.rand(3, 400, 600)
    item = {"low": low, "high": high, "name": "1.png"}
    assert test_script.fit_geometry(item, "pad", 32, True) == (low, high)
    cropped_low, cropped_high = test_script.fit_geometry(item, "center_crop", 32, False)
    assert torch.equal(cropped_low, low[:, 8:392, 12:588]) and torch.equal(cropped_high, high[:, 8:392, 12:588])
    with pytest.raises(UserError, match="1.png: .*no centred crop"):
        test_script.fit_geometry({**item, "low": low[:, :20]}, "center_crop", 32, False)


def test_test_py_scores_the_ts_centre_crop(tmp_path):
    module = _module(TS_TINY).eval()
    ckpt = _save(module, tmp_path / "ts.ckpt")
    data = tmp_path / "pairs"
    rng = np.random.default_rng(0)
    for sub in ("low", "high"):
        (data / sub).mkdir(parents=True)
    high = (rng.random((35, 43, 3)) * 255).astype(np.uint8)  # margins 3 and 3 to the multiple 8
    low = (high * 0.2).astype(np.uint8)
    Image.fromarray(high).save(data / "high" / "a.png")
    Image.fromarray(low).save(data / "low" / "a.png")
    out = tmp_path / "results"
    code = test_script.main(["--cfg", str(ROOT / "cfg/test/LOL_TS.yaml"), "--ckpt", str(ckpt), "--test-folder",
                             str(data), "--output", str(out), "--sampler", "ddim", "--steps", "2", "--device", "cpu",
                             "--reference-protocol"])
    assert code == 0
    enhanced = np.asarray(Image.open(out / "a.png"))
    assert enhanced.shape == (32, 40, 3)
    report = json.loads((out / "metrics.json").read_text())
    from utils.metrics import psnr
    assert report["per_image"][0]["psnr"] == pytest.approx(psnr(enhanced, high[1:33, 1:41]), abs=1e-9)
    expected_in = torch.from_numpy(low[2:34, 2:42].astype(np.float32) / 255).permute(2, 0, 1)[None]
    wrong_in = torch.from_numpy(low[1:33, 1:41].astype(np.float32) / 255).permute(2, 0, 1)[None]
    sampler = config_from_dict({"sampler": {"sampler": "ddim", "steps": 2}}).sampler
    with torch.no_grad():
        right = (module.enhance(expected_in, sampler).image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        wrong = (module.enhance(wrong_in, sampler).image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    diff = np.abs(enhanced.astype(int) - right.astype(int))
    assert diff.max() <= 1  # the reference's input offsets (2, 2), up to folded-weight-norm rounding
    assert np.abs(enhanced.astype(int) - wrong.astype(int)).mean() > 10 * diff.mean() + 0.5


def test_default_config_is_still_fs():
    config = Config()
    assert not config.model.he_network and config.model.cond_on_res and config.data.test_geometry == "pad"
    assert AnlightenDiff(config_from_dict(TINY)).he_network is None
