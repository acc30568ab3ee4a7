"""The physical KV page pool: device tensors only, no bookkeeping."""

from __future__ import annotations

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
