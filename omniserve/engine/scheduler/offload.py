"""Offloading for the scheduler: which requests may decode in the CPU pool (the resolved OffloadMode), swap-outs
decided by pages and by time, swap-ins when there is slack."""

from __future__ import annotations

from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.plan import KVTransfer
from omniserve.engine.scheduler.policy import OffloadMode
from omniserve.engine.scheduler.request import Placement, Request

_SWAP_IN_HEADROOM = 0.25  # swap in only if this share of all pages stays free beyond what is needed


class Offloading:
    """Part of Scheduler (scheduler.py): moves its requests between running (device) and offloaded (host)."""

    def _may_offload(self, request: Request) -> bool:
        mode = self.config.offload_mode
        if mode is OffloadMode.NONE or not request.at_token_boundary:
            return False
        return (mode.offloads_ls or request.is_best_effort) and self._host_has_room(request)

    def _host_has_room(self, request: Request) -> bool:
        """Whether the hosts can take the request's KV as it will be when it is done, beside the offloaded requests
        (and those being swapped out) counted the same way: host memory granted is never overcommitted by their
        growth, and a request that does not fit stays on the device (or waits) instead."""
        if self.host_capacity is None:
            return True
        if self._host_tokens_left is None:  # once per plan (not per candidate); each swap-out planned takes its share
            held = sum(_final_kv(r) for r in self.offloaded) + sum(
                _final_kv(r) for r in self.running if r.placement is Placement.SWAPPING_OUT)
            self._host_tokens_left = self.host_capacity() - held
        return _final_kv(request) <= self._host_tokens_left

    def _swap_fits(self, request: Request, batch: IterationBudget) -> bool:
        """A swap-out's cost to the engine fits this iteration's time budget. While no LS request runs or waits, one
        swap-out per iteration is allowed whatever it costs, so that BE work always makes progress. (A waiting one
        may be admitted later in this plan: its first chunk would then share an iteration already over budget.)"""
        if batch.time_budget is None:
            return True
        cost = self.latency_model.swap_out_time(request.num_computed_tokens)
        if batch.fits(batch.shape, extra_seconds=cost):
            return True
        ls_present = any(self._is_ls(r) for r in self.running) or any(self._is_ls(r) for r in self.waiting)
        return not batch.swap_seconds and not ls_present

    def _swap_out(self, request: Request, batch: IterationBudget) -> KVTransfer:
        if batch.model is not None:
            batch.swap_seconds += batch.model.swap_out_time(request.num_computed_tokens)
        request.placement = Placement.SWAPPING_OUT
        if self._host_tokens_left is not None:
            self._host_tokens_left -= _final_kv(request)
        return KVTransfer(request.request_id, list(self.page_table.pages(request.request_id)),
                          request.num_computed_tokens, _final_kv(request))

    def _plan_page_swap_outs(self, batch: IterationBudget, scheduled: dict[str, int]) -> list[KVTransfer]:
        """Swap-outs decided by pages: under `cpu` placement every BE request once it decodes; otherwise the newest
        offloadable requests while free pages (counting those being swapped out) fall short of what is wanted.
        Swap-outs whose cost does not fit the time budget wait for a later iteration."""
        candidates = [
            r for r in self.running
            if r.placement is Placement.DEVICE and self._may_offload(r) and r.request_id not in scheduled
        ]
        if not candidates:
            return []
        if self.config.offload_mode is not OffloadMode.BE_ALWAYS:
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
        # Host room is judged again as each is chosen: those chosen before it in this plan count.
        return [self._swap_out(request, batch) for request in candidates
                if self._host_has_room(request) and self._swap_fits(request, batch)]

    def _plan_swap_ins(self, batch: IterationBudget, reserve_rows: int) -> list[KVTransfer]:
        """Offloaded requests come back to the device when nothing waits, no LS prefill runs (the next chunk would
        send them out again), pages are plentiful and their decode would fit this iteration's time budget."""
        if not self.config.offload_mode.swaps_in or self.waiting:
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


def _final_kv(request: Request) -> int:
    """Tokens of KV the request holds once it has generated all it may (its last token is never fed back)."""
    return request.num_tokens - 1 + max(0, request.max_tokens - request.num_output_tokens)
