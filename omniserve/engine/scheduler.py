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
   longest-waiting rows first, then the lowest layers, so no row starves.

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

from omniserve.config import SchedulerConfig
from omniserve.engine.plan import IterationPlan, KVTransfer, OffloadedToken, RunnerOutput, ScheduledChunk
from omniserve.engine.policy import POLICY_TABLE
from omniserve.engine.request import Placement, Request, RequestStatus
from omniserve.kv_cache import PageTable
from omniserve.profiler.latency_model import BatchShape, LatencyModel, batch_shape_of_chunks, prefill_interactions

logger = logging.getLogger(__name__)

_SWAP_IN_HEADROOM = 0.25  # swap in only if this share of all pages stays free beyond what is needed
_CORRECTION_WINDOW = 16  # the correction is the median measured/predicted ratio of this many latest iterations
_CORRECTION_LIMITS = (1e-3, 1e3)  # a ratio beyond these is a broken clock or profile, not a drift to follow
_CORRECTION_FRESH_S = 30.0  # measurements older than this may no longer describe the machine (other tenants come, go)
_REJECTING_ALL_AFTER = 10  # LS rejections in a row, none admitted, before it is logged as rejecting everything


class _Batch:
    """The iteration being planned: its token count and, with a latency model, its shape and predicted time."""

    def __init__(self, model: LatencyModel | None, num_layers: int, time_budget: float | None, token_budget: int,
                 correction: float = 1.0):
        self.model = model
        self.correction = correction
        """Measured / predicted iteration time lately: scales the model's predictions (and so the budget's use)."""
        self.num_layers = num_layers
        self.time_budget = time_budget if model is not None else None
        self.tokens_left = token_budget
        self.shape = BatchShape()
        self.swap_seconds = 0.0
        """What this iteration's swap-outs cost the engine (gathering and handing over KV)."""

    def with_chunk(self, shape: BatchShape, start: int, count: int, sample: bool) -> BatchShape:
        # Built directly, not with dataclasses.replace: this runs thousands of times per plan (chunk bisection).
        decode = count == 1
        return BatchShape(
            num_rows=shape.num_rows + count,
            prefill_interactions=shape.prefill_interactions + (0 if decode else prefill_interactions(start, count)),
            decode_context=shape.decode_context + (start + 1 if decode else 0),
            num_decodes=shape.num_decodes + decode,
            num_sampled=shape.num_sampled + sample,
            extra_rows=shape.extra_rows,
            prefill_tokens=shape.prefill_tokens + (0 if decode else count))

    def time(self) -> float | None:
        if self.model is None:
            return None
        return self.correction * (self.model.iteration_time(self.shape) + self.swap_seconds)

    def fits(self, shape: BatchShape, reserve_rows: int = 0, extra_seconds: float = 0.0) -> bool:
        if self.time_budget is None:
            return True
        if reserve_rows:
            shape = replace(shape, extra_rows=(reserve_rows,) * self.num_layers)
        predicted = self.model.iteration_time(shape) + self.swap_seconds + extra_seconds
        return self.correction * predicted <= self.time_budget

    def largest_chunk(self, request: Request, reserve_rows: int = 0) -> int:
        """The most of the request's uncomputed tokens that fit the token and time budgets (0: none)."""
        start, remaining = request.num_computed_tokens, request.num_tokens - request.num_computed_tokens
        high = min(remaining, self.tokens_left)

        def fits(count: int) -> bool:
            return self.fits(self.with_chunk(self.shape, start, count, count == remaining), reserve_rows)

        if high <= 0 or fits(high):
            return max(high, 0)
        low = 0  # fits(low) holds (taking nothing), fits(high) does not: time grows with the chunk
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        # An iteration with nothing else to run takes at least one token, even under an SLO tighter than that takes:
        # running nothing would not help any LS request, and the request would never progress.
        return 1 if low == 0 and self.shape.num_rows == 0 else low

    def add(self, request: Request, count: int) -> None:
        start = request.num_computed_tokens
        self.shape = self.with_chunk(self.shape, start, count, start + count == request.num_tokens)
        self.tokens_left -= count


class Scheduler:
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
    ) -> None:
        """default_tpot_slo bounds iterations even while no LS request runs, so that a new LS request never waits
        behind a long BE iteration. clock is injectable for the simulator. calibrates: the caller times scratch
        iterations when asked (calibration_wanted), so an LS request about to be rejected on an idle device whose
        latest measurements are old waits for fresh ones instead (the engine does; the simulator's device is its
        model)."""
        self.config = config
        self.policy = POLICY_TABLE[config.policy]
        self.page_table = page_table
        self.eos_token_ids = frozenset(eos_token_ids)
        self.num_layers = num_layers
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
        self._released: list[str] = []  # ended requests the runner and the CPU pool still hold state for

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

    def observe(self, plan: IterationPlan, seconds: float) -> None:
        """How long a planned iteration really took. The latency model was profiled once; the machine drifts (other
        tenants, clocks, caches), so later plans follow the median ratio of measured to predicted time over the
        latest iterations: one odd iteration (a GC pause) moves it nothing, a lasting change within a few
        iterations, however far the profile was off. After a pause longer than _CORRECTION_FRESH_S the first new
        measurements replace the old ones."""
        if not plan.predicted_time or not (plan.chunks or plan.returning):
            return
        ratio = seconds * self.time_correction / plan.predicted_time  # against the uncorrected prediction
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

    def results_ready(self, keys: list[tuple[str, int]]) -> None:
        """CPU attention results that came back: (request id, layer)."""
        for request_id, layer in keys:
            request = self.requests.get(request_id)
            if request is not None and request.placement is Placement.HOST and request.offload_layer == layer:
                request.result_ready_since = self.iteration

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
        batch = _Batch(self.latency_model, self.num_layers, self.time_budget(), self.config.max_num_batched_tokens,
                       self.time_correction)
        scheduled: dict[str, int] = {}  # request id -> tokens this iteration (dicts keep insertion order)
        rejected: list[str] = []
        device = [r for r in self.running if r.placement is Placement.DEVICE]
        decoding = [r for r in device if r.num_tokens - r.num_computed_tokens == 1 and r.num_output_tokens]
        prefilling = [r for r in device if r not in decoding]

        # 1-2. LS decode, LS prefill (running, then waiting). Swap-outs for pages are planned once the LS decodes,
        # which run whatever they cost, are in the batch, so that their cost is judged against what is left; except
        # under `neo`, which may offload the LS decodes themselves.
        swap_outs = self._plan_page_swap_outs(batch, scheduled) if self.policy.offload == "all" else []
        decoding = [r for r in decoding if r.placement is Placement.DEVICE]
        for request in decoding:
            if self._is_ls(request) and batch.tokens_left > 0:
                self._try_schedule(request, 1, batch, scheduled)
        if self.policy.offload != "all":
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

        swap_ins = self._plan_swap_ins(batch, reserve)
        starts, returning = self._admit_piggyback(batch)
        plan = IterationPlan(
            chunks=[self._chunk(self.requests[rid], count) for rid, count in scheduled.items()],
            offloaded_starts=starts, returning=returning, swap_outs=swap_outs, swap_ins=swap_ins, rejected=rejected,
            predicted_time=batch.time(), time_budget=batch.time_budget,
        )
        return plan

    def _try_schedule(
        self, request: Request, count: int, batch: _Batch, scheduled: dict[str, int], evict_ls: bool = True
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
        self, batch: _Batch, scheduled: dict[str, int], rejected: list[str], ls: bool, reserve_rows: int = 0
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
            if ls and self.policy.reject_late and self._predicted_ttft(request, ahead, batch) > (
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
            if count <= 0 or not self._page_room(request, needed):
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

    def _predicted_ttft(self, request: Request, tokens_ahead: int, batch: _Batch) -> float:
        """Seconds from arrival to the request's first token if it were admitted now behind `tokens_ahead` LS
        prefill tokens, with each iteration taking the largest chunk the time budget allows."""
        if request.num_output_tokens or self.latency_model is None or request.ttft_slo is None:
            return 0.0  # preempted requests already have their first token; without a model there is no estimate
        # The iterations ahead keep this one's decode rows, not its prefill chunks (their tokens are `tokens_ahead`).
        shape = batch.shape
        base = replace(shape, num_rows=shape.num_rows - shape.prefill_tokens, prefill_interactions=0, prefill_tokens=0)
        remaining = tokens_ahead + request.num_tokens - request.num_computed_tokens

        def fits(count: int) -> bool:
            return batch.fits(batch.with_chunk(base, 0, count, False))

        low, high = 0, min(remaining, self.config.max_num_batched_tokens)
        if fits(high):
            low = high
        while high - low > 1:  # the largest chunk that fits: time grows with the chunk
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        if low == 0:
            return math.inf
        iterations = math.ceil(remaining / low)
        full = batch.with_chunk(base, 0, low, True)
        per_iteration_s = self.time_correction * self.latency_model.iteration_time(full)
        return self.clock() - request.arrival_time + iterations * per_iteration_s

    # ------------------------------------------------------------------------------------------------ pages
    def _page_room(self, request: Request, num_tokens: int) -> bool:
        if not self.page_table.can_grow(request.request_id, num_tokens):
            return False
        if self.policy.be_page_cap and not self._is_ls(request):
            allocator = self.page_table.allocator
            be_pages = sum(len(self.page_table.pages(r.request_id)) for r in self.running if not self._is_ls(r))
            needed = self.page_table.pages_needed(request.request_id, num_tokens)
            return be_pages + needed <= (1.0 - self.config.ls_headroom) * allocator.num_pages
        return True

    def _make_room(self, request: Request, num_tokens: int, scheduled: dict[str, int], evict_ls: bool) -> bool:
        """Preempts device requests not scheduled this iteration (the newest BE first, then the newest LS if
        allowed) until the request can grow; preempts the request itself if nothing else is left."""
        while not self._page_room(request, num_tokens):
            candidates = [
                r for r in self.running
                if r.placement is Placement.DEVICE and r is not request and r.request_id not in scheduled
                and (evict_ls or not self._is_ls(r))
            ]
            victims = [r for r in candidates if not self._is_ls(r)] or candidates
            if not self._is_ls(request):  # a BE request only ever displaces BE requests
                victims = [r for r in victims if not self._is_ls(r)]
            if not victims:
                self._preempt(request)
                return False
            self._preempt(victims[-1])
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.page_table.release(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted = True
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

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

    # ------------------------------------------------------------------------------------------------ placement
    def _may_offload(self, request: Request) -> bool:
        offload = self.policy.offload
        if offload == "none" or not request.at_token_boundary:
            return False
        if offload == "all":
            return True
        return request.is_best_effort and self.config.be_decode_placement != "device"

    def _swap_fits(self, request: Request, batch: _Batch) -> bool:
        """A swap-out's cost to the engine fits this iteration's time budget. While no LS request runs, one swap-out
        per iteration is allowed whatever it costs, so that BE work always makes progress."""
        if batch.time_budget is None:
            return True
        cost = self.latency_model.swap_out_time(request.num_computed_tokens)
        if batch.fits(batch.shape, extra_seconds=cost):
            return True
        return not batch.swap_seconds and not any(self._is_ls(r) for r in self.running)

    def _swap_out(self, request: Request, batch: _Batch) -> KVTransfer:
        if batch.model is not None:
            batch.swap_seconds += batch.model.swap_out_time(request.num_computed_tokens)
        request.placement = Placement.SWAPPING_OUT
        return KVTransfer(request.request_id, list(self.page_table.pages(request.request_id)),
                          request.num_computed_tokens)

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

    def _plan_page_swap_outs(self, batch: _Batch, scheduled: dict[str, int]) -> list[KVTransfer]:
        """Swap-outs decided by pages: under `cpu` placement every BE request once it decodes; otherwise the newest
        offloadable requests while free pages (counting those being swapped out) fall short of what is wanted.
        Swap-outs whose cost does not fit the time budget wait for a later iteration."""
        candidates = [
            r for r in self.running
            if r.placement is Placement.DEVICE and self._may_offload(r) and r.request_id not in scheduled
        ]
        if not candidates:
            return []
        if not (self.policy.offload == "be" and self.config.be_decode_placement == "cpu"):
            free = self.page_table.allocator.num_free + sum(
                len(self.page_table.pages(r.request_id)) for r in self.running if r.placement is Placement.SWAPPING_OUT
            )
            wanted, chosen = self._pages_wanted(), []
            candidates.sort(key=lambda r: r.is_best_effort)  # stable: taken from the end, BE go before LS (neo)
            for request in reversed(candidates):  # newest first
                if free >= wanted:
                    break
                chosen.append(request)
                free += len(self.page_table.pages(request.request_id))
            candidates = chosen
        return [self._swap_out(request, batch) for request in candidates if self._swap_fits(request, batch)]

    def _plan_swap_ins(self, batch: _Batch, reserve_rows: int) -> list[KVTransfer]:
        """Offloaded requests come back to the device when nothing waits, no LS prefill runs (the next chunk would
        send them out again), pages are plentiful and their decode would fit this iteration's time budget."""
        if self.policy.offload == "none" or self.config.be_decode_placement != "auto" or self.waiting:
            return []
        if any(self._is_ls(r) and not r.num_output_tokens for r in self.running):
            return []
        allocator = self.page_table.allocator
        keep_free = self._pages_wanted() + int(_SWAP_IN_HEADROOM * allocator.num_pages)
        shape = batch.shape
        transfers = []
        for request in list(self.offloaded):  # oldest first
            if request.token_in_flight:
                continue
            if len(self.running) >= self.config.max_num_seqs:
                break
            needed = self.page_table.pages_needed(request.request_id, request.num_computed_tokens + 1)
            shape = batch.with_chunk(shape, request.num_computed_tokens, 1, True)
            if allocator.num_free - needed < keep_free or not batch.fits(shape, reserve_rows):
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

    def _waited_a_pass(self, request: Request) -> bool:
        """Whether a BE request the time budget leaves out has waited on the device as long as an offloaded token
        takes (about one iteration per layer). Offloading it sooner would make it slower, not faster, whenever the
        device frees a slot within that time; on deep models it also swapped requests out and in again in turn."""
        last = request.last_token_iteration
        return last is None or self.iteration - last >= self.num_layers

    def _admit_piggyback(self, batch: _Batch) -> tuple[list[OffloadedToken], list[tuple[str, int]]]:
        """Offloaded rows that join the device batch: tokens starting at layer 0 and CPU results re-entering at their
        layer. Each layer stays within budget / layers; longest-waiting rows first, then the lowest layers."""
        candidates = []  # (waiting since, layer, request); a new token enters "before" layer 0
        for request in self.offloaded:
            if not request.token_in_flight:
                candidates.append((request.result_ready_since or 0, -1, request))
            elif request.result_ready_since is not None:
                candidates.append((request.result_ready_since, request.offload_layer, request))
        candidates.sort(key=lambda c: (c[0], c[1]))
        shape = batch.shape
        layer_budget = None
        if batch.time_budget is not None:
            budget = batch.time_budget / batch.correction - batch.swap_seconds  # in the model's own units
            layer_budget = (budget - batch.model.head_time(shape.num_sampled)) / self.num_layers
        extra = [0] * self.num_layers
        starts, returning = [], []
        # A layer's time is its dense work on its rows plus the device attention, which is the same at every layer.
        attention = batch.model.attention_time(shape) if layer_budget is not None else 0.0
        for _, layer, request in candidates:
            row_layer = max(layer, 0)
            extra[row_layer] += 1
            # As in largest_chunk, an iteration never runs nothing: the first row goes in whatever the budget says.
            over = layer_budget is not None and (shape.num_rows or starts or returning) and (
                batch.model.dense_time(shape.num_rows + extra[row_layer]) + attention > layer_budget)
            if over:
                extra[row_layer] -= 1
                continue
            if layer < 0:
                request.token_in_flight = True
                request.offload_layer, request.result_ready_since = 0, None
                starts.append(OffloadedToken(
                    request.request_id, request.token_ids[-1], request.num_tokens - 1, request.params,
                    request.num_output_tokens,
                ))
            else:
                returning.append((request.request_id, layer))
                request.offload_layer, request.result_ready_since = layer + 1, None
        batch.shape = replace(shape, extra_rows=tuple(extra))
        return starts, returning

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
                request.result_ready_since = self.iteration
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
