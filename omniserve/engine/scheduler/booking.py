"""Booking an iteration's results: new tokens, stop conditions, finished swaps, lost host KV, and how offloaded tokens
went through the layers."""

from __future__ import annotations

from collections import deque

from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput
from omniserve.engine.scheduler.request import OffloadedTokenTiming, Placement, Request, RequestStatus
from omniserve.engine.scheduler.state import SchedulerState


class ResultBooker:
    """Updates the requests from what the runner (or the simulator) reports."""

    def __init__(self, state: SchedulerState, eos_token_ids: tuple[int, ...]) -> None:
        self.state = state
        self.eos_token_ids = frozenset(eos_token_ids)
        self.offloaded_token_timings: deque[OffloadedTokenTiming] = deque(maxlen=10_000)
        """Offloaded tokens sampled and not yet taken (take_offloaded_token_timings); at most the last 10,000."""

    def update(self, plan: IterationPlan, output: RunnerOutput) -> list[Request]:
        """Books the iteration's results. Returns the requests that got a new token (finished ones included)."""
        requests, updated = self.state.requests, []
        page_table = self.state.page_table
        page_table.end_transfers()  # the plan has run: its prefix pages' copies are done
        caching, page_size = page_table.caching, page_table.page_size
        for chunk in plan.chunks:
            request = requests.get(chunk.request_id)
            if request is None:  # ended while the iteration ran
                continue
            before = request.num_computed_tokens
            request.num_computed_tokens += len(chunk.token_ids)
            if caching and before // page_size != request.num_computed_tokens // page_size:  # a page filled
                page_table.cache_full_pages(request.request_id, request.token_ids, request.num_computed_tokens,
                                            request.params.cache_salt)
            sampled = output.sampled.get(chunk.request_id)
            if chunk.sample and sampled is not None:
                self._append_token(request, sampled)
                updated.append(request)
        for request_id, sampled in output.sampled.items():
            request = requests.get(request_id)
            if request is not None and request.placement is Placement.HOST and request.token_in_flight:
                self._time_offloaded_token(request)
                request.token_in_flight = False
                request.result_ready_since = self.state.iteration
                request.num_computed_tokens += 1
                self._append_token(request, sampled)
                updated.append(request)
        for request_id, layer in output.offload_layers.items():  # how far each offloaded token got this iteration
            request = requests.get(request_id)
            if request is not None and request.placement is Placement.HOST and request.token_in_flight:
                request.offload_layer, request.result_ready_since = layer, None
        self._book_swap_outs(output.swapped_out)
        self._book_swap_ins(output.swapped_in)
        self._book_lost(output.lost)
        return updated

    def take_offloaded_token_timings(self) -> list[OffloadedTokenTiming]:
        """How the offloaded tokens sampled since the last call went through the layers (for metrics)."""
        timings = list(self.offloaded_token_timings)
        self.offloaded_token_timings.clear()
        return timings

    def _time_offloaded_token(self, request: Request) -> None:
        if request.token_started is None:
            return
        iteration, started = request.token_started
        iterations = self.state.iteration - iteration + 1
        self.offloaded_token_timings.append(OffloadedTokenTiming(
            request.params.service_class.value, iterations, self.state.clock() - started,
            self.state.num_layers / iterations))
        request.token_started = None

    def _book_swap_outs(self, request_ids: list[str]) -> None:
        state = self.state
        for request_id in request_ids:
            request = state.requests.get(request_id)
            if request is None or request.placement is not Placement.SWAPPING_OUT:
                continue
            state.page_table.release(request_id)
            state.running.remove(request)
            state.offloaded.append(request)
            request.placement = Placement.HOST
            request.result_ready_since = state.iteration
            request.num_swap_outs += 1
            state.stats.num_swap_outs += 1

    def _book_swap_ins(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            request = self.state.requests.get(request_id)
            if request is not None and request.placement is Placement.SWAPPING_IN:
                self.state.page_table.release_host_prefix(request_id)  # its whole KV is on the device again
                request.placement = Placement.DEVICE
                request.num_swap_ins += 1
                self.state.stats.num_swap_ins += 1

    def _book_lost(self, request_ids: list[str]) -> None:
        """Host KV lost with a worker: the requests are recomputed from their tokens, on the device."""
        state = self.state
        for request_id in request_ids:
            request = state.requests.get(request_id)
            if request is None or request.placement not in (Placement.HOST, Placement.SWAPPING_IN):
                continue
            (state.offloaded if request.placement is Placement.HOST else state.running).remove(request)
            request.placement = Placement.DEVICE
            request.token_in_flight = False
            state.requeue(request)
            state.stats.num_rebuilt += 1

    def _append_token(self, request: Request, sampled) -> None:
        request.token_ids.append(sampled.token_id)
        request.last_token_time = self.state.clock()
        request.last_token_iteration = self.state.iteration
        if request.first_token_time is None:
            request.first_token_time = request.last_token_time
        if request.params.logprobs is not None:
            request.logprobs.append(sampled)
        self._check_stop(request, sampled.token_id)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params, finish = request.params, self.state.finish
        grammar = request.grammar
        if grammar is not None and token_id not in self.eos_token_ids:
            if not grammar.accept(token_id):  # the mask allowed it: a matcher fault, never a silently bad answer
                return finish(request.request_id, RequestStatus.FINISHED_ERROR,
                              stop_reason=f"structured output: {grammar.error}")
            if grammar.done:  # the grammar is complete: only EOS could follow
                return finish(request.request_id, RequestStatus.FINISHED_STOPPED)
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return finish(request.request_id, RequestStatus.FINISHED_STOPPED)
            if token_id in params.stop_token_ids:
                return finish(request.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=token_id)
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.state.config.max_model_len:
            finish(request.request_id, RequestStatus.FINISHED_LENGTH)
