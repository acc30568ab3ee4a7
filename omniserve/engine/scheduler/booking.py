"""Booking an iteration's results for the scheduler: new tokens, stop conditions, finished copies, lost host KV."""

from __future__ import annotations

from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput
from omniserve.engine.scheduler.request import OffloadedTokenTiming, Placement, Request, RequestStatus


class Booking:
    """Part of Scheduler (scheduler.py): updates its requests from what the runner (or the simulator) reports."""

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
                self._time_offloaded_token(request)
                request.token_in_flight = False
                request.result_ready_since = self.iteration
                request.num_computed_tokens += 1
                self._append_token(request, sampled)
                updated.append(request)
        for request_id, layer in output.offload_layers.items():  # how far each offloaded token got this iteration
            request = self.requests.get(request_id)
            if request is not None and request.placement is Placement.HOST and request.token_in_flight:
                request.offload_layer, request.result_ready_since = layer, None
        self._book_swaps(output)
        return updated

    def _time_offloaded_token(self, request: Request) -> None:
        if request.token_started is None:
            return
        iteration, started = request.token_started
        iterations = self.iteration - iteration + 1
        self.offloaded_token_timings.append(OffloadedTokenTiming(
            request.params.service_class.value, iterations, self.clock() - started, self.num_layers / iterations))
        request.token_started = None

    def take_offloaded_token_timings(self) -> list[OffloadedTokenTiming]:
        """How the offloaded tokens sampled since the last call went through the layers (for metrics)."""
        timings = list(self.offloaded_token_timings)
        self.offloaded_token_timings.clear()
        return timings

    def _book_swaps(self, output: RunnerOutput) -> None:
        for request_id in output.swapped_out:
            request = self.requests.get(request_id)
            if request is None or request.placement is not Placement.SWAPPING_OUT:
                continue
            self.page_table.release(request_id)
            self.running.remove(request)
            self.offloaded.append(request)
            request.placement = Placement.HOST
            request.result_ready_since = self.iteration
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
        request.last_token_time = self.clock()
        request.last_token_iteration = self.iteration
        if request.first_token_time is None:
            request.first_token_time = request.last_token_time
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
