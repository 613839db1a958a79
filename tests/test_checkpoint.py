"""Loading the official checkpoint layout (synthesised at reduced width) and our own checkpoints."""

import pickle
from pathlib import Path

import pytest
import torch

from models import AnlightenDiff, CheckpointError, load_checkpoint
from models.checkpoint import export_checkpoint
from utils.config import Config, config_from_dict

TSV = Path(__file__).parent / "data" / "official_state_dict_keys.tsv"
SCALE = 8  # the official widths (multiples of 64) divided by 8: unet_dim 64 -> 8


def _official_layout() -> dict[str, tuple[int, ...]]:
    rows = TSV.read_text().splitlines()[1:]
    layout = {}
    for key, shape, _ in (row.split("\t") for row in rows):
        dims = [int(x) for x in shape.strip("()").split(",") if x.strip()]
        layout[key] = tuple(d // SCALE if d % 64 == 0 else d for d in dims)
    return layout


def _legacy_name(key: str) -> str:
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


def _small_official_config() -> Config:
    return config_from_dict({"model": {"unet_dim": 64 // SCALE}})


def _write_official(path: Path, module: AnlightenDiff, with_hparams: bool = True) -> None:
    """Save ``module`` the way the paper's Lightning 1.x code saved FS_final.ckpt."""
    state = {_legacy_name(k): v for k, v in module.state_dict().items()}
    state["lpips.net.slice1.0.weight"] = torch.zeros(4, 3, 3, 3)
    state["loss_fn_alex.net.lin0.model.1.weight"] = torch.zeros(1, 4, 1, 1)
    hparams = {"unet_dim": 64 // SCALE, "dim_mults": (1, 2, 2, 4, 4, 8), "timesteps": 100, "use_wn": True,
               "cond_use_wn": True, "train_lr": 4e-4, "optimizer": "Lion", "train_batch_size": 24,
               "use_center": True, "use_center_sampler": True, "sample_mode": "ddpm", "lpips_type": "vgg"}
    checkpoint = {"epoch": 999, "global_step": 12345, "pytorch-lightning_version": "1.9.4",
                  "state_dict": state, "loops": {}, "callbacks": {}, "optimizer_states": [{}],
                  "lr_schedulers": []}
    if with_hparams:
        checkpoint["hyper_parameters"] = hparams
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def official_module() -> AnlightenDiff:
    torch.manual_seed(0)
    module = AnlightenDiff(_small_official_config()).eval()
    with torch.no_grad():  # make weight norm's g differ from ||v|| so a mis-mapped key would show
        for name, p in module.named_parameters():
            if name.endswith("original0"):
                p.mul_(1.5)
    return module


def test_synthetic_official_layout_matches_the_tsv(official_module, tmp_path):
    path = tmp_path / "FS_final.ckpt"
    _write_official(path, official_module)
    state = torch.load(path, weights_only=True)["state_dict"]
    model_keys = {k: tuple(v.shape) for k, v in state.items() if k.startswith(("model.", "encoder."))}
    assert model_keys == _official_layout()


@pytest.mark.parametrize("with_hparams", [True, False])
def test_official_checkpoint_loads_strictly_and_reproduces_outputs(official_module, tmp_path, with_hparams):
    path = tmp_path / "FS_final.ckpt"
    _write_official(path, official_module, with_hparams)
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config.model.unet_dim == 8 and loaded.config.model.dim_mults == (1, 2, 2, 4, 4, 8)
    low = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([37])
    with torch.no_grad():
        c1, f1 = official_module.method.anchor(low)
        c2, f2 = loaded.method.anchor(low)
        e1 = official_module.model.unet(torch.zeros_like(low), t, low, f1)
        e2 = loaded.model.unet(torch.zeros_like(low), t, low, f2)
    assert torch.equal(c1, c2) and torch.equal(e1, e2)
    assert torch.equal(loaded.model.extra_term_coef2, official_module.model.extra_term_coef2)


def test_own_checkpoint_round_trip(tiny_config, tmp_path):
    module = AnlightenDiff(tiny_config)
    path = tmp_path / "own.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_config
    for (k1, v1), (k2, v2) in zip(module.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_missing_and_unexpected_keys_are_listed(tiny_config, tmp_path):
    module = AnlightenDiff(tiny_config)
    state = module.state_dict()
    state.pop("model.unet.final_conv.1.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.unet.final_conv.1.bias") as err:
        load_checkpoint(path)
    assert "unexpected (1): encoder.extra.weight" in str(err.value)


def test_architecture_mismatch_is_reported(tiny_config, tmp_path):
    module = AnlightenDiff(tiny_config)
    path = tmp_path / "own.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    other = config_from_dict({**tiny_config.to_dict(), "model": {"unet_dim": 16, "dim_mults": [1, 2, 2]}})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(path, config=other)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"hello, not a checkpoint", "not a readable PyTorch checkpoint"),
])
def test_non_checkpoint_files(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint(tiny_config, tmp_path):
    path = tmp_path / "own.ckpt"
    module = AnlightenDiff(tiny_config)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_code_running_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_export_keeps_only_weights_and_config(tiny_config, tmp_path):
    module = AnlightenDiff(tiny_config)
    source = tmp_path / "run.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "optimizer_states": [{"big": torch.zeros(1000)}], "global_step": 7}, source)
    target = export_checkpoint(source, tmp_path / "small.ckpt")
    content = torch.load(target, weights_only=True)
    assert set(content) == {"state_dict", "hyper_parameters", "exported_from"}
    loaded = load_checkpoint(target)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.state_dict().items())
    with pytest.raises(FileExistsError):
        export_checkpoint(source, target)
