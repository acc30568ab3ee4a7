"""First-come-first-served continuous batching with chunked prefill and preemption by recomputation.

Each iteration, running requests come first (a decode token each, or their next prefill chunk), then waiting
requests in arrival order, while the token budget, the sequence limit and the KV pages last. When a running request
needs a page and none is free, the most recently admitted request is preempted: its pages are freed and it waits at
the front of the queue, to be recomputed from its tokens (prompt and output so far) when pages free up.
"""

from __future__ import annotations

import time
from collections import deque

from omniserve.config import SchedulerConfig
from omniserve.engine.plan import IterationPlan, RunnerOutput, ScheduledChunk
from omniserve.engine.request import Request, RequestStatus
from omniserve.kv_cache import PageTable


class Scheduler:
    def __init__(self, config: SchedulerConfig, page_table: PageTable, eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.page_table = page_table
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        """Every unfinished request, by id."""
        self.num_preemptions = 0
        """Preemptions so far (a request recomputed twice counts twice)."""

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
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.stop_reason = stop_reason
        self.page_table.release(request_id)

    # ---------------------------------------------------------------------------------------------- schedule
    def schedule(self) -> IterationPlan:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.page_table.can_grow(request.request_id, request.num_computed_tokens + count):
                victim = self.running[-1]
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

        return IterationPlan([self._chunk(request, count) for request, count in scheduled])

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

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.page_table.release(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

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
            if not chunk.sample or sampled is None:
                continue
            request.token_ids.append(sampled.token_id)
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if request.params.logprobs is not None:
                request.logprobs.append(sampled)
            updated.append(request)
            self._check_stop(request, sampled.token_id)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            if token_id in params.stop_token_ids:
                return self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token_id)
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
