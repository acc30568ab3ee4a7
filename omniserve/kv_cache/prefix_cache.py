"""Automatic prefix caching: full KV pages found again by what they hold.

A full page's key is a hash chained over every token before it and its own (`page_hash`), seeded by the request's
cache salt, so a page is found only by a request whose tokens up to the end of that page are the same and whose salt
is the same (requests of different API keys never share a page, see omniserve.entrypoints.openai.serving). Pages in
use are reference-counted by the allocator (page_allocator.py); a cached page that no request holds any more stays
here, idle, until the allocator needs it back for new KV, the least recently used first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def salt_digest(salt: str | None) -> bytes:
    """The seed of a request's hash chain: requests with different salts share no page."""
    return hashlib.sha256(b"omniserve-prefix\0" + (salt or "").encode()).digest()


def page_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full page: its tokens, chained to the key of the page before it (or the salt's digest)."""
    return hashlib.sha256(previous + array("q", tokens).tobytes()).digest()


class PrefixCache:
    """Page ids by key, and the idle ones (cached, held by no request) in least-recently-used order.

    Knows nothing of reference counts: the allocator parks a page here when its last holder lets it go, takes it
    back when a request hits it, and evicts the oldest idle page when it has no free page left."""

    def __init__(self) -> None:
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.num_evicted = 0
        self.evicted: list[tuple[int, bytes]] | None = None
        """(page, key) of each page evicted since it was last emptied, when a host tier keeps them (else None)."""

    def __len__(self) -> int:
        """Pages cached (held by requests or idle)."""
        return len(self._page_of)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def lookup(self, key: bytes) -> int | None:
        return self._page_of.get(key)

    def insert(self, key: bytes, page: int) -> None:
        """Caches a page just filled. A key already cached keeps its page (two requests computed the same page at
        once: the later copy stays private to its request and is freed with it)."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    def park(self, page: int) -> None:
        """A cached page no request holds any more: idle, the most recently used."""
        self._idle[page] = None

    def unpark(self, page: int) -> None:
        """An idle page a request takes again."""
        del self._idle[page]

    def idle_pages(self) -> list[int]:
        """The idle pages, least recently used first."""
        return list(self._idle)

    def evict(self) -> int | None:
        """Forgets the least recently used idle page and returns it for reuse (None: no idle page)."""
        if not self._idle:
            return None
        page, _ = self._idle.popitem(last=False)
        key = self._key_of.pop(page)
        del self._page_of[key]
        self.num_evicted += 1
        if self.evicted is not None:
            self.evicted.append((page, key))
        return page

    def remove(self, page: int) -> None:
        """Forgets a page in use whose KV never came (a failed copy): it is freed as an uncached page."""
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
