"""Sampling: supports are restricted as asked, seeds reproduce, penalties count what a request has seen, n and
logprobs work."""

from __future__ import annotations

import pytest
import torch

from omniserve.sampling.params import InvalidRequestError, SampledToken, SamplingParams
from omniserve.sampling.sampler import SamplingRow, sample

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 over five tokens.
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = PROBS.log().unsqueeze(0)


def draw(params: SamplingParams, times: int = 400, logits=LOGITS) -> set[int]:
    rows = [SamplingRow(params, 0)] * times
    return {t.token_id for t in sample(logits.repeat(times, 1), rows, eos_token_ids=())}


def test_truncation_restricts_support():
    assert draw(SamplingParams()) == {0, 1, 2, 3, 4}
    assert draw(SamplingParams(top_k=2)) == {0, 1}
    assert draw(SamplingParams(top_p=0.7)) == {0, 1}  # 0.4 + 0.3 reaches 0.7
    assert draw(SamplingParams(top_p=0.71)) == {0, 1, 2}
    assert draw(SamplingParams(min_p=0.3)) == {0, 1, 2}  # 0.15 >= 0.3 * 0.4
    assert draw(SamplingParams(top_k=3, min_p=0.5)) == {0, 1}
    assert draw(SamplingParams(temperature=0.0)) == {0}
    assert draw(SamplingParams(top_k=1, temperature=5.0)) == {0}


def test_temperature_sharpens_and_flattens():
    counts_cold = torch.bincount(torch.tensor([t.token_id for t in sample(
        LOGITS.repeat(2000, 1), [SamplingRow(SamplingParams(temperature=0.3), 0)] * 2000, ())]), minlength=5)
    counts_hot = torch.bincount(torch.tensor([t.token_id for t in sample(
        LOGITS.repeat(2000, 1), [SamplingRow(SamplingParams(temperature=3.0), 0)] * 2000, ())]), minlength=5)
    assert counts_cold[0] > 1300 and counts_hot[0] < 700  # p = 0.70 and 0.27 (vs 0.4 at temperature 1)


def test_seed_reproduces_per_step_whatever_the_batch():
    params = SamplingParams(seed=1234)
    alone = [sample(LOGITS, [SamplingRow(params, step)], ())[0].token_id for step in range(20)]
    in_batch = [
        sample(LOGITS.repeat(3, 1), [SamplingRow(SamplingParams(), 0), SamplingRow(params, step),
                                     SamplingRow(SamplingParams(seed=9), 0)], ())[1].token_id
        for step in range(20)
    ]
    assert alone == in_batch and len(set(alone)) > 1


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 10.0, 10.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    assert sample(logits, [SamplingRow(params, 0)], eos_token_ids=(2,))[0].token_id in (0, 3)
    assert sample(logits, [SamplingRow(params, 2)], eos_token_ids=(2,))[0].token_id in (1, 2)


def test_logprobs_are_the_models():
    token = sample(LOGITS, [SamplingRow(SamplingParams(temperature=0.0, logprobs=2), 0)], ())[0]
    assert token.token_id == 0 and token.logprob == pytest.approx(PROBS[0].log().item(), abs=1e-6)
    assert [t for t, _ in token.top_logprobs] == [0, 1]
    assert token.top_logprobs[1][1] == pytest.approx(PROBS[1].log().item(), abs=1e-6)


def test_penalties_count_the_tokens_a_request_has_seen():
    logits = torch.tensor([[2.0, 1.5, 1.0, -1.0, 0.5]])

    def greedy(seen: list[int], generated: int, logprobs=None, **penalties) -> SampledToken:
        params = SamplingParams(temperature=0.0, logprobs=logprobs, **penalties)
        return sample(logits, [SamplingRow(params, generated, seen_token_ids=seen)], ())[0]

    assert greedy([4, 0], 1, frequency_penalty=0.3).token_id == 0  # 2.0 - 0.3 > 1.5
    assert greedy([4, 0, 0], 2, frequency_penalty=0.3).token_id == 1  # 2.0 - 0.6 < 1.5: once per use
    assert greedy([4, 0, 0, 0], 3, presence_penalty=0.4).token_id == 0  # 2.0 - 0.4: once, however often
    assert greedy([0, 4], 1, presence_penalty=1.0).token_id == 0  # the prompt's tokens are not the completion's
    assert greedy([0, 4], 1, repetition_penalty=2.0).token_id == 1  # ... but repetition counts them: 2.0 / 2
    assert greedy([1, 0, 2], 0, repetition_penalty=5.0).token_id == 4  # 2.0, 1.5, 1.0 / 5 < 0.5
    token = greedy([0, 0], 1, logprobs=0, frequency_penalty=2.0)
    assert token.token_id == 1 and token.logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())
    rows = [SamplingRow(SamplingParams(temperature=0.0), 1, seen_token_ids=None),
            SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=1.0), 1, seen_token_ids=[0])]
    assert [t.token_id for t in sample(logits.repeat(2, 1), rows, ())] == [0, 1]  # only the row that has them


def test_penalties_give_the_same_tokens_offloaded_as_on_the_device(tiny_model_dirs, make_llm):
    """An offloaded row's penalties see its tokens as the device row's do (the piggybacked path's tokens are the
    device's); they change what a greedy request says."""
    prompts = [[5, 6, 7, 5, 6, 7], [9, 10, 11]]
    penalized = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, service_class="be",
                               repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)
    tokens = {}
    for placement in ("device", "cpu"):
        llm = make_llm(tiny_model_dirs["llama"][0], dtype="float32", be_decode_placement=placement)
        swaps = []
        llm.engine.add_iteration_observer(lambda record: swaps.extend(record.plan.swap_outs))
        tokens[placement] = [o.outputs[0].token_ids for o in llm.generate(prompts, penalized, use_tqdm=False)]
        assert bool(swaps) == (placement == "cpu")
        plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                             use_tqdm=False)
    assert tokens["cpu"] == tokens["device"]
    assert [o.outputs[0].token_ids for o in plain] != tokens["device"]


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2), dict(n=0),
     dict(max_tokens=0), dict(min_tokens=5, max_tokens=2), dict(logprobs=50), dict(stop_token_ids=[-1]),
     dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0)],
)
def test_invalid_values_are_refused_with_the_field_named(bad):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**bad)
    assert info.value.param == next(iter(bad)) or info.value.param == "min_tokens"


def test_seeded_generation_is_reproducible_and_n_gives_distinct_samples(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float32")
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    first = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate([[9] * 30, [5, 6, 7], [1, 2]], params, use_tqdm=False)[1].outputs[0].token_ids
    assert first == crowd
    many = llm.generate([[5, 6, 7]], SamplingParams(n=4, max_tokens=12, seed=7, ignore_eos=True), use_tqdm=False)
    completions = many[0].outputs
    assert [c.index for c in completions] == [0, 1, 2, 3]
    assert completions[0].token_ids == first  # completion i uses seed + i
    assert len({tuple(c.token_ids) for c in completions}) > 1
    again = llm.generate([[5, 6, 7]], SamplingParams(n=4, max_tokens=12, seed=7, ignore_eos=True), use_tqdm=False)
    assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in completions]


def test_logprobs_through_the_engine(tiny_model_dirs, make_llm):
    llm = make_llm(tiny_model_dirs["llama"][0], dtype="float32")
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry.token_id == token and entry.top_logprobs[0][0] == token and entry.logprob <= 0
