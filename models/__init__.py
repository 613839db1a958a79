"""AnlightenDiff models: networks, anchored diffusion, samplers, the LightningModule, checkpoints."""

from models.checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    load_for_inference,
    resolve_checkpoint,
)
from models.module import AnlightenDiff, build_networks

__all__ = [
    "DEFAULT_CHECKPOINT",
    "AnlightenDiff",
    "CheckpointError",
    "build_networks",
    "load_checkpoint",
    "load_for_inference",
    "resolve_checkpoint",
]
