"""What the scheduler's managers share: the requests and their queues, the device page table, the iteration count and
the counters. Each manager owns the rest of its state (pages.py, admission.py, offload.py, piggyback.py, booking.py,
correction.py); this object holds only what more than one of them reads or moves."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.latency_model import LatencyModel
from omniserve.engine.scheduler.policy import POLICY_TABLE
from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
from omniserve.kv_cache import PageTable


@dataclass
class SchedulerStats:
    """Counters since the engine started, for metrics and benchmarks."""

    num_preemptions: int = 0
    """Preemptions (a request recomputed twice counts twice)."""
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    num_rebuilt: int = 0
    """Offloaded requests recomputed on the device after their worker died."""
    num_rejected: int = 0
    prefix_cache_queries: int = 0
    """Tokens of the requests started, looked up in the prefix cache (each request once, when it first starts)."""
    prefix_cache_hits: int = 0
    """Of those, the tokens found there."""


class SchedulerState:
    """The requests, where each is (waiting, running on the device, offloaded to the CPU pool), and the settings and
    models every manager plans with."""

    def __init__(self, config: SchedulerConfig, page_table: PageTable, num_layers: int,
                 latency_model: LatencyModel | None, clock: Callable[[], float]) -> None:
        self.config = config
        self.policy = POLICY_TABLE[config.policy]
        self.page_table = page_table
        self.num_layers = num_layers
        self.latency_model = latency_model
        """The cost model plans are made with (None: no SLO, only the token budget bounds an iteration)."""
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Requests that hold device pages (decoding, prefilling, or swapping)."""
        self.offloaded: list[Request] = []
        """Requests whose KV is in the CPU pool."""
        self.requests: dict[str, Request] = {}
        """Every unfinished request, by id."""
        self.iteration = 0
        self.stats = SchedulerStats()
        self.released: list[str] = []
        """Ended requests the runner and the CPU pool still hold state for (see Scheduler.take_released)."""

    def is_ls(self, request: Request) -> bool:
        """Whether the request is served as latency-sensitive (under a policy without classes, every request is)."""
        return not self.policy.classes or not request.is_best_effort

    def ls_present(self) -> bool:
        """Whether an LS request runs or waits."""
        return any(self.is_ls(r) for r in self.running) or any(self.is_ls(r) for r in self.waiting)

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Ends a request however it ends (stop, length, abort, error, rejection) and frees its pages. Unknown ids
        are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.placement is Placement.HOST:
            self.offloaded.remove(request)
        else:
            self.running.remove(request)
        if request.placement is not Placement.DEVICE:
            self.released.append(request_id)
        request.status = status
        request.stop_reason = stop_reason
        self.page_table.forget(request_id)

    def requeue(self, request: Request) -> None:
        """Sends a request back to the front of the queue, to be recomputed from its tokens (preempted, or its host
        KV lost): its pages are freed."""
        self.page_table.release(request.request_id)
        self.page_table.release_host_prefix(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
