"""Free list of KV pages."""

from __future__ import annotations


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Hands out page ids from a free list. Knows nothing of requests."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._used:
                raise RuntimeError(f"page {page} freed twice or never allocated")
            self._used.remove(page)
            self._free.append(page)

    def check_integrity(self) -> None:
        """Every page is either free or used, exactly once."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        if free & self._used:
            raise AssertionError(f"pages both free and used: {sorted(free & self._used)[:8]}")
        if len(free) + len(self._used) != self.num_pages:
            raise AssertionError(f"free {len(free)} + used {len(self._used)} != total {self.num_pages}")
