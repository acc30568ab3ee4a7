"""Attention over the device's paged KV cache."""

from omniserve.attention.paged import AttentionMetadata, PagedAttention

__all__ = ["AttentionMetadata", "PagedAttention"]
