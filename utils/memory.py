"""glibc's allocator, process-wide: keeping freed memory for reuse speeds CPU inference up.

A change to the whole process, so nothing in the library makes it: the command-line scripts opt in
(:func:`retain_freed_memory_for` their device), ``bench/speed.py`` switches it per measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAINING = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}


def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def retain_freed_memory(enabled: bool = True) -> bool:
    """glibc's allocator, process-wide: serve every allocation from the heap (no mmap per large tensor) and
    keep freed memory for reuse.

    By default glibc maps each large tensor freshly and unmaps it when freed, so every activation of a
    full-image UNet page-faults zeroed memory (several times slower elementwise ops at 600x400 on a 2-core
    CPU, see bench/speed.py). Peak RSS stays about the same; memory is returned by :func:`release_memory`
    or ``enabled=False`` (glibc's default values, though its dynamic mmap threshold stays off once an
    option was set). Returns False (and does nothing) where libc is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    for option, value in (_RETAINING if enabled else _GLIBC_DEFAULTS).items():
        libc.mallopt(option, value)
    if not enabled:
        libc.malloc_trim(0)
    return True


def retain_freed_memory_for(device: torch.device) -> bool:
    """:func:`retain_freed_memory` when inference runs on the CPU, where it pays; the command-line scripts'
    opt-in. Returns whether the allocator was changed."""
    return device.type == "cpu" and retain_freed_memory()


def release_memory() -> None:
    """Return the allocator's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
