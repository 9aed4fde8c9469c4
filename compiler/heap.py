"""glibc's malloc told to keep large freed blocks for reuse while a model is compressed.

By default glibc hands every block above its mmap threshold (at most 32 MiB) back to the
kernel when it is freed, and the next one of that size is faulted in again, page by page,
zeroed. Compression allocates and drops arrays of tens to hundreds of MiB per layer (its
inputs on the calibration rows, Hessian copies, error products): measured on a ResNet-50
compile (`bench/compile_speed.py`, 2 cores), 17 s of the process's 189 CPU-seconds were
the kernel's; raising glibc's mmap and trim thresholds to REUSE_BYTES took the compile from
107.5 to 100.0 s, at a peak RSS of 2.59 GiB (VGG-16's FC stack: 58.0 -> 51.4 s, 3.35 -> 3.47
GiB; at 1 GiB: 96.5 and 46.0 s, but 3.50 and 3.86 GiB). Larger blocks are still mapped and
unmapped as before.

Elsewhere (musl, macOS, Windows) nothing changes.
"""

from __future__ import annotations

import ctypes
from typing import ContextManager

from .parallel import ProcessWide

# Blocks up to this size are taken from, and freed back to, the heap while a compile runs.
REUSE_BYTES = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
# Where glibc's own dynamic threshold ends up after large frees (DEFAULT_MMAP_THRESHOLD_MAX on
# 64 bits, trim threshold twice that): what the block leaves behind, as setting a threshold
# turns the dynamic one off for the rest of the process.
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: others' mallopt differs or is missing
        return libc
    except (OSError, AttributeError):
        return None


def _keep_freed() -> ctypes.CDLL | None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, REUSE_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, REUSE_BYTES)
    return libc


def _give_back(libc: ctypes.CDLL | None) -> None:
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
        libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
        libc.malloc_trim(0)


_reuse = ProcessWide(_keep_freed, _give_back)


def reuse_freed_memory() -> ContextManager[None]:
    """Run the block with freed blocks of up to REUSE_BYTES kept for reuse (glibc only); on leaving
    the outermost such block, the free memory goes back to the kernel (malloc_trim)."""
    return _reuse.held()
