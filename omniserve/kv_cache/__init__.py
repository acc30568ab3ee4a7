"""Paged KV cache: physical pool (tensors, page_pool.py) -> page allocator (free list, holders, and the prefix cache's
idle pages, prefix_cache.py) -> per-request page tables (and the prefix cache's lookups).

The package exports the bookkeeping only, which is plain Python (the scheduler and the simulator use it without
torch); the pool of tensors is imported from omniserve.kv_cache.page_pool."""

from omniserve.kv_cache.page_allocator import OutOfPagesError, PageAllocator
from omniserve.kv_cache.page_table import PageTable
from omniserve.kv_cache.prefix_cache import PrefixCache

__all__ = ["OutOfPagesError", "PageAllocator", "PageTable", "PrefixCache"]
