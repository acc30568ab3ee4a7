"""Host-memory KV cache of offloaded requests: per request and layer, growing as tokens are added."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omniserve.cpu_attention.kernel import TILE, decode_attention, prefixed_decode_attention, tile_keys, untile_keys
from omniserve.kv_cache.page_pool import PagePool, token_slots


class HostKV:
    """One request's keys and values for every layer.

    Per layer, keys are [num_kv_heads, tiles, head_dim, 16] (tiles of 16 positions, transposed inside a tile) and
    values [num_kv_heads, capacity, head_dim], with the first lengths[layer] positions valid: the layouts the decode
    kernel streams through (kernel.py). Capacity doubles when full, so appending a token is amortised O(1).

    A request whose prompt starts with pages of the prefix cache's host tier keeps only the KV after them: its
    attention reads those pages in place, where every offloaded request with that prefix reads them.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, tier: PagePool | None = None,
                 prefix_pages: Sequence[int] = ()) -> None:
        """k, v: [num_layers, num_tokens, num_kv_heads, head_dim], the request's KV so far (after its prefix, if it
        has one). prefix_pages: the pages of the host tier (`tier`, in shared memory) that hold the request's first
        tokens, a multiple of 16 of them. Half-precision KV is kept in fp32: the kernel computes in fp32 or fp64
        only."""
        self.tier, self.prefix_pages = tier, tuple(prefix_pages)
        self.prefix_tokens = 0 if tier is None else len(self.prefix_pages) * tier.page_size
        self.prefix_slots = None if tier is None else token_slots(self.prefix_pages, 0, self.prefix_tokens,
                                                                  tier.page_size)
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
        if not self.prefix_tokens:
            return decode_attention(q_here, k, v).to(q.dtype)
        prefix = (self.tier.k[layer], self.tier.v[layer], self.prefix_slots)
        return prefixed_decode_attention(q_here, k, v, prefix).to(q.dtype)

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
        return self.with_prefix(k, v, self.tier, self.prefix_pages) if self.prefix_tokens else (k, v)

    @staticmethod
    def with_prefix(k: torch.Tensor, v: torch.Tensor, tier: PagePool,
                    prefix_pages: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [num_layers, tokens, num_kv_heads, head_dim] with the KV of the host tier's prefix pages in front, in
        their dtype (a whole KV, for a swap-in or a host that cannot read the tier)."""
        prefix_k, prefix_v = tier.gather(prefix_pages, len(prefix_pages) * tier.page_size)
        return torch.cat([prefix_k.to(k.dtype), k], 1), torch.cat([prefix_v.to(v.dtype), v], 1)

    @property
    def nbytes(self) -> int:
        """The request's own KV (a prefix in the host tier is the tier's)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
