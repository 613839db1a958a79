"""The library face: hubconf.py's torch.hub entry point and the package description in pyproject.toml."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize

import utils.memory
from models import DEFAULT_CHECKPOINT, AnlightenDiff, CheckpointError, load_checkpoint
from models.checkpoint import export_checkpoint
from utils.image_io import read_image

ROOT = Path(__file__).resolve().parents[1]


def _hub_load(**kwargs) -> AnlightenDiff:
    return torch.hub.load(str(ROOT), "anlightendiff", source="local", **kwargs)


def _hubconf():
    """hubconf.py imported the way torch.hub imports it (torch.hub.help has no source="local")."""
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sample() -> torch.Tensor:
    """A 1 x 3 x 32 x 48 crop of a bundled low-light photo, in [0, 1]."""
    rgb = read_image(ROOT / "samples" / "lol_6.png").rgb[:32, :48]
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def test_hub_load_gives_the_bundled_model_ready_to_enhance(sample):
    model = _hub_load()
    assert isinstance(model, AnlightenDiff) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    enhanced = model.enhance(sample).image
    assert enhanced.shape == sample.shape
    assert enhanced.min() >= 0 and enhanced.max() <= 1
    assert not torch.allclose(enhanced, sample, atol=0.05)  # it did brighten the photo

    reference = load_checkpoint(ROOT / "checkpoints" / "default.ckpt").enhance(sample).image
    assert torch.allclose(enhanced, reference, atol=1e-5), (enhanced - reference).abs().max()


def test_loading_leaves_the_process_as_it_was(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the hub entry point changed glibc's allocator settings")

    monkeypatch.setattr(utils.memory, "_libc", refuse)
    path, threads, grad = list(sys.path), torch.get_num_threads(), torch.is_grad_enabled()
    rng = torch.get_rng_state()
    _hub_load()
    assert torch.equal(torch.get_rng_state(), rng)
    assert (sys.path, torch.get_num_threads(), torch.is_grad_enabled()) == (path, threads, grad)


def test_hub_loads_the_checkpoint_it_is_given(tiny_config, tmp_path):
    trained = AnlightenDiff(tiny_config)
    run = tmp_path / "run.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, run)
    exported = export_checkpoint(run, tmp_path / "tiny.ckpt")

    model = _hub_load(checkpoint=str(exported))
    assert model.config == tiny_config and model.config.model.unet_dim == 8
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # weight norm folded
    low = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 0.3
    out = model.enhance(low).image
    assert out.shape == low.shape and out.min() >= 0 and out.max() <= 1

    unfolded = _hub_load(checkpoint=exported, fold=False)  # keyword arguments reach prepare_for_inference
    assert any(parametrize.is_parametrized(m) for m in unfolded.modules())
    with pytest.raises(CheckpointError, match="not found"):
        _hub_load(checkpoint=tmp_path / "missing.ckpt")


def test_entry_point_is_documented_and_finds_the_bundled_checkpoint():
    hubconf = _hubconf()
    doc = inspect.getdoc(hubconf.anlightendiff)  # what torch.hub.help returns for a GitHub repo
    for part in ("Args:", "checkpoint:", "device:", "**kwargs:", "Returns:", "enhance"):
        assert part in doc
    assert hubconf.BUNDLED_CHECKPOINT == DEFAULT_CHECKPOINT and DEFAULT_CHECKPOINT.is_file()
    assert all(importlib.util.find_spec(name) for name in hubconf.dependencies)


def _pins(requirements: Path) -> list[str]:
    lines = (line.strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-r"))]


def test_pyproject_pins_match_the_requirement_files():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert extras["dev"] == _pins(ROOT / "requirements-dev.txt")
    assert extras["demo"] == _pins(ROOT / "requirements-demo.txt")
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    for package in project["tool"]["setuptools"]["packages"]:
        assert (ROOT / package / "__init__.py").is_file()
