"""The output processor: inline in step(), and on AsyncEngine's output thread, the same outputs (stop strings, n > 1,
logprobs), tokens past a stop dropped, and nothing held once requests end however they end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from omniserve.engine.async_engine import AsyncEngine, EngineDeadError
from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.output_processor import CompletionUpdate, NewRequest, OutputProcessor
from omniserve.sampling.params import SamplingParams
from omniserve.tokenizer import load_tokenizer

PROMPT = "the capital of france is"


@pytest.fixture
def engine(tiny_chat_model):
    # fp32 on every CPU: in bf16 a batch's logits are fp32 sums up to 8 rows and rounded to bf16 beyond
    # (models/linear.py), so two runs batched differently would differ by a rounding of the logits.
    return LLMEngine(model=tiny_chat_model, block_size=4, be_decode_placement="device", dtype="float32")


def run_offline(engine: LLMEngine, requests: dict[str, SamplingParams]) -> dict:
    for request_id, params in requests.items():
        engine.add_request(request_id, PROMPT, params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def run_async(async_engine: AsyncEngine, requests: dict[str, SamplingParams]) -> tuple[dict, dict]:
    """The last output of each request, and the text its deltas add up to, per completion."""
    async def one(request_id, params):
        streamed = [""] * params.n
        async for out in async_engine.generate(request_id, PROMPT, params):
            for completion in out.outputs:
                streamed[completion.index] += completion.delta_text
        return out, streamed

    async def main():
        return await asyncio.gather(*[one(i, p) for i, p in requests.items()])

    results = dict(zip(requests, asyncio.run(main())))
    return {i: r[0] for i, r in results.items()}, {i: r[1] for i, r in results.items()}


def wait_idle(engine: LLMEngine, async_engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 30  # aborts and stops land at the threads' next turn
    while engine.has_unfinished_requests() or async_engine.processor.num_requests:
        assert time.monotonic() < deadline, "the engine or its output processor still holds requests"
        time.sleep(0.01)
    engine.check_integrity()
    assert engine.allocator.num_used == 0 and engine.output_processor.num_requests == 0


def _leaves(value) -> list:
    """The numbers of a nested structure of tuples, lists and dataclasses, in order."""
    if isinstance(value, (int, float)):
        return [value]
    if hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, name) for name in value.__dataclass_fields__]
    if isinstance(value, dict):
        value = list(value.items())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return []


def test_the_output_thread_gives_what_step_gives(engine):
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    text = run_offline(engine, {"free": SamplingParams(**greedy)})["free"].outputs[0].text
    stop = " " + text.split()[4]
    requests = {
        "stopped": SamplingParams(**greedy, stop=[stop], logprobs=2),
        "two": SamplingParams(**greedy, stop=[stop], n=2),
        "sampled": SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, n=2, logprobs=1),
        "free": SamplingParams(**greedy),
    }
    expected = run_offline(engine, requests)
    assert expected["stopped"].outputs[0].finish_reason == "stop" and stop not in expected["stopped"].outputs[0].text
    async_engine = AsyncEngine(engine)
    try:
        got, streamed = run_async(async_engine, requests)
        wait_idle(engine, async_engine)
    finally:
        async_engine.shutdown()
    for request_id, want in expected.items():
        assert got[request_id].finished
        for have, out in zip(got[request_id].outputs, want.outputs, strict=True):
            assert (have.text, have.token_ids, have.finish_reason, have.stop_reason) == (
                out.text, out.token_ids, out.finish_reason, out.stop_reason)
            # Batched differently in the two runs: log-probabilities agree to rounding, not to the last bit.
            assert _leaves(have.logprobs) == pytest.approx(_leaves(out.logprobs), rel=1e-4, abs=1e-5)
            assert not out.logprobs or _leaves(out.logprobs)  # the comparison saw the numbers
            assert streamed[request_id][have.index] == have.text


def test_aborted_and_abandoned_requests_leave_nothing_behind(engine):
    async_engine = AsyncEngine(engine)

    async def main():
        stream = async_engine.generate("left", PROMPT, SamplingParams(max_tokens=400, ignore_eos=True, n=2))
        async for _ in stream:
            break
        await stream.aclose()  # a client gone
        async for _ in async_engine.generate("short", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True)):
            pass

    try:
        asyncio.run(main())
        wait_idle(engine, async_engine)
    finally:
        async_engine.shutdown()
    engine.add_request("inline", PROMPT, SamplingParams(max_tokens=400, ignore_eos=True))
    engine.step()
    engine.abort_request("inline")
    assert engine.output_processor.num_requests == 0 and not engine.has_unfinished_requests()


def test_tokens_after_a_stop_string_are_dropped(tiny_chat_model):
    tokenizer = load_tokenizer("hf", Path(tiny_chat_model))
    stops = []
    processor = OutputProcessor(tokenizer, lambda *stop: stops.append(stop))
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(stop=["hello world"], n=1)
    processor.add_request(NewRequest("r", PROMPT, prompt, params, 0.0, None, None))
    words = tokenizer.convert_tokens_to_ids(["paris", "hello", "world", "sea", "hello"])

    def update(token_id, finish_reason=None):
        return CompletionUpdate("r", 0, token_id, None, finish_reason, None, 0.0, 1.0, 2.0, 0, 0, None)

    outputs = [processor.process([update(t)]) for t in words[:3]]
    assert [len(o) for o in outputs] == [1, 1, 1] and stops == [("r", 0, "hello world")]
    last = outputs[-1][0]
    assert last.finished and last.outputs[0].text == " paris " and last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].token_ids == words[:3] and processor.num_requests == 0
    assert processor.process([update(words[3]), update(words[4], "length")]) == []  # made before the stop landed


def test_a_failing_output_thread_fails_the_streams_and_stops_the_engine(engine, monkeypatch):
    async_engine = AsyncEngine(engine)

    def broken(updates):
        raise RuntimeError("broken")

    monkeypatch.setattr(async_engine.processor, "process", broken)

    async def main():
        async for _ in async_engine.generate("r", PROMPT, SamplingParams(max_tokens=4)):
            pass

    try:
        with pytest.raises(EngineDeadError, match="broken"):
            asyncio.run(main())
        async_engine._thread.join(30)
        assert not async_engine.alive and not engine.has_unfinished_requests()
    finally:
        async_engine.shutdown()
