"""Batching never changes results: a prompt alone, in a batch of different-length prompts, chunked, or preempted and
recomputed gives the same greedy tokens (float64, so that summation order cannot flip a near-tie)."""

from __future__ import annotations

import pytest

from omniserve.sampling.params import SamplingParams

PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)], [3] * 29, [42, 43]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture
def reference(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float64", block_size=4)
    return [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]


@pytest.mark.parametrize(
    "settings",
    [
        dict(),  # one batch, prefill and decode mixed in iterations
        dict(max_num_batched_tokens=8),  # long prompts are chunked over several iterations
        dict(max_num_seqs=2),  # requests queue and join the batch as others finish
        dict(num_gpu_blocks_override=30),  # too few pages: requests are preempted and recomputed
    ],
    ids=["batched", "chunked", "queued", "preempted"],
)
def test_batch_gives_same_tokens_as_alone(settings, reference, tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float64", block_size=4, **settings)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    if "num_gpu_blocks_override" in settings:
        assert llm.engine.scheduler.stats.num_preemptions > 0


def test_requests_arriving_mid_flight(reference, tiny_model_dirs, make_llm):
    """Continuous batching: requests added while others decode join without disturbing them."""
    engine = make_llm(tiny_model_dirs["llama"][0], dtype="float64", block_size=4).engine
    results = {}
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), prompt, GREEDY)
        for _ in range(3):
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert [results[str(i)] for i in range(len(PROMPTS))] == reference


def test_never_written_kv_cannot_leak_into_attention(reference, tiny_model_dirs, make_llm):
    """Pages come from uninitialised memory: poison them with NaN and the results must not change."""
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float64", block_size=4)
    for k, v in zip(llm.engine.pool.k, llm.engine.pool.v):
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
