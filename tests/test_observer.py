"""The engine's iteration observers: one record per step with the step's plan, the runner's output and the timings
(swap-outs, CPU pool calls, offloaded-row bookkeeping); the same tokens with or without an observer; nothing kept once
the last observer is gone."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from omniserve.engine.observer import IterationRecord, TimedPool
from omniserve.sampling.params import SamplingParams

PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)]]


def greedy(service_class: str, max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, service_class=service_class)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_a_record_per_step_with_the_plan_output_and_times(tiny_model_dirs, make_llm):
    tiny = tiny_model_dirs["llama"][0]
    # The same prompts run three times: without the prefix cache, each time computes every prompt token.
    llm = make_llm(tiny, dtype="float64", block_size=4, enable_prefix_caching=False)
    reference = tokens(llm.generate(PROMPTS, greedy("ls"), use_tqdm=False))
    records: list[IterationRecord] = []
    llm.engine.add_iteration_observer(records.append)
    assert tokens(llm.generate(PROMPTS, greedy("ls"), use_tqdm=False)) == reference
    assert records and not any(r.failed for r in records)
    sampled = sum(len(r.output.sampled) for r in records)
    assert sampled == len(PROMPTS) * 6  # every token came out of an observed iteration
    assert sum(r.num_rows for r in records) >= sum(map(len, PROMPTS))  # every prompt token was computed
    for r in records:
        assert 0 < r.seconds <= r.step_seconds
        assert r.num_chunks == len(r.plan.chunks) and r.cpu_wait_seconds == 0.0
    with pytest.raises(FrozenInstanceError):
        records[0].seconds = 0.0

    llm.engine.remove_iteration_observer(records.append)
    count = len(records)
    assert tokens(llm.generate(PROMPTS, greedy("ls"), use_tqdm=False)) == reference
    assert len(records) == count and llm.engine.runner.timings is None


def test_offloaded_iterations_report_swaps_pool_calls_and_bookkeeping(tiny_model_dirs, make_llm):
    """BE requests decode in the CPU pool: their swap-outs, the pool's calls and the offloaded rows' bookkeeping are
    timed, and the pool is called directly again once nobody observes."""
    tiny = tiny_model_dirs["llama"][0]
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="cpu")
    engine = llm.engine
    reference = tokens(llm.generate(PROMPTS, greedy("be"), use_tqdm=False))
    records: list[IterationRecord] = []
    engine.add_iteration_observer(records.append)
    assert isinstance(engine.runner.cpu_pool, TimedPool)
    assert tokens(llm.generate(PROMPTS, greedy("be"), use_tqdm=False)) == reference
    assert sum(len(r.plan.swap_outs) for r in records) == len(PROMPTS)
    assert sum(r.swap_out_seconds > 0 for r in records) >= 1
    assert any(r.ran_offloaded for r in records) and sum(r.num_offloaded_rows for r in records) > 0
    assert sum(r.pool_seconds.get("submit", 0.0) for r in records) > 0
    assert all(r.offload_seconds >= r.pool_seconds.get("submit", 0.0) for r in records)
    engine.remove_iteration_observer(records.append)
    assert engine.runner.cpu_pool is engine.cpu_pool and engine.runner.timings is None


def test_a_failed_iteration_is_recorded_as_failed(tiny_model_dirs, make_llm, monkeypatch):
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float64", block_size=4)
    engine = llm.engine
    records: list[IterationRecord] = []
    engine.add_iteration_observer(records.append)

    def broken(plan):
        raise RuntimeError("device fault")

    monkeypatch.setattr(engine.runner, "execute", broken)
    engine.add_request("r", PROMPTS[0], greedy("ls"))
    outputs = engine.step()
    assert outputs[0].finished and records[-1].failed and not records[-1].output.sampled
