"""Inference precision: fp32, or bf16/fp16 autocast of the networks (the sampler's arithmetic stays float32)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from utils.choices import precision_error

NATIVE_BF16_CAPABILITIES = ("avx512_bf16", "amx_bf16", "bf16")
"""Keys of ``torch.cpu.get_capabilities()`` that mean bf16 arithmetic in hardware: AVX512-BF16 or AMX on x86,
the BF16 extension on ARM."""


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively: a CUDA GPU with bf16, or a CPU with bf16 instructions
    (:data:`NATIVE_BF16_CAPABILITIES`) whose oneDNN runs autocast's convolutions. Elsewhere bf16 is emulated and
    far slower than fp32; False too where torch cannot tell (no ``torch.cpu.get_capabilities``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None or not torch.backends.mkldnn.is_available():
        return False
    found = capabilities()
    return any(found.get(name, False) for name in NATIVE_BF16_CAPABILITIES)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32); a ValueError for one ``device`` cannot run
    (:func:`utils.choices.precision_error`)."""
    if (error := precision_error(precision, device.type)) is not None:
        raise ValueError(error)
    if precision == "fp32":
        return None
    if precision == "bf16" and not bf16_supported(device):
        warnings.warn(f"bf16 is emulated on this {device.type} (no native bf16): expect it to be much slower "
                      "than fp32", stacklevel=2)
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the networks at ``precision`` (a null context for fp32)."""
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
