"""The FCFS scheduler and the page bookkeeping, on the CPU with made-up runner outputs (no model)."""

from __future__ import annotations

import pytest

from omniserve.config import SchedulerConfig
from omniserve.engine.plan import RunnerOutput
from omniserve.engine.request import Request, RequestStatus
from omniserve.engine.scheduler import Scheduler
from omniserve.kv_cache import OutOfPagesError, PageAllocator, PageTable
from omniserve.sampling.params import SamplingParams
from omniserve.sampling.sampler import SampledToken


def make_scheduler(num_pages=64, page_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), PageTable(PageAllocator(num_pages), page_size), eos_token_ids=(2,))


def add(scheduler, request_id, prompt_len, max_tokens=8, **params) -> Request:
    request = Request(request_id, list(range(10, 10 + prompt_len)), SamplingParams(**params), max_tokens)
    scheduler.add_request(request)
    return request


def run_step(scheduler, token=7):
    plan = scheduler.schedule()
    sampled = {c.request_id: SampledToken(token) for c in plan.chunks if c.sample}
    scheduler.update(plan, RunnerOutput(sampled))
    return plan


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
    plans = [run_step(scheduler) for _ in range(3)]
    assert [c.token_ids.__len__() for p in plans for c in p.chunks] == [10, 10, 5]
    assert [c.sample for p in plans for c in p.chunks] == [False, False, True]
    assert plans[1].chunks[0].start_position == 10


def test_running_requests_decode_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=12)
    add(scheduler, "a", 6)
    run_step(scheduler)
    add(scheduler, "b", 30)
    plan = run_step(scheduler)
    assert [(c.request_id, len(c.token_ids)) for c in plan.chunks] == [("a", 1), ("b", 11)]


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        add(scheduler, name, 4)
    plan = run_step(scheduler)
    assert [c.request_id for c in plan.chunks] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_preemption_frees_the_newest_and_requeues_it_first():
    scheduler = make_scheduler(num_pages=4)
    a = add(scheduler, "a", 7, max_tokens=8)
    b = add(scheduler, "b", 7, max_tokens=8)
    run_step(scheduler)  # both prefill 7 tokens: 2 pages each, the pool is full
    run_step(scheduler)  # both decode their 8th token, still within 2 pages
    run_step(scheduler)  # a's 9th token needs a third page: b, the newest, is preempted
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and scheduler.waiting[0] is b
    assert a.status is RequestStatus.RUNNING and scheduler.num_preemptions == 1
    scheduler.page_table.allocator.check_integrity()
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert b.output_token_ids == [7] * 8 and scheduler.page_table.allocator.num_used == 0


def test_stop_conditions():
    scheduler = make_scheduler()
    eos = add(scheduler, "eos", 3)
    ignore = add(scheduler, "ignore", 3, max_tokens=2, ignore_eos=True)
    stop_id = add(scheduler, "stop-id", 3, ignore_eos=True, stop_token_ids=[2])
    run_step(scheduler, token=2)
    assert eos.status is RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    assert stop_id.status is RequestStatus.FINISHED_STOPPED and stop_id.stop_reason == 2
    assert ignore.status is RequestStatus.RUNNING
    run_step(scheduler, token=2)
    assert ignore.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.page_table.allocator.num_used == 0


def test_min_tokens_defers_eos():
    scheduler = make_scheduler()
    request = add(scheduler, "a", 3, min_tokens=2)
    run_step(scheduler, token=2)
    assert request.status is RequestStatus.RUNNING
    run_step(scheduler, token=2)
    assert request.status is RequestStatus.FINISHED_STOPPED


def test_finishing_a_waiting_or_running_request_frees_pages():
    scheduler = make_scheduler(max_num_seqs=1)
    add(scheduler, "a", 5)
    add(scheduler, "b", 5)
    run_step(scheduler)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("unknown", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished() and scheduler.page_table.allocator.num_used == 0
    assert scheduler.schedule().chunks == []
