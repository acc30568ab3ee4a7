"""Offloaded tokens that advance several layers per iteration (the multi-layer pipeline): the same tokens as the
device path, a planned wait that is never exceeded (none at all: the one-layer pipeline's behaviour), and a worker
that dies while the device waits on it."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from omniserve.cpu_attention import PoolConfig
from omniserve.engine.scheduler.latency_model import LatencyModel, LinearModel, PiecewiseLinear
from omniserve.engine.scheduler.plan import ONE_LAYER, OffloadedPipeline
from omniserve.sampling.params import SamplingParams

LAYERS = 6
PROMPTS = [[7, 8, 9], list(range(100, 141)), [500 + i for i in range(17)], [3] * 29]


def greedy(service_class: str, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, service_class=service_class)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> str:
    """A tiny Llama with enough layers for a token to go through several of them in one iteration."""
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("deep")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def reference(deep) -> list[list[int]]:
    from omniserve.entrypoints.llm import LLM

    llm = LLM(deep, dtype="float64", block_size=4, be_decode_placement="device")
    try:
        return tokens(llm.generate(PROMPTS, greedy("ls"), use_tqdm=False))
    finally:
        llm.engine.shutdown()


def force_pipeline(engine, pipeline: OffloadedPipeline) -> list:
    """Every plan gets `pipeline`; returns the list the runner's outputs (and each step's seconds) go to."""
    ran = []
    schedule, execute = engine.scheduler.schedule, engine.runner.execute
    engine.scheduler.schedule = lambda: replace(schedule(), pipeline=pipeline)

    def timed(plan):
        started = time.perf_counter()
        output = execute(plan)
        ran.append((plan, output, time.perf_counter() - started))
        return output

    engine.runner.execute = timed
    return ran


def test_tokens_that_advance_several_layers_per_iteration_equal_the_device_path(deep, reference, make_llm):
    """The scheduler plans the wait: a profile in which a layer's dense work is dear (50 ms) and the CPU's round trip
    for a layer is 20 ms makes waiting for the CPU pay (a token per iteration, not one per six), and a 1 s budget has
    room for it."""
    llm = make_llm(deep, dtype="float64", block_size=4, be_decode_placement="cpu")
    scheduler = llm.engine.scheduler
    scheduler.state.latency_model = LatencyModel(
        num_layers=LAYERS, dense=PiecewiseLinear((0.0, 1000.0), (50e-3, 51e-3)),
        prefill_attention=LinearModel(0.0, (0.0, 0.0)), decode_attention=LinearModel(0.0, (0.0, 0.0)),
        head=LinearModel(1e-3, (0.0,)), cpu_attention=LinearModel(20e-3, (0.0, 0.0)))
    scheduler.default_tpot_slo = 1.0 / scheduler.config.iteration_budget_share
    scheduler.observe = lambda *args: None  # keep the chosen numbers
    planned = []
    schedule = scheduler.schedule
    scheduler.schedule = lambda: planned.append(schedule()) or planned[-1]
    assert tokens(llm.generate(PROMPTS, greedy("be"), use_tqdm=False)) == reference
    waits = [p.pipeline.wait_s for p in planned if p.offloaded_starts]
    assert waits and max(waits) == pytest.approx(2 * (LAYERS - 1) * 20e-3)  # the expected wait, with its margin
    timings = scheduler.take_offloaded_token_timings()
    assert len(timings) == len(PROMPTS) * 11  # every token after the prefill's went through the pool
    assert max(t.layers_per_iteration for t in timings) == LAYERS  # some took all six layers in one iteration


@pytest.mark.parametrize("pipeline, delay", [(OffloadedPipeline(None, 0.0), 0.03), (OffloadedPipeline(None, 0.05), 0.6),
                                             (ONE_LAYER, 0.03)], ids=["no-wait", "wait-50ms", "one-layer"])
def test_a_planned_wait_is_never_exceeded(deep, reference, make_llm, pipeline, delay):
    """A slow pool: the device waits at most the plan's 50 ms for a pool that takes 0.6 s a batch, or not at all;
    without a wait, rows still go on whenever their result is back in time; one layer per iteration at most with the
    one-layer plan. The tokens are the device's in every case."""
    llm = make_llm(deep, dtype="float64", block_size=4, be_decode_placement="cpu",
                   pool_config=PoolConfig(simulated_delay_s=delay))
    ran = force_pipeline(llm.engine, pipeline)
    params = [greedy("be", 4) if i % 2 == 0 else greedy("ls", 4) for i in range(len(PROMPTS))]
    expected = [ref[:4] for ref in reference]
    assert tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == expected
    waited = [output.cpu_wait_s for _, output, _ in ran]
    if pipeline.wait_s:
        # Up to the deadline and one poll past it (and 0.3 s more, for a busy machine), far short of the pool's 0.6 s.
        assert 0.04 < max(waited) <= pipeline.wait_s + 0.3
    else:
        assert max(waited) == 0.0
    timings = llm.engine.scheduler.take_offloaded_token_timings()
    if pipeline is ONE_LAYER:
        assert all(t.iterations >= LAYERS for t in timings)
        assert all(output.offloaded_rows is None for _, output, _ in ran)


def test_a_waiting_row_keeps_only_the_sent_rows_alive(deep, make_llm):
    """Rows wait at layers (a slow pool, no wait) while LS prefills of 29 and 41 tokens share the iterations: each
    waiting row's residual holds no more memory than the rows sent with it, not the layer's whole output."""
    llm = make_llm(deep, dtype="float64", block_size=4, be_decode_placement="cpu",
                   pool_config=PoolConfig(simulated_delay_s=0.03))
    force_pipeline(llm.engine, OffloadedPipeline(None, 0.0))
    runner, largest = llm.engine.runner, []
    execute = runner.execute

    def checked(plan):
        output = execute(plan)
        waiting = [t.residual for t in runner._offloaded.values() if t.residual is not None]
        row_bytes = 64 * 8  # hidden size, float64
        largest.extend(r.untyped_storage().nbytes() // row_bytes for r in waiting)
        return output

    runner.execute = checked
    params = [greedy("be", 6) if i % 2 == 0 else greedy("ls", 6) for i in range(len(PROMPTS))]
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert largest and max(largest) <= 2  # the two BE requests' rows at most


def test_a_worker_that_dies_while_the_device_waits(deep, reference, make_llm):
    """The device waits (up to 2 s) on a pool that takes 0.5 s a batch; the worker is killed meanwhile. The
    iteration ends well within its wait, and the offloaded requests are rebuilt and give the device's tokens."""
    llm = make_llm(deep, dtype="float64", block_size=4, be_decode_placement="cpu",
                   pool_config=PoolConfig(simulated_delay_s=0.5))
    engine = llm.engine
    ran = force_pipeline(engine, OffloadedPipeline(None, 2.0))
    for index, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(str(index), prompt, greedy("be", 4))
    while not engine.runner.num_offloaded_in_flight:
        engine.step()
    pid, pool_wait, killed = engine.cpu_pool.worker_pids()[0], engine.cpu_pool.wait, []

    def killing_wait(timeout_s: float) -> None:  # the worker dies as soon as the device waits on it
        if not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        pool_wait(timeout_s)

    engine.cpu_pool.wait = killing_wait
    results = {}
    waited_through_the_death = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        if waited_through_the_death is None:
            waited_through_the_death = ran[-1][2]
    assert killed and waited_through_the_death < 1.5  # it stopped waiting when the worker died, not at the 2 s deadline
    assert engine.scheduler.stats.num_rebuilt >= 1
    assert [results[str(i)] for i in range(2)] == [ref[:4] for ref in reference[:2]]


@pytest.mark.parametrize("pipeline", ["sync", "one-layer"])
def test_the_pipeline_setting_gives_the_device_tokens(deep, reference, make_llm, pipeline):
    """--offload-pipeline as a user sets it (no SLOs, so no latency model): `sync` waits for every layer's rows and
    takes a whole token per iteration; `one-layer` never goes beyond a layer per iteration."""
    llm = make_llm(deep, dtype="float64", block_size=4, be_decode_placement="cpu", offload_pipeline=pipeline)
    assert tokens(llm.generate(PROMPTS, greedy("be"), use_tqdm=False)) == reference
    timings = llm.engine.scheduler.take_offloaded_token_timings()
    assert len(timings) == len(PROMPTS) * 11
    if pipeline == "sync":
        assert all(t.iterations == 1 for t in timings)
    else:
        assert all(t.iterations >= LAYERS for t in timings)
