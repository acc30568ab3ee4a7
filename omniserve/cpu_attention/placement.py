"""Where an offloaded request's host KV goes, at swap-out: the one rule the CPU attention pool follows and the
simulator models. Plain Python, no torch.

A request is placed at the size it will reach when done (the size the scheduler counts against host capacity), so a
host is never promised more than its budget by requests that grow there. Among the hosts with room for it, the one
with the largest share of its budget still free after taking it: an offloaded request's attention work grows with its
KV, so keeping the hosts' memory equally full keeps their CPU workers equally busy (filling the local host first left
the remote hosts' workers idle while the local ones queued). The local host wins ties (no network between the engine
and its workers), then the host with fewer requests. When no host has room, the local host (the last resort: its
budget is a preference, the memory is there). On the chosen host, the least loaded worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOCAL = -1
"""choose_host's answer for the local host."""


@dataclass(frozen=True)
class HostRoom:
    free: int
    """Memory (bytes or tokens, as the caller counts) not yet promised to a request."""
    budget: int
    """The host's whole KV budget, in the same unit."""
    num_requests: int = 0


def choose_host(local: HostRoom, remote: Sequence[HostRoom], size: int) -> int:
    """LOCAL, or the index in `remote` of the host that takes a request of `size`."""
    hosts = [(LOCAL, local), *enumerate(remote)]
    fitting = [(index, room) for index, room in hosts if room.free >= size]
    if not fitting:
        return LOCAL

    def preference(item: tuple[int, HostRoom]) -> tuple[float, bool, int]:
        index, room = item
        share_left = (room.free - size) / room.budget if room.budget > 0 else 0.0
        return share_left, index == LOCAL, -room.num_requests

    return max(fitting, key=preference)[0]


def least_loaded(requests_per_worker: Sequence[int]) -> int:
    """The worker with the fewest requests (the lowest index among equals)."""
    return min(range(len(requests_per_worker)), key=lambda i: (requests_per_worker[i], i))
