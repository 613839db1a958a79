"""Shared fixtures: tiny configs and models that run in milliseconds on a CPU."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

import utils.memory
from utils.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parents[1]

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads stall on each
# other (measured ~10x slower): run the in-process tests single-threaded.
torch.set_num_threads(1)

TINY = {
    "model": {"unet_dim": 8, "dim_mults": [1, 2, 2]},
    "diffusion": {"timesteps": 10, "pad_multiple": 8},
    "sampler": {"sampler": "ddpm", "steps": 10},
    "val_sampler": {"sampler": "ddim", "steps": 2},
    "optim": {"loss_type": "l2", "optimizer": "adamw", "lr": 1e-3},
}


def default_signals() -> None:
    """``preexec_fn`` of every subprocess a test starts: SIGINT and SIGTERM back to their default dispositions.

    A suite started with SIGINT ignored (``nohup make test``, a background job of a non-interactive shell, some CI
    runners) would pass SIG_IGN on to the scripts it starts, and Python does not install its KeyboardInterrupt
    handler in a process that starts with SIGINT ignored: the Ctrl-C the tests send would never arrive."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def train_steps(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, steps: int,
                seed: int | None = None) -> list[float]:
    """The losses of ``steps`` plain training steps of a LightningModule on one batch. With ``seed``, torch is
    reseeded before each step, so every step redraws the same t, noise and teacher-forcing choice and the loss is a
    function of the weights alone."""
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def load_bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``bench/<name>.py`` imported as module ``bench_<name>`` (bench/ is a folder of scripts, not a package),
    registered in ``sys.modules`` for the test only (its dataclasses need their module)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def libc_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The allocator calls (``("mallopt", option, value)``, ``("malloc_trim", pad)``) that utils.memory makes
    during the test, recorded instead of made."""
    calls: list[tuple] = []
    libc = SimpleNamespace(mallopt=lambda *args: calls.append(("mallopt", *args)),
                           malloc_trim=lambda *args: calls.append(("malloc_trim", *args)))
    monkeypatch.setattr(utils.memory, "_libc", lambda: libc)
    return calls


@pytest.fixture
def tiny_config() -> Config:
    """A 3-level, width-8 model with 10 timesteps."""
    return config_from_dict(TINY)


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """A (low, high) pair of 2 x 3 x 16 x 24 images in [0, 1], low darker than high."""
    generator = torch.Generator().manual_seed(0)
    high = torch.rand(2, 3, 16, 24, generator=generator)
    return high * 0.2, high
