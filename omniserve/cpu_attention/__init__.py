"""CPU attention pool: host KV of offloaded requests and their decode attention, in worker processes.

The pool's names are imported on first use, so that the placement rule (placement.py) loads without torch (the
simulator uses it)."""

from omniserve.lazy import lazy_exports

_EXPORTS = {"AttentionResult": "omniserve.cpu_attention.pool", "CPUAttentionPool": "omniserve.cpu_attention.pool",
            "PoolConfig": "omniserve.cpu_attention.pool"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
