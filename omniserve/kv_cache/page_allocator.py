"""KV pages: a free list, reference counts, and (with prefix caching) the idle cached pages to take back."""

from __future__ import annotations

from omniserve.kv_cache.prefix_cache import PrefixCache


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    """Hands out page ids and counts who holds each. Knows nothing of requests.

    With a prefix cache, a page whose last holder lets it go stays cached (idle) if it was cached, and counts as
    free: it is handed out again, and forgotten by the cache, only when no never-used or evicted page is left."""

    def __init__(self, num_pages: int, cache: PrefixCache | None = None) -> None:
        self.num_pages = num_pages
        self.cache = cache
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._holders: dict[int, int] = {}
        """Pages in use -> how many requests hold each (more than one only for cached pages)."""
        self._num_idle = 0  # the cache's idle pages, counted here: num_free is read for every request every iteration

    @property
    def num_free(self) -> int:
        """Pages that can be handed out: never used, or cached and idle."""
        return len(self._free) + self._num_idle

    @property
    def num_used(self) -> int:
        """Pages some request holds."""
        return len(self._holders)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfPagesError(f"asked for {count} pages, {self.num_free} free")
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.pop()
            else:
                page = self.cache.evict()
                self._num_idle -= 1
            self._holders[page] = 1
            pages.append(page)
        return pages

    def share(self, page: int) -> None:
        """One more holder for a cached page (in use by others, or idle)."""
        if page in self._holders:
            self._holders[page] += 1
        else:
            self.cache.unpark(page)
            self._num_idle -= 1
            self._holders[page] = 1

    def free(self, pages: list[int]) -> None:
        """One holder fewer for each page; a page nobody holds becomes free (idle, if it is cached)."""
        for page in pages:
            holders = self._holders.get(page)
            if holders is None:
                raise RuntimeError(f"page {page} freed twice or never allocated")
            if holders > 1:
                self._holders[page] = holders - 1
                continue
            del self._holders[page]
            if self.cache is not None and self.cache.is_cached(page):
                self.cache.park(page)
                self._num_idle += 1
            else:
                self._free.append(page)

    def check_integrity(self) -> None:
        """Every page is exactly one of: free, held, cached and idle."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        idle = set(self.cache.idle_pages()) if self.cache is not None else set()
        for name, pages in (("free and held", free & self._holders.keys()), ("free and idle", free & idle),
                            ("held and idle", idle & self._holders.keys())):
            if pages:
                raise AssertionError(f"pages both {name}: {sorted(pages)[:8]}")
        if len(free) + len(self._holders) + len(idle) != self.num_pages:
            raise AssertionError(f"free {len(free)} + held {len(self._holders)} + idle {len(idle)} "
                                 f"!= total {self.num_pages}")
        if self.cache is not None and any(not self.cache.is_cached(p) for p in idle):
            raise AssertionError("an idle page is not cached")
        if len(idle) != self._num_idle:
            raise AssertionError(f"{len(idle)} idle pages, {self._num_idle} counted")
