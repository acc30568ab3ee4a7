"""Offloading: the BE decode stage (which decodes stay on the device and which go to the CPU pool), swap-outs decided
by pages, and swap-ins when there is slack. Which requests may decode in the pool at all is the resolved OffloadMode
(policy.py); the host memory they may take is `host_capacity`."""

from __future__ import annotations

from typing import Callable

from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.pages import PageManager
from omniserve.engine.scheduler.plan import KVTransfer
from omniserve.engine.scheduler.policy import OffloadMode
from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
from omniserve.engine.scheduler.state import SchedulerState

_SWAP_IN_HEADROOM = 0.25  # swap in only if this share of all pages stays free beyond what is needed


class OffloadManager:
    """Moves requests between the device (running) and the CPU pool (offloaded)."""

    def __init__(self, state: SchedulerState, pages: PageManager,
                 host_capacity: Callable[[], int] | None = None) -> None:
        """host_capacity: tokens of KV the CPU pool's hosts hold in all, now (None: no limit); a request is
        offloaded only while the offloaded ones, counted at the size they reach when done, leave it room."""
        self.state = state
        self.pages = pages
        self.mode = state.config.offload_mode
        self.host_capacity = host_capacity
        self.host_tokens_left: int | None = None
        """Host KV left for swap-outs in the plan being made (None: not counted yet). Reset at every plan."""

    def place_be_decodes(self, decoding: list[Request], batch: IterationBudget, scheduled: dict[str, int],
                         reserve_rows: int) -> list[KVTransfer]:
        """Stage 3: BE requests decode on the device while they fit (time and pages); the rest are swapped out to
        the CPU pool, as far as the swap-outs' own cost fits, or wait if they may not leave. Short of pages (it fitted
        the time), a request is offloaded at once; short of time, once it has waited a pass. `reserve_rows`: rows
        kept for the offloaded rows that piggyback this iteration."""
        swap_outs = []
        for request in decoding:
            if self.state.is_ls(request) or request.status is not RequestStatus.RUNNING:
                continue
            fits_time = batch.tokens_left > 0 and batch.fits(
                batch.with_chunk(batch.shape, request.num_computed_tokens, 1, True), reserve_rows)
            if fits_time and self.pages.has_room(request, request.num_tokens):
                self.pages.schedule(request, 1, batch, scheduled)
            elif self.may_offload(request) and (fits_time or self._waited_a_pass(request)) and self._swap_fits(
                    request, batch):
                swap_outs.append(self._swap_out(request, batch))
            elif fits_time:  # may not leave the device: make room among the BE requests, as FCFS would
                self.pages.schedule(request, 1, batch, scheduled, evict_ls=False)
        return swap_outs

    def may_offload(self, request: Request) -> bool:
        if self.mode is OffloadMode.NONE or not request.at_token_boundary:
            return False
        return (self.mode.offloads_ls or request.is_best_effort) and self._host_has_room(request)

    def plan_page_swap_outs(self, batch: IterationBudget, scheduled: dict[str, int]) -> list[KVTransfer]:
        """Swap-outs decided by pages: under `cpu` placement every BE request once it decodes; otherwise the newest
        offloadable requests while free pages (counting those being swapped out) fall short of what is wanted.
        Swap-outs whose cost does not fit the time budget wait for a later iteration."""
        candidates = [
            r for r in self.state.running
            if r.placement is Placement.DEVICE and self.may_offload(r) and r.request_id not in scheduled
        ]
        if not candidates:
            return []
        if self.mode is not OffloadMode.BE_ALWAYS:
            candidates = self._short_of_pages(candidates)
        # Host room is judged again as each is chosen: those chosen before it in this plan count.
        return [self._swap_out(request, batch) for request in candidates
                if self._host_has_room(request) and self._swap_fits(request, batch)]

    def _short_of_pages(self, candidates: list[Request]) -> list[Request]:
        """The newest candidates (BE before LS) whose pages close the gap between free pages and those wanted."""
        page_table = self.state.page_table
        free = page_table.allocator.num_free + sum(
            len(page_table.pages(r.request_id)) for r in self.state.running if r.placement is Placement.SWAPPING_OUT)
        wanted, chosen = self.pages.wanted(), []
        candidates.sort(key=lambda r: r.is_best_effort)  # stable: taken from the end, BE go before LS (neo)
        for request in reversed(candidates):  # newest first
            if free >= wanted:
                break
            chosen.append(request)
            free += len(page_table.pages(request.request_id))
        return chosen

    def plan_swap_ins(self, batch: IterationBudget, reserve_rows: int) -> list[KVTransfer]:
        """Offloaded requests come back to the device when nothing waits, no LS prefill runs (the next chunk would
        send them out again), pages are plentiful and their decode would fit this iteration's time budget."""
        state, page_table = self.state, self.state.page_table
        if not self.mode.swaps_in or state.waiting:
            return []
        if any(state.is_ls(r) and not r.num_output_tokens for r in state.running):
            return []
        allocator = page_table.allocator
        keep_free = self.pages.wanted() + int(_SWAP_IN_HEADROOM * allocator.num_pages)
        shape = batch.shape
        transfers = []
        for request in list(state.offloaded):  # oldest first
            if request.token_in_flight:
                continue
            if len(state.running) >= state.config.max_num_seqs:
                break
            needed = page_table.pages_needed(request.request_id, request.num_computed_tokens + 1)
            shape = batch.with_chunk(shape, request.num_computed_tokens, 1, True)
            if allocator.num_free - needed < keep_free or not batch.fits(shape, reserve_rows):
                break
            keep_free += needed - page_table.pages_needed(request.request_id, request.num_computed_tokens)
            transfers.append(self._swap_in(request))
        return transfers

    def _swap_in(self, request: Request) -> KVTransfer:
        """Its pages still in the prefix cache (its prompt's shared prefix, or its own pages, idle since it left)
        are taken back; the host KV is written into the rest."""
        page_table = self.state.page_table
        cached = page_table.attach_cached_prefix(
            request.request_id, request.token_ids[:request.num_computed_tokens + 1], request.params.cache_salt)
        page_table.grow(request.request_id, request.num_computed_tokens)
        request.placement = Placement.SWAPPING_IN
        self.state.offloaded.remove(request)
        self.state.running.append(request)
        return KVTransfer(request.request_id, list(page_table.pages(request.request_id)), request.num_computed_tokens,
                          cached_tokens=cached)

    def _host_has_room(self, request: Request) -> bool:
        """Whether the hosts can take the request's KV as it will be when it is done, beside the offloaded requests
        (and those being swapped out) counted the same way: host memory granted is never overcommitted by their
        growth, and a request that does not fit stays on the device (or waits) instead."""
        if self.host_capacity is None:
            return True
        if self.host_tokens_left is None:  # once per plan (not per candidate); each swap-out planned takes its share
            held = sum(final_kv(r) for r in self.state.offloaded) + sum(
                final_kv(r) for r in self.state.running if r.placement is Placement.SWAPPING_OUT)
            self.host_tokens_left = self.host_capacity() - held
        return final_kv(request) <= self.host_tokens_left

    def _swap_fits(self, request: Request, batch: IterationBudget) -> bool:
        """A swap-out's cost to the engine fits this iteration's time budget. While no LS request runs or waits, one
        swap-out per iteration is allowed whatever it costs, so that BE work always makes progress. (A waiting one
        may be admitted later in this plan: its first chunk would then share an iteration already over budget.)"""
        if batch.time_budget is None:
            return True
        cost = batch.model.swap_out_time(request.num_computed_tokens)
        if batch.fits(batch.shape, extra_seconds=cost):
            return True
        return not batch.swap_seconds and not self.state.ls_present()

    def _swap_out(self, request: Request, batch: IterationBudget) -> KVTransfer:
        if batch.model is not None:
            batch.swap_seconds += batch.model.swap_out_time(request.num_computed_tokens)
        request.placement = Placement.SWAPPING_OUT
        if self.host_tokens_left is not None:
            self.host_tokens_left -= final_kv(request)
        page_table = self.state.page_table
        shared_pages = (request.num_cached_tokens or 0) // page_table.page_size
        prefix = page_table.hold_host_prefix(request.request_id, shared_pages)
        return KVTransfer(request.request_id, list(page_table.pages(request.request_id)), request.num_computed_tokens,
                          final_kv(request) - len(prefix) * page_table.page_size, host_prefix_pages=tuple(prefix))

    def _waited_a_pass(self, request: Request) -> bool:
        """Whether a BE request the time budget leaves out has waited on the device as long as an offloaded token
        takes (about one iteration per layer). Offloading it sooner would make it slower, not faster, whenever the
        device frees a slot within that time; on deep models it also swapped requests out and in again in turn."""
        last = request.last_token_iteration
        return last is None or self.state.iteration - last >= self.state.num_layers


def final_kv(request: Request) -> int:
    """Tokens of KV the request holds once it has generated all it may (its last token is never fed back)."""
    return request.num_tokens - 1 + max(0, request.max_tokens - request.num_output_tokens)
