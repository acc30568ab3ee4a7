"""First-come-first-served continuous batching with chunked prefill, preemption by recomputation, and placement of
best-effort (BE) decode on the device or in the CPU attention pool.

Each iteration, running device requests come first (a decode token each, or their next prefill chunk), then waiting
requests in arrival order, while the token budget, the sequence limit and the KV pages last. When a running request
needs a page and none is free, the most recently admitted device request is preempted: its pages are freed and it
waits at the front of the queue, to be recomputed from its tokens (prompt and output so far) when pages free up.

Offloaded requests hold no device pages. Each one whose previous token is done starts its next token at layer 0;
the runner carries it through the layers as CPU attention results come back. Placement (`be_decode_placement`):
`cpu` swaps every BE request out once it decodes, `device` never does, `auto` swaps BE requests out (newest first)
when free pages fall short of what the device requests need next, and back in when pages are plentiful and nothing
waits.
"""

from __future__ import annotations

import time
from collections import deque

from omniserve.config import SchedulerConfig
from omniserve.engine.plan import IterationPlan, KVTransfer, OffloadedToken, RunnerOutput, ScheduledChunk
from omniserve.engine.request import Placement, Request, RequestStatus
from omniserve.kv_cache import PageTable

_SWAP_IN_HEADROOM = 0.25  # auto: swap in only if this share of all pages stays free beyond what is needed


class Scheduler:
    def __init__(self, config: SchedulerConfig, page_table: PageTable, eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.page_table = page_table
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Requests that hold device pages (decoding, prefilling, or swapping)."""
        self.offloaded: list[Request] = []
        """Requests whose KV is in the CPU pool."""
        self.requests: dict[str, Request] = {}
        """Every unfinished request, by id."""
        self.num_preemptions = 0
        """Preemptions so far (a request recomputed twice counts twice)."""
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_rebuilt = 0
        """Offloaded requests recomputed on the device after their worker died."""
        self._released: list[str] = []  # ended requests the runner and the CPU pool still hold state for

    # ------------------------------------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Ends a request however it ends (stop, length, abort, error) and frees its pages. Unknown ids are ignored."""
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
            self._released.append(request_id)
        request.status = status
        request.stop_reason = stop_reason
        self.page_table.release(request_id)

    def take_released(self) -> list[str]:
        """Ended requests whose offloaded state (host KV, residuals, rows in flight) the runner must drop."""
        released, self._released = self._released, []
        return released

    # ---------------------------------------------------------------------------------------------- schedule
    def schedule(self) -> IterationPlan:
        swap_outs = self._plan_swap_outs()
        swap_ins = self._plan_swap_ins()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.placement is not Placement.DEVICE:
                index += 1
                continue
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.page_table.can_grow(request.request_id, request.num_computed_tokens + count):
                victim = self._preemption_victim()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # the request itself was the last one left to preempt
            self.page_table.grow(request.request_id, request.num_computed_tokens + count)
            scheduled.append((request, count))
            budget -= count
            index += 1

        # New requests wait while anything is being preempted: admitting them would only preempt again.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.page_table.can_grow(request.request_id, request.num_computed_tokens + count):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self.page_table.grow(request.request_id, request.num_computed_tokens + count)
            scheduled.append((request, count))
            budget -= count

        starts = []
        for request in self.offloaded:
            if not request.token_in_flight:
                request.token_in_flight = True
                starts.append(OffloadedToken(
                    request.request_id, request.token_ids[-1], request.num_tokens - 1, request.params,
                    request.num_output_tokens,
                ))
        chunks = [self._chunk(request, count) for request, count in scheduled]
        return IterationPlan(chunks, starts, swap_outs, swap_ins)

    def _chunk(self, request: Request, count: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + count],
            start_position=start,
            page_ids=list(self.page_table.pages(request.request_id)),
            sample=start + count == request.num_tokens,
            params=request.params,
            num_generated=request.num_output_tokens,
        )

    def _preemption_victim(self) -> Request:
        """The most recently admitted request that is on the device (not mid-swap)."""
        return next(r for r in reversed(self.running) if r.placement is Placement.DEVICE)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.page_table.release(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------------------------------------ placement
    def _pages_wanted(self) -> int:
        """Pages the device requests need for their next tokens, plus the next waiting request's first chunk."""
        wanted = sum(
            self.page_table.pages_needed(r.request_id, r.num_computed_tokens + 1)
            for r in self.running if r.placement is Placement.DEVICE
        )
        if self.waiting:
            head = self.waiting[0]
            chunk = min(head.num_tokens - head.num_computed_tokens, self.config.max_num_batched_tokens)
            wanted += self.page_table.pages_needed(head.request_id, head.num_computed_tokens + chunk)
        return wanted

    def _plan_swap_outs(self) -> list[KVTransfer]:
        mode = self.config.be_decode_placement
        if mode == "device":
            return []
        candidates = [
            r for r in self.running if r.placement is Placement.DEVICE and r.is_best_effort and r.at_token_boundary
        ]
        if mode == "auto":
            free = self.page_table.allocator.num_free + sum(
                len(self.page_table.pages(r.request_id)) for r in self.running if r.placement is Placement.SWAPPING_OUT
            )
            wanted, chosen = self._pages_wanted(), []
            for request in reversed(candidates):  # newest first
                if free >= wanted:
                    break
                chosen.append(request)
                free += len(self.page_table.pages(request.request_id))
            candidates = chosen
        transfers = []
        for request in candidates:
            request.placement = Placement.SWAPPING_OUT
            transfers.append(KVTransfer(
                request.request_id, list(self.page_table.pages(request.request_id)), request.num_computed_tokens
            ))
        return transfers

    def _plan_swap_ins(self) -> list[KVTransfer]:
        if self.config.be_decode_placement != "auto" or self.waiting:
            return []
        allocator = self.page_table.allocator
        keep_free = self._pages_wanted() + int(_SWAP_IN_HEADROOM * allocator.num_pages)
        transfers = []
        for request in list(self.offloaded):  # oldest first
            if request.token_in_flight:
                continue
            if len(self.running) >= self.config.max_num_seqs:
                break
            needed = self.page_table.pages_needed(request.request_id, request.num_computed_tokens + 1)
            if allocator.num_free - needed < keep_free:
                break
            keep_free += needed - self.page_table.pages_needed(request.request_id, request.num_computed_tokens)
            self.page_table.grow(request.request_id, request.num_computed_tokens)
            request.placement = Placement.SWAPPING_IN
            self.offloaded.remove(request)
            self.running.append(request)
            transfers.append(KVTransfer(
                request.request_id, list(self.page_table.pages(request.request_id)), request.num_computed_tokens
            ))
        return transfers

    # ------------------------------------------------------------------------------------------------ update
    def update(self, plan: IterationPlan, output: RunnerOutput) -> list[Request]:
        """Books the iteration's results. Returns the requests that got a new token (finished ones included)."""
        updated = []
        for chunk in plan.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None:  # ended while the iteration ran
                continue
            request.num_computed_tokens += len(chunk.token_ids)
            sampled = output.sampled.get(chunk.request_id)
            if chunk.sample and sampled is not None:
                self._append_token(request, sampled)
                updated.append(request)
        for request_id, sampled in output.sampled.items():
            request = self.requests.get(request_id)
            if request is not None and request.placement is Placement.HOST and request.token_in_flight:
                request.token_in_flight = False
                request.num_computed_tokens += 1
                self._append_token(request, sampled)
                updated.append(request)
        self._book_swaps(output)
        return updated

    def _book_swaps(self, output: RunnerOutput) -> None:
        for request_id in output.swapped_out:
            request = self.requests.get(request_id)
            if request is None or request.placement is not Placement.SWAPPING_OUT:
                continue
            self.page_table.release(request_id)
            self.running.remove(request)
            self.offloaded.append(request)
            request.placement = Placement.HOST
            request.num_swap_outs += 1
            self.num_swap_outs += 1
        for request_id in output.swapped_in:
            request = self.requests.get(request_id)
            if request is not None and request.placement is Placement.SWAPPING_IN:
                request.placement = Placement.DEVICE
                request.num_swap_ins += 1
                self.num_swap_ins += 1
        for request_id in output.lost:  # host KV lost with a worker: recompute from the tokens, on the device
            request = self.requests.get(request_id)
            if request is None or request.placement not in (Placement.HOST, Placement.SWAPPING_IN):
                continue
            (self.offloaded if request.placement is Placement.HOST else self.running).remove(request)
            self.page_table.release(request_id)
            request.placement = Placement.DEVICE
            request.token_in_flight = False
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
            self.num_rebuilt += 1

    def _append_token(self, request: Request, sampled) -> None:
        request.token_ids.append(sampled.token_id)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        if request.params.logprobs is not None:
            request.logprobs.append(sampled)
        self._check_stop(request, sampled.token_id)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            if token_id in params.stop_token_ids:
                return self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token_id)
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
