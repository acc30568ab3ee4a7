"""Attention over the device's paged KV cache."""

from omniserve.attention.paged import AttentionMetadata, build_metadata, paged_attention

__all__ = ["AttentionMetadata", "build_metadata", "paged_attention"]
