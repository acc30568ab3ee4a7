"""Giving a long-running process's freed heap back to the OS.

glibc's malloc keeps what is freed for reuse and returns memory only from the top of each heap. Buffers of many sizes
and lifetimes (host KV, activations, request state) leave free fragments below the top that it keeps for good, so a
server or a CPU attention worker would sit at its peak footprint long after the load is gone. `trim_heap` hands every
free page back (glibc's malloc_trim: a few milliseconds for a heap of a few GB); with another C library it does
nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> bool:
    """Returns the heap's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
