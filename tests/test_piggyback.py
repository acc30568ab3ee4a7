"""Attention piggybacking: BE requests whose decode attention runs in the CPU pool produce exactly the tokens they
would on the device, next to LS requests that are not disturbed; the device never waits for the pool; a dead worker
loses no request; and nothing is left behind however a request ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fakes import PROMPTS, greedy, tokens

from omniserve.cpu_attention import CPUAttentionPool, PoolConfig
from omniserve.engine.scheduler.latency_model import LatencyModel, LinearModel, PiecewiseLinear
from omniserve.sampling.params import SamplingParams

# `tiny` and `reference` (the device-only tokens of PROMPTS) are conftest.py's fixtures.


def mixed_params():
    """Odd prompts are LS, even ones BE."""
    return [greedy("be" if i % 2 == 0 else "ls") for i in range(len(PROMPTS))]


def test_offloaded_right_after_prefill_gives_device_tokens(tiny, reference, make_llm):
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="cpu")
    assert tokens(llm.generate(PROMPTS, mixed_params(), use_tqdm=False)) == reference
    scheduler = llm.engine.scheduler
    assert scheduler.stats.num_swap_outs == 3 and scheduler.stats.num_swap_ins == 0


def test_swapped_out_mid_decode_and_back_in_gives_device_tokens(tiny, reference, make_llm):
    # Few pages: BE requests are offloaded when LS requests need pages, and come back once those finish.
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="auto", num_gpu_blocks_override=40)
    params = [greedy("be", 40) if i % 2 == 0 else greedy("ls") for i in range(len(PROMPTS))]
    engine = llm.engine
    engine.add_request("be-early", PROMPTS[0], greedy("be", 40))
    for _ in range(4):
        engine.step()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    while engine.has_unfinished_requests():
        engine.step()
    device = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="device")
    expected = tokens(device.generate(PROMPTS, [greedy(max_tokens=p.max_tokens) for p in params], use_tqdm=False))
    assert tokens(outputs) == expected
    assert engine.scheduler.stats.num_swap_outs >= 1 and engine.scheduler.stats.num_swap_ins >= 1


def test_piggyback_admission_caps_still_give_device_tokens(tiny, reference, make_llm):
    """A time budget that lets one offloaded row per layer join each iteration (dense work of a layer: 1 ms +
    0.1 ms per row, head 1 ms, budget 3.3 ms): rows wait their turn, and the tokens do not change."""
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="cpu")
    scheduler = llm.engine.scheduler
    scheduler.state.latency_model = LatencyModel(
        num_layers=2, dense=PiecewiseLinear((0.0, 1000.0), (1e-3, 101e-3)), prefill_attention=LinearModel(0.0, (0.0, 0.0)),
        decode_attention=LinearModel(0.0, (0.0, 0.0)), head=LinearModel(1e-3, (0.0,)),
        cpu_attention=LinearModel(0.0, (0.0, 0.0)),
    )
    scheduler.default_tpot_slo = 3.3e-3 / scheduler.config.iteration_budget_share  # a 3.3 ms iteration budget
    scheduler.observe = lambda *args: None  # keep the chosen numbers: no correction from measured times
    returning_per_layer = []
    schedule = scheduler.schedule

    def recording_schedule():
        plan = schedule()
        layers = [layer for _, layer in plan.returning] + [0] * len(plan.offloaded_starts)
        returning_per_layer.append(max((layers.count(layer) for layer in set(layers)), default=0))
        return plan

    scheduler.schedule = recording_schedule
    assert tokens(llm.generate(PROMPTS, [greedy("be")] * len(PROMPTS), use_tqdm=False)) == reference
    assert max(returning_per_layer) == 1


def test_default_model_offloaded_in_float32(default_gguf, default_llm, make_llm):
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name three colours."}]]
    prompts = [default_llm.apply_chat_template(c) for c in chats]
    expected = tokens(default_llm.generate(prompts, greedy(max_tokens=24), use_tqdm=False))
    offloading = make_llm(default_gguf, max_model_len=2048, be_decode_placement="cpu", dtype="float32")
    got = tokens(offloading.generate(prompts, [greedy("be", 24), greedy("ls", 24)], use_tqdm=False))
    assert got == expected and offloading.engine.scheduler.stats.num_swap_outs == 1


def test_device_does_not_wait_for_a_slow_pool(tiny, make_llm):
    llm = make_llm(tiny, dtype="float32", be_decode_placement="cpu", pool_config=PoolConfig(simulated_delay_s=0.5))
    engine = llm.engine
    engine.add_request("be", PROMPTS[1], greedy("be", 50))
    engine.add_request("ls", PROMPTS[0], greedy("ls", 40))
    ls_done = None
    start = time.monotonic()
    while ls_done is None and time.monotonic() - start < 60:
        for out in engine.step():
            if out.request_id == "ls" and out.finished:
                ls_done = out
    ls_seconds = time.monotonic() - start
    be_tokens = engine.scheduler.requests["be"].num_output_tokens
    assert ls_done is not None and len(ls_done.outputs[0].token_ids) == 40
    # The BE request gets at most a token per 2 layers x 0.5 s while the LS request runs at device speed.
    assert be_tokens <= 2 and ls_seconds < 10
    engine.abort_request("be")


def test_killed_worker_loses_no_request(tiny, reference, make_llm):
    llm = make_llm(tiny, dtype="float64", block_size=4, be_decode_placement="cpu")
    engine = llm.engine
    for index, (prompt, params) in enumerate(zip(PROMPTS, mixed_params())):
        engine.add_request(str(index), prompt, params)
    results = {}
    killed = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        if not killed and engine.scheduler.offloaded and engine.runner.num_offloaded_in_flight:
            os.kill(engine.cpu_pool.worker_pids()[0], signal.SIGKILL)
            killed = True
    assert killed and engine.scheduler.stats.num_rebuilt >= 1
    assert [results[str(i)] for i in range(len(PROMPTS))] == reference


def test_a_swap_in_planned_just_before_its_worker_dies_is_rebuilt(tiny, make_llm):
    """The worker dies between the plan and its execution: the request is rebuilt from its tokens (once failed, the
    whole iteration failed with it: 63 requests in a soak)."""
    from omniserve.engine.scheduler.plan import IterationPlan, KVTransfer

    llm = make_llm(tiny, dtype="float32", block_size=4, be_decode_placement="cpu")
    engine = llm.engine
    engine.add_request("be", PROMPTS[1], greedy("be", 30))
    while not engine.scheduler.offloaded:
        engine.step()
    worker = engine.cpu_pool.worker_pids()[0]
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(w is not None and w.alive() for w in engine.cpu_pool._workers):
        assert time.monotonic() < deadline, "the killed worker still runs"
        time.sleep(0.01)
    plan = IterationPlan(swap_ins=[KVTransfer("be", [0], 1)])
    output = engine.runner.execute(plan)
    assert output.lost == ["be"] and not output.swapped_in
    engine.scheduler.update(plan, output)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.stats.num_rebuilt == 1
    engine.check_integrity()


def test_abort_and_stop_of_offloaded_requests_free_everything(tiny, make_llm):
    llm = make_llm(tiny, dtype="float32", block_size=4, be_decode_placement="cpu")
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], greedy("be", 30))
    engine.add_request("b", PROMPTS[2], SamplingParams(temperature=0, max_tokens=30, service_class="be",
                                                       ignore_eos=True, stop_token_ids=list(range(1000))))
    engine.add_request("c", PROMPTS[3], SamplingParams(temperature=0.8, seed=3, max_tokens=30, service_class="be"))
    while not engine.runner.num_offloaded_in_flight:
        engine.step()
    engine.abort_request("a")
    engine.abort_request("c")
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()  # host KV, residuals, rows in flight and pages all back to zero
    assert engine.cpu_pool.host_kv_bytes() == 0


def test_service_class_is_validated():
    from omniserve.sampling.params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="service_class"):
        SamplingParams(service_class="gold")


def test_half_precision_engine_offloads(tiny, make_llm):
    """bf16 rows travel to the pool as fp32 (the host KV's dtype) and come back as bf16."""
    llm = make_llm(tiny, dtype="bfloat16", be_decode_placement="cpu")
    outputs = llm.generate(PROMPTS[:2], [greedy("be", 8), greedy("ls", 8)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 8]
    assert llm.engine.scheduler.stats.num_swap_outs == 1


_BF16_ENGINE = """
import json, sys
import torch
from omniserve import LLM, SamplingParams

x, w = torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(8, 16, dtype=torch.bfloat16)
try:
    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    onednn_bf16 = True
except RuntimeError:
    onednn_bf16 = False
llm = LLM(sys.argv[1], dtype="bfloat16", be_decode_placement="cpu")
params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, service_class=c) for c in ("be", "ls")]
outputs = llm.generate(json.loads(sys.argv[2]), params, use_tqdm=False)
print(json.dumps({"onednn_bf16": onednn_bf16, "swap_outs": llm.engine.scheduler.stats.num_swap_outs,
                  "lengths": [len(o.outputs[0].token_ids) for o in outputs]}))
llm.engine.shutdown()
"""


def test_half_precision_engine_on_a_cpu_without_avx512(tiny):
    """On an AVX2-only CPU oneDNN has no bf16 GEMM, so the dense layers must take another one. ONEDNN_MAX_CPU_ISA
    makes oneDNN act as on such a CPU; it is read once per process, hence the subprocess."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, "-c", _BF16_ENGINE, tiny, json.dumps(PROMPTS[:2])], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["onednn_bf16"]:
        pytest.skip("this torch's oneDNN runs bf16 GEMMs even when limited to AVX2")
    assert report["lengths"] == [8, 8] and report["swap_outs"] == 1


def test_the_pool_keeps_room_for_a_request_as_it_will_be_when_done():
    """Placement counts a request at the KV it reaches when done (as the scheduler's host capacity does), so a host
    is never promised more than its budget by requests that grow there; freeing gives the room back."""
    budget = 1 << 20
    pool = CPUAttentionPool(PoolConfig(local_memory_bytes=budget))
    kv = torch.zeros(1, 4, 1, 8)  # [layers, tokens, kv_heads, head_dim]
    per_token = CPUAttentionPool.host_bytes_per_token(1, 1, 8)
    try:
        pool.load("grows", kv, kv, final_tokens=100)
        assert pool.free_host_bytes() == budget - 100 * per_token
        pool.load("done", kv, kv)  # no final size given: the 4 tokens it holds
        assert pool.free_host_bytes() == budget - 104 * per_token
        pool.free(["grows", "done"])
        assert pool.free_host_bytes() == budget
    finally:
        pool.shutdown()


def test_a_killed_worker_leaves_no_thread_or_descriptor_behind():
    """A worker's death, then its restart, leaves the engine with the threads and file descriptors it had. (Through a
    multiprocessing.Queue, each death left a thread blocked for good on the dead worker's full pipe, holding the pipe
    and the rows and swapped-out KV it had yet to send: the soak benchmark's growth under worker kills. And KV sent
    through shared memory kept its segment's descriptor in the sender until the receiver fetched it: a worker killed
    before reading its swap-out never did.)"""
    pool = CPUAttentionPool(PoolConfig())
    kv = torch.zeros(1, 4, 1, 8)  # [layers, tokens, kv_heads, head_dim]
    try:
        pool.load("a", kv, kv)
        pool.host_kv_bytes()  # the worker is up and holds "a"
        threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # dead, not yet reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.load("c", torch.zeros(1, 4, 1, 8), torch.ones(1, 4, 1, 8))  # a swap-out the dead worker never reads
        rows = torch.zeros(64, 1, 1024)  # sent before the engine notices: one message larger than a pipe's buffer
        pool.submit([("a", 0)] * 64, rows, rows[..., :8], rows[..., :8])
        lost = pool.check_workers()
        while not lost:  # the pool finds the dead worker at its next check
            assert time.monotonic() < deadline
            time.sleep(0.01)
            lost = pool.check_workers()
        assert sorted(lost) == ["a", "c"]
        pool.load("b", kv, kv)
        pool.host_kv_bytes()  # a new worker in its place, holding "b"
        while (threading.active_count(), len(os.listdir("/proc/self/fd"))) != (threads, fds):
            assert time.monotonic() < deadline, (threading.enumerate(), os.listdir("/proc/self/fd"))
            time.sleep(0.05)
    finally:
        pool.shutdown()
