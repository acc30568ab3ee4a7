"""The SLO-aware scheduler: every iteration, what runs on the device, what decodes in the CPU pool, and what waits.

Stages, in priority order (the `omniserve` policy; the others are settings of the same stages, see policy.py):

1. LS decode: every running LS request decodes on the device.
2. LS prefill: running LS prefills continue, then waiting LS requests are admitted, each with the largest chunk that
   keeps the iteration's predicted time within the time budget (the tightest LS TPOT SLO). A waiting LS request
   whose predicted TTFT no longer fits its SLO is rejected at once: never a silently late answer.
3. BE decode on the device while it fits (time and pages); the rest are swapped out to the CPU pool, as far as
   the swap-outs' own cost fits. (Decode before BE prefill: else every BE request would be swapped out at its first
   token whenever another BE prompt waits, pages to spare or not.)
4. BE prefill within what is left. Both BE stages keep a reserve for the rows piggybacking this iteration.
5. Swap-in of an offloaded request when there is slack (pages and time, nothing waiting, no LS prefill running).
6. Piggyback admission: offloaded rows whose CPU result is back (and offloaded requests starting a new token) join
   the device batch at their layer while each layer stays within its share of the budget (budget / layers); the
   longest-waiting rows first, then the lowest layers, so no row starves. Then the offloaded pipeline: how many
   offloaded rows a layer may run and how long the device may wait for CPU results, so that rows whose results
   come back in time advance several layers in the iteration, within the budget (piggyback.py).

BE requests are never rejected: they wait. When a request needs a page and none is free, the newest device request
that has not been scheduled this iteration is preempted (BE before LS): its pages are freed and it waits at the
front of the queue, to be recomputed from its tokens. Without a latency model (no SLO set) there is no time budget:
only the token budget (`max_num_batched_tokens`), the sequence limit and the pages bound an iteration. Predictions
are scaled by the recent ratio of measured to predicted iteration times (`observe`), so that a machine that drifted
from its profile still gets iterations that fit; and an LS request that would be rejected on an idle device whose
measurements are old waits until the engine has measured the device again (`calibration_wanted`), so that a stale
profile or correction never turns away what the device can serve.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import replace
from typing import Callable

from omniserve.engine.scheduler.booking import Booking
from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.latency_model import LatencyModel, batch_shape_of_chunks
from omniserve.engine.scheduler.offload import Offloading
from omniserve.engine.scheduler.pages import PageRoom
from omniserve.engine.scheduler.piggyback import Piggybacking
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput, ScheduledChunk
from omniserve.engine.scheduler.policy import POLICY_TABLE
from omniserve.engine.scheduler.request import OffloadedTokenTiming, Placement, Request, RequestStatus
from omniserve.kv_cache import PageTable

logger = logging.getLogger(__name__)

_CORRECTION_WINDOW = 16  # the correction is the median measured/predicted ratio of this many latest iterations
_CORRECTION_LIMITS = (1e-3, 1e3)  # a ratio beyond these is a broken clock or profile, not a drift to follow
_CORRECTION_FRESH_S = 30.0  # measurements older than this may no longer describe the machine (other tenants come, go)
_REJECTING_ALL_AFTER = 10  # LS rejections in a row, none admitted, before it is logged as rejecting everything


class Scheduler(Booking, PageRoom, Offloading, Piggybacking):
    """The stages and their state; each group of methods lives in a module of its own (see __init__.py)."""

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
        behind a long BE iteration. clock is injectable for the simulator. calibrates: the caller times scratch
        iterations when asked (calibration_wanted), so an LS request about to be rejected on an idle device whose
        latest measurements are old waits for fresh ones instead (the engine does; the simulator's device is its
        model). host_capacity: tokens of KV the CPU pool's hosts hold in all, now (None: no limit); a request is
        offloaded only while the offloaded ones, counted at the size they reach when done, leave it room.
        cpu_workers: the CPU pool's workers, for predicting how long a layer's offloaded rows take there (the
        offloaded pipeline's wait, piggyback.py)."""
        self.config = config
        self.policy = POLICY_TABLE[config.policy]
        self.page_table = page_table
        self.eos_token_ids = frozenset(eos_token_ids)
        self.num_layers = num_layers
        self.host_capacity = host_capacity
        self.cpu_workers = max(1, cpu_workers)
        self.latency_model = latency_model
        self.default_tpot_slo = default_tpot_slo
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Requests that hold device pages (decoding, prefilling, or swapping)."""
        self.offloaded: list[Request] = []
        """Requests whose KV is in the CPU pool."""
        self.requests: dict[str, Request] = {}
        """Every unfinished request, by id."""
        self.iteration = 0
        self.num_preemptions = 0
        """Preemptions so far (a request recomputed twice counts twice)."""
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_rebuilt = 0
        """Offloaded requests recomputed on the device after their worker died."""
        self.num_rejected = 0
        self.ls_rejected_in_a_row = 0
        """LS requests rejected at admission since the last one admitted."""
        self.time_correction = 1.0
        """Measured / predicted iteration time lately (see observe): scales every prediction."""
        self.calibrates = calibrates
        self.calibration_wanted = False
        """Set by schedule() when an admission decision waits for fresh measurements (see calibrates)."""
        self._ratios: deque[float] = deque(maxlen=_CORRECTION_WINDOW)
        self._last_observed: float | None = None  # clock() of the latest measured iteration
        self._preempted = False  # in the iteration being planned
        self._host_tokens_left: int | None = None  # host KV left for swap-outs in the plan (None: not counted yet)
        self._released: list[str] = []  # ended requests the runner and the CPU pool still hold state for
        self.offloaded_token_timings: deque[OffloadedTokenTiming] = deque(maxlen=10_000)
        """Offloaded tokens sampled and not yet taken (take_offloaded_token_timings); at most the last 10,000."""

    # ------------------------------------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
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
            self._released.append(request_id)
        request.status = status
        request.stop_reason = stop_reason
        self.page_table.release(request_id)

    def take_released(self) -> list[str]:
        """Ended requests whose offloaded state (host KV, residuals, rows in flight) the runner must drop."""
        released, self._released = self._released, []
        return released

    def observe(self, plan: IterationPlan, seconds: float, output: RunnerOutput | None = None) -> None:
        """How long a planned iteration really took. The latency model was profiled once; the machine drifts (other
        tenants, clocks, caches), so later plans follow the median ratio of measured to predicted time over the
        latest iterations: one odd iteration (a GC pause) moves it nothing, a lasting change within a few
        iterations, however far the profile was off. After a pause longer than _CORRECTION_FRESH_S the first new
        measurements replace the old ones. With the runner's `output`, the device's own speed is judged: on the
        offloaded rows it ran, without the time it waited for the CPU."""
        if not plan.predicted_time or not plan.chunks:
            # Offloaded rows alone say little about the device: a few rows a layer cost mostly per-layer overhead
            # that the dense model, fitted on device batches, does not describe; following them pulled the
            # correction to 0.2-0.5 on this machine, and the next LS prefill, so planned, ran 2-4x over.
            return
        predicted = plan.predicted_time / self.time_correction  # uncorrected
        if output is not None and output.offloaded_rows is not None and plan.shape is not None:
            ran = replace(plan.shape, extra_rows=output.offloaded_rows)
            predicted = self.latency_model.iteration_time(ran) + plan.swap_seconds
            seconds = max(0.0, seconds - output.cpu_wait_s)
        if predicted <= 0:
            return
        ratio = seconds / predicted
        if not self._measurements_are_fresh():
            self._ratios.clear()  # old measurements describe the machine as it was: the new ones alone decide
        self._ratios.append(min(max(ratio, _CORRECTION_LIMITS[0]), _CORRECTION_LIMITS[1]))
        self.time_correction = statistics.median(self._ratios)
        self._last_observed = self.clock()

    def predicted_time(self, chunks: list[ScheduledChunk]) -> float | None:
        """The corrected prediction for an iteration of just these device chunks (None: no latency model)."""
        if self.latency_model is None:
            return None
        return self.time_correction * self.latency_model.iteration_time(batch_shape_of_chunks(chunks))

    def _measurements_are_fresh(self) -> bool:
        return self._last_observed is not None and self.clock() - self._last_observed <= _CORRECTION_FRESH_S

    # ---------------------------------------------------------------------------------------------- schedule
    def _is_ls(self, request: Request) -> bool:
        return not self.policy.classes or not request.is_best_effort

    def time_budget(self) -> float | None:
        """The share of the tightest TPOT SLO among running LS requests (else of the default one) that an iteration
        is planned to fill; the rest absorbs the latency model's error."""
        if not self.policy.time_budget or self.latency_model is None:
            return None
        slos = [r.tpot_slo for r in self.running if r.tpot_slo is not None and self._is_ls(r)]
        slo = min(slos) if slos else self.default_tpot_slo
        return None if slo is None else slo * self.config.iteration_budget_share

    def schedule(self) -> IterationPlan:
        self.iteration += 1
        self._preempted = False
        self._host_tokens_left = None
        batch = IterationBudget(self.latency_model, self.num_layers, self.time_budget(),
                                self.config.max_num_batched_tokens, self.time_correction)
        scheduled: dict[str, int] = {}  # request id -> tokens this iteration (dicts keep insertion order)
        rejected: list[str] = []
        device = [r for r in self.running if r.placement is Placement.DEVICE]
        decoding = [r for r in device if r.num_tokens - r.num_computed_tokens == 1 and r.num_output_tokens]
        prefilling = [r for r in device if r not in decoding]

        # 1-2. LS decode, LS prefill (running, then waiting). Swap-outs for pages are planned once the LS decodes,
        # which run whatever they cost, are in the batch, so that their cost is judged against what is left; except
        # under `neo`, which may offload the LS decodes themselves.
        offloads_ls = self.config.offload_mode.offloads_ls
        swap_outs = self._plan_page_swap_outs(batch, scheduled) if offloads_ls else []
        decoding = [r for r in decoding if r.placement is Placement.DEVICE]
        for request in decoding:
            if self._is_ls(request) and batch.tokens_left > 0:
                self._try_schedule(request, 1, batch, scheduled)
        if not offloads_ls:
            swap_outs = self._plan_page_swap_outs(batch, scheduled)
            decoding = [r for r in decoding if r.placement is Placement.DEVICE]
        for request in prefilling:
            if self._is_ls(request):
                self._try_schedule(request, batch.largest_chunk(request), batch, scheduled)
        self._admit_waiting(batch, scheduled, rejected, ls=True)

        # 3. BE decode on the device while it fits; the rest go to the CPU pool (or wait, if they may not). Decodes
        # come before BE prefill: a request that has its first token should not be swapped out (or, without the pool,
        # stall holding its pages) because the next BE prompt took the budget.
        reserve = math.ceil(len(self.offloaded) / self.num_layers)  # room kept for the rows that piggyback
        for request in decoding:
            if self._is_ls(request) or request.status is not RequestStatus.RUNNING:
                continue
            fits_time = batch.tokens_left > 0 and batch.fits(
                batch.with_chunk(batch.shape, request.num_computed_tokens, 1, True), reserve)
            if fits_time and self._page_room(request, request.num_tokens):
                self._try_schedule(request, 1, batch, scheduled)
            # Short of pages (it fitted the time): offload now; short of time: once it has waited a pass.
            elif self._may_offload(request) and (fits_time or self._waited_a_pass(request)) and self._swap_fits(
                    request, batch):
                swap_outs.append(self._swap_out(request, batch))
            elif fits_time:  # may not leave the device: make room among the BE requests, as FCFS would
                self._try_schedule(request, 1, batch, scheduled, evict_ls=False)

        # 4. BE prefill within what is left.
        for request in prefilling:
            if not self._is_ls(request) and request.status is RequestStatus.RUNNING:
                self._try_schedule(request, batch.largest_chunk(request, reserve), batch, scheduled)
        self._admit_waiting(batch, scheduled, rejected, ls=False, reserve_rows=reserve)

        swap_ins, (starts, returning, pipeline) = self._plan_swap_ins(batch, reserve), self._admit_piggyback(batch)
        return IterationPlan(
            chunks=[self._chunk(self.requests[rid], count) for rid, count in scheduled.items()],
            offloaded_starts=starts, returning=returning, swap_outs=swap_outs, swap_ins=swap_ins, rejected=rejected,
            predicted_time=batch.time(), time_budget=batch.time_budget, pipeline=pipeline, shape=batch.shape,
            swap_seconds=batch.swap_seconds,
        )

    def _try_schedule(
        self, request: Request, count: int, batch: IterationBudget, scheduled: dict[str, int], evict_ls: bool = True
    ) -> bool:
        """Grows the request's pages for `count` more tokens, preempting others if needed, and books the chunk."""
        if count <= 0 or request.status is not RequestStatus.RUNNING:
            return False
        if not self._make_room(request, request.num_computed_tokens + count, scheduled, evict_ls):
            return False
        self.page_table.grow(request.request_id, request.num_computed_tokens + count)
        batch.add(request, count)
        scheduled[request.request_id] = count
        return True

    def _admit_waiting(
        self, batch: IterationBudget, scheduled: dict[str, int], rejected: list[str], ls: bool, reserve_rows: int = 0
    ) -> None:
        """Admits waiting requests of one class in arrival order; for LS, rejects those that would be late."""
        ahead = sum(  # LS prefill tokens that will run before a waiting LS request's
            r.num_tokens - r.num_computed_tokens - scheduled.get(r.request_id, 0)
            for r in self.running if r.placement is Placement.DEVICE and self._is_ls(r) and not r.num_output_tokens
        ) if ls else 0
        blocked = False  # once one request cannot start, later ones of its class wait too (arrival order)
        for request in (r for r in tuple(self.waiting) if self._is_ls(r) == ls):  # a snapshot: admission removes
            if blocked and not ls:
                break  # nothing more can happen to waiting BE requests (LS ones may still be rejected)
            remaining = request.num_tokens - request.num_computed_tokens
            if ls and self.policy.reject_late and batch.predicted_ttft(
                request, ahead, self.config.max_num_batched_tokens, self.clock()) > (
                request.ttft_slo or math.inf
            ):
                if self.calibrates and not (self.running or self.offloaded or ahead) and not (
                        self._measurements_are_fresh()):
                    # It would run alone on an idle device, and nothing measured lately backs the prediction: wait
                    # one iteration for the caller to measure the device, then decide.
                    self.calibration_wanted = blocked = True
                    continue
                self._reject(request, rejected)
                continue
            ahead += remaining
            # New requests wait while anything is being preempted: admitting them would only preempt again.
            if blocked or self._preempted or len(self.running) >= self.config.max_num_seqs:
                blocked = True
                continue
            count = batch.largest_chunk(request, reserve_rows)
            needed = request.num_computed_tokens + count
            if count <= 0 or not self._page_room(request, needed) or not (ls or self._room_for_whole_prompt(request)):
                blocked = True
                continue
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            if ls:
                self.ls_rejected_in_a_row = 0
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            self.running.append(request)
            self.page_table.grow(request.request_id, needed)
            batch.add(request, count)
            scheduled[request.request_id] = count

    def _reject(self, request: Request, rejected: list[str]) -> None:
        self.finish_request(request.request_id, RequestStatus.REJECTED)
        self.num_rejected += 1
        self.ls_rejected_in_a_row += 1
        rejected.append(request.request_id)
        if self.ls_rejected_in_a_row % (10 * _REJECTING_ALL_AFTER) == _REJECTING_ALL_AFTER:
            logger.warning(
                "admission has rejected the last %d LS requests and admitted none: their predicted TTFT exceeds "
                "the SLO (%.3f s) even alone; the profile's times are scaled by %.2f from measured iterations. "
                "Check the SLOs against `omniserve profile` on this machine.", self.ls_rejected_in_a_row,
                request.ttft_slo or 0.0, self.time_correction)

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
