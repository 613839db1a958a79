"""Loading checkpoints: this project's own, the paper's released ``FS_final.ckpt`` (Lightning 1.x) and the
layout of its two-step (TS) ``twostep_final.ckpt``."""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.errors import CheckpointError
from models.module import AnlightenDiff
from models.preparation import prepare_for_inference
from models.stages import NETWORK_NAMES, networks_from_earlier_stage
from utils.config import Config, ConfigError, apply_overrides, config_from_dict
from utils.image_io import atomic_write

WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0",
                     "weight_v": "parametrizations.weight.original1"}
FOREIGN_PREFIXES = ("lpips.", "loss_fn_alex.")
MODEL_PREFIXES = ("model.", "encoder.", "he_network.")
TS_PREFIXES = {"encoder.model.": "encoder.", "histroEncoder.model.": "he_network."}
"""The TS reference's module paths (LitCond and LitHE wrap their U-Nets as ``model``) -> ours."""
TS_ENCODER_COPY = "histroEncoder.encoder.model."
"""The TS reference saves the anchor encoder twice: LitHE holds the same encoder object (refused unless equal)."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default.ckpt"
"""The checkpoint trained for this project and shipped with it, used when no ``--ckpt`` is given."""


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


def is_two_step_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is in the TS reference's layout (``encoder.model.*``: LitCond's wrapped encoder)."""
    return any(k.startswith("encoder.model.") for k in state_dict)


def model_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the model's own tensors (dropping the LPIPS networks the reference saved), in this project's layout
    with modern key names: the TS reference's prefixes are mapped (:func:`_from_two_step_layout`)."""
    if is_two_step_layout(state_dict):
        state_dict = _from_two_step_layout(state_dict)
    return {_modern_key(k): v for k, v in state_dict.items()
            if k.startswith(MODEL_PREFIXES) and not k.startswith(FOREIGN_PREFIXES)}


def _from_two_step_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TS reference's state dict (``model.``, ``model.unet.``, ``encoder.model.``, ``histroEncoder.model.``,
    ``histroEncoder.encoder.model.``) in this project's prefixes (``model.``, ``encoder.``, ``he_network.``).

    Refused (CheckpointError): a file without the HE network H, which the reference would silently leave at its
    random initialisation, and a second copy of the encoder that differs from the first."""
    if not any(k.startswith("histroEncoder.model.") for k in state_dict):
        raise CheckpointError("a two-step (TS) checkpoint (encoder.model.*) without the HE network H "
                              "(histroEncoder.model.*): refused, it would run a random H (the reference's test.py "
                              "ignores this silently); use the final TS checkpoint, which holds all three networks")
    encoder = {k.removeprefix("encoder.model."): v for k, v in state_dict.items() if k.startswith("encoder.model.")}
    copy = {k.removeprefix(TS_ENCODER_COPY): v for k, v in state_dict.items() if k.startswith(TS_ENCODER_COPY)}
    differing = sorted(k for k in set(copy) | set(encoder)
                       if k not in copy or k not in encoder or not torch.equal(copy[k], encoder[k]))
    if copy and differing:
        raise CheckpointError(f"a two-step (TS) checkpoint whose two copies of the anchor encoder (encoder.model.* and "
                              f"{TS_ENCODER_COPY}*) differ in {len(differing)} tensor(s), e.g. {differing[0]}: "
                              "refused, the reference's test would load either one depending on the order")
    mapped = {}
    for key, value in state_dict.items():
        if key.startswith(TS_ENCODER_COPY):
            continue
        prefix = next((p for p in TS_PREFIXES if key.startswith(p)), None)
        mapped[TS_PREFIXES[prefix] + key.removeprefix(prefix) if prefix else key] = value
    return mapped


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
                **_inferred_he_network(sd),
            },
            "diffusion": {"timesteps": int(sd["model.betas"].shape[0])},
        }
    except (KeyError, IndexError) as err:
        raise CheckpointError(f"cannot infer the architecture from the checkpoint's tensors (missing {err})") from None


def _inferred_he_network(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A checkpoint with an HE network is the TS variant, whose encoder is the sigmoid one (cond_on_res false)."""
    return {"he_network": True, "cond_on_res": False} if any(k.startswith("he_network.") for k in sd) else {}


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
    if "on_res" in hparams and inferred["model"].get("he_network"):
        inferred["model"]["he_on_res"] = hparams["on_res"]  # the TS reference's H reads the diffusion's on_res
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
    """The LightningModule in eval mode from one of our checkpoints, the official ``FS_final.ckpt`` or a TS
    checkpoint in the reference's layout (the variant is read off the keys).

    Loading is strict: a missing or unexpected tensor is an error that lists them. ``config`` overrides the
    checkpoint's own (its architecture must then match the tensors).
    """
    checkpoint = read_checkpoint(path, map_location)
    try:
        state = model_state_dict(checkpoint["state_dict"])
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    config = config or config_from_checkpoint(checkpoint)
    module = AnlightenDiff(config)
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


def load_earlier_stage(module: AnlightenDiff, path: str | Path) -> list[str]:
    """``init_from``: load into ``module`` the networks an earlier stage's checkpoint ``path`` hands over (see
    :func:`models.stages.networks_from_earlier_stage`: the anchor encoder, and the HE network), strictly; returns
    the prefixes loaded. A missing file, a missing network or one of another shape is a CheckpointError naming
    the key and the file."""
    if not Path(path).is_file():
        raise CheckpointError(f"init_from: no checkpoint at {path} (train the earlier stage first, or fix the path)")
    try:
        state = model_state_dict(read_checkpoint(path)["state_dict"])
    except CheckpointError as err:
        raise CheckpointError(f"init_from: {err}") from None
    available = {k.split(".", 1)[0] for k in state}
    loaded = []
    for prefix, required in networks_from_earlier_stage(module.config, available).items():
        network, what = getattr(module, prefix), NETWORK_NAMES[prefix]
        weights = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
        if not weights:
            if required:
                raise CheckpointError(f"init_from: {path} holds no {what} ({prefix}.*), which stage "
                                      f"{module.config.stage} loads from the earlier stage (train that stage first, "
                                      "or fix the path)")
            continue
        try:
            network.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"init_from: {path} does not hold an {what} matching this config's model section "
                                  f"({str(err).splitlines()[0]})") from None
        loaded.append(prefix)
    return loaded


def load_for_inference(path: str | Path | None, device: torch.device) -> AnlightenDiff:
    """The checkpoint at ``path`` (None: the bundled one) on ``device``, prepared for fast inference (see
    :func:`models.preparation.prepare_for_inference`): what test.py, test_unpaired.py and the demo run. The
    process's allocator is left alone (the scripts opt in: :func:`utils.memory.retain_freed_memory_for`)."""
    return prepare_for_inference(load_checkpoint(resolve_checkpoint(path), map_location=device), device)


def _listing(title: str, keys: list[str], limit: int = 10) -> str:
    if not keys:
        return ""
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}): {', '.join(keys[:limit])}{more}\n"


def export_checkpoint(source: str | Path, target: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Write a small inference checkpoint: the model's tensors and its config, no optimizer or loop state.
    ``overrides`` (``section.key=value``, e.g. ``sampler.detail=input``) change the config it carries, such as
    the recommended sampler settings; the result is validated.

    ``python -m models.checkpoint SOURCE TARGET [--set section.key=value ...]`` does this from the command line.
    """
    module = load_checkpoint(source)
    hparams = dict(module.hparams)
    if overrides:
        try:
            hparams["config"] = config_from_dict(apply_overrides(hparams["config"], overrides)).to_dict()
        except ConfigError as err:
            raise CheckpointError(f"--set: {err}") from None
    content = {"state_dict": module.state_dict(), "hyper_parameters": hparams, "exported_from": Path(source).name}
    return atomic_write(target, lambda tmp: torch.save(content, tmp), overwrite=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint as a small inference checkpoint.")
    parser.add_argument("source", help="a checkpoint of train.py (or any this project loads)")
    parser.add_argument("target", help="the file to write (refused if it exists)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the carried config, e.g. --set sampler.detail=input (repeatable)")
    args = parser.parse_args(argv)
    print(f"wrote {export_checkpoint(args.source, args.target, args.overrides)}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_cli
    from utils.image_io import OutputExistsError

    raise SystemExit(run_cli(main, (CheckpointError, OutputExistsError)))
