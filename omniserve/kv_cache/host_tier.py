"""The prefix cache's host tier: full pages evicted from the device, kept in host memory by key, so that a later
request finds them there and copies them back instead of computing them again.

Bookkeeping only (torch-free): which host page holds which key, least recently used first. The page table plans
the copies (`PageTable.take_transfers`): saves of device pages evicted by a plan, loads of host pages into device
pages; the runner runs them first in the iteration, saves before loads, before any KV is written. A host page that
a planned load reads is pinned until that plan has run, so that a save of the same plan never overwrites it.

Offloaded requests read their prompt's shared prefix here in place (PageTable.hold_host_prefix): each holds those
pages, which are never evicted while held. At most half the tier is held, so that it stays a cache.

The tier shares one host budget with the CPU pool's offloaded KV, and gives way to it: the engine sets, after each
plan, how many pages it may fill (`set_limit`), and the least recently used pages beyond are evicted."""

from __future__ import annotations

from collections import OrderedDict


class HostTier:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._page_of: dict[bytes, int] = {}
        self._key_of: OrderedDict[int, bytes] = OrderedDict()
        """Pages holding a key, least recently used first."""
        self._pinned: set[int] = set()
        self._holders: dict[int, int] = {}
        """Held pages: how many offloaded requests read each in place."""
        self.num_evicted = 0
        self.limit = num_pages
        """Pages it may fill now (set_limit): all, less what offloaded KV takes of the budget they share."""

    def __len__(self) -> int:
        """Pages holding a key."""
        return len(self._key_of)

    def lookup(self, key: bytes) -> int | None:
        """The page holding `key`, or None."""
        return self._page_of.get(key)

    def store(self, key: bytes) -> int | None:
        """A page to copy `key`'s KV into: free, or the least recently used unpinned one (evicted). None: the key is
        here already, or every page is pinned."""
        if key in self._page_of:
            self._key_of.move_to_end(self._page_of[key])
            return None
        if self._free and len(self._key_of) < self.limit:
            page = self._free.pop()
        else:
            page = self._evict_one()
            if page is None:
                return None
        self._page_of[key] = page
        self._key_of[page] = key
        return page

    def _evict_one(self) -> int | None:
        """Forgets the least recently used page nobody pins or holds; returns it (None: there is none)."""
        page = next((p for p in self._key_of if p not in self._pinned and p not in self._holders), None)
        if page is not None:
            del self._page_of[self._key_of.pop(page)]
            self.num_evicted += 1
        return page

    def set_limit(self, limit: int) -> list[int]:
        """Lets the tier fill at most `limit` pages from now on: the least recently used pages beyond it are evicted
        (pages pinned or held stay, over the limit if need be). Returns the evicted pages, whose memory may be given
        back."""
        self.limit = max(0, min(limit, self.num_pages))
        evicted = []
        while len(self._key_of) > self.limit:
            page = self._evict_one()
            if page is None:
                break
            self._free.append(page)
            evicted.append(page)
        return evicted

    @property
    def num_kept(self) -> int:
        """Pages that may not be evicted now (pinned by this plan's copies, or held by offloaded requests)."""
        return len(self._pinned | self._holders.keys())

    def drop(self, page: int) -> None:
        """Forgets a page whose copy did not happen (its iteration failed); whoever held it must hold it no more."""
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
            self._free.append(page)
        self._holders.pop(page, None)

    @property
    def num_held(self) -> int:
        return len(self._holders)

    def may_hold(self, count: int) -> bool:
        """Whether `count` more pages may be held: held pages never exceed half the tier."""
        return self.num_held + count <= self.num_pages // 2

    def hold(self, page: int) -> None:
        """One more offloaded request reads this page in place: it is not evicted until released."""
        self._holders[page] = self._holders.get(page, 0) + 1
        self._key_of.move_to_end(page)

    def release(self, page: int) -> None:
        holders = self._holders.get(page)
        if holders is None:  # dropped meanwhile
            return
        if holders > 1:
            self._holders[page] = holders - 1
        else:
            del self._holders[page]

    def pin(self, page: int) -> None:
        """A page a planned copy reads or writes: the most recently used, and kept until unpinned."""
        self._key_of.move_to_end(page)
        self._pinned.add(page)

    def unpin_all(self) -> None:
        self._pinned.clear()

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free) or free & self._key_of.keys():
            raise AssertionError("a host page is free twice, or free and holding a key")
        if len(free) + len(self._key_of) != self.num_pages or len(self._page_of) != len(self._key_of):
            raise AssertionError(f"host pages: {len(free)} free + {len(self._key_of)} holding keys != {self.num_pages}")
        if not self._holders.keys() <= self._key_of.keys():
            raise AssertionError("a held host page holds no key")
