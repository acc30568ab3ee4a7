"""Device KV pages for the scheduler: whether a request has room to grow, making room by preempting (recompute), and
how many pages the device requests want next."""

from __future__ import annotations

from omniserve.engine.scheduler.request import Placement, Request, RequestStatus


class PageRoom:
    """Part of Scheduler (scheduler.py): reads and changes its running and waiting requests and page table."""

    def _page_room(self, request: Request, num_tokens: int) -> bool:
        if not self.page_table.can_grow(request.request_id, num_tokens):
            return False
        if self.policy.be_page_cap and not self._is_ls(request):
            allocator = self.page_table.allocator
            be_pages = sum(len(self.page_table.pages(r.request_id)) for r in self.running if not self._is_ls(r))
            needed = self.page_table.pages_needed(request.request_id, num_tokens)
            return be_pages + needed <= (1.0 - self.config.ls_headroom) * allocator.num_pages
        return True

    def pages_committed(self) -> int:
        """Device pages in use plus those the running BE prefills will still take to finish their prompts (their
        room was set aside when they were admitted, see _room_for_whole_prompt)."""
        owed = sum(
            self.page_table.pages_needed(r.request_id, r.num_tokens) for r in self.running
            if r.placement is Placement.DEVICE and not self._is_ls(r) and r.num_tokens - r.num_computed_tokens > 1)
        return self.page_table.allocator.num_used + owed

    def _room_for_whole_prompt(self, request: Request) -> bool:
        """Whether a waiting BE request's whole prompt and its first decode step fit the free device pages beyond
        what is set aside (pages_committed) and what the running LS requests take next (the rest of their prompts
        and their next token). Its KV can leave the device only at a token boundary (swap-out), so one admitted on
        its first chunk without that room is preempted midway by the next one's growth or by LS, and its prompt
        computed again: device time spent for nothing (a prompt larger than the device is let through, as before).

        Later growth is not reserved: setting aside all the KV a request may reach, when the hosts could not take
        it, cut BE throughput by a fifth in the regime map's memory-bound cells (device KV binds there, not the
        device time that recomputing a preempted request costs)."""
        needed = self.page_table.pages_needed(request.request_id, request.num_tokens + 1)
        ls_next = sum(self.page_table.pages_needed(r.request_id, r.num_tokens + 1) for r in self.running
                      if r.placement is Placement.DEVICE and self._is_ls(r))
        num_pages = self.page_table.allocator.num_pages
        return num_pages - self.pages_committed() - ls_next >= min(needed, num_pages)

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

    def _pages_wanted(self) -> int:
        """Pages the device requests need for their next tokens, plus the next waiting request's first chunk.

        Swap-outs for pages aim at this, not at the room a waiting BE request needs to be admitted (its whole prompt,
        _room_for_whole_prompt): aiming at that offloaded each BE request right after its prefill to admit the next,
        and halved BE throughput with long prompts (a 120 s regime-map cell: 0.57x sarathi against 1.12x), the device's
        decodes giving way to prefills of requests that then crawl."""
        wanted = sum(
            self.page_table.pages_needed(r.request_id, r.num_computed_tokens + 1)
            for r in self.running if r.placement is Placement.DEVICE
        )
        if self.waiting:
            head = self.waiting[0]
            chunk = min(head.num_tokens - head.num_computed_tokens, self.config.max_num_batched_tokens)
            wanted += self.page_table.pages_needed(head.request_id, head.num_computed_tokens + chunk)
        return wanted
