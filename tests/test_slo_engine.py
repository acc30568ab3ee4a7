"""The SLO-aware scheduler end to end on a tiny model: a profile measured on this machine, a tight TPOT SLO, heavy
BE load. Every iteration that runs LS rows is planned within the budget, and every request completes. (How closely
the measured times follow the predictions is a benchmark's question: benchmarks/bench_profile.py.)"""

from __future__ import annotations

import pytest

from omniserve.profiler.latency_model import BatchShape
from omniserve.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def tiny_profile(tiny_model_dirs, tmp_path_factory):
    from omniserve import LLM

    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    llm = LLM(tiny_model_dirs["llama"][0], ls_tpot_slo=1.0, profile_path=str(path), block_size=4)
    llm.engine.shutdown()
    return path, llm.engine.latency_model


def test_tight_tpot_slo_under_heavy_be_load(tiny_model_dirs, tiny_profile, make_llm):
    path, model = tiny_profile
    lone_decode = model.iteration_time(BatchShape(1, 0, 64, 1, 1))
    budget = 3 * lone_decode  # tight: a few rows of prefill per iteration on top of the LS decodes
    llm = make_llm(tiny_model_dirs["llama"][0], ls_tpot_slo=budget, profile_path=str(path), block_size=4,
                   num_gpu_blocks_override=96)
    engine = llm.engine
    be = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, service_class="be")
    ls = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"be{i}", [(7 * i + j) % 900 + 3 for j in range(60 + 5 * i)], be)
    finished, ls_iterations = {}, []
    for step in range(5000):
        if step in (5, 25, 60):
            engine.add_request(f"ls{step}", [(11 * step + j) % 900 + 3 for j in range(20)], ls)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        plan = engine.last_iteration.plan
        if any(c.request_id.startswith("ls") for c in plan.chunks):
            # LS decodes run whatever they cost; anything beyond them must fit the budget.
            optional = any(len(c.token_ids) > 1 or not c.request_id.startswith("ls") for c in plan.chunks)
            optional = optional or plan.offloaded_starts or plan.returning or plan.swap_outs
            if optional:
                ls_iterations.append((plan.predicted_time, plan.time_budget, plan.summary()))
        if not engine.has_unfinished_requests() and step > 60:
            break
    assert sorted(finished) == sorted([f"be{i}" for i in range(8)] + ["ls5", "ls25", "ls60"])
    assert set(finished.values()) == {"length"}
    over = [(p, l, s) for p, l, s in ls_iterations if p > l]
    assert ls_iterations and not over, over[:3]
    assert engine.scheduler.num_swap_outs >= 1  # the BE load did not fit: some of it decoded in the CPU pool

