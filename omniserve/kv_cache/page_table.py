"""Per-request page tables on top of the allocator."""

from __future__ import annotations

from omniserve.kv_cache.page_allocator import PageAllocator


class PageTable:
    """Which pages hold each request's KV. A request with n tokens cached owns ceil(n / page_size) pages, in order."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self._pages: dict[str, list[int]] = {}

    def pages(self, request_id: str) -> list[int]:
        return self._pages.get(request_id, [])

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold num_tokens tokens."""
        return -(-num_tokens // self.page_size)

    def pages_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra pages the request needs to hold num_tokens tokens."""
        return max(0, self.pages_for(num_tokens) - len(self._pages.get(request_id, ())))

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        return self.pages_needed(request_id, num_tokens) <= self.allocator.num_free

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Makes room for num_tokens tokens (raises OutOfPagesError if there is none)."""
        extra = self.pages_needed(request_id, num_tokens)
        if extra:
            self._pages.setdefault(request_id, []).extend(self.allocator.allocate(extra))

    def release(self, request_id: str) -> None:
        """Frees all of the request's pages; a no-op for a request that holds none."""
        pages = self._pages.pop(request_id, None)
        if pages:
            self.allocator.free(pages)

    @property
    def num_requests(self) -> int:
        return len(self._pages)
