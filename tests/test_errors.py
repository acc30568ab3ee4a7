"""Bad input gets a clear error and the engine keeps serving; requests that end early free everything."""

from __future__ import annotations

import threading

import pytest

from omniserve.config import ConfigError
from omniserve.sampling.params import InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def llm(tiny_model_dirs, make_llm):
    return make_llm(tiny_model_dirs["llama"][0], max_model_len=64, block_size=4)


@pytest.mark.parametrize(
    "prompt, params, message, param",
    [
        ([], GREEDY, "empty", "prompt"),
        ([1] * 64, GREEDY, "maximum context length is 64", "prompt"),
        ([1] * 60, SamplingParams(max_tokens=10), "maximum context length is 64", "max_tokens"),
        ([5, 1000], GREEDY, r"token ids must be in \[0, 1000\)", "prompt"),
        ("text", GREEDY, "no tokenizer", "prompt"),
    ],
    ids=["empty", "too-long", "too-long-with-output", "bad-token-id", "text-without-tokenizer"],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, prompt, params, message, param):
    with pytest.raises(InvalidRequestError, match=message) as info:
        llm.generate([[3, 4, 5], prompt], params, use_tqdm=False)
    assert info.value.param == param
    assert not llm.engine.has_unfinished_requests()  # the valid request queued before it was withdrawn
    assert len(llm.generate([[3, 4, 5]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_request_larger_than_the_kv_cache_is_refused(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"][0], max_model_len=64, block_size=4, num_gpu_blocks_override=3)
    with pytest.raises(InvalidRequestError, match="do not fit the KV cache"):
        llm.generate([[3] * 10], GREEDY, use_tqdm=False)


def test_max_model_len_beyond_the_model_is_a_config_error(tiny_model_dirs, make_llm):
    with pytest.raises(ConfigError, match="exceeds the model's limit of 512"):
        make_llm(tiny_model_dirs["llama"][0], max_model_len=4096)


def test_duplicate_request_id(llm):
    llm.engine.add_request("x", [3, 4], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        llm.engine.add_request("x", [3, 4], GREEDY)
    llm.engine.abort_request("x")


def test_abort_mid_generation_frees_pages(llm):
    engine = llm.engine
    engine.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=20))
    engine.add_request("b", [3, 4, 5], SamplingParams(max_tokens=20))
    engine.step()
    engine.step()
    assert engine.allocator.num_used > 0
    engine.abort_request("a")
    engine.abort_request("b")
    engine.abort_request("never-existed")
    assert engine.allocator.num_used == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_failed_iteration_fails_its_requests_not_the_engine(llm, monkeypatch):
    engine = llm.engine
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real_execute(plan)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    engine.add_request("a", [3, 4, 5], GREEDY)
    outputs = engine.step() + engine.step()
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "error"
    assert engine.allocator.num_used == 0
    assert len(llm.generate([[3, 4, 5]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_cpu_attention_pool_settings_are_validated(tiny_model_dirs, make_llm):
    with pytest.raises(ConfigError, match="at least one worker"):
        make_llm(tiny_model_dirs["llama"][0], cpu_attention_workers=0)
    with pytest.raises(ConfigError, match="be_decode_placement"):
        make_llm(tiny_model_dirs["llama"][0], be_decode_placement="gpu")
    with pytest.raises(ConfigError, match="offload_pipeline must be one of multi-layer, one-layer, sync"):
        make_llm(tiny_model_dirs["llama"][0], offload_pipeline="two-layer")


def test_failed_iteration_that_started_swap_outs_frees_them(tiny_model_dirs, make_llm, monkeypatch):
    """The runner copies a plan's swap-outs before its forward pass; if the pass then fails, the requests being
    swapped out fail too and give back their device pages and host KV, so offline generation ends."""
    llm = make_llm(tiny_model_dirs["llama"][0], max_model_len=64, block_size=4, be_decode_placement="cpu")
    engine = llm.engine
    real_execute = engine.runner.execute
    failed_with_swaps = []

    def fails_after_swapping(plan):
        if plan.swap_outs and not failed_with_swaps:
            engine.runner._swap_out(plan.swap_outs)  # the copy happens, then the device faults
            failed_with_swaps.append([t.request_id for t in plan.swap_outs])
            raise RuntimeError("simulated device fault after the swap-outs started")
        return real_execute(plan)

    monkeypatch.setattr(engine.runner, "execute", fails_after_swapping)
    be = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, service_class="be")
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=llm.generate([[3, 4, 5], [6, 7]], be, use_tqdm=False)),
                              daemon=True)
    worker.start()
    worker.join(timeout=120)  # it used to spin forever
    assert not worker.is_alive(), "generation hung after a failed iteration with swap-outs"
    assert failed_with_swaps
    reasons = {o.request_id: o.outputs[0].finish_reason for o in result["out"]}
    assert sorted(reasons.values()).count("error") == len(failed_with_swaps[0])
    assert engine.allocator.num_used == 0 and engine.cpu_pool.host_kv_bytes() == 0
