"""The five scheduling policies (omniserve, sarathi, llumnix, neo, fcfs) on one mixed LS + BE workload, in one run.

Placement, as in bench_piggyback.py: "the device on one core, the CPU attention pool on the other". This process (the
device) is pinned to --engine-core with one torch thread; the CPU attention pool gets one worker with one thread
pinned to --pool-core. Every policy gets a fresh engine of the same settings (built-in SmolLM2-135M-Instruct, fp32,
max_model_len 2048, --max-num-batched-tokens, --kv-pages device KV pages of 16 tokens: few enough that the BE load
runs the device out of pages, so offloading, headroom and preemption all come into play).

SLOs. A calibration engine (omniserve policy, placeholder SLOs) loads the profiled latency model (profiling the
model on first use, cached afterwards) and times a lone LS request. TPOT SLO = --tpot-factor x the measured time of
a lone LS decode step. TTFT SLO = --ttft-factor x the latency model's time to prefill the longest LS prompt
(--ls-max-prompt tokens) next to one LS decode, in the largest chunks that keep each iteration within the TPOT SLO
(what the SLO-aware scheduler does). Every policy is told the same SLOs; fcfs and llumnix do not use them.

Workload (fixed seed, the same for every policy, open loop): LS requests arrive as a Poisson process of --ls-rate
per second over --duration seconds, prompts are ShareGPT first human turns (prompts_500.json) tokenized with the
engine's tokenizer and cut to at most --ls-max-prompt tokens, output lengths uniform in --ls-output; BE requests come
as a burst of --be-burst at t=0 plus a Poisson process of --be-rate per second, prompts of uniform length in
--be-prompt tokens made of ShareGPT text, --be-output-len output tokens. Greedy, EOS ignored. The script sleeps until
each arrival, adds the request, and calls engine.step() back to back while anything is unfinished; every token is
stamped when its step returns, and every step is timed.

A run ends once the arrival window is over and every LS request has ended; BE requests still running then are
aborted. A run that reaches --duration + --drain seconds is cut: every request still open is aborted (an LS request
cut this way is a miss, counted as "LS cut").

Per policy:
- LS SLO attainment: share of LS requests that were not rejected, got their first token within the TTFT SLO (from the
  scheduled arrival, so a request that arrives while a long step runs pays for the wait) and finished with a mean
  TPOT ((last token - first token) / (tokens - 1)) within the TPOT SLO. Also TTFT-only and TPOT-only attainment
  (rejected and cut requests are misses in both), and the rejection count.
- LS TTFT p50/p99 (LS requests not rejected; a cut request without a first token counts with its wait so far, a lower
  bound) and mean-TPOT p50/p99 (LS requests with >= 2 tokens), as ratios to their SLO.
- BE output tokens/s over the arrival window [0, --duration] (the same window for every policy), and its ratio to
  fcfs in the same repeat; BE requests finished within the window.
- Scheduler counters over the timed run: preemptions, swap-outs, swap-ins, rejections (engine.scheduler.num_*), and
  the prefill tokens computed again after a preemption (the work preemption threw away).
- Steps while some LS request was decoding (it had its first token and had not finished), and how many of those
  took longer than the TPOT SLO (the iteration budget); the slowest such step as a ratio to the SLO; measured step
  time / the latency model's prediction (policies with a time budget); how busy the pool's core was.
- Correctness across policies: greedy LS tokens of every LS request that finished under several policies (and
  repeats) must be identical.

Each engine gets a short warm-up (an LS and a BE request; a pool worker start and one attention round trip where the
policy has a pool) before its timed run. --repeats > 1 repeats the whole comparison (policy order reversed every other
repeat); figures are then medians with the min-max spread in brackets.

Others work on this machine: before calibrating and before each run the script waits (up to --quiet-wait s) until
other processes use less than a tenth of a core, and reports the share of each run that other processes held the
engine's core and the pool's core (/proc/stat per core, minus this process and the pool workers). --trace writes one
JSON line per timed step (plan, predicted and measured time, queues, free pages, CPU of the engine's side threads and
of the pool worker). --profile points the engines at a latency profile of their own (profiled there when missing).

    python benchmarks/bench_policies.py --markdown policies.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    SHAREGPT_500,
    cpu_model,
    git_revision,
    percentile,
    proc_cpu_seconds,
    shuffled_texts,
    side_thread_cpu_seconds,
    spread,
)

POLICIES = ("fcfs", "sarathi", "llumnix", "neo", "omniserve")  # fcfs first: the baseline of the BE ratio
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048


# ------------------------------------------------------------------------------------------------------- helpers
def core_busy_seconds() -> dict[int, float]:
    """CPU seconds each core has been busy so far, by everything (steal time included); Linux only."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                ticks = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy


class CpuMeter:
    """Load that other processes put on the engine's core and on the pool's core: each core's busy time minus what
    this process (pinned to the engine core) and the pool workers (pinned to the pool core) used there."""

    def __init__(self, engine_core: int, pool_core: int, worker_pids: list[int]) -> None:
        self.cores, self.pids = (engine_core, pool_core), worker_pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, dict[int, float], float, float]:
        workers = sum(proc_cpu_seconds(pid) for pid in self.pids)
        return time.perf_counter(), core_busy_seconds(), proc_cpu_seconds(os.getpid()), workers

    def shares(self) -> tuple[float, float, float]:
        """Shares of the time since the start: other processes on the engine core, other processes on the pool core,
        the pool workers."""
        (t0, busy0, own0, workers0), (t1, busy1, own1, workers1) = self.start, self._sample()
        engine_core, pool_core = self.cores
        wall = max(t1 - t0, 1e-9)
        engine = (busy1[engine_core] - busy0[engine_core]) - (own1 - own0)
        pool = (busy1[pool_core] - busy0[pool_core]) - (workers1 - workers0)
        return max(0.0, engine) / wall, max(0.0, pool) / wall, (workers1 - workers0) / wall


def wait_for_quiet(limit_s: float, threshold: float = 0.1) -> tuple[float, float]:
    """Waits (up to limit_s) until other processes use less than `threshold` of a core in all over 2 s, so that a
    run starts on a quiet machine (others edit and test on it). Returns (seconds waited, their load in cores)."""
    start = time.perf_counter()
    while True:
        busy0, own0 = sum(core_busy_seconds().values()), proc_cpu_seconds(os.getpid())
        time.sleep(2.0)
        load = max(0.0, sum(core_busy_seconds().values()) - busy0 - (proc_cpu_seconds(os.getpid()) - own0)) / 2.0
        waited = time.perf_counter() - start
        if load < threshold or waited >= limit_s:
            return waited, load


def table(cols: dict[str, str], body: list[dict[str, str]], sep: str, edge: str) -> list[str]:
    widths = {k: max(len(v), *(len(str(r[k])) for r in body)) for k, v in cols.items()}
    cells = [list(cols.values()), ["-" * widths[k] for k in cols]]
    cells += [[str(r[k]) for k in cols] for r in body]
    return [(edge + sep.join(c.ljust(widths[k]) for k, c in zip(cols, line)) + edge[::-1]).rstrip()
            for line in cells]


# ------------------------------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the run starts."""
    request_id: str
    prompt: list[int]
    max_tokens: int
    service_class: str
    """`ls` or `be`."""


def poisson_times(rng: random.Random, rate: float, duration: float) -> list[float]:
    times, t = [], 0.0
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        times.append(t)
    return times


def build_workload(tokenizer, texts: list[str], args: argparse.Namespace) -> list[Arrival]:
    """LS: Poisson arrivals, ShareGPT prompts as they are (cut to --ls-max-prompt); BE: a burst at t=0 plus Poisson
    arrivals, prompts of a uniform length made of consecutive ShareGPT texts."""
    rng = random.Random(args.seed)
    # Tokens average about 4 characters: cutting the text to 8 per token first keeps tokenizing long turns cheap.
    encode = lambda text, limit: tokenizer.encode(text[: 8 * limit], add_special_tokens=False)[:limit]  # noqa: E731
    source = iter(texts * 4)
    arrivals = []
    for i, at in enumerate(poisson_times(rng, args.ls_rate, args.duration)):
        prompt = []
        while len(prompt) < 4:  # skip one-word turns
            prompt = encode(next(source), args.ls_max_prompt)
        arrivals.append(Arrival(at, f"ls{i}", prompt, rng.randint(*args.ls_output), "ls"))
    be_times = [0.0] * args.be_burst + poisson_times(rng, args.be_rate, args.duration)
    for i, at in enumerate(be_times):
        length = rng.randint(*args.be_prompt)
        prompt: list[int] = []
        while len(prompt) < length:
            prompt += encode(next(source) + "\n\n", length - len(prompt))
        arrivals.append(Arrival(at, f"be{i}", prompt[:length], args.be_output_len, "be"))
    return sorted(arrivals, key=lambda a: a.at)


# -------------------------------------------------------------------------------------------------------- engines
@dataclass(frozen=True)
class Chunk:
    """What the latency model reads of a scheduled chunk (see batch_shape_of_chunks)."""

    token_ids: list[int]
    start_position: int
    sample: bool


@dataclass(frozen=True)
class Slo:
    ttft: float
    tpot: float


def build_engine(policy: str, args: argparse.Namespace, slo: Slo):
    from omniserve.cpu_attention import PoolConfig
    from omniserve.engine.args import EngineArgs
    from omniserve.engine.llm_engine import LLMEngine

    engine_args = EngineArgs(
        model=args.model, device="cpu", dtype="float32", threads=1, max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=BLOCK_SIZE,
        num_gpu_blocks_override=args.kv_pages, policy=policy, ls_ttft_slo=slo.ttft, ls_tpot_slo=slo.tpot,
        profile_path=args.profile, seed=args.seed,
    )
    pool_config = PoolConfig(num_workers=1, threads_per_worker=1, worker_cores=((args.pool_core,),))
    return LLMEngine(engine_args, pool_config=pool_config)


def params(max_tokens: int, service_class: str):
    from omniserve import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, service_class=service_class)


def drain(engine, limit_s: float = 120.0) -> list[float]:
    """Steps until the engine is idle; returns each step's seconds."""
    times, deadline = [], time.perf_counter() + limit_s
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            raise SystemExit("warm-up did not finish: the engine hangs")
    return times


def start_pool(engine) -> None:
    """Starts the pool's worker and runs one attention round trip through it, so the timed run does not pay for the
    worker's start (spawn, import torch, kernel load)."""
    import torch

    pool, c = engine.cpu_pool, engine.model_config
    if pool is None:
        return
    kv = torch.zeros(c.num_layers, 4, c.num_kv_heads, c.head_dim)
    pool.load("warmup-pool", kv, kv.clone())
    pool.submit([("warmup-pool", 0)], torch.zeros(1, c.num_heads, c.head_dim),
                torch.zeros(1, c.num_kv_heads, c.head_dim), torch.zeros(1, c.num_kv_heads, c.head_dim))
    deadline = time.monotonic() + 300
    while not pool.poll():
        if time.monotonic() > deadline or pool.check_workers():
            raise SystemExit("the CPU attention worker did not start")
        pool.wait(1.0)
    pool.free(["warmup-pool"])


def warm_up(engine, ls_prompt: list[int], be_prompt: list[int]) -> None:
    start_pool(engine)
    engine.add_request("warmup-ls", ls_prompt[:64], params(4, "ls"))
    engine.add_request("warmup-be", be_prompt[:600], params(4, "be"))
    drain(engine)


def calibrate(args: argparse.Namespace, texts: list[str]):
    """SLOs from a lone LS request and the latency model. Returns (slo, explanation lines, tokenizer, latency)."""
    from omniserve.engine.scheduler.latency_model import batch_shape_of_chunks

    waited, load = wait_for_quiet(args.quiet_wait)
    print(f"calibrating (waited {waited:.0f} s for a quiet machine; other load {load:.2f} cores)", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    engine = build_engine("omniserve", args, Slo(ttft=600.0, tpot=60.0))  # placeholders: only to load the model
    build_s = time.perf_counter() - started
    tokenizer, latency = engine.tokenizer, engine.latency_model
    if latency is None:
        raise SystemExit("the omniserve engine loaded no latency model: cannot choose SLOs")
    # The longest LS prompt: --ls-max-prompt tokens of ShareGPT text.
    prompt = tokenizer.encode("\n\n".join(texts[:50])[: 8 * args.ls_max_prompt], add_special_tokens=False)
    prompt = prompt[: args.ls_max_prompt]
    out_len = 32
    prefill_s, decode_s = [], []
    for attempt in range(3):  # the first one warms up
        engine.add_request(f"calibrate{attempt}", prompt, params(out_len, "ls"))
        times = drain(engine)
        if attempt:
            prefill_s.append(sum(times[:-(out_len - 1)]))
            decode_s += times[-(out_len - 1):][2:]
    engine.shutdown()
    decode_step = statistics.median(decode_s)
    lone_prefill = statistics.median(prefill_s)
    context = len(prompt) + out_len // 2
    decode_row = Chunk([0], context - 1, True)
    predicted_decode = latency.iteration_time(batch_shape_of_chunks([decode_row]))
    tpot = args.tpot_factor * decode_step

    # Prefill of the longest LS prompt next to one LS decode, each chunk the largest that fits the TPOT SLO, with the
    # latency model scaled to this machine's present speed (measured / predicted lone decode), as the scheduler's
    # own running correction scales it.
    scale = decode_step / predicted_decode

    def chunk_time(start: int, count: int) -> float:
        chunk = Chunk([0] * count, start, start + count == len(prompt))
        return scale * latency.iteration_time(batch_shape_of_chunks([decode_row, chunk]))

    start, chunks, budgeted = 0, [], 0.0
    while start < len(prompt):
        count = min(len(prompt) - start, args.max_num_batched_tokens)
        while count > 1 and chunk_time(start, count) > tpot:
            count -= 1
        chunks.append(count)
        budgeted += chunk_time(start, count)
        start += count
    ttft = args.ttft_factor * budgeted
    predicted_prefill = latency.iteration_time(batch_shape_of_chunks([Chunk([0] * len(prompt), 0, True)]))
    lines = [
        f"calibration (engine built in {build_s:.1f} s, latency model: "
        f"{latency.metadata.get('created', '?')}, {latency.metadata.get('measurements', '?')} measurements): "
        f"a lone LS decode step at context {context} takes {decode_step * 1e3:.1f} ms measured "
        f"(latency model: {predicted_decode * 1e3:.1f} ms = {predicted_decode / decode_step:.2f}x measured); "
        f"a lone {len(prompt)}-token LS prefill takes {lone_prefill * 1e3:.0f} ms measured as one chunk (latency "
        f"model: {predicted_prefill * 1e3:.0f} ms = {predicted_prefill / lone_prefill:.2f}x measured); the "
        f"profile's own held-out median/p90 relative errors: " + ", ".join(
            f"{name} {a.get('median_rel_error', float('nan')):.2f}/{a.get('p90_rel_error', float('nan')):.2f}"
            for name, a in latency.accuracy.items()),
        f"TPOT SLO = {args.tpot_factor:g} x the measured lone decode step = {tpot * 1e3:.1f} ms (the iteration budget "
        f"of the time-budgeted policies)",
        f"TTFT SLO = {args.ttft_factor:g} x {budgeted * 1e3:.0f} ms = {ttft * 1e3:.0f} ms, where {budgeted * 1e3:.0f} "
        f"ms is the latency model's time (scaled by {scale:.2f}, measured/predicted lone decode) to prefill the "
        f"longest LS prompt ({len(prompt)} tokens) next to one LS "
        f"decode in {len(chunks)} chunks that each fit the TPOT SLO ({chunks[0]} tokens first); that is "
        f"{ttft / lone_prefill:.1f}x the measured lone one-chunk prefill",
    ]
    return Slo(ttft=ttft, tpot=tpot), lines, tokenizer, latency


# ---------------------------------------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    policy: str
    ls_total: int
    ls_attained: int
    ls_ttft_ok: int
    ls_tpot_ok: int
    ls_rejected: int
    ls_cut: int
    ttft_ratios: list[float]
    tpot_ratios: list[float]
    be_tokens_in_window: int
    be_tps: float
    be_finished: int
    be_total: int
    preemptions: int
    swap_outs: int
    swap_ins: int
    rejected_counter: int
    steps: int
    ls_steps: int
    ls_steps_over: int
    worst_ls_step: float
    """Slowest step while an LS request was decoding, in seconds."""
    measured_over_predicted: list[float]
    add_lag: list[float]
    """Seconds between a request's scheduled arrival and its add_request (a step was running)."""
    wall_s: float
    others_engine_core: float
    """Share of the timed run that other processes held the engine's core."""
    others_pool_core: float
    pool_busy: float
    """Share of the timed run the pool workers were on a core."""
    recomputed: int
    """Prefill tokens computed again after a preemption (the work preemption throws away)."""
    quiet_wait: tuple[float, float]
    """Seconds waited for a quiet machine before the run, and the others' load then (cores)."""
    integrity: str
    ls_tokens: dict[str, list[int]] = field(default_factory=dict)


def run_policy(policy: str, workload: list[Arrival], args: argparse.Namespace, slo: Slo) -> RunResult:
    quiet = wait_for_quiet(args.quiet_wait)
    engine = build_engine(policy, args, slo)
    ls_first = next(a.prompt for a in workload if a.service_class == "ls")
    be_first = next(a.prompt for a in workload if a.service_class == "be")
    try:
        warm_up(engine, ls_first, be_first)
        if args.trace is None:
            result = drive(engine, policy, workload, args, slo, None)
        else:
            with open(args.trace, "a") as trace:
                result = drive(engine, policy, workload, args, slo, trace)
    finally:
        engine.shutdown()
    del engine
    gc.collect()
    result.quiet_wait = quiet
    return result


def drive(engine, policy: str, workload: list[Arrival], args: argparse.Namespace, slo: Slo, trace) -> RunResult:
    scheduler = engine.scheduler
    counters0 = (scheduler.num_preemptions, scheduler.num_swap_outs, scheduler.num_swap_ins, scheduler.num_rejected)
    predicted: list[float | None] = [None]
    execute = engine.runner.execute

    last_plan = [None]
    computed: dict[str, int] = {}  # request id -> the furthest position ever in its KV
    recomputed = [0]

    def execute_noting_prediction(plan):  # on the instance: what the scheduler predicted for this step
        predicted[0] = plan.predicted_time if plan.chunks or plan.offloaded_starts or plan.returning else None
        last_plan[0] = plan
        for chunk in plan.chunks:
            start, end = chunk.start_position, chunk.start_position + len(chunk.token_ids)
            furthest = computed.get(chunk.request_id, 0)
            recomputed[0] += max(0, min(end, furthest) - start)
            computed[chunk.request_id] = max(furthest, end)
        return execute(plan)

    engine.runner.execute = execute_noting_prediction

    kind = {a.request_id: a.service_class for a in workload}
    arrival = {a.request_id: a.at for a in workload}
    ls_ids = [a.request_id for a in workload if a.service_class == "ls"]
    pending = deque(workload)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    seen: dict[str, int] = {}
    reason: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    be_tokens_in_window = 0
    be_finished_in_window = 0
    decoding_ls: set[str] = set()
    steps = ls_steps = ls_steps_over = 0
    worst_ls_step = 0.0
    ratios: list[float] = []
    add_lag: list[float] = []
    added: list[str] = []
    cut = False

    pids = [pid for pid in engine.cpu_pool.worker_pids() if pid] if engine.cpu_pool is not None else []
    meter = CpuMeter(args.engine_core, args.pool_core, pids)
    start = time.perf_counter()
    while True:
        now = time.perf_counter() - start
        while pending and pending[0].at <= now:
            a = pending.popleft()
            engine.add_request(a.request_id, a.prompt, params(a.max_tokens, a.service_class))
            added.append(a.request_id)
            add_lag.append(now - a.at)
        ls_open = [rid for rid in ls_ids if rid not in reason]
        if not pending and not ls_open and now >= args.duration:
            break  # arrival window over, every LS request ended: BE requests still running are aborted below
        if now >= args.duration + args.drain:
            cut = True
            break
        if not engine.has_unfinished_requests():
            if not pending:
                break
            time.sleep(max(0.0, min(pending[0].at - now, args.duration - now if now < args.duration else 1.0)))
            continue
        ls_was_decoding = bool(decoding_ls)
        predicted[0] = None
        if trace is not None:
            side0, worker0 = side_thread_cpu_seconds(), sum(proc_cpu_seconds(pid) for pid in pids)
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        elapsed, stamp = t1 - t0, t1 - start
        steps += 1
        if ls_was_decoding:
            ls_steps += 1
            ls_steps_over += elapsed > slo.tpot
            worst_ls_step = max(worst_ls_step, elapsed)
        if predicted[0]:
            ratios.append(elapsed / predicted[0])
        if trace is not None and last_plan[0] is not None:
            plan = last_plan[0]
            trace.write(json.dumps({
                "policy": policy, "t": round(stamp, 4), "step_ms": round(elapsed * 1e3, 2),
                "predicted_ms": None if plan.predicted_time is None else round(plan.predicted_time * 1e3, 2),
                "budget_ms": None if plan.time_budget is None else round(plan.time_budget * 1e3, 2),
                "ls_decoding": ls_was_decoding, "rows": plan.num_tokens,
                "chunks": [(c.request_id, len(c.token_ids), c.start_position) for c in plan.chunks],
                "offloaded_starts": len(plan.offloaded_starts), "returning": len(plan.returning),
                "swap_outs": [t.request_id for t in plan.swap_outs], "swap_ins": [t.request_id for t in plan.swap_ins],
                "rejected": plan.rejected, "waiting": len(scheduler.waiting), "running": len(scheduler.running),
                "offloaded": len(scheduler.offloaded), "free_pages": engine.allocator.num_free,
                "side_threads_ms": round((side_thread_cpu_seconds() - side0) * 1e3, 1),
                "worker_ms": round((sum(proc_cpu_seconds(pid) for pid in pids) - worker0) * 1e3, 1),
            }) + "\n")
        last_plan[0] = None
        for out in outputs:
            rid, completion = out.request_id, out.outputs[0]
            new = len(completion.token_ids) - seen.get(rid, 0)
            seen[rid] = len(completion.token_ids)
            if new > 0:
                if rid not in first:
                    first[rid] = stamp
                    if kind[rid] == "ls":
                        decoding_ls.add(rid)
                last[rid] = stamp
                if kind[rid] == "be" and stamp <= args.duration:
                    be_tokens_in_window += new
            if out.finished:
                reason[rid] = completion.finish_reason
                tokens[rid] = list(completion.token_ids)
                decoding_ls.discard(rid)
                if kind[rid] == "be" and completion.finish_reason == "length" and stamp <= args.duration:
                    be_finished_in_window += 1
    end = time.perf_counter() - start
    others_engine_core, others_pool_core, pool_busy = meter.shares()
    for rid in added:
        if rid not in reason:
            engine.abort_request(rid)
    integrity = "ok"
    try:
        engine.check_integrity()
    except AssertionError as exc:
        integrity = f"FAILED: {exc}"
    engine.runner.execute = execute

    ttft_ratios, tpot_ratios = [], []
    attained = ttft_ok = tpot_ok = rejected = ls_cut = 0
    for rid in ls_ids:
        if reason.get(rid) == "rejected":
            rejected += 1
            continue
        if rid not in reason:
            ls_cut += 1
        ttft = (first[rid] if rid in first else end) - arrival[rid]  # no first token yet: a lower bound
        ttft_ratios.append(ttft / slo.ttft)
        n = seen.get(rid, 0)
        tpot = (last[rid] - first[rid]) / (n - 1) if n >= 2 else None
        if tpot is not None:
            tpot_ratios.append(tpot / slo.tpot)
        good_ttft = rid in first and ttft <= slo.ttft
        good_tpot = reason.get(rid) == "length" and tpot is not None and tpot <= slo.tpot
        ttft_ok += good_ttft
        tpot_ok += good_tpot
        attained += good_ttft and good_tpot
    be_total = sum(1 for a in workload if a.service_class == "be")
    return RunResult(
        policy=policy, ls_total=len(ls_ids), ls_attained=attained, ls_ttft_ok=ttft_ok, ls_tpot_ok=tpot_ok,
        ls_rejected=rejected, ls_cut=ls_cut, ttft_ratios=ttft_ratios, tpot_ratios=tpot_ratios,
        be_tokens_in_window=be_tokens_in_window, be_tps=be_tokens_in_window / args.duration,
        be_finished=be_finished_in_window, be_total=be_total,
        preemptions=scheduler.num_preemptions - counters0[0], swap_outs=scheduler.num_swap_outs - counters0[1],
        swap_ins=scheduler.num_swap_ins - counters0[2], rejected_counter=scheduler.num_rejected - counters0[3],
        steps=steps, ls_steps=ls_steps, ls_steps_over=ls_steps_over, worst_ls_step=worst_ls_step,
        measured_over_predicted=ratios, add_lag=add_lag, wall_s=end,
        others_engine_core=others_engine_core, others_pool_core=others_pool_core, pool_busy=pool_busy,
        recomputed=recomputed[0], quiet_wait=(0.0, 0.0),
        integrity=integrity + ("; cut at the drain limit" if cut else ""),
        ls_tokens={rid: tokens[rid] for rid in ls_ids if reason.get(rid) == "length"},
    )


# ----------------------------------------------------------------------------------------------------- reporting
def compare_ls_tokens(results: list[RunResult]) -> tuple[int, int, list[str]]:
    """(LS requests that finished in >= 2 runs, of those the ones identical in all, descriptions of differences)."""
    by_request: dict[str, list[tuple[str, list[int]]]] = {}
    for index, r in enumerate(results):
        for rid, toks in r.ls_tokens.items():
            by_request.setdefault(rid, []).append((f"{r.policy}#{index}", toks))
    compared = identical = 0
    differences = []
    for rid, runs in sorted(by_request.items(), key=lambda kv: int(kv[0][2:])):
        if len(runs) < 2:
            continue
        compared += 1
        reference_name, reference = runs[0]
        bad = [(name, toks) for name, toks in runs[1:] if toks != reference]
        if not bad:
            identical += 1
            continue
        for name, toks in bad:
            at = next((i for i, (a, b) in enumerate(zip(reference, toks)) if a != b), min(len(reference), len(toks)))
            differences.append(f"{rid}: {name} differs from {reference_name} from output token {at}")
    return compared, identical, differences


def summary_rows(
    results: dict[str, list[RunResult]], baseline: dict[int, float], slo: Slo
) -> tuple[list[dict], list[dict]]:
    rows, details = [], []
    for policy, runs in results.items():
        share = lambda attr: [getattr(r, attr) / r.ls_total for r in runs if r.ls_total]  # noqa: E731
        rows.append({
            "policy": policy,
            "ls": spread([r.ls_total for r in runs], "{:.0f}"),
            "attain": spread(share("ls_attained"), "{:.0%}"),
            "ttft_ok": spread(share("ls_ttft_ok"), "{:.0%}"),
            "tpot_ok": spread(share("ls_tpot_ok"), "{:.0%}"),
            "rejected": spread([r.ls_rejected for r in runs], "{:.0f}"),
            "cut": spread([r.ls_cut for r in runs], "{:.0f}"),
            "ttft50": spread([percentile(r.ttft_ratios, 50) for r in runs]),
            "ttft99": spread([percentile(r.ttft_ratios, 99) for r in runs]),
            "tpot50": spread([percentile(r.tpot_ratios, 50) for r in runs]),
            "tpot99": spread([percentile(r.tpot_ratios, 99) for r in runs]),
            "be_tps": spread([r.be_tps for r in runs], "{:.1f}"),
            "be_ratio": spread([r.be_tps / baseline[i] if baseline.get(i) else float("nan")
                                for i, r in enumerate(runs)]) + "x",
            "be_done": spread([r.be_finished for r in runs], "{:.0f}") + f"/{runs[0].be_total}",
            "preempt": spread([r.preemptions for r in runs], "{:.0f}"),
            "recomputed": spread([r.recomputed for r in runs], "{:.0f}"),
            "swaps": f"{spread([r.swap_outs for r in runs], '{:.0f}')}/{spread([r.swap_ins for r in runs], '{:.0f}')}",
        })
        details.append({
            "policy": policy,
            "steps": spread([r.steps for r in runs], "{:.0f}"),
            "ls_steps": spread([r.ls_steps for r in runs], "{:.0f}"),
            "over": spread([r.ls_steps_over for r in runs], "{:.0f}"),
            "over_share": spread([r.ls_steps_over / r.ls_steps if r.ls_steps else float("nan") for r in runs],
                                 "{:.0%}"),
            "worst": spread([r.worst_ls_step / slo.tpot for r in runs]),
            "mop50": spread([percentile(r.measured_over_predicted, 50) for r in runs]),
            "mop90": spread([percentile(r.measured_over_predicted, 90) for r in runs]),
            "lag": spread([percentile(r.add_lag, 99) * 1e3 for r in runs], "{:.0f}"),
            "rej": spread([r.rejected_counter for r in runs], "{:.0f}"),
            "wall": spread([r.wall_s for r in runs], "{:.1f}"),
            "pool": spread([r.pool_busy for r in runs], "{:.0%}"),
            "others": spread([r.others_engine_core for r in runs], "{:.0%}") + " / "
            + spread([r.others_pool_core for r in runs], "{:.0%}"),
            "integrity": "; ".join(sorted({r.integrity for r in runs})),
        })
    return rows, details


COLUMNS = {
    "policy": "policy", "ls": "LS reqs", "attain": "LS SLO attainment", "ttft_ok": "TTFT ok", "tpot_ok": "TPOT ok",
    "rejected": "rejected", "cut": "LS cut", "ttft50": "TTFT p50/SLO", "ttft99": "TTFT p99/SLO",
    "tpot50": "TPOT p50/SLO", "tpot99": "TPOT p99/SLO", "be_tps": "BE tok/s", "be_ratio": "BE vs fcfs",
    "be_done": "BE finished", "preempt": "preemptions", "recomputed": "tokens recomputed",
    "swaps": "swap-outs/ins",
}
DETAIL_COLUMNS = {
    "policy": "policy", "steps": "steps", "ls_steps": "steps with LS decoding",
    "over": "... over TPOT SLO", "over_share": "share over", "worst": "slowest such step/TPOT SLO",
    "mop50": "step/predicted p50", "mop90": "step/predicted p90", "lag": "arrival lag p99 ms",
    "rej": "num_rejected", "wall": "run s", "pool": "pool core busy",
    "others": "other processes on engine / pool core", "integrity": "engine integrity after run",
}


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="policies to run (fcfs is the BE baseline; without it there is no BE ratio)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals (and the BE window)")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="seconds after the window before a run is cut (open requests aborted)")
    parser.add_argument("--ls-rate", type=float, default=0.5, help="LS arrivals per second (Poisson)")
    parser.add_argument("--ls-max-prompt", type=int, default=256, help="LS prompts are cut to this many tokens")
    parser.add_argument("--ls-output", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"),
                        help="LS output lengths, uniform")
    parser.add_argument("--be-burst", type=int, default=8, help="BE requests arriving at t=0")
    parser.add_argument("--be-rate", type=float, default=0.0, help="further BE arrivals per second (Poisson)")
    parser.add_argument("--be-prompt", type=int, nargs=2, default=(512, 1024), metavar=("MIN", "MAX"),
                        help="BE prompt lengths in tokens, uniform")
    parser.add_argument("--be-output-len", type=int, default=128)
    parser.add_argument("--kv-pages", type=int, default=256, help="device KV pages of 16 tokens, for every policy")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--tpot-factor", type=float, default=2.5, help="TPOT SLO / measured lone LS decode step")
    parser.add_argument("--ttft-factor", type=float, default=2.0,
                        help="TTFT SLO / predicted budgeted prefill of the longest LS prompt")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--engine-core", type=int, default=0, help="core the engine process is pinned to")
    parser.add_argument("--pool-core", type=int, default=1, help="core the CPU attention worker is pinned to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="before calibrating and before each run, wait up to this many seconds for other "
                        "processes to use < 0.1 core")
    parser.add_argument("--profile", default=None,
                        help="latency profile JSON for the engines (profiled there when missing); default: the "
                        "engine's cache")
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    parser.add_argument("--trace", type=Path, help="append one JSON line per timed step here (plan, times, queues)")
    args = parser.parse_args()
    if args.ls_output[0] < 2 or args.ls_output[0] > args.ls_output[1] or args.be_prompt[0] > args.be_prompt[1]:
        parser.error("need 2 <= --ls-output MIN <= MAX and --be-prompt MIN <= MAX")
    if args.be_prompt[1] + args.be_output_len > MAX_MODEL_LEN:
        parser.error(f"a BE request must fit max_model_len {MAX_MODEL_LEN}")
    if math.ceil((args.be_prompt[1] + args.be_output_len) / BLOCK_SIZE) > args.kv_pages:
        parser.error("the longest BE request does not fit --kv-pages")

    os.sched_setaffinity(0, {args.engine_core})  # before torch starts any thread; spawned workers inherit it
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of model loading and profiling
    if args.trace is not None:
        args.trace.write_text("")
    import torch

    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    command = shlex.join(["python", *sys.argv])
    cpu = cpu_model()
    info = [
        f"command: `{command}` (omniserve at commit {git_revision()})",
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}; "
        f"engine pinned to core {args.engine_core} with 1 torch thread, CPU attention pool: 1 worker with 1 thread "
        f"pinned to core {args.pool_core}",
    ]
    print("\n".join(info), flush=True)

    texts = shuffled_texts(SHAREGPT_500, args.seed)
    if texts is None:
        raise SystemExit(f"{SHAREGPT_500} is missing: this benchmark needs ShareGPT prompts")
    slo, slo_lines, tokenizer, latency = calibrate(args, texts)
    print("\n".join(slo_lines), flush=True)
    workload = build_workload(tokenizer, texts, args)
    ls = [a for a in workload if a.service_class == "ls"]
    be = [a for a in workload if a.service_class == "be"]
    be_pages = sum(math.ceil((len(a.prompt) + a.max_tokens) / BLOCK_SIZE) for a in be)
    workload_line = (
        f"workload (seed {args.seed}): {len(ls)} LS requests, Poisson {args.ls_rate:g}/s over {args.duration:g} s, "
        f"ShareGPT prompts of {min(len(a.prompt) for a in ls)}-{max(len(a.prompt) for a in ls)} tokens (median "
        f"{statistics.median(len(a.prompt) for a in ls):.0f}), {args.ls_output[0]}-{args.ls_output[1]} output tokens; "
        f"{len(be)} BE requests ({args.be_burst} at t=0"
        + (f", then Poisson {args.be_rate:g}/s" if args.be_rate else "")
        + f"), {args.be_prompt[0]}-{args.be_prompt[1]}-token prompts of ShareGPT text, {args.be_output_len} output "
        f"tokens; greedy, EOS ignored; SmolLM2-135M-Instruct fp32, max_model_len {MAX_MODEL_LEN}, "
        f"max_num_batched_tokens {args.max_num_batched_tokens}, {args.kv_pages} device KV pages of {BLOCK_SIZE} tokens "
        f"(the BE requests alone need {be_pages}: {be_pages / args.kv_pages:.1f}x the cache); a run ends when every "
        f"LS request has ended after the window (BE aborted), or is cut at {args.duration + args.drain:g} s"
    )
    print(workload_line, flush=True)

    results: dict[str, list[RunResult]] = {p: [] for p in args.policies}
    for repeat in range(args.repeats):
        order = args.policies if repeat % 2 == 0 else args.policies[::-1]
        for policy in order:
            r = run_policy(policy, workload, args, slo)
            results[policy].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {policy}: LS attained {r.ls_attained}/{r.ls_total} "
                  f"(rejected {r.ls_rejected}, cut {r.ls_cut}), TTFT p99 {percentile(r.ttft_ratios, 99):.2f}x SLO, "
                  f"TPOT p99 {percentile(r.tpot_ratios, 99):.2f}x SLO, BE {r.be_tps:.1f} tok/s, "
                  f"{r.preemptions} preemptions, {r.swap_outs}/{r.swap_ins} swap-outs/ins, "
                  f"{r.ls_steps_over}/{r.ls_steps} LS steps over budget, run {r.wall_s:.0f} s, {r.integrity}; "
                  f"waited {r.quiet_wait[0]:.0f} s for quiet, others then held the engine core "
                  f"{r.others_engine_core:.0%} and the pool core {r.others_pool_core:.0%} of the run",
                  file=sys.stderr, flush=True)

    baseline = {i: r.be_tps for i, r in enumerate(results.get("fcfs", []))}
    rows, details = summary_rows(results, baseline, slo)
    all_runs = [r for runs in results.values() for r in runs]
    compared, identical, differences = compare_ls_tokens(all_runs)
    interference = max(r.others_engine_core for r in all_runs)
    same = f"{identical}/{compared} identical" + ("" if identical == compared else " (MISMATCH)")
    info += [*slo_lines, workload_line,
             f"{args.repeats} run(s) per policy, a fresh engine each with a short warm-up; "
             + ("median [min-max]; " if args.repeats > 1 else "")
             + f"before each run the script waited up to {args.quiet_wait:g} s for other processes to go quiet "
             f"(longest wait {max(r.quiet_wait[0] for r in all_runs):.0f} s); during the runs they held the engine's "
             f"core up to {interference:.0%} of the time",
             f"correctness: greedy tokens of LS requests that finished under several policies/repeats: {same}"]
    lines = ["", *info[-2:], "", *table(COLUMNS, rows, "  ", ""), "", *table(DETAIL_COLUMNS, details, "  ", "")]
    if differences:
        lines += ["", "LS token differences:", *differences[:20]]
    print("\n".join(lines), flush=True)
    if interference > 0.05:
        print(f"warning: other processes held the engine's core up to {interference:.0%} of a run's time",
              file=sys.stderr)
    if args.markdown:
        section = ["## omniserve scheduling policies on one LS + BE workload", ""] + [f"- {line}" for line in info]
        section += ["", *table(COLUMNS, rows, " | ", "| "), "", *table(DETAIL_COLUMNS, details, " | ", "| ")]
        if differences:
            section += ["", "LS token differences:", "", *[f"- {d}" for d in differences[:20]]]
        args.markdown.write_text("\n".join(section) + "\n")
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
