"""Host-memory KV cache of offloaded requests: per request and layer, growing as tokens are added."""

from __future__ import annotations

import torch


class HostKV:
    """One request's keys and values for every layer.

    Per layer, k[layer] is [num_kv_heads, capacity, head_dim] (v alike), with the first lengths[layer] positions
    valid: each KV head's context is contiguous, which is what the decode kernel streams through. Capacity doubles
    when full, so appending a token is amortised O(1).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_layers, num_tokens, num_kv_heads, head_dim], the request's KV so far."""
        num_layers, num_tokens, kv_heads, head_dim = k.shape
        capacity = max(16, 2 * num_tokens)
        self.k = [torch.empty(kv_heads, capacity, head_dim, dtype=k.dtype) for _ in range(num_layers)]
        self.v = [torch.empty(kv_heads, capacity, head_dim, dtype=v.dtype) for _ in range(num_layers)]
        for layer in range(num_layers):
            self.k[layer][:, :num_tokens] = k[layer].transpose(0, 1)
            self.v[layer][:, :num_tokens] = v[layer].transpose(0, 1)
        self.lengths = [num_tokens] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds one token's k, v [num_kv_heads, head_dim] to `layer`; returns that layer's whole context as views
        [num_kv_heads, length, head_dim]."""
        length = self.lengths[layer]
        if length == self.k[layer].shape[1]:
            self.k[layer] = _grow(self.k[layer], length)
            self.v[layer] = _grow(self.v[layer], length)
        self.k[layer][:, length] = k
        self.v[layer][:, length] = v
        self.lengths[layer] = length + 1
        return self.k[layer][:, : length + 1], self.v[layer][:, : length + 1]

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole KV as [num_layers, num_tokens, num_kv_heads, head_dim] (at a token boundary: all layers equal)."""
        length = self.lengths[0]
        if any(n != length for n in self.lengths):
            raise RuntimeError("host KV exported in the middle of a token")
        k = torch.stack([layer[:, :length].transpose(0, 1) for layer in self.k])
        v = torch.stack([layer[:, :length].transpose(0, 1) for layer in self.v])
        return k, v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _grow(buffer: torch.Tensor, length: int) -> torch.Tensor:
    grown = torch.empty(buffer.shape[0], 2 * buffer.shape[1], buffer.shape[2], dtype=buffer.dtype)
    grown[:, :length] = buffer[:, :length]
    return grown
