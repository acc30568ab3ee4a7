"""The physical KV page pool: device tensors only, no bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omniserve.config import CPU_DEFAULT_KV_BYTES, CacheConfig, ModelConfig

_CUDA_FREE_MEMORY_FRACTION = 0.9


class PagePool:
    """K and V pages for every layer.

    Per layer, k[layer] and v[layer] are [num_pages * page_size, num_kv_heads, head_dim]: token slot
    `page * page_size + offset` holds one token's key (or value). Flat slots make writes a single index_copy_.
    """

    def __init__(self, model: ModelConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype):
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_pages * page_size, model.num_kv_heads, model.head_dim)
        # torch.empty: pages are written before they are read, and untouched host memory is never committed.
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(model.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(model.num_layers)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [num_tokens, num_kv_heads, head_dim] at `slots` [num_tokens]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, page_ids: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the first num_tokens tokens' K and V of the request whose pages are page_ids, from every layer:
        each [num_layers, num_tokens, num_kv_heads, head_dim], on the pool's device (swap-out)."""
        slots = token_slots(page_ids, 0, num_tokens, self.page_size).to(self.k[0].device)
        return (torch.stack([layer.index_select(0, slots) for layer in self.k]),
                torch.stack([layer.index_select(0, slots) for layer in self.v]))

    def scatter(self, page_ids: Sequence[int], num_tokens: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The inverse of gather (swap-in): stores k, v [num_layers, num_tokens, num_kv_heads, head_dim], wherever
        they are, as the first num_tokens tokens of the request whose pages are page_ids."""
        slots = token_slots(page_ids, 0, num_tokens, self.page_size).to(self.k[0].device)
        for layer in range(len(self.k)):
            # Layer by layer: a whole request's KV moved at once would need that much spare device memory.
            self.write(layer, slots, k[layer].to(slots.device), v[layer].to(slots.device))


def token_slots(page_ids: Sequence[int], start: int, count: int, page_size: int) -> torch.Tensor:
    """[count] int64 on the host: the slots of positions start .. start+count-1 of a request whose pages are
    page_ids."""
    positions = torch.arange(start, start + count)
    pages = torch.tensor(page_ids, dtype=torch.long)
    return pages[positions // page_size] * page_size + positions % page_size


def bytes_per_page(model: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * page_size * model.kv_size * torch.empty((), dtype=dtype).element_size()


def pages_for_memory(model: ModelConfig, cache: CacheConfig, device: torch.device, dtype: torch.dtype) -> int:
    """How many pages the configured (or default) KV memory holds."""
    if cache.num_pages is not None:
        return cache.num_pages
    budget = cache.kv_cache_memory_bytes
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * _CUDA_FREE_MEMORY_FRACTION)
        else:
            budget = CPU_DEFAULT_KV_BYTES
    return max(1, budget // bytes_per_page(model, cache.page_size, dtype))
