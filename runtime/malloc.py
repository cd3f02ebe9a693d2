"""glibc malloc tuning for CPU inference on full-size maps.

By default glibc serves every block over 32 MiB (one 128-channel 320x320 activation is 52 MB)
with a fresh mmap and unmaps it on free, so each such tensor page-faults all its memory in
again; for GroupNorm, SiLU and additions that costs more than their arithmetic.
`malloc_reuse(True)` raises the thresholds so freed blocks stay in the heap for the next tensor.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
REUSE_BYTES = 1 << 30
GLIBC_MMAP_MAX = 32 << 20  # where glibc's dynamic mmap threshold stops growing


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def malloc_reuse(enabled: bool) -> bool:
    """Process-wide: glibc keeps up to 1 GiB of freed memory for reuse (enabled), or behaves as
    in its steady state by default (blocks over 32 MiB mapped and unmapped per allocation, the
    heap trimmed past 64 MiB free). Returns False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    mmap, trim = (REUSE_BYTES, REUSE_BYTES) if enabled else (GLIBC_MMAP_MAX, 2 * GLIBC_MMAP_MAX)
    done = libc.mallopt(_M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if not enabled:
        release_free_memory()
    return done


def release_free_memory() -> bool:
    """Return the heap's free memory to the system (malloc_trim), so that the resident memory
    a run adds is what it needs, not what earlier runs left for reuse; False where the C library
    is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
