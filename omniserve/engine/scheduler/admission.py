"""Admission: which waiting requests start this iteration, with how large a first chunk, and which LS requests are
rejected at once because their predicted TTFT misses their SLO (never a silently late answer).

With prefix caching, every decision (TTFT, the chunk, the pages it needs) counts only the tokens a request must
compute: its longest cached prefix is looked up for the TTFT, and its pages taken once it may start (one that then
does not start lets them go again). One of a request's n completions waits while a sibling computes their prompt, then finds it cached."""

from __future__ import annotations

import logging
import math

from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.correction import TimeCorrection
from omniserve.engine.scheduler.pages import PageManager
from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
from omniserve.engine.scheduler.state import SchedulerState

logger = logging.getLogger(__name__)

_REJECTING_ALL_AFTER = 10  # LS rejections in a row, none admitted, before it is logged as rejecting everything


class Admission:
    """Admits waiting requests of one class at a time, in arrival order."""

    def __init__(self, state: SchedulerState, pages: PageManager, correction: TimeCorrection,
                 calibrates: bool = False) -> None:
        """calibrates: the caller times scratch iterations when asked (calibration_wanted), so an LS request about to
        be rejected on an idle device whose latest measurements are old waits for fresh ones instead (the engine
        does; the simulator's device is its model)."""
        self.state = state
        self.pages = pages
        self.correction = correction
        self.calibrates = calibrates
        self.calibration_wanted = False
        """Set when an admission decision waits for fresh measurements (see calibrates); the caller clears it."""
        self.ls_rejected_in_a_row = 0
        """LS requests rejected at admission since the last one admitted."""

    def admit(self, batch: IterationBudget, scheduled: dict[str, int], rejected: list[str], ls: bool,
              reserve_rows: int = 0) -> None:
        """Admits waiting requests of one class (LS or BE) in arrival order into the iteration (`scheduled`: request
        id -> tokens); for LS, rejects those that would be late (their ids go to `rejected`)."""
        state = self.state
        ahead = self._ls_prefill_ahead(scheduled) if ls else 0
        blocked = False  # once one request cannot start, later ones of its class wait too (arrival order)
        judged: set[int] = set()  # the groups judged in this call (by id())
        for request in (r for r in tuple(state.waiting) if state.is_ls(r) == ls):  # a snapshot: admission removes
            if blocked and not ls:
                break  # nothing more can happen to waiting BE requests (LS ones may still be rejected)
            if request.status is not RequestStatus.WAITING:
                continue  # rejected with its group in this call
            # What the prefix cache holds of its tokens is not computed again: the checks count only the rest.
            uncached = self._uncached_tokens(request) if ls and self._judges_lateness(request) else (
                request.num_tokens - request.num_computed_tokens)
            if ls and self._needs_judging(request, judged):
                late = self._group_is_late(request, batch, ahead, uncached)
                if late and self._wants_calibration(ahead):
                    self.calibration_wanted = blocked = True
                    continue
                if late:
                    self._reject(self._waiting_members(request), rejected)
                    continue
            ahead += uncached
            # New requests wait while anything is being preempted: admitting them would only preempt again. One of n
            # completions waits while a sibling computes their prompt, and then finds it cached.
            if blocked or self.pages.preempted or len(state.running) >= state.config.max_num_seqs or (
                    self._sibling_computes_prompt(request)):
                blocked = True
                continue
            self._attach_cached_prefix(request)  # its cached pages are taken only now that it may start
            count = batch.largest_chunk(request, reserve_rows)
            if count <= 0 or not self.pages.has_room(request, request.num_computed_tokens + count) or not (
                    ls or self.pages.room_for_whole_prompt(request)):
                blocked = True
                self._detach(request)
                continue
            self._start(request, count, batch, scheduled, ls)

    def _needs_judging(self, request: Request, judged: set[int]) -> bool:
        """A request alone is judged at every admission while it waits; a group (see RequestGroup) until one of its
        members starts, and once per admission, when its first waiting member comes."""
        group = request.group
        if group is None:
            return True
        if group.started or id(group) in judged:
            return False
        judged.add(id(group))
        return True

    def _waiting_members(self, request: Request) -> list[Request]:
        if request.group is None:
            return [request]
        return [m for m in request.group.members if m.status is RequestStatus.WAITING]

    def _group_is_late(self, request: Request, batch: IterationBudget, ahead: int, uncached: int) -> bool:
        """Whether the request, or the last of its group's waiting members, would miss the TTFT SLO if admitted now."""
        if request.group is not None and self._judges_lateness(request):
            uncached = sum(self._uncached_tokens(m) for m in self._waiting_members(request))
        return self._is_late(request, batch, ahead, uncached)

    def _judges_lateness(self, request: Request) -> bool:
        return self.state.policy.reject_late and self.state.latency_model is not None and request.ttft_slo is not None

    def _uncached_tokens(self, request: Request) -> int:
        """The tokens a waiting request would compute, its cached prefix looked up (not taken)."""
        cached = 0
        if request.num_computed_tokens == 0:
            cached = self.state.page_table.cached_prefix_tokens(request.request_id, request.token_ids,
                                                                request.params.cache_salt)
        return request.num_tokens - request.num_computed_tokens - cached

    def _attach_cached_prefix(self, request: Request) -> None:
        if request.num_computed_tokens == 0:  # a waiting request holds no KV (a preempted one was freed)
            request.num_computed_tokens = self.state.page_table.attach_cached_prefix(
                request.request_id, request.token_ids, request.params.cache_salt)

    def _sibling_computes_prompt(self, request: Request) -> bool:
        if request.siblings is None or not self.state.page_table.caching:
            return False
        return any(r.siblings == request.siblings and r.num_computed_tokens < r.num_prompt_tokens
                   for r in self.state.running)

    def _detach(self, request: Request) -> None:
        """A waiting request that does not start now lets go of the cached pages it was given: they stay cached,
        and it looks them up again when it next may start."""
        self.state.page_table.release(request.request_id)
        request.num_computed_tokens = 0

    def _ls_prefill_ahead(self, scheduled: dict[str, int]) -> int:
        """LS prefill tokens that will run before a waiting LS request's."""
        return sum(
            r.num_tokens - r.num_computed_tokens - scheduled.get(r.request_id, 0) for r in self.state.running
            if r.placement is Placement.DEVICE and self.state.is_ls(r) and not r.num_output_tokens)

    def _is_late(self, request: Request, batch: IterationBudget, ahead: int, uncached: int) -> bool:
        if not self.state.policy.reject_late:
            return False
        ttft = batch.predicted_ttft(request, ahead, uncached, self.state.config.max_num_batched_tokens,
                                    self.state.clock())
        return ttft > (request.ttft_slo or math.inf)

    def _wants_calibration(self, ahead: int) -> bool:
        """A late LS request would run alone on an idle device, and nothing measured lately backs the prediction: it
        waits one iteration for the caller to measure the device, then is decided."""
        state = self.state
        return self.calibrates and not (state.running or state.offloaded or ahead) and not self.correction.is_fresh()

    def _start(self, request: Request, count: int, batch: IterationBudget, scheduled: dict[str, int],
               ls: bool) -> None:
        state = self.state
        state.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        if ls:
            self.ls_rejected_in_a_row = 0
        if request.group is not None:
            request.group.started = True
        if request.first_scheduled_time is None:
            request.first_scheduled_time = state.clock()
        if request.num_cached_tokens is None:
            request.num_cached_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
            state.stats.prefix_cache_queries += request.num_tokens
            state.stats.prefix_cache_hits += request.num_computed_tokens
        state.running.append(request)
        state.page_table.grow(request.request_id, request.num_computed_tokens + count)
        batch.add(request, count)
        scheduled[request.request_id] = count

    def _reject(self, members: list[Request], rejected: list[str]) -> None:
        """Turns away a request, or the waiting members of its group (one rejection in a row)."""
        for member in members:
            self.state.finish(member.request_id, RequestStatus.REJECTED)
            rejected.append(member.request_id)
        self.state.stats.num_rejected += len(members)
        self.ls_rejected_in_a_row += 1
        request = members[0]
        if self.ls_rejected_in_a_row % (10 * _REJECTING_ALL_AFTER) == _REJECTING_ALL_AFTER:
            logger.warning(
                "admission has rejected the last %d LS requests and admitted none: their predicted TTFT exceeds "
                "the SLO (%.3f s) even alone; the profile's times are scaled by %.2f from measured iterations. "
                "Check the SLOs against `omniserve profile` on this machine.", self.ls_rejected_in_a_row,
                request.ttft_slo or 0.0, self.correction.value)
