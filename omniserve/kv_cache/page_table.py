"""Per-request page tables on top of the allocator, and the prefix cache's lookups and inserts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from omniserve.kv_cache.host_tier import HostTier
from omniserve.kv_cache.page_allocator import PageAllocator
from omniserve.kv_cache.prefix_cache import page_hash, salt_digest


class PageTable:
    """Which pages hold each request's KV. A request with n tokens cached owns ceil(n / page_size) pages, in order.

    With prefix caching (the allocator has a cache), a request starts on the cached pages that hold the longest
    prefix of its tokens (`attach_cached_prefix`), and each of its pages is cached once full (`cache_full_pages`)."""

    def __init__(self, allocator: PageAllocator, page_size: int, host_tier: HostTier | None = None) -> None:
        """host_tier: where evicted cached pages go, and are found again (needs the allocator's cache)."""
        self.allocator = allocator
        self.page_size = page_size
        self.cache = allocator.cache
        self.host_tier = host_tier
        if host_tier is not None:
            if self.cache is None:
                raise ValueError("a host tier keeps the prefix cache's evicted pages: the allocator needs a cache")
            self.cache.evicted = []
        self.copy_beats_recompute: Callable[[int, int, int], bool] | None = None
        """Set by the engine where it can judge: (start, count, copied) -> whether copying `copied` tokens' KV back
        from the host tier takes less time than computing the `count` tokens from position `start` that hold them.
        None: a prefix in the host tier is always copied back."""
        self.offload_reads_host_tier = False
        """Set by the engine when its CPU pool's workers read the host tier in place: an offloaded request then
        holds its shared prefix's host pages instead of carrying its own copy of them (hold_host_prefix)."""
        self._loads: list[tuple[int, int]] = []
        """Host page -> device page copies planned since take_transfers (prefix pages found in the host tier)."""
        self._saves: list[tuple[int, int]] = []
        """Device page -> host page copies planned since take_transfers for prefixes offloaded requests hold."""
        self._held: dict[str, list[int]] = {}
        """Per offloaded request: the host pages of its prefix that it reads in place."""
        self._in_flight: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        """The saves and loads of the last plan, until it has run (end_transfers) or failed (abort_transfers)."""
        self._pages: dict[str, list[int]] = {}
        self._num_cached: dict[str, int] = {}
        """Per request: how many of its first pages are in the cache (hit, or cached when they filled)."""
        self._hashes: dict[str, list[bytes]] = {}
        """Per request: the keys of its full pages so far, kept until it ends (`forget`): a request preempted and
        started again, or looked up on each admission attempt, hashes its tokens once."""

    @property
    def caching(self) -> bool:
        return self.cache is not None

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
        """Lets go of all the request's pages (cached ones stay cached); a no-op for a request that holds none."""
        self._num_cached.pop(request_id, None)
        pages = self._pages.pop(request_id, None)
        if pages:
            self.allocator.free(pages)

    def forget(self, request_id: str) -> None:
        """Releases an ended request's pages (the host tier's it held included) and drops what was kept of it."""
        self.release(request_id)
        self.release_host_prefix(request_id)
        self._hashes.pop(request_id, None)

    @property
    def num_requests(self) -> int:
        return len(self._pages)

    @property
    def num_remembered(self) -> int:
        """Requests whose page keys are kept (until `forget`)."""
        return len(self._hashes)

    # ------------------------------------------------------------------------------------------- prefix caching
    def cached_prefix_tokens(self, request_id: str, token_ids: Sequence[int], salt: str | None) -> int:
        """The tokens of the request's cached prefix (on the device or in the host tier), without taking any page:
        what attach_cached_prefix gives it while free pages allow."""
        if self.cache is None or request_id in self._pages:
            return 0
        return len(self._cached_prefix(request_id, token_ids, salt)) * self.page_size

    def attach_cached_prefix(self, request_id: str, token_ids: Sequence[int], salt: str | None) -> int:
        """Gives a request that holds no page the cached pages of its longest cached prefix of full pages, short of
        its last token (which must be computed to sample from). Returns the tokens they hold (0: no hit).

        Pages on the device are taken first, so that no allocation below evicts them. Pages in the host tier get
        device pages, as free pages allow (the prefix ends at the first that gets none), cached under their keys
        at once and held once more until the plan has run (so that no other allocation of this plan evicts one
        before its copy lands); their copies are planned (take_transfers)."""
        if self.cache is None or request_id in self._pages:
            return 0
        found = self._cached_prefix(request_id, token_ids, salt)
        for _, page, _ in found:
            if page is not None:
                self.allocator.share(page)
        pages = []
        for index, (key, page, host_page) in enumerate(found):
            if page is None:
                if not self.allocator.num_free:
                    self.allocator.free([p for _, p, _ in found[index:] if p is not None])
                    break
                [page] = self.allocator.allocate(1)
                self.cache.insert(key, page)
                self.allocator.share(page)
                self.host_tier.pin(host_page)
                self._loads.append((host_page, page))
            pages.append(page)
        if not pages:
            return 0
        self._pages[request_id] = pages
        self._num_cached[request_id] = len(pages)
        return len(pages) * self.page_size

    # --------------------------------------------------------------------------------------------- the host tier
    def hold_host_prefix(self, request_id: str, shared_pages: int) -> list[int]:
        """For a request this plan offloads: host-tier pages that hold its first full pages, held for it until
        release_host_prefix, which its host KV reads in place instead of a copy of its own. Its pages in the tier
        already are taken, and its first `shared_pages` (its prompt's cache hit: a prefix others share) are saved
        there with this plan's copies if they are not. The prefix ends at the first page that is neither, is cut to
        whole tiles of 16 tokens (the CPU kernel's unit), and is empty if the tier may hold no more."""
        if not self.offload_reads_host_tier or request_id in self._held:
            return []
        tier, hashes, pages = self.host_tier, self._hashes.get(request_id, []), self._pages.get(request_id, [])
        found = []  # (key, device page, host page or None)
        for index in range(min(self._num_cached.get(request_id, 0), len(hashes))):
            host_page = tier.lookup(hashes[index])
            if host_page is None and index >= shared_pages:
                break
            found.append((hashes[index], pages[index], host_page))
        found = found[:self._whole_tiles(len(found))]
        if not found or not tier.may_hold(len(found)):
            return []
        for _, _, host_page in found:  # held first: no save below may evict them
            if host_page is not None:
                tier.hold(host_page)
        held = []
        for index, (key, page, host_page) in enumerate(found):
            if host_page is None:
                host_page = tier.store(key)
                if host_page is None:  # every page pinned or held
                    for _, _, later in found[index:]:
                        if later is not None:
                            tier.release(later)
                    break
                tier.hold(host_page)
                tier.pin(host_page)
                self._saves.append((page, host_page))
            held.append(host_page)
        for host_page in held[self._whole_tiles(len(held)):]:
            tier.release(host_page)  # a save planned for it still lands: the page stays cached
        held = held[:self._whole_tiles(len(held))]
        if held:
            self._held[request_id] = held
        return held

    def _whole_tiles(self, num_pages: int) -> int:
        """The most of num_pages pages that hold a multiple of 16 tokens."""
        step = 16 // math.gcd(self.page_size, 16)
        return num_pages // step * step

    def release_host_prefix(self, request_id: str) -> None:
        """The request reads its prefix in the host tier no more (back on the device, rebuilt, or ended)."""
        for host_page in self._held.pop(request_id, ()):
            self.host_tier.release(host_page)

    @property
    def num_holding_host_prefix(self) -> int:
        """Requests that hold host-tier pages (0 once every offloaded request has ended)."""
        return len(self._held)

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The copies the plan just made needs, run before its forward, saves first: (device page, host page) saves
        of the pages it evicted and of the prefixes its offloaded requests hold, (host page, device page) loads of
        the pages it found in the host tier."""
        if self.host_tier is None:
            return [], []
        saves, self._saves = self._saves, []
        for page, key in self.cache.evicted:
            host_page = self.host_tier.store(key)
            if host_page is not None:
                saves.append((page, host_page))
                self.host_tier.pin(host_page)  # written by this plan: no later store or limit of it evicts it
        self.cache.evicted.clear()
        loads, self._loads = self._loads, []
        self._in_flight = (saves, loads)
        return saves, loads

    def end_transfers(self) -> None:
        """The last plan has run: its loaded pages are released from their copy's hold, its host pages unpinned."""
        saves, loads = self._in_flight
        if loads:
            self.allocator.free([page for _, page in loads])
        if self.host_tier is not None:
            self.host_tier.unpin_all()
        self._in_flight = ([], [])

    def abort_transfers(self) -> None:
        """The last plan failed: its copies may not have happened, so the pages they were to fill are forgotten."""
        saves, loads = self._in_flight
        for _, host_page in saves:
            self.host_tier.drop(host_page)
        for _, page in loads:
            self.cache.remove(page)
        self.end_transfers()

    def cache_full_pages(self, request_id: str, token_ids: Sequence[int], num_computed: int,
                         salt: str | None) -> None:
        """Caches the request's pages that its computed tokens (the first `num_computed`) have filled since."""
        if self.cache is None:
            return
        pages = self._pages.get(request_id)
        full = min(num_computed // self.page_size, len(pages) if pages else 0)
        done = self._num_cached.get(request_id, 0)
        if full <= done:
            return
        hashes = self._page_hashes(request_id, token_ids, salt, full)
        for index in range(done, full):
            self.cache.insert(hashes[index], pages[index])
        self._num_cached[request_id] = full

    def _cached_prefix(self, request_id: str, token_ids: Sequence[int],
                       salt: str | None) -> list[tuple[bytes, int | None, int | None]]:
        """(key, device page, host page) of each page of the request's longest cached prefix, short of its last
        token: each page on the device, or else in the host tier. The prefix ends before its first page in the host
        tier if computing the pages from there would be faster than copying those in the host tier back."""
        found = []
        for key in self._page_hashes(request_id, token_ids, salt, (len(token_ids) - 1) // self.page_size):
            page = self.cache.lookup(key)
            host_page = None if page is not None or self.host_tier is None else self.host_tier.lookup(key)
            if page is None and host_page is None:
                break
            found.append((key, page, host_page))
        first_host = next((i for i, (_, page, _) in enumerate(found) if page is None), None)
        if first_host is not None and self.copy_beats_recompute is not None:
            copied = sum(page is None for _, page, _ in found) * self.page_size
            count = (len(found) - first_host) * self.page_size
            if not self.copy_beats_recompute(first_host * self.page_size, count, copied):
                return found[:first_host]
        return found

    def _page_hashes(self, request_id: str, token_ids: Sequence[int], salt: str | None, count: int) -> list[bytes]:
        """The keys of the request's first `count` full pages, extending those kept."""
        hashes = self._hashes.setdefault(request_id, [])
        size = self.page_size
        previous = hashes[-1] if hashes else salt_digest(salt)
        for index in range(len(hashes), count):
            previous = page_hash(previous, token_ids[index * size:(index + 1) * size])
            hashes.append(previous)
        return hashes[:count] if len(hashes) > count else hashes
