"""The engine behind the server: concurrent streams, bad input, abandoned streams, and the metrics it records.
Tests wait for what the engine thread did (an event, or a generous deadline), never for a fixed time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from omniserve.engine.async_engine import AsyncEngine, EngineDeadError
from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.openai.metrics import ServerMetrics
from omniserve.sampling.params import InvalidRequestError, SamplingParams


@pytest.fixture
def served(tiny_model_dirs):
    engine = LLMEngine(model=tiny_model_dirs["llama"][0], be_decode_placement="device", block_size=4)
    metrics = ServerMetrics("tiny")
    async_engine = AsyncEngine(engine, on_iteration=metrics.on_iteration)
    yield engine, async_engine, metrics
    async_engine.shutdown()


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    body, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode()) for s in family.samples
    }


def test_concurrent_streams_match_the_offline_engine(served, tiny_model_dirs):
    engine, async_engine, metrics = served
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, service_class=c) for c in ("ls", "be")] * 2

    async def collect(index):
        tokens = []
        async for out in async_engine.generate(f"r{index}", [5, 6, 7 + index], params[index]):
            tokens += out.outputs[0].delta_token_ids
        return tokens

    async def main():
        return await asyncio.gather(*[collect(i) for i in range(4)])

    got = asyncio.run(main())
    offline = LLMEngine(model=tiny_model_dirs["llama"][0], be_decode_placement="device")
    for index in range(4):
        offline.add_request(str(index), [5, 6, 7 + index], params[index])
    expected = {}
    while offline.has_unfinished_requests():
        for out in offline.step():
            expected[out.request_id] = out.outputs[0].token_ids
    assert got == [expected[str(i)] for i in range(4)]
    ls = (("model_name", "tiny"), ("service_class", "ls"))
    success = ("vllm:request_success_total", (("finished_reason", "length"),) + ls)
    deadline = time.monotonic() + 30  # recorded on the engine thread once the outputs have gone out
    while samples(metrics).get(success) != 2:
        assert time.monotonic() < deadline, "the finished requests were not counted"
        time.sleep(0.01)
    values = samples(metrics)
    assert values[("vllm:generation_tokens_total", ls)] == 12
    assert values[("vllm:time_to_first_token_seconds_count", ls)] == 2
    assert values[("vllm:request_success_total", (("finished_reason", "length"),) + ls)] == 2


def test_bad_input_raises_and_an_abandoned_stream_frees_its_memory(served):
    engine, async_engine, _ = served

    async def main():
        with pytest.raises(InvalidRequestError, match="empty"):
            async for _ in async_engine.generate("bad", [], SamplingParams()):
                pass
        stream = async_engine.generate("left", [5, 6], SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # what a disconnecting client's handler does
        deadline = time.monotonic() + 30  # the abort lands at the engine thread's next turn
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not engine.has_unfinished_requests() and engine.allocator.num_used == 0
    engine.check_integrity()


def test_a_shut_down_engine_refuses_requests(served):
    _, async_engine, _ = served
    async_engine.shutdown()

    async def main():
        async for _ in async_engine.generate("late", [5], SamplingParams()):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(main())


def test_arrival_is_stamped_when_a_request_comes_in_not_after_the_running_iteration(served):
    """TTFT (and TTFT admission) count from the request's arrival, even while the engine thread is mid-iteration."""
    engine, async_engine, _ = served
    step, held, released_steps = engine.run_iteration, threading.Event(), threading.Event()

    def held_step():  # the first iteration lasts until the test lets it go on
        held.set()
        assert released_steps.wait(60)
        return step()

    engine.run_iteration = held_step

    async def last_output(request_id: str, prompt: list[int], max_tokens: int):
        async for out in async_engine.generate(request_id, prompt, SamplingParams(max_tokens=max_tokens,
                                                                                  ignore_eos=True)):
            last = out
        return last

    async def main():
        busy = asyncio.ensure_future(last_output("busy", [5, 6, 7], 4))
        assert await asyncio.to_thread(held.wait, 60)  # the engine thread is now mid-iteration, and stays there
        posted = time.monotonic()
        late = asyncio.ensure_future(last_output("late", [5], 1))
        for _ in range(3):  # the request is posted (and stamped) at its task's first step
            await asyncio.sleep(0)
        released = time.monotonic()
        released_steps.set()
        last = await late
        await busy
        return posted, released, last

    posted, released, last = asyncio.run(main())
    del engine.run_iteration
    assert posted <= last.metrics.arrival_time <= released  # not when the engine thread got round to it
    assert last.metrics.first_token_time > released


def test_an_engine_that_goes_idle_gives_freed_memory_back_once(served, monkeypatch):
    from omniserve.engine import async_engine as module

    trims = []
    monkeypatch.setattr(module, "trim_heap", lambda: trims.append(time.monotonic()))
    engine, async_engine, _ = served
    idle_polls = []
    wait = async_engine._wakeup.wait
    async_engine._wakeup.wait = lambda timeout=None: idle_polls.append(time.monotonic()) or wait(timeout)

    def idle_past(moment: float) -> None:
        """Until the engine thread has looked whether to trim, idle, after `moment` (two idle polls after it: the
        look before the second came after the first)."""
        deadline = time.monotonic() + 30
        while sum(t >= moment for t in idle_polls) < 2:
            assert time.monotonic() < deadline, "the engine thread does not poll"
            time.sleep(0.01)

    idle_past(time.monotonic() + module._TRIM_AFTER_IDLE_S + 0.1)
    assert not trims  # nothing ran yet: nothing to give back

    async def run_one():
        async for out in async_engine.generate("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4)):
            finished_at = time.monotonic()
        return finished_at

    finished_at = asyncio.run(run_one())
    deadline = time.monotonic() + 30
    while not trims and time.monotonic() < deadline:
        time.sleep(0.05)
    assert trims
    idle_past(trims[0] + module._TRIM_AFTER_IDLE_S + 0.1)  # idle long enough for a second trim, were there one
    assert len(trims) == 1 and trims[0] - finished_at >= 0.9  # after a second idle, once


def test_an_engine_under_load_gives_freed_memory_back_at_intervals(served, monkeypatch):
    """A load that never pauses would never trim: the busy engine trims every _TRIM_UNDER_LOAD_S (here: every
    iteration) as well."""
    from omniserve.engine import async_engine as module

    trims = []
    monkeypatch.setattr(module, "_TRIM_UNDER_LOAD_S", 0.0)
    monkeypatch.setattr(module, "trim_heap", lambda: trims.append(time.monotonic()))
    _, async_engine, _ = served

    async def run_one():
        async for out in async_engine.generate("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6,
                                                                                ignore_eos=True)):
            finished_at = time.monotonic()
        return finished_at

    finished_at = asyncio.run(run_one())
    assert sum(t <= finished_at for t in trims) >= 3  # while its iterations ran, not only once idle
