"""AnlightenDiff models: networks, anchored diffusion, samplers, the LightningModule, checkpoints.

The names below are imported on first use (PEP 562), so that importing one submodule (``models.stages``,
``models.samplers``) does not import the Lightning module and the checkpoint loader with it."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_CHECKPOINT": "models.checkpoint",
    "CheckpointError": "models.errors",
    "load_checkpoint": "models.checkpoint",
    "load_for_inference": "models.checkpoint",
    "resolve_checkpoint": "models.checkpoint",
    "AnlightenDiff": "models.module",
    "AnchoredDiffusion": "models.anchored_diffusion",
    "build_method": "models.build",
    "build_networks": "models.build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
