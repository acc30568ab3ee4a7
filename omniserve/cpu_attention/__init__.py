"""CPU attention pool: host KV of offloaded requests and their decode attention, in worker processes."""

from omniserve.cpu_attention.pool import AttentionResult, CPUAttentionPool, PoolConfig

__all__ = ["AttentionResult", "CPUAttentionPool", "PoolConfig"]
