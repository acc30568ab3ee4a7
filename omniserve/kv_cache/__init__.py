"""Paged KV cache: physical pool (tensors) -> page allocator (free list) -> per-request page tables."""

from omniserve.kv_cache.page_allocator import OutOfPagesError, PageAllocator
from omniserve.kv_cache.page_pool import PagePool, bytes_per_page, pages_for_memory
from omniserve.kv_cache.page_table import PageTable

__all__ = ["OutOfPagesError", "PageAllocator", "PagePool", "PageTable", "bytes_per_page", "pages_for_memory"]
