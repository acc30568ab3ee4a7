"""The SLO-aware policies, without a model or device memory: a latency model of chosen numbers, a clock the test
moves, and a runner that is plain data (CPU results come back by the next iteration)."""

from __future__ import annotations

import logging
import math

import pytest
from fakes import LAYERS, MODEL, MS, step

from omniserve.engine.scheduler import Scheduler
from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.latency_model import (
    BatchShape, LatencyModel, LinearModel, prefill_interactions,
)
from omniserve.engine.scheduler.request import Placement, Request, RequestGroup, RequestStatus
from omniserve.kv_cache import PageAllocator, PageTable
from omniserve.sampling.params import SamplingParams

# MODEL (fakes.py): one layer's dense work takes 1 ms + 0.1 ms per row; the head 1 ms + 0.1 ms per sampled row;
# attention is cheap.


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(policy="omniserve", num_pages=256, page_size=4, tpot=0.05, clock=None, **config) -> Scheduler:
    config.setdefault("iteration_budget_share", 1.0)  # the rules below are stated against the whole SLO
    return Scheduler(
        SchedulerConfig(policy=policy, **config), PageTable(PageAllocator(num_pages), page_size), eos_token_ids=(2,),
        num_layers=LAYERS, latency_model=MODEL, default_tpot_slo=tpot, clock=clock or Clock(),
    )


def add(scheduler, request_id, prompt_len, max_tokens=8, service_class="ls", ttft=None, tpot=0.05) -> Request:
    ls = service_class == "ls"
    request = Request(
        request_id, list(range(10, 10 + prompt_len)), SamplingParams(service_class=service_class), max_tokens,
        arrival_time=scheduler.state.clock(), ttft_slo=ttft if ls else None, tpot_slo=tpot if ls else None,
    )
    scheduler.add_request(request)
    return request


def chunk_sizes(plan) -> dict[str, int]:
    return {c.request_id: len(c.token_ids) for c in plan.chunks}


def test_prefill_chunk_is_the_largest_that_fits_the_tpot_budget():
    scheduler = make()
    add(scheduler, "decoding", 8, max_tokens=50)
    step(scheduler)
    add(scheduler, "long", 900)
    plan = step(scheduler)
    chunk = chunk_sizes(plan)["long"]
    assert 0 < chunk < 900 and plan.predicted_time <= plan.time_budget == 0.05
    one_more = BatchShape(1 + chunk + 1, prefill_interactions(0, chunk + 1), 9, 1, 1)
    assert MODEL.iteration_time(one_more) > 0.05  # the next token would not have fitted
    assert plan.predicted_time == pytest.approx(MODEL.iteration_time(
        BatchShape(1 + chunk, prefill_interactions(0, chunk), 9, 1, 1)))


@pytest.mark.parametrize("margin, admitted", [(1.01, True), (0.99, False)])
def test_ls_admission_at_the_ttft_boundary(margin, admitted):
    scheduler = make()
    predicted = MODEL.iteration_time(BatchShape(10, prefill_interactions(0, 10), 0, 0, 1))
    request = add(scheduler, "ls", 10, ttft=predicted * margin)
    plan = step(scheduler)
    assert (request.status is RequestStatus.RUNNING) is admitted
    assert plan.rejected == ([] if admitted else ["ls"])
    if not admitted:
        assert request.status is RequestStatus.REJECTED and scheduler.stats.num_rejected == 1
        assert "ls" not in scheduler.requests and scheduler.page_table.allocator.num_used == 0


@pytest.mark.parametrize("slack, admitted", [(1.3, True), (0.7, False)])
def test_predicted_ttft_counts_the_prefill_ahead_not_this_iterations_chunks(slack, admitted):
    """A short LS prompt behind a long one that fills this iteration: its TTFT is the tokens ahead plus its own, in
    the largest chunks an iteration holds, not in whatever room the long one's chunk leaves in this iteration."""
    scheduler = make()

    def shape(count: int) -> BatchShape:
        return BatchShape(count, prefill_interactions(0, count), 0, 0, 1)

    chunk = max(c for c in range(1, 400) if MODEL.iteration_time(shape(c)) <= 0.05)
    expected = math.ceil((300 + 10) / chunk) * MODEL.iteration_time(shape(chunk))
    add(scheduler, "long", 300)
    short = add(scheduler, "short", 10, ttft=slack * expected)
    plan = step(scheduler)
    assert chunk_sizes(plan)["long"] == chunk and plan.rejected == ([] if admitted else ["short"])
    assert (short.status is RequestStatus.REJECTED) is not admitted


def test_waiting_ls_is_rejected_as_soon_as_it_would_be_late_and_be_is_never_rejected():
    clock = Clock()
    scheduler = make(clock=clock, max_num_seqs=1)
    add(scheduler, "first", 10, max_tokens=100)
    step(scheduler)
    waiting = add(scheduler, "second", 10, ttft=0.5)  # no sequence slot until "first" ends
    be = add(scheduler, "be", 10, service_class="be")
    step(scheduler)
    assert waiting.status is RequestStatus.WAITING
    clock.now += 0.495  # still waiting, and its prefill (about 10 ms) would now end past the SLO
    plan = step(scheduler)
    assert plan.rejected == ["second"] and waiting.status is RequestStatus.REJECTED
    clock.now += 100
    step(scheduler)
    assert be.status is RequestStatus.WAITING  # BE waits, however long


def add_group(scheduler, name: str, count: int, prompt_len: int, ttft: float) -> list[Request]:
    """The engine requests of one API request of `count` prompts (a RequestGroup)."""
    group = RequestGroup()
    for i in range(count):
        request = Request(f"{name}{i}", list(range(10, 10 + prompt_len)), SamplingParams(), 8,
                          arrival_time=scheduler.state.clock(), ttft_slo=ttft, tpot_slo=0.05, group=group)
        scheduler.add_request(request)
        group.members.append(request)
    return group.members


def largest_chunk_and_time() -> tuple[int, float]:
    """The largest prefill chunk an iteration holds within the 50 ms budget, and that iteration's time."""
    def shape(count: int) -> BatchShape:
        return BatchShape(count, prefill_interactions(0, count), 0, 0, 1)

    chunk = max(c for c in range(1, 400) if MODEL.iteration_time(shape(c)) <= 0.05)
    return chunk, MODEL.iteration_time(shape(chunk))


def test_a_request_of_many_prompts_is_rejected_before_any_of_them_runs():
    """20 prompts of 100 tokens: the first fit the TTFT SLO alone, all 20 do not. As separate requests the first
    run and the rest are turned away; as one API request (a group) all are turned away at once."""
    chunk, per_iteration = largest_chunk_and_time()
    ttft = 0.5 * math.ceil(20 * 100 / chunk) * per_iteration
    alone = make()
    separate = [add(alone, f"p{i}", 100, ttft=ttft) for i in range(20)]
    step(alone)
    assert separate[0].status is RequestStatus.RUNNING and separate[-1].status is RequestStatus.REJECTED
    scheduler = make()
    members = add_group(scheduler, "p", 20, 100, ttft)
    plan = step(scheduler)
    assert plan.rejected == [m.request_id for m in members] and not plan.chunks
    assert scheduler.stats.num_rejected == 20 and scheduler.admission.ls_rejected_in_a_row == 1
    assert not scheduler.requests and scheduler.page_table.allocator.num_used == 0


def test_once_a_group_started_none_of_its_prompts_is_turned_away():
    clock = Clock()
    chunk, per_iteration = largest_chunk_and_time()
    scheduler = make(clock=clock, max_num_seqs=2)  # the group's members start two at a time
    members = add_group(scheduler, "p", 6, 20, ttft=2 * math.ceil(6 * 20 / chunk) * per_iteration + 0.01)
    step(scheduler)
    assert [m.status for m in members[:2]] == [RequestStatus.RUNNING] * 2
    clock.now += 100  # far past the SLO: waiting members would be late, alone
    while scheduler.has_unfinished():
        step(scheduler)
    assert all(m.status is RequestStatus.FINISHED_LENGTH for m in members) and scheduler.stats.num_rejected == 0


def test_priority_order_ls_decode_ls_prefill_be_decode_be_prefill():
    scheduler = make(max_num_batched_tokens=40, tpot=None, be_decode_placement="device")
    add(scheduler, "be-old", 6, service_class="be", max_tokens=20)
    add(scheduler, "ls-old", 6, max_tokens=20)
    step(scheduler)  # both prefill
    add(scheduler, "be-new", 8, service_class="be")
    add(scheduler, "ls-new", 30)
    plan = step(scheduler)
    assert [c.request_id for c in plan.chunks] == ["ls-old", "ls-new", "be-old", "be-new"]
    assert chunk_sizes(plan) == {"ls-old": 1, "ls-new": 30, "be-old": 1, "be-new": 8}
    add(scheduler, "be-newer", 50, service_class="be")
    plan = step(scheduler)  # the BE prefill takes what the decodes leave
    assert chunk_sizes(plan) == {"ls-old": 1, "ls-new": 1, "be-old": 1, "be-new": 1, "be-newer": 36}


def test_be_decode_is_offloaded_when_it_does_not_fit_the_time_budget():
    scheduler = make(num_pages=1024)
    be = add(scheduler, "be", 8, service_class="be", max_tokens=30)
    step(scheduler)
    plan = step(scheduler)  # alone, the BE decode fits: it stays on the device
    assert chunk_sizes(plan) == {"be": 1} and be.placement is Placement.DEVICE
    add(scheduler, "ls", 2000, max_tokens=2)  # a long LS prefill takes the whole budget
    for _ in range(LAYERS - 1):  # offloaded, a token would take about LAYERS iterations: it waits that long first
        plan = step(scheduler)
        assert "be" not in chunk_sizes(plan) and not plan.swap_outs and be.placement is Placement.DEVICE
    plan = step(scheduler)
    assert [t.request_id for t in plan.swap_outs] == ["be"] and be.placement is Placement.HOST
    assert plan.predicted_time <= 0.05
    while "ls" in scheduler.requests:
        step(scheduler)
    for _ in range(3 * LAYERS):  # slack again: it comes back, and it was never rejected or preempted
        step(scheduler)
    assert be.placement is Placement.DEVICE and be.num_swap_ins == 1 and be.num_preemptions == 0


def test_be_decode_is_offloaded_when_device_pages_run_short():
    scheduler = make(num_pages=16)
    old = add(scheduler, "old", 7, max_tokens=30, service_class="be")
    new = add(scheduler, "new", 7, max_tokens=30, service_class="be")
    for _ in range(3):
        step(scheduler)
    add(scheduler, "ls", 41, max_tokens=2)  # needs 11 pages: more than the 10 free
    step(scheduler)
    assert new.placement is Placement.HOST and old.placement is Placement.DEVICE


def test_piggyback_rows_per_layer_stay_within_the_layer_budget():
    scheduler = make(be_decode_placement="cpu", tpot=None)
    requests = [add(scheduler, f"be{i}", 4, service_class="be", max_tokens=40) for i in range(12)]
    step(scheduler)  # prefill, with no time budget yet
    step(scheduler)  # swapped out
    assert all(r.placement is Placement.HOST for r in requests)
    scheduler.default_tpot_slo = 0.00625
    # Per layer: (6.25 ms - 1 ms head) / 4 layers = 1.3125 ms; each layer's dense work is 1 + 0.1 ms * rows: 3 rows.
    layer_budget = (0.00625 - MODEL.head_time(0)) / LAYERS
    cap = math.floor((layer_budget - 1 * MS) / (0.1 * MS) + 1e-9)
    most = 0
    for _ in range(30):
        plan = step(scheduler)
        per_layer = [0] * LAYERS
        for _, layer in plan.returning:
            per_layer[layer] += 1
        per_layer[0] += len(plan.offloaded_starts)
        assert max(per_layer) <= cap
        most = max(most, *per_layer)
    assert cap == 3 and most == cap and all(r.num_output_tokens > 1 for r in requests)


def test_offloaded_rows_at_high_layers_do_not_starve():
    scheduler = make(be_decode_placement="cpu", tpot=None)
    requests = [add(scheduler, f"be{i}", 4, service_class="be", max_tokens=200) for i in range(8)]
    step(scheduler)
    step(scheduler)
    scheduler.default_tpot_slo = 0.0054  # room for one offloaded row per layer
    progress = {r.request_id: [] for r in requests}
    for _ in range(60):
        step(scheduler)
        for r in requests:
            progress[r.request_id].append((r.num_output_tokens, r.offload_layer))
    for request in requests:  # everyone keeps moving: no request stands still for long
        history = progress[request.request_id]
        stalls = max(sum(1 for _ in run) for run in _runs(history))
        assert stalls <= 2 * len(requests) and request.num_output_tokens >= 3  # layer 0 takes starts and returns


def test_the_offloaded_pipeline_is_planned_within_the_budget_and_waits_only_without_ls():
    """The multi-layer plan's row limit and wait fit the TPOT budget beside an LS request (its `planned_s` counts
    both); without a budget the device never waits while an LS request runs."""
    for tpot in (0.01, None):
        scheduler = make(be_decode_placement="cpu", tpot=None)
        for i in range(12):
            add(scheduler, f"be{i}", 40, service_class="be", max_tokens=100)
        step(scheduler)
        step(scheduler)  # swapped out: every BE request decodes in the pool
        scheduler.default_tpot_slo = tpot
        add(scheduler, "ls", 20, max_tokens=30, tpot=tpot)
        plans = [step(scheduler) for _ in range(25)]
        with_ls = [p for p in plans if any(c.request_id == "ls" for c in p.chunks)]
        assert any(p.offloaded_starts or p.returning for p in with_ls)  # offloaded rows share those iterations
        if tpot is not None:
            planned = [p for p in with_ls if p.pipeline.planned_s is not None]
            assert planned and all(p.pipeline.planned_s <= p.time_budget * (1 + 1e-9) for p in planned)
            assert any(p.pipeline.wait_s > 0 for p in planned)  # the plan did use slack for a wait
        else:
            assert all(p.pipeline.wait_s == 0.0 for p in with_ls)


def test_the_sync_pipeline_is_planned_within_the_budget_with_returning_rows():
    """NEO's pipeline: the device waits for the CPU at every layer, so admission counts the CPU's time for every row
    the iteration carries, those that return to a layer they had to stop at as well as the new tokens."""
    scheduler = make(be_decode_placement="cpu", tpot=None, offload_pipeline="sync")
    for i in range(12):
        add(scheduler, f"be{i}", 40, service_class="be", max_tokens=100)
    step(scheduler)
    step(scheduler)
    scheduler.default_tpot_slo = 0.01
    add(scheduler, "ls", 20, max_tokens=30, tpot=0.01)
    plans = [step(scheduler) for _ in range(25)]  # the fake pool returns a row one layer at a time: rows return
    planned = [p for p in plans if p.pipeline.planned_s is not None and p.chunks]
    assert any(p.returning for p in planned)
    over = [(p.pipeline, p.time_budget) for p in planned if p.pipeline.planned_s > p.time_budget * (1 + 1e-9)]
    assert planned and not over, over[:3]


def _runs(history):
    run = [history[0]]
    for item in history[1:]:
        if item == run[-1]:
            run.append(item)
        else:
            yield run
            run = [item]
    yield run


def test_sarathi_keeps_be_on_the_device_and_only_in_leftover_budget():
    scheduler = make(policy="sarathi", num_pages=1024)
    be = add(scheduler, "be", 8, service_class="be", max_tokens=30)
    step(scheduler)
    add(scheduler, "ls", 2000, max_tokens=2)
    plan = step(scheduler)
    assert "be" not in chunk_sizes(plan) and not plan.swap_outs and be.placement is Placement.DEVICE
    assert plan.predicted_time <= 0.05


def test_llumnix_caps_be_pages_and_keeps_headroom_for_ls():
    scheduler = make(policy="llumnix", num_pages=20, ls_headroom=0.5, tpot=None)
    for i in range(4):
        add(scheduler, f"be{i}", 12, service_class="be", max_tokens=30)  # 3-4 pages each
    for _ in range(3):
        step(scheduler)
    be_pages = sum(len(scheduler.page_table.pages(f"be{i}")) for i in range(4))
    assert be_pages <= 10 and any(r.status is RequestStatus.WAITING for r in scheduler.requests.values())
    ls = add(scheduler, "ls", 30, max_tokens=2)  # 8 pages: fits in the headroom at once
    step(scheduler)
    assert ls.status is RequestStatus.RUNNING and ls.num_preemptions == 0


def test_neo_offloads_ls_too_when_pages_run_short():
    scheduler = make(policy="neo", num_pages=16)
    a = add(scheduler, "a", 7, max_tokens=30)
    b = add(scheduler, "b", 7, max_tokens=30)
    for _ in range(3):
        step(scheduler)
    add(scheduler, "c", 41, max_tokens=2)
    step(scheduler)
    assert b.placement is Placement.HOST and a.placement is Placement.DEVICE


def test_fcfs_ignores_classes():
    scheduler = make(policy="fcfs", max_num_batched_tokens=10, tpot=None)
    add(scheduler, "be", 10, service_class="be")
    add(scheduler, "ls", 10)
    plan = step(scheduler)
    assert [c.request_id for c in plan.chunks] == ["be"] and plan.time_budget is None


@pytest.mark.parametrize("policy", ["omniserve", "sarathi", "llumnix", "neo", "fcfs"])
def test_every_policy_finishes_a_mixed_load_and_frees_every_page(policy):
    scheduler = make(policy=policy, num_pages=40)
    for i in range(6):
        add(scheduler, f"ls{i}", 5 + 7 * i, max_tokens=12)
        add(scheduler, f"be{i}", 9 + 5 * i, service_class="be", max_tokens=20)
    for _ in range(2000):
        if not scheduler.has_unfinished():
            break
        plan = step(scheduler)
        scheduler.page_table.allocator.check_integrity()
        if plan.time_budget is not None and plan.chunks:
            assert plan.predicted_time <= plan.time_budget or len(plan.chunks) == sum(
                len(c.token_ids) == 1 for c in plan.chunks)  # over budget only with LS decodes alone
    assert not scheduler.has_unfinished() and scheduler.page_table.allocator.num_used == 0


def test_an_slo_tighter_than_one_row_still_lets_be_work_progress():
    scheduler = make(tpot=1e-6, be_decode_placement="cpu")
    for i in range(3):
        add(scheduler, f"be{i}", 9, service_class="be", max_tokens=5)
    for _ in range(500):
        if not scheduler.has_unfinished():
            break
        step(scheduler)
    assert not scheduler.has_unfinished()


def test_a_forced_token_does_not_join_an_iteration_that_swaps_out():
    """An iteration with nothing else to run takes one token of a request whatever the budget says; one that swaps a
    request out has something to run, and the token waits rather than push it over budget."""
    from omniserve.engine.scheduler.budget import IterationBudget

    request = Request("r", [5] * 20, SamplingParams(), 8)
    tight = 2 * MS  # the head and one layer's dense work alone take more
    assert IterationBudget(MODEL, LAYERS, tight, 512).largest_chunk(request) == 1
    swapping = IterationBudget(MODEL, LAYERS, tight, 512)
    swapping.swap_seconds = 0.1 * MS
    assert swapping.largest_chunk(request) == 0


def test_the_correction_ignores_iterations_of_offloaded_rows_alone():
    """A few offloaded rows a layer cost mostly per-layer overhead that the dense model does not describe: an
    iteration that ran nothing else says little about the device, and must not move the correction."""
    from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput

    scheduler = make()
    plan = IterationPlan(returning=[("x", 0)], predicted_time=10 * MS, shape=BatchShape(extra_rows=(1,)))
    for _ in range(20):
        scheduler.observe(plan, 1 * MS, RunnerOutput(offloaded_rows=(1,) * LAYERS))
    assert scheduler.correction.value == 1.0


def test_iterations_are_planned_within_a_share_of_the_slo():
    scheduler = make(iteration_budget_share=0.8)
    add(scheduler, "long", 900)
    plan = step(scheduler)
    assert plan.time_budget == pytest.approx(0.04) and plan.predicted_time <= 0.04


def test_a_swap_out_that_does_not_fit_the_budget_waits_while_ls_runs():
    slow_swaps = LatencyModel(**(vars(MODEL) | {"swap_out": LinearModel(0.0, (1e-3,))}))  # 1 ms per token
    scheduler = make(num_pages=1024)
    scheduler.state.latency_model = slow_swaps
    be = add(scheduler, "be", 60, service_class="be", max_tokens=30)
    step(scheduler)
    add(scheduler, "ls", 2000, max_tokens=2)  # the budget goes to the LS prefill: no room for a 60 ms swap-out
    plan = step(scheduler)
    assert not plan.swap_outs and be.placement is Placement.DEVICE and plan.predicted_time <= 0.05
    # With no LS request to protect, BE work progresses: one swap-out per iteration, whatever it costs.
    alone = make(num_pages=1024, be_decode_placement="cpu")
    alone.latency_model = slow_swaps
    first, second = (add(alone, name, 60, service_class="be", max_tokens=30) for name in ("first", "second"))
    swapped = []
    for _ in range(200):
        plan = step(alone)
        assert len(plan.swap_outs) <= 1
        swapped += [t.request_id for t in plan.swap_outs]
        if second.placement is Placement.HOST:
            break
    assert swapped == ["first", "second"]


def test_an_over_budget_swap_out_waits_while_an_ls_request_waits():
    """The swap-out is planned before waiting LS requests are admitted: one that arrived must not find its first
    chunk in an iteration that an over-budget swap-out has already filled."""
    slow_swaps = LatencyModel(**(vars(MODEL) | {"swap_out": LinearModel(0.0, (1e-3,))}))  # 1 ms per token
    scheduler = make(num_pages=1024, be_decode_placement="cpu")
    scheduler.state.latency_model = slow_swaps
    be = add(scheduler, "be", 60, service_class="be", max_tokens=30)
    step(scheduler)  # BE prefill: now at a token boundary, due to go to the CPU pool (a 60 ms swap-out)
    add(scheduler, "ls", 20, max_tokens=4)
    plan = step(scheduler)
    assert "ls" in chunk_sizes(plan) and not plan.swap_outs and be.placement is Placement.DEVICE
    assert plan.predicted_time <= plan.time_budget


def test_measured_iteration_times_correct_later_plans():
    scheduler = make()
    add(scheduler, "long", 900)
    plan = step(scheduler)
    for _ in range(100):  # the machine turns out 1.5x slower than profiled
        scheduler.observe(plan, 1.5 * plan.predicted_time / scheduler.correction.value)
    assert scheduler.correction.value == pytest.approx(1.5, rel=0.01)
    plan = step(scheduler)
    assert plan.predicted_time <= plan.time_budget  # the corrected prediction is what must fit
    uncorrected = plan.predicted_time / scheduler.correction.value
    assert uncorrected <= plan.time_budget / 1.5 * 1.01


def test_admission_that_rejects_everything_says_so(caplog):
    scheduler = make()
    with caplog.at_level(logging.WARNING, logger="omniserve.engine.scheduler"):
        for i in range(12):
            add(scheduler, f"hopeless{i}", 10, ttft=1e-6)
            step(scheduler)
    assert scheduler.admission.ls_rejected_in_a_row == 12 == scheduler.stats.num_rejected
    assert "rejected the last 10 LS requests and admitted none" in caplog.text
    add(scheduler, "fine", 10, ttft=1.0)
    step(scheduler)
    assert scheduler.admission.ls_rejected_in_a_row == 0


def test_the_correction_follows_a_profile_far_off_and_ignores_one_odd_iteration():
    clock = Clock()
    scheduler = make(clock=clock)
    add(scheduler, "long", 900, max_tokens=100)
    for _ in range(10):  # the device is 20x faster than profiled (the profile was taken on a busy machine)
        plan = step(scheduler)
        scheduler.observe(plan, plan.predicted_time / scheduler.correction.value / 20)
    assert scheduler.correction.value == pytest.approx(1 / 20)
    plan = step(scheduler)
    scheduler.observe(plan, 100 * plan.predicted_time)  # a GC pause
    assert scheduler.correction.value == pytest.approx(1 / 20)
    clock.now += 60  # a minute later the old measurements no longer vote: the first new one decides
    plan = step(scheduler)
    scheduler.observe(plan, 2 * plan.predicted_time / scheduler.correction.value)
    assert scheduler.correction.value == pytest.approx(2.0)


def test_prefills_and_decodes_are_corrected_apart():
    """A profile 20x off for prefills and 2x for decodes (taken on a busy machine): a lone prefill is predicted by
    the prefills' ratio, not by the median of the decodes that most iterations are, so an LS request whose TTFT SLO
    only the prefills' ratio meets is admitted."""
    scheduler = make()
    first = add(scheduler, "first", 64, max_tokens=40)
    while first.status is not RequestStatus.FINISHED_LENGTH:
        plan = step(scheduler)
        uncorrected = plan.predicted_time / scheduler.correction.factor(plan.shape)
        prefill = 2 * plan.shape.prefill_tokens >= plan.shape.num_rows
        scheduler.observe(plan, uncorrected / (20 if prefill else 2))
    assert scheduler.correction.value == pytest.approx(1 / 2)  # the window holds decodes
    lone = BatchShape(num_rows=64, prefill_interactions=prefill_interactions(0, 64), num_sampled=1, prefill_tokens=64)
    assert scheduler.correction.factor(lone) == pytest.approx(1 / 20)
    mixed = BatchShape(num_rows=2, prefill_interactions=prefill_interactions(0, 1), num_decodes=1, prefill_tokens=1)
    assert scheduler.correction.factor(mixed) == pytest.approx((1 / 20 + 1 / 2) / 2)
    ttft = 3 * MODEL.iteration_time(lone) / 20
    assert MODEL.iteration_time(lone) / 2 > ttft  # one correction for all would reject it
    late = add(scheduler, "late", 64, ttft=ttft)
    step(scheduler)
    assert late.status is RequestStatus.RUNNING and scheduler.stats.num_rejected == 0


@pytest.mark.parametrize("measured_lately", [False, True])
def test_a_late_lone_request_on_an_idle_device_waits_for_a_measurement_unless_one_is_fresh(measured_lately):
    """An engine's scheduler (it calibrates when asked) keeps a late LS request on an idle device waiting, and asks
    for a calibration, when nothing measured lately backs the prediction. With fresh measurements the prediction
    stands and the request is rejected."""
    clock = Clock()
    scheduler = Scheduler(
        SchedulerConfig(iteration_budget_share=1.0), PageTable(PageAllocator(256), 4), eos_token_ids=(2,),
        num_layers=LAYERS, latency_model=MODEL, default_tpot_slo=0.05, clock=clock, calibrates=True)
    if measured_lately:
        scheduler.correction.last_observed = clock()
    late = add(scheduler, "late", 64, ttft=MODEL.iteration_time(BatchShape(num_rows=64, num_sampled=1)) / 10)
    step(scheduler)
    assert late.status is (RequestStatus.REJECTED if measured_lately else RequestStatus.WAITING)
    assert scheduler.admission.calibration_wanted is not measured_lately
