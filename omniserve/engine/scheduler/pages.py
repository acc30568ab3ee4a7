"""Device KV pages for the scheduler: whether a request has room to grow, booking a chunk with the pages it needs,
making room by preempting (recompute), and how many pages the device requests want next."""

from __future__ import annotations

from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
from omniserve.engine.scheduler.state import SchedulerState


class PageManager:
    """Answers "may this request grow on the device?" and makes it so, preempting others when it must."""

    def __init__(self, state: SchedulerState) -> None:
        self.state = state
        self.page_table = state.page_table
        self.preempted = False
        """Whether the plan being made has preempted a request (new requests then wait: they would only preempt
        again). Reset by the scheduler at every plan."""

    def has_room(self, request: Request, num_tokens: int) -> bool:
        """Whether the request's pages can grow to `num_tokens` without preempting (and, under `llumnix`, within
        the BE requests' share of the pages)."""
        if not self.page_table.can_grow(request.request_id, num_tokens):
            return False
        state = self.state
        if state.policy.be_page_cap and not state.is_ls(request):
            be_pages = sum(len(self.page_table.pages(r.request_id)) for r in state.running if not state.is_ls(r))
            needed = self.page_table.pages_needed(request.request_id, num_tokens)
            return be_pages + needed <= (1.0 - state.config.ls_headroom) * self.page_table.allocator.num_pages
        return True

    def schedule(self, request: Request, count: int, batch: IterationBudget, scheduled: dict[str, int],
                 evict_ls: bool = True) -> bool:
        """Grows a running request's pages for `count` more tokens, preempting others if needed, and books the chunk
        in the iteration (`scheduled`: request id -> tokens this iteration)."""
        if count <= 0 or request.status is not RequestStatus.RUNNING:
            return False
        if not self.make_room(request, request.num_computed_tokens + count, scheduled, evict_ls):
            return False
        self.page_table.grow(request.request_id, request.num_computed_tokens + count)
        batch.add(request, count)
        scheduled[request.request_id] = count
        return True

    def committed(self) -> int:
        """Device pages in use plus those the running BE prefills will still take to finish their prompts (their
        room was set aside when they were admitted, see room_for_whole_prompt)."""
        owed = sum(
            self.page_table.pages_needed(r.request_id, r.num_tokens) for r in self.state.running
            if r.placement is Placement.DEVICE and not self.state.is_ls(r) and r.num_tokens - r.num_computed_tokens > 1)
        return self.page_table.allocator.num_used + owed

    def room_for_whole_prompt(self, request: Request) -> bool:
        """Whether a waiting BE request's whole prompt and its first decode step fit the free device pages beyond
        what is set aside (committed) and what the running LS requests take next (the rest of their prompts and
        their next token). Its KV can leave the device only at a token boundary (swap-out), so one admitted on its
        first chunk without that room is preempted midway by the next one's growth or by LS, and its prompt computed
        again: device time spent for nothing (a prompt larger than the device is let through, as before).

        Later growth is not reserved: setting aside all the KV a request may reach, when the hosts could not take
        it, cut BE throughput by a fifth in the regime map's memory-bound cells (device KV binds there, not the
        device time that recomputing a preempted request costs)."""
        needed = self.page_table.pages_needed(request.request_id, request.num_tokens + 1)
        ls_next = sum(self.page_table.pages_needed(r.request_id, r.num_tokens + 1) for r in self.state.running
                      if r.placement is Placement.DEVICE and self.state.is_ls(r))
        num_pages = self.page_table.allocator.num_pages
        return num_pages - self.committed() - ls_next >= min(needed, num_pages)

    def make_room(self, request: Request, num_tokens: int, scheduled: dict[str, int], evict_ls: bool) -> bool:
        """Preempts device requests not scheduled this iteration (the newest BE first, then the newest LS if
        allowed) until the request can grow; preempts the request itself if nothing else is left."""
        is_ls = self.state.is_ls
        while not self.has_room(request, num_tokens):
            candidates = [
                r for r in self.state.running
                if r.placement is Placement.DEVICE and r is not request and r.request_id not in scheduled
                and (evict_ls or not is_ls(r))
            ]
            victims = [r for r in candidates if not is_ls(r)] or candidates
            if not is_ls(request):  # a BE request only ever displaces BE requests
                victims = [r for r in victims if not is_ls(r)]
            if not victims:
                self.preempt(request)
                return False
            self.preempt(victims[-1])
        return True

    def preempt(self, request: Request) -> None:
        self.state.running.remove(request)
        request.num_preemptions += 1
        self.state.stats.num_preemptions += 1
        self.preempted = True
        self.state.requeue(request)

    def wanted(self) -> int:
        """Pages the device requests need for their next tokens, plus the next waiting request's first chunk.

        Swap-outs for pages aim at this, not at the room a waiting BE request needs to be admitted (its whole prompt,
        room_for_whole_prompt): aiming at that offloaded each BE request right after its prefill to admit the next,
        and halved BE throughput with long prompts (a 120 s regime-map cell: 0.57x sarathi against 1.12x), the
        device's decodes giving way to prefills of requests that then crawl."""
        state = self.state
        wanted = sum(
            self.page_table.pages_needed(r.request_id, r.num_computed_tokens + 1)
            for r in state.running if r.placement is Placement.DEVICE
        )
        if state.waiting:
            head = state.waiting[0]
            chunk = min(head.num_tokens - head.num_computed_tokens, state.config.max_num_batched_tokens)
            wanted += self.page_table.pages_needed(head.request_id, head.num_computed_tokens + chunk)
        return wanted
