"""The SLO-aware scheduler: every iteration, what runs on the device, what decodes in the CPU pool, and what waits.

Stages, in priority order (the `omniserve` policy; the others are settings of the same stages, see policy.py), and
the manager that answers each:

1. LS decode: every running LS request decodes on the device (pages.py: PageManager.schedule).
2. LS prefill: running LS prefills continue, then waiting LS requests are admitted, each with the largest chunk that
   keeps the iteration's predicted time within the time budget (the tightest LS TPOT SLO). A waiting LS request
   whose predicted TTFT no longer fits its SLO is rejected at once: never a silently late answer (admission.py).
3. BE decode on the device while it fits (time and pages); the rest are swapped out to the CPU pool, as far as
   the swap-outs' own cost fits (offload.py: OffloadManager.place_be_decodes). Decode before BE prefill: else every
   BE request would be swapped out at its first token whenever another BE prompt waits, pages to spare or not.
4. BE prefill within what is left (admission.py). Both BE stages keep a reserve for the rows piggybacking this
   iteration.
5. Swap-in of an offloaded request when there is slack: pages and time, nothing waiting, no LS prefill running
   (offload.py).
6. Piggyback admission: offloaded rows whose CPU result is back (and offloaded requests starting a new token) join
   the device batch at their layer while each layer stays within its share of the budget (budget / layers); the
   longest-waiting rows first, then the lowest layers, so no row starves. Then the offloaded pipeline: how many
   offloaded rows a layer may run and how long the device may wait for CPU results, so that rows whose results
   come back in time advance several layers in the iteration, within the budget (piggyback.py).

BE requests are never rejected: they wait. When a request needs a page and none is free, the newest device request
that has not been scheduled this iteration is preempted (BE before LS): its pages are freed and it waits at the
front of the queue, to be recomputed from its tokens (pages.py). Without a latency model (no SLO set) there is no
time budget: only the token budget (`max_num_batched_tokens`), the sequence limit and the pages bound an iteration.
Predictions are scaled by the recent ratio of measured to predicted iteration times (correction.py), so that a
machine that drifted from its profile still gets iterations that fit; and an LS request that would be rejected on an
idle device whose measurements are old waits until the engine has measured the device again
(`admission.calibration_wanted`), so that a stale profile or correction never turns away what the device can serve.
The iteration's results are booked by booking.py. What the managers share (the queues, the page table, the
counters) is SchedulerState (state.py).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from omniserve.engine.scheduler.admission import Admission
from omniserve.engine.scheduler.booking import ResultBooker
from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.correction import TimeCorrection
from omniserve.engine.scheduler.latency_model import LatencyModel, batch_shape_of_chunks
from omniserve.engine.scheduler.offload import OffloadManager
from omniserve.engine.scheduler.pages import PageManager
from omniserve.engine.scheduler.piggyback import PiggybackManager
from omniserve.engine.scheduler.plan import IterationPlan, KVTransfer, RunnerOutput, ScheduledChunk
from omniserve.engine.scheduler.request import OffloadedTokenTiming, Placement, Request, RequestStatus
from omniserve.engine.scheduler.state import SchedulerState
from omniserve.kv_cache import PageTable
from omniserve.sampling.params import InvalidRequestError


class Scheduler:
    """Plans every iteration through its managers, and books what the iteration did."""

    def __init__(
        self,
        config: SchedulerConfig,
        page_table: PageTable,
        eos_token_ids: tuple[int, ...],
        num_layers: int = 1,
        latency_model: LatencyModel | None = None,
        default_tpot_slo: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        calibrates: bool = False,
        host_capacity: Callable[[], int] | None = None,
        cpu_workers: int = 1,
    ) -> None:
        """default_tpot_slo bounds iterations even while no LS request runs, so that a new LS request never waits
        behind a long BE iteration. clock is injectable for the simulator. calibrates: see Admission.
        host_capacity: tokens of KV the CPU pool's hosts hold in all, now (see OffloadManager). cpu_workers: the CPU
        pool's workers, for predicting how long a layer's offloaded rows take there (see PiggybackManager)."""
        self.state = state = SchedulerState(config, page_table, num_layers, latency_model, clock)
        self.default_tpot_slo = default_tpot_slo
        self.correction = TimeCorrection(clock)
        self.pages = PageManager(state)
        self.admission = Admission(state, self.pages, self.correction, calibrates)
        self.offload = OffloadManager(state, self.pages, host_capacity)
        self.piggyback = PiggybackManager(state, cpu_workers)
        self.booker = ResultBooker(state, eos_token_ids)
        # The state's settings and containers, for readers (they are never replaced, only changed in place).
        self.config, self.page_table, self.stats = config, page_table, state.stats
        self.requests, self.waiting, self.running, self.offloaded = (
            state.requests, state.waiting, state.running, state.offloaded)

    # ------------------------------------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        """Queues a request; InvalidRequestError (nothing queued) if it can never fit the device (check_fits)."""
        self.check_fits(request.num_tokens + request.max_tokens)
        self.state.requests[request.request_id] = request
        self.state.waiting.append(request)

    def check_fits(self, num_tokens: int) -> None:
        """InvalidRequestError unless a request of `num_tokens` (prompt and output) fits the device's KV pages: one
        that does not would preempt itself, and hold up every request behind it, forever."""
        page_table = self.state.page_table
        if page_table.pages_for(num_tokens) > page_table.allocator.num_pages:
            raise InvalidRequestError(f"{num_tokens} tokens do not fit the KV cache ({page_table.allocator.num_pages} "
                                      f"pages of {page_table.page_size} tokens)", "max_tokens")

    def has_unfinished(self) -> bool:
        return bool(self.state.requests)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Ends a request however it ends (stop, length, abort, error, rejection) and frees its pages. Unknown ids
        are ignored."""
        self.state.finish(request_id, status, stop_reason)

    def take_released(self) -> list[str]:
        """Ended requests whose offloaded state (host KV, residuals, rows in flight) the runner must drop."""
        released, self.state.released = self.state.released, []
        return released

    # ------------------------------------------------------------------------------------------------ results
    def update(self, plan: IterationPlan, output: RunnerOutput) -> list[Request]:
        """Books the iteration's results. Returns the requests that got a new token (finished ones included)."""
        return self.booker.update(plan, output)

    def results_ready(self, keys: list[tuple[str, int]]) -> None:
        """CPU attention results that came back: (request id, layer)."""
        self.piggyback.results_ready(keys)

    def observe(self, plan: IterationPlan, seconds: float, output: RunnerOutput | None = None) -> None:
        """How long a planned iteration really took (see TimeCorrection)."""
        self.correction.observe(self.state.latency_model, plan, seconds, output)

    def predicted_time(self, chunks: list[ScheduledChunk]) -> float | None:
        """The corrected prediction for an iteration of just these device chunks (None: no latency model)."""
        if self.state.latency_model is None:
            return None
        shape = batch_shape_of_chunks(chunks)
        return self.correction.factor(shape) * self.state.latency_model.iteration_time(shape)

    # ---------------------------------------------------------------------------------------------- schedule
    def time_budget(self) -> float | None:
        """The share of the tightest TPOT SLO among running LS requests (else of the default one) that an iteration
        is planned to fill; the rest absorbs the latency model's error."""
        state = self.state
        if not state.policy.time_budget or state.latency_model is None:
            return None
        slos = [r.tpot_slo for r in state.running if r.tpot_slo is not None and state.is_ls(r)]
        slo = min(slos) if slos else self.default_tpot_slo
        return None if slo is None else slo * state.config.iteration_budget_share

    def schedule(self) -> IterationPlan:
        """Plans one iteration: the stages of the module's docstring, in order."""
        state = self.state
        state.iteration += 1
        self.pages.preempted, self.offload.host_tokens_left = False, None
        batch = IterationBudget(state.latency_model, state.num_layers, self.time_budget(),
                                state.config.max_num_batched_tokens, self.correction)
        scheduled: dict[str, int] = {}  # request id -> tokens this iteration (dicts keep insertion order)
        rejected: list[str] = []
        device = [r for r in state.running if r.placement is Placement.DEVICE]
        decoding = [r for r in device if r.is_decoding]
        prefilling = [r for r in device if not r.is_decoding]

        swap_outs, decoding = self._schedule_ls(batch, scheduled, rejected, decoding, prefilling)
        reserve = math.ceil(len(state.offloaded) / state.num_layers)  # room kept for the rows that piggyback
        swap_outs += self.offload.place_be_decodes(decoding, batch, scheduled, reserve)
        for request in prefilling:  # 4. BE prefill within what is left
            if not state.is_ls(request) and request.status is RequestStatus.RUNNING:
                self.pages.schedule(request, batch.largest_chunk(request, reserve), batch, scheduled)
        self.admission.admit(batch, scheduled, rejected, ls=False, reserve_rows=reserve)

        swap_ins = self.offload.plan_swap_ins(batch, reserve)
        starts, returning, pipeline = self.piggyback.admit(batch)
        prefix_saves, prefix_loads = state.page_table.take_transfers()
        return IterationPlan(
            chunks=[self._chunk(state.requests[rid], count) for rid, count in scheduled.items()],
            offloaded_starts=starts, returning=returning, swap_outs=swap_outs, swap_ins=swap_ins, rejected=rejected,
            predicted_time=batch.time(), time_budget=batch.time_budget, pipeline=pipeline, shape=batch.shape,
            swap_seconds=batch.swap_seconds, prefix_saves=prefix_saves, prefix_loads=prefix_loads,
        )

    def _schedule_ls(self, batch: IterationBudget, scheduled: dict[str, int], rejected: list[str],
                     decoding: list[Request], prefilling: list[Request]) -> tuple[list[KVTransfer], list[Request]]:
        """Stages 1-2: LS decode, LS prefill (running, then waiting). Swap-outs for pages are planned once the LS
        decodes, which run whatever they cost, are in the batch, so that their cost is judged against what is left;
        except under `neo`, which may offload the LS decodes themselves. Returns the swap-outs and the decoding
        requests still on the device."""
        is_ls, offloads_ls = self.state.is_ls, self.offload.mode.offloads_ls
        swap_outs = self.offload.plan_page_swap_outs(batch, scheduled) if offloads_ls else []
        decoding = [r for r in decoding if r.placement is Placement.DEVICE]
        for request in decoding:
            if is_ls(request) and batch.tokens_left > 0:
                self.pages.schedule(request, 1, batch, scheduled)
        if not offloads_ls:
            swap_outs = self.offload.plan_page_swap_outs(batch, scheduled)
            decoding = [r for r in decoding if r.placement is Placement.DEVICE]
        for request in prefilling:
            if is_ls(request):
                self.pages.schedule(request, batch.largest_chunk(request), batch, scheduled)
        self.admission.admit(batch, scheduled, rejected, ls=True)
        return swap_outs, decoding

    def _chunk(self, request: Request, count: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + count],
            start_position=start,
            page_ids=list(self.state.page_table.pages(request.request_id)),
            sample=start + count == request.num_tokens,
            params=request.params,
            num_generated=request.num_output_tokens,
            grammar=request.grammar,
            seen_token_ids=request.seen_token_ids,
        )

    def take_offloaded_token_timings(self) -> list[OffloadedTokenTiming]:
        """How the offloaded tokens sampled since the last call went through the layers (for metrics)."""
        return self.booker.take_offloaded_token_timings()
