"""Giving a long-running process's freed heap back to the OS.

glibc's malloc keeps what is freed for reuse and returns memory only from the top of each heap. Buffers of many sizes
and lifetimes (host KV, activations, request state) leave free fragments below the top that it keeps for good, so a
server or a CPU attention worker would sit at its peak footprint long after the load is gone. `trim_heap` hands every
free page back (glibc's malloc_trim: a few milliseconds for a heap of a few GB); `map_large_allocations` keeps large
buffers off the heap altogether, so that each is handed back the moment it is freed. With another C library both do
nothing.
"""

from __future__ import annotations

import ctypes
import functools


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _glibc(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None


def map_large_allocations(threshold_bytes: int) -> bool:
    """Every allocation of at least threshold_bytes gets a mapping of its own, unmapped when freed (glibc's
    M_MMAP_THRESHOLD, set once: that also stops glibc from raising the threshold to the size of each large buffer
    freed, which is what put host KV buffers on the heap, in fragments between trims). For a process whose large
    buffers come and go with requests, so that its RSS follows what it holds; False where the C library cannot."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def trim_heap() -> bool:
    """Returns the heap's free pages to the OS; False where the C library cannot."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
