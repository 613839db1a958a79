"""Making a loaded model fast to run (measured by ``bench/speed.py``): eval mode without gradients, weight norm
folded into plain weights, optionally channels_last and ``torch.compile``. Nothing here changes the process
(the allocator is the command-line scripts' opt-in, :mod:`utils.memory`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from models.unet import UNetBackbone


def fold_weight_norm(module: nn.Module) -> int:
    """Replace every weight parametrization (weight norm) below ``module`` by its current value as a plain
    ``weight`` parameter, in place (torch's ``remove_parametrizations(..., leave_parametrized=True)``); returns
    how many were folded.

    Outputs are unchanged up to float rounding (the folded weight is g v / |v| computed once instead of at
    every forward). Irreversible: the state dict then holds ``weight`` instead of g/v, so the module no
    longer saves or loads in the checkpoint format and training would change its parametrization. Fold a
    ``copy.deepcopy`` to keep the original: torch deletes the ``weight`` property from the parametrized class,
    which a deep copy shares with its original, so it is given back to that class once the folded module has
    left it.
    """
    parametrized = [child for child in module.modules() if parametrize.is_parametrized(child, "weight")]
    for child in parametrized:
        parametrized_class = type(child)
        weight = vars(parametrized_class)["weight"]
        parametrize.remove_parametrizations(child, "weight", leave_parametrized=True)
        if type(child) is not parametrized_class:
            parametrized_class.weight = weight
    return len(parametrized)


def prepare_for_inference(module: nn.Module, device: torch.device | str = "cpu", *, fold: bool = True,
                          channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Make ``module`` (the LightningModule, or any module holding the networks) fast to run; in place.

    Eval mode, no gradients, on ``device``; then, each switchable: ``fold`` weight norm
    (:func:`fold_weight_norm`; irreversible), ``channels_last`` weights and ``compile`` every UNet (anchor
    encoder and noise predictor) with ``torch.compile`` (slow first call per input size). Returns ``module``.
    """
    module.eval().requires_grad_(False).to(device)
    if fold:
        fold_weight_norm(module)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        for network in module.modules():
            if isinstance(network, UNetBackbone):
                network.compile()
    return module
