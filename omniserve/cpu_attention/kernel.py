"""Decode attention for one request over its host KV (GQA aware): a compiled kernel, with a torch fallback.

The host KV keeps keys in tiles of 16 positions, transposed inside each tile ([kv_heads, tiles, head_dim, 16]), and
values as rows ([kv_heads, length, head_dim]); see csrc/decode_attention.cpp for why. The kernel is built once per
machine with PyTorch's extension tooling (cached under ~/.cache/torch_extensions); where that fails (no compiler),
the torch fallback computes the same thing, more slowly.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TILE = 16
_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


@functools.cache
def compiled_kernel():
    """The compiled extension, built on first use; None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        return load("omniserve_cpu_decode_attention", [str(_SOURCE)], extra_cflags=_FLAGS, verbose=False)
    except Exception as exc:  # no compiler or ninja: fall back, loudly
        logger.warning("CPU decode-attention kernel could not be built (%s); using the slower torch path", exc)
        return None


def decode_attention(q: torch.Tensor, k_tiles: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [num_heads, head_dim]; k_tiles: [num_kv_heads, tiles, head_dim, 16]; v: [num_kv_heads, length, head_dim].
    Returns [num_heads, head_dim]."""
    kernel = compiled_kernel()
    if kernel is not None:
        return kernel.decode_attention(q, k_tiles, v)
    return decode_attention_reference(q, untile_keys(k_tiles, v.shape[1]), v)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain torch: q [num_heads, head_dim], k and v [num_kv_heads, length, head_dim]."""
    heads, head_dim = q.shape
    kv_heads = k.shape[0]
    scores = q.view(kv_heads, heads // kv_heads, head_dim) @ k.transpose(1, 2) * head_dim**-0.5
    return (scores.softmax(-1) @ v).reshape(heads, head_dim)


def tile_keys(k: torch.Tensor, capacity_tiles: int | None = None) -> torch.Tensor:
    """[num_kv_heads, length, head_dim] -> [num_kv_heads, tiles, head_dim, 16] (unused lanes zero)."""
    kv_heads, length, head_dim = k.shape
    tiles = max(capacity_tiles or 0, -(-length // TILE))
    padded = k.new_zeros(kv_heads, tiles * TILE, head_dim)
    padded[:, :length] = k
    return padded.view(kv_heads, tiles, TILE, head_dim).transpose(2, 3).contiguous()


def untile_keys(k_tiles: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of tile_keys: [num_kv_heads, length, head_dim]."""
    kv_heads, tiles, head_dim, _ = k_tiles.shape
    return k_tiles.transpose(2, 3).reshape(kv_heads, tiles * TILE, head_dim)[:, :length]
