"""The FCFS scheduler, BE placement and the page bookkeeping, on the CPU with made-up runner outputs (no model)."""

from __future__ import annotations

import pytest
from fakes import step

from omniserve.engine.scheduler import Scheduler
from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.plan import RunnerOutput
from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
from omniserve.kv_cache import OutOfPagesError, PageAllocator, PageTable
from omniserve.sampling.params import InvalidRequestError, SamplingParams


def make_scheduler(num_pages=64, page_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), PageTable(PageAllocator(num_pages), page_size), eos_token_ids=(2,))


def add(scheduler, request_id, prompt_len, max_tokens=8, **params) -> Request:
    request = Request(request_id, list(range(10, 10 + prompt_len)), SamplingParams(**params), max_tokens)
    scheduler.add_request(request)
    return request


def test_allocator_integrity_and_double_free():
    allocator = PageAllocator(8)
    pages = allocator.allocate(3)
    allocator.check_integrity()
    assert allocator.num_free == 5 and pages == [0, 1, 2]
    allocator.free(pages)
    allocator.check_integrity()
    with pytest.raises(RuntimeError, match="twice"):
        allocator.free([1])
    with pytest.raises(OutOfPagesError):
        allocator.allocate(9)


def test_chunked_prefill_respects_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    add(scheduler, "a", 25)
    plans = [step(scheduler) for _ in range(3)]
    assert [c.token_ids.__len__() for p in plans for c in p.chunks] == [10, 10, 5]
    assert [c.sample for p in plans for c in p.chunks] == [False, False, True]
    assert plans[1].chunks[0].start_position == 10


def test_running_requests_decode_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=12)
    add(scheduler, "a", 6)
    step(scheduler)
    add(scheduler, "b", 30)
    plan = step(scheduler)
    assert [(c.request_id, len(c.token_ids)) for c in plan.chunks] == [("a", 1), ("b", 11)]


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        add(scheduler, name, 4)
    plan = step(scheduler)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_a_request_that_can_never_fit_the_device_is_refused_whoever_adds_it():
    """Driven directly (not through the engine), a request larger than every KV page together is refused before it
    is queued: it once preempted itself forever."""
    scheduler = make_scheduler(num_pages=4, page_size=4)
    with pytest.raises(InvalidRequestError, match="17 tokens do not fit the KV cache \\(4 pages of 4 tokens\\)"):
        add(scheduler, "huge", 9, max_tokens=8)
    assert not scheduler.has_unfinished()
    add(scheduler, "fits", 8, max_tokens=8)
    assert scheduler.has_unfinished()


def test_preemption_frees_the_newest_and_requeues_it_first():
    scheduler = make_scheduler(num_pages=4)
    a = add(scheduler, "a", 7, max_tokens=8)
    b = add(scheduler, "b", 7, max_tokens=8)
    step(scheduler)  # both prefill 7 tokens: 2 pages each, the pool is full
    step(scheduler)  # both decode their 8th token, still within 2 pages
    step(scheduler)  # a's 9th token needs a third page: b, the newest, is preempted
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and scheduler.waiting[0] is b
    assert a.status is RequestStatus.RUNNING and scheduler.stats.num_preemptions == 1
    scheduler.page_table.allocator.check_integrity()
    while scheduler.has_unfinished():
        step(scheduler)
    assert b.output_token_ids == [7] * 8 and scheduler.page_table.allocator.num_used == 0


def test_be_prefill_starts_only_with_room_for_its_whole_prompt():
    """Chunked BE prefills that together outgrow the device would preempt each other midway and compute their
    prompts again: the second starts once the device has room for its whole prompt besides the first's."""
    scheduler = make_scheduler(num_pages=12, page_size=4, max_num_batched_tokens=16, be_decode_placement="device")
    add(scheduler, "first", 30, max_tokens=4, service_class="be")  # 8 pages once prefilled, 9 at the end
    second = add(scheduler, "second", 30, max_tokens=4, service_class="be")
    step(scheduler)
    plan = step(scheduler)  # first's last 14 prompt tokens leave 2 of the token budget: not enough pages for second
    assert [c.request_id for c in plan.chunks] == ["first"] and second.status is RequestStatus.WAITING
    while scheduler.has_unfinished():
        step(scheduler)
    assert scheduler.stats.num_preemptions == 0 and second.output_token_ids == [7] * 4


def test_stop_conditions():
    scheduler = make_scheduler()
    eos = add(scheduler, "eos", 3)
    ignore = add(scheduler, "ignore", 3, max_tokens=2, ignore_eos=True)
    stop_id = add(scheduler, "stop-id", 3, ignore_eos=True, stop_token_ids=[2])
    step(scheduler, token=2)
    assert eos.status is RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    assert stop_id.status is RequestStatus.FINISHED_STOPPED and stop_id.stop_reason == 2
    assert ignore.status is RequestStatus.RUNNING
    step(scheduler, token=2)
    assert ignore.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.page_table.allocator.num_used == 0


def test_min_tokens_defers_eos():
    scheduler = make_scheduler()
    request = add(scheduler, "a", 3, min_tokens=2)
    step(scheduler, token=2)
    assert request.status is RequestStatus.RUNNING
    step(scheduler, token=2)
    assert request.status is RequestStatus.FINISHED_STOPPED


def test_finishing_a_waiting_or_running_request_frees_pages():
    scheduler = make_scheduler(max_num_seqs=1)
    add(scheduler, "a", 5)
    add(scheduler, "b", 5)
    step(scheduler)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("unknown", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished() and scheduler.page_table.allocator.num_used == 0
    assert scheduler.schedule().chunks == []


# ------------------------------------------------------------------------------------------- BE placement (piggyback)


def test_cpu_placement_offloads_be_after_prefill_only():
    scheduler = make_scheduler(be_decode_placement="cpu")
    be = add(scheduler, "be", 5, service_class="be")
    ls = add(scheduler, "ls", 5)
    step(scheduler)  # prefill samples the first token
    plan = step(scheduler)  # BE at a token boundary: swapped out, its pages freed
    assert [t.request_id for t in plan.swap_outs] == ["be"] and plan.swap_outs[0].num_tokens == 5
    assert be.placement is Placement.HOST and scheduler.page_table.pages("be") == []
    assert ls.placement is Placement.DEVICE
    plan = step(scheduler)  # the offloaded token starts at layer 0 with the newest token
    assert [(t.request_id, t.position) for t in plan.offloaded_starts] == [("be", 5)]
    plan = step(scheduler)  # its CPU attention result returns at its (only) layer: the token is done
    assert plan.returning == [("be", 0)] and be.num_output_tokens == 2 and be.num_computed_tokens == 6
    while scheduler.has_unfinished():
        step(scheduler)
    assert scheduler.take_released() == ["be"] and scheduler.page_table.allocator.num_used == 0


def test_offloading_stops_where_host_memory_would_run_out():
    """Requests are offloaded only while the hosts can hold them as they will be when done: the second BE request,
    which would not fit beside the first, keeps decoding on the device; both finish and every page is freed."""
    capacity = [5 + 8]  # tokens: the first request's 5-token prompt and its 8 output tokens
    scheduler = Scheduler(SchedulerConfig(be_decode_placement="cpu"), PageTable(PageAllocator(64), 4),
                          eos_token_ids=(2,), host_capacity=lambda: capacity[0])
    first = add(scheduler, "first", 5, service_class="be")
    second = add(scheduler, "second", 5, service_class="be")
    step(scheduler)
    step(scheduler)
    assert first.placement is Placement.HOST and second.placement is Placement.DEVICE
    while scheduler.has_unfinished():
        assert second.placement is Placement.DEVICE
        step(scheduler)
    assert first.num_output_tokens == second.num_output_tokens == 8 and scheduler.page_table.allocator.num_used == 0


def test_be_flows_through_host_memory_while_ls_holds_the_device():
    """LS holds half the device pages; BE requests are prefilled only when their whole prompt has a place beside
    LS's next pages (none is preempted before its first token), go to the host (within its budget, each counted at
    its final size) to make room for the next, decode there or on the device, and finish. None is lost, the hosts
    never hold more than their budget, every page is freed."""
    capacity = 3 * (12 + 10)  # host tokens: three BE requests when done (12-token prompts, 10 output tokens)
    scheduler = Scheduler(SchedulerConfig(be_decode_placement="auto"), PageTable(PageAllocator(24), 4),
                          eos_token_ids=(2,), num_layers=2, host_capacity=lambda: capacity)
    ls = add(scheduler, "ls", 28, max_tokens=20)  # 7 pages at once, 12 of the 24 by the end
    be = [add(scheduler, f"be{i}", 12, max_tokens=10, service_class="be") for i in range(6)]
    preempted_midway = []
    while scheduler.has_unfinished():
        before = {r.request_id: r.num_preemptions for r in be}
        step(scheduler)
        preempted_midway += [r.request_id for r in be if r.num_preemptions > before[r.request_id]
                             and not r.num_output_tokens]
        held = sum(r.num_tokens - 1 + r.max_tokens - r.num_output_tokens for r in scheduler.offloaded)
        assert held <= capacity
    assert ls.num_output_tokens == 20 and all(r.num_output_tokens == 10 for r in be)
    assert not preempted_midway and scheduler.stats.num_swap_outs >= 3
    assert scheduler.page_table.allocator.num_used == 0
    assert not scheduler.requests and not scheduler.offloaded and not scheduler.running


def test_device_placement_never_offloads():
    scheduler = make_scheduler(be_decode_placement="device")
    add(scheduler, "be", 5, service_class="be")
    while scheduler.has_unfinished():
        assert not step(scheduler).swap_outs


def test_auto_offloads_newest_be_when_pages_run_short_and_brings_it_back():
    scheduler = make_scheduler(num_pages=16, be_decode_placement="auto")
    old = add(scheduler, "old", 7, max_tokens=30, service_class="be")
    new = add(scheduler, "new", 7, max_tokens=30, service_class="be")
    for _ in range(3):
        step(scheduler)
    add(scheduler, "ls", 41, max_tokens=2)  # needs 11 pages: more than the 10 free
    step(scheduler)
    assert new.placement is Placement.HOST and old.placement is Placement.DEVICE
    assert new.num_swap_outs == 1
    while "ls" in scheduler.requests:
        step(scheduler)
    for _ in range(3):  # nothing waits and pages are plentiful again: the offloaded request comes back
        step(scheduler)
    assert new.placement is Placement.DEVICE and new.num_swap_ins == 1


def test_a_swap_in_takes_back_the_pages_the_prefix_cache_still_has():
    """Offloaded, then back: the request's pages still cached (its prompt's prefix, which another request holds,
    and its own, idle since it left) are taken back, and only the rest of its KV is written."""
    from omniserve.kv_cache import PrefixCache

    scheduler = Scheduler(SchedulerConfig(be_decode_placement="auto"), PageTable(PageAllocator(16, PrefixCache()), 4),
                          eos_token_ids=(2,))
    old = add(scheduler, "old", 9, max_tokens=30, service_class="be")
    for _ in range(2):
        step(scheduler)
    new = add(scheduler, "new", 9, max_tokens=30, service_class="be")  # the same prompt: two pages found cached
    for _ in range(3):
        step(scheduler)
    add(scheduler, "ls", 45, max_tokens=2)  # needs 12 pages: more than the 11 free
    step(scheduler)
    assert new.placement is Placement.HOST and old.placement is Placement.DEVICE
    while "ls" in scheduler.requests:
        step(scheduler)
    swap_ins = []
    for _ in range(3):
        swap_ins += step(scheduler).swap_ins
    [swap_in] = swap_ins
    # all three of its full pages: the two it shares with "old", and its own, idle in the cache since it left
    assert swap_in.cached_tokens == 12 and swap_in.page_ids[:2] == scheduler.page_table.pages("old")[:2]
    assert new.placement is Placement.DEVICE


def test_lost_offloaded_request_is_recomputed_on_the_device():
    scheduler = make_scheduler(be_decode_placement="cpu")
    be = add(scheduler, "be", 5, service_class="be")
    step(scheduler)
    step(scheduler)
    assert be.placement is Placement.HOST
    plan = scheduler.schedule()
    scheduler.update(plan, RunnerOutput(lost=["be"]))
    assert be.placement is Placement.DEVICE and be.num_computed_tokens == 0 and scheduler.waiting[0] is be
    plan = step(scheduler)
    assert plan.chunks[0].request_id == "be" and len(plan.chunks[0].token_ids) == be.num_tokens - 1
