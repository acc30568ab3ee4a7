"""Decode attention for one request over its host KV (GQA aware)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [num_heads, head_dim]; k, v: [num_kv_heads, length, head_dim]. Returns [num_heads, head_dim].

    The query heads that share a KV head stand in SDPA's query-length axis, as on the device, so the arithmetic is
    the same as the device path's and no KV is copied."""
    heads, head_dim = q.shape
    kv_heads = k.shape[0]
    grouped = q.view(kv_heads, heads // kv_heads, head_dim)
    return F.scaled_dot_product_attention(grouped, k, v).reshape(heads, head_dim)
