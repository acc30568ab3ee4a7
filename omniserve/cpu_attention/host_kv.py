"""Host-memory KV cache of offloaded requests: per request and layer, growing as tokens are added."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from omniserve.cpu_attention.kernel import TILE, decode_attention, prefixed_decode_attention, tile_keys, untile_keys

if TYPE_CHECKING:
    from omniserve.kv_cache.page_pool import PagePool


class HostKV:
    """One request's keys and values for every layer.

    Per layer, keys are [num_kv_heads, tiles, head_dim, 16] (tiles of 16 positions, transposed inside a tile) and
    values [num_kv_heads, capacity, head_dim], with the first lengths[layer] positions valid: the layouts the decode
    kernel streams through (kernel.py). Capacity doubles when full, so appending a token is amortised O(1).

    A request whose prompt starts with pages of the prefix cache's host tier keeps only the KV after them: its
    attention reads those pages in place, where every offloaded request with that prefix reads them.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, prefix: tuple[PagePool, torch.Tensor] | None = None) -> None:
        """k, v: [num_layers, num_tokens, num_kv_heads, head_dim], the request's KV so far (after its prefix, if it
        has one). prefix: the host tier (its pages in shared memory) and the prefix's slots there [P] int64, P a
        multiple of 16. Half-precision KV is kept in fp32: the kernel computes in fp32 or fp64 only."""
        self.prefix = prefix
        self.dtype = torch.float32 if k.dtype in (torch.bfloat16, torch.float16) else k.dtype
        k, v = k.to(self.dtype), v.to(self.dtype)
        num_layers, num_tokens, kv_heads, head_dim = k.shape
        capacity = max(TILE, -(-2 * num_tokens // TILE) * TILE)
        self.k = [tile_keys(k[layer].transpose(0, 1), capacity // TILE) for layer in range(num_layers)]
        self.v = [v.new_zeros(kv_heads, capacity, head_dim) for _ in range(num_layers)]
        for layer in range(num_layers):
            self.v[layer][:, :num_tokens] = v[layer].transpose(0, 1)
        self.lengths = [num_tokens] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one token's k, v [num_kv_heads, head_dim] to `layer`; returns that layer's key tiles and values
        [num_kv_heads, length, head_dim] (views)."""
        length = self.lengths[layer]
        if length == self.v[layer].shape[1]:
            self._grow(layer, length)
        self.k[layer][:, length // TILE, :, length % TILE] = k.to(self.dtype)
        self.v[layer][:, length] = v.to(self.dtype)
        self.lengths[layer] = length + 1
        return self.k[layer], self.v[layer][:, : length + 1]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Decode attention of q [num_heads, head_dim] over the layer's context (the prefix, then k and v as
        `append` returned them); [num_heads, head_dim] in q's dtype."""
        q_here = q.to(self.dtype)
        if self.prefix is None:
            return decode_attention(q_here, k, v).to(q.dtype)
        tier, slots = self.prefix
        return prefixed_decode_attention(q_here, k, v, (tier.k[layer], tier.v[layer], slots)).to(q.dtype)

    def _grow(self, layer: int, length: int) -> None:
        values = self.v[layer]
        grown = values.new_zeros(values.shape[0], 2 * values.shape[1], values.shape[2])
        grown[:, :length] = values[:, :length]
        self.v[layer] = grown
        self.k[layer] = tile_keys(untile_keys(self.k[layer], length), grown.shape[1] // TILE)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole KV, the prefix's included, as [num_layers, num_tokens, num_kv_heads, head_dim] (at a token
        boundary: all layers equal)."""
        length = self.lengths[0]
        if any(n != length for n in self.lengths):
            raise RuntimeError("host KV exported in the middle of a token")
        k = torch.stack([untile_keys(layer, length).transpose(0, 1) for layer in self.k])
        v = torch.stack([layer[:, :length].transpose(0, 1) for layer in self.v])
        if self.prefix is not None:
            tier, slots = self.prefix
            k = torch.cat([torch.stack([layer.index_select(0, slots) for layer in tier.k]).to(self.dtype), k], 1)
            v = torch.cat([torch.stack([layer.index_select(0, slots) for layer in tier.v]).to(self.dtype), v], 1)
        return k, v

    @property
    def nbytes(self) -> int:
        """The request's own KV (a prefix in the host tier is the tier's)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
