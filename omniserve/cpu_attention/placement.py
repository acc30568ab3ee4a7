"""Where an offloaded request's host KV goes, at swap-out: the one rule the CPU attention pool follows and the
simulator models. Plain Python, no torch.

The local host first while its KV budget lasts (no network between the engine and its workers); then the remote host
with the most free memory, the fewest requests among equals; the local host again when no remote host has room (it is
the last resort: its budget is a preference, the memory is there). On the chosen host, the least loaded worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOCAL = -1
"""choose_host's answer for the local host."""


@dataclass(frozen=True)
class RemoteRoom:
    free: int
    """Memory (bytes or tokens, as the caller counts) not yet promised to a request."""
    num_requests: int


def choose_host(local_free: int, remote: Sequence[RemoteRoom], size: int) -> int:
    """LOCAL, or the index in `remote` of the host that takes a request of `size`."""
    if not remote or local_free >= size:
        return LOCAL
    best = max(range(len(remote)), key=lambda i: (remote[i].free, -remote[i].num_requests))
    return best if remote[best].free >= size else LOCAL


def least_loaded(requests_per_worker: Sequence[int]) -> int:
    """The worker with the fewest requests (the lowest index among equals)."""
    return min(range(len(requests_per_worker)), key=lambda i: (requests_per_worker[i], i))
