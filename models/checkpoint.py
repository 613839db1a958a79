"""Loading checkpoints: this project's own and the paper's released ``FS_final.ckpt`` (Lightning 1.x)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from models.inference import prepare_for_inference
from models.module import AnlightenDiff
from utils.config import Config, ConfigError, config_from_dict
from utils.image_io import atomic_write

WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0",
                     "weight_v": "parametrizations.weight.original1"}
FOREIGN_PREFIXES = ("lpips.", "loss_fn_alex.")
MODEL_PREFIXES = ("model.", "encoder.")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default.ckpt"
"""The checkpoint trained for this project and shipped with it, used when no ``--ckpt`` is given."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: a downloaded file never runs code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format)") from None
        raise CheckpointError(
            f"{path}: refused, it needs arbitrary unpickling (objects beyond tensors and plain containers), "
            "which could run code. Re-save its state_dict with plain types."
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not a checkpoint"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format): "
                              f"{reason}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    return checkpoint


def _modern_key(key: str) -> str:
    """Map the legacy weight-norm names (weight_g / weight_v) to torch's parametrization names."""
    stem, _, leaf = key.rpartition(".")
    return f"{stem}.{WEIGHT_NORM_NAMES[leaf]}" if leaf in WEIGHT_NORM_NAMES else key


def model_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the model's own tensors (dropping the LPIPS networks the reference saved), modern key names."""
    return {_modern_key(k): v for k, v in state_dict.items()
            if k.startswith(MODEL_PREFIXES) and not k.startswith(FOREIGN_PREFIXES)}


def infer_model_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture read off tensor shapes (for checkpoints that carry no usable config)."""
    sd = model_state_dict(state_dict)
    try:
        dim = sd["model.unet.mlp.0.weight"].shape[1]
        levels = sorted({int(k.split(".")[3]) for k in sd if k.startswith("model.unet.downs.")})
        widths = [_conv_out(sd, f"model.unet.downs.{i}.0.block1.block.1") for i in levels]
        second_in = _conv_in(sd, "model.unet.downs.0.1.block1.block.1")
        return {
            "model": {
                "unet_dim": int(dim),
                "dim_mults": [int(w // dim) for w in widths],
                "in_dim": _conv_in(sd, "model.unet.downs.0.0.block1.block.1"),
                "unet_outdim": _conv_out(sd, "model.unet.final_conv.1"),
                "cond_in_dim": _conv_in(sd, "encoder.downs.0.0.block1.block.1"),
                "use_wn": any(k.startswith("model.unet.") and "parametrizations" in k for k in sd),
                "cond_use_wn": any(k.startswith("encoder.") and "parametrizations" in k for k in sd),
                "stronger_cond": second_in == 2 * widths[0],
            },
            "diffusion": {"timesteps": int(sd["model.betas"].shape[0])},
        }
    except (KeyError, IndexError) as err:
        raise CheckpointError(f"cannot infer the architecture from the checkpoint's tensors (missing {err})") from None


def _conv_weight(sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return sd.get(f"{prefix}.weight", sd.get(f"{prefix}.parametrizations.weight.original1"))


def _conv_in(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return int(_conv_weight(sd, prefix).shape[1])


def _conv_out(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return int(_conv_weight(sd, prefix).shape[0])


def config_from_checkpoint(checkpoint: dict[str, Any]) -> Config:
    """Our checkpoints hold ``hyper_parameters["config"]``; the official one a flat dict of the reference's
    options, of which only the architecture and diffusion keys matter here; otherwise shapes decide."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if isinstance(hparams.get("config"), dict):
        try:
            return config_from_dict(hparams["config"])
        except ConfigError as err:
            raise CheckpointError(f"the checkpoint's config is invalid: {err}") from None
    inferred = infer_model_config(checkpoint["state_dict"])
    for section, cls_fields in (("model", Config().model), ("diffusion", Config().diffusion)):
        for key in vars(cls_fields):
            if key in hparams and key not in inferred.get(section, {}):
                inferred.setdefault(section, {})[key] = hparams[key]
    try:
        return config_from_dict(inferred)
    except ConfigError as err:
        raise CheckpointError(f"the checkpoint's options are invalid here: {err}") from None


def resolve_checkpoint(path: str | Path | None) -> Path:
    """``path``, or the bundled default checkpoint when None (an error if it is not there)."""
    if path is not None:
        return Path(path)
    if not DEFAULT_CHECKPOINT.is_file():
        raise CheckpointError(f"no --ckpt given and the bundled default checkpoint {DEFAULT_CHECKPOINT} is missing")
    return DEFAULT_CHECKPOINT


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    config: Config | None = None) -> AnlightenDiff:
    """The LightningModule in eval mode from one of our checkpoints or the official ``FS_final.ckpt``.

    Loading is strict: a missing or unexpected tensor is an error that lists them. ``config`` overrides the
    checkpoint's own (its architecture must then match the tensors).
    """
    checkpoint = read_checkpoint(path, map_location)
    config = config or config_from_checkpoint(checkpoint)
    module = AnlightenDiff(config)
    state = model_state_dict(checkpoint["state_dict"])
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{path}: does not fit the model built from its config\n"
                              + _listing("missing", missing) + _listing("unexpected", unexpected)
                              + _listing("wrong shape", mismatched))
    module.load_state_dict(state, strict=True)
    return module.eval()


def load_for_inference(path: str | Path | None, device: torch.device) -> AnlightenDiff:
    """The checkpoint at ``path`` (None: the bundled one) on ``device``, prepared for fast inference (see
    :func:`models.inference.prepare_for_inference`): what test.py, test_unpaired.py and the demo run."""
    return prepare_for_inference(load_checkpoint(resolve_checkpoint(path), map_location=device), device)


def _listing(title: str, keys: list[str], limit: int = 10) -> str:
    if not keys:
        return ""
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}): {', '.join(keys[:limit])}{more}\n"


def export_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Write a small inference checkpoint: the model's tensors and its config, no optimizer or loop state.

    ``python -m models.checkpoint SOURCE TARGET`` does this from the command line.
    """
    module = load_checkpoint(source)
    content = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
               "exported_from": Path(source).name}
    return atomic_write(target, lambda tmp: torch.save(content, tmp), overwrite=False)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m models.checkpoint SOURCE.ckpt TARGET.ckpt")
    print(f"wrote {export_checkpoint(sys.argv[1], sys.argv[2])}")
