"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "anlightendiff", source="local")``.

The project's packages are imported inside the entry point, so that importing this file (which
``torch.hub.help`` does) stays cheap and a missing package is reported by torch.hub's ``dependencies`` check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Import names (not distribution names) that loading the model needs; torch.hub checks them before loading.
dependencies = ["torch", "torchvision", "pytorch_lightning", "torchmetrics", "lion_pytorch", "lpips", "numpy",
                "PIL", "yaml", "skimage"]

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "default.ckpt"


def anlightendiff(checkpoint: str | Path | None = None, device: str | Any = "cpu", **kwargs: Any) -> Any:
    """AnlightenDiff low-light enhancement, loaded and ready: ``model.enhance(img).image``.

    Loading leaves the process as it was (torch's global random state, the allocator settings, sys.path).

    Args:
        checkpoint: path of a checkpoint to load: one of this project's (trained or exported with
            ``python -m models.checkpoint``) or the paper's ``FS_final.ckpt``. None (the default): the
            checkpoint bundled with the repository, ``checkpoints/default.ckpt`` next to this hubconf.py.
        device: where the model runs, e.g. ``"cpu"`` (default), ``"cuda"`` or a ``torch.device``.
        **kwargs: passed to ``models.preparation.prepare_for_inference``: ``fold=True`` (fold weight norm
            into plain weights, irreversible; pass False to keep the trainable parametrization),
            ``channels_last=False`` and ``compile=False`` (``torch.compile`` the networks). Loading never
            changes the allocator; on CPU, ``utils.memory.retain_freed_memory()`` (glibc keeps freed memory
            for reuse, process-wide, as the command-line scripts do) makes enhancing faster.

    Returns:
        The ``models.AnlightenDiff`` LightningModule in eval mode without gradients, on ``device``.
        ``model.enhance(img)`` takes (B, 3, H, W) float images in [0, 1] of any size and returns
        ``Enhanced(image, anchor)``, both (B, 3, H, W) in [0, 1]; its sampler is the checkpoint's
        ``config.sampler`` (the bundled one: DDIM, 4 steps, deterministic), or pass
        ``sampler=utils.config.SamplerConfig(...)``. ``model.config`` is the checkpoint's configuration.

    Raises:
        models.CheckpointError: the checkpoint is missing, unreadable or does not fit the model.

    Example::

        model = torch.hub.load("path/to/AnlightenDiff", "anlightendiff", source="local")
        enhanced = model.enhance(low_light_image).image
    """
    import torch

    from models import load_checkpoint, resolve_checkpoint
    from models.preparation import prepare_for_inference

    device = torch.device(device)
    path = resolve_checkpoint(BUNDLED_CHECKPOINT if checkpoint is None else checkpoint)
    with torch.random.fork_rng(devices=[]):  # building the networks draws their (then replaced) initial weights
        module = load_checkpoint(path, map_location=device)
    return prepare_for_inference(module, device, **kwargs)
