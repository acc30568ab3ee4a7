"""CPU attention pool: host KV of offloaded requests and their decode attention, in worker processes.

The pool's names are imported on first use, so that the placement rule (placement.py) loads without torch (the
simulator uses it)."""

import importlib

_EXPORTS = {"AttentionResult": "omniserve.cpu_attention.pool", "CPUAttentionPool": "omniserve.cpu_attention.pool",
            "PoolConfig": "omniserve.cpu_attention.pool"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omniserve.cpu_attention' has no attribute {name!r}")
