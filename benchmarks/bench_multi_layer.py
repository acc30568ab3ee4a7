"""Offloaded tokens through several layers per iteration on this machine: the `multi-layer` offloaded pipeline against
`one-layer` (the OmniServe paper's: a token advances one layer per iteration and the device never waits).

Placement as in bench_piggyback.py: this process (the device) is pinned to --engine-core with one torch thread; the
CPU attention pool gets one worker with one thread pinned to --pool-core. Built-in SmolLM2-135M-Instruct (30
layers), fp32, max_model_len 2048, `be_decode_placement="cpu"`: every BE request is offloaded after its prefill.

Workload, the same for both pipelines: --be-requests BE requests queued at the start (--be-prompt-len tokens,
--be-output-len output tokens), and LS requests (--ls-prompt-len, --ls-output-len) arriving one every --ls-interval s
at fixed times from the run's start (the first at 0) while any BE request is unfinished, at most until --duration.
Prompts are ShareGPT first turns repeated or cut to length; greedy, EOS ignored. LS SLOs --ls-ttft-slo and
--ls-tpot-slo: the scheduler plans every iteration within iteration_budget_share x the TPOT SLO. Every run gets a
fresh engine and a short warm-up: a lone LS request, whose decode step is reported against the TPOT SLO, then a
small mixed run that starts the pool's worker. The script drives `engine.step()` itself, stamps every token when its
step returns and keeps every iteration's plan and runner output (the engine's iteration records). Before each
run it waits up to --quiet-wait s for other processes to go quiet, and reports the share of the engine's core and of
the pool's core that they took during it (others edit and test on this machine).

Per pipeline (median [min-max] over --repeats runs each, interleaved), then multi-layer / one-layer of each repeat:
- BE tokens: p50 and p90 of the scheduler's OffloadedTokenTiming.seconds (from the iteration a token enters layer 0
  to the one that samples it), the mean engine step over iterations that ran offloaded rows, and the goal figure
  p50 token time / (layers x that mean step) (<= 0.25: a token takes at most a quarter of the one-layer pipeline's
  time); layers per iteration (mean, p50), iterations per token (p50); BE output tokens/s (all BE tokens / time until
  the last BE request ends), the BE prefill phase (until every BE request has its first token, i.e. is offloaded) and
  the BE tokens/s after it (where the pipelines differ most); the seconds the device waited for the pool per
  iteration with offloaded rows (RunnerOutput.cpu_wait_s), also as a share of that iteration; how busy the pool's
  core was.
- LS: SLO attainment (TTFT from the scheduled arrival <= SLO and mean TPOT after the first token <= SLO; rejected
  requests are misses; goal: multi-layer within 1 point of one-layer), TTFT p90 and mean-TPOT p90 over their SLO;
  iterations with LS rows, those planned over the time budget (pipeline.planned_s, else predicted_time, against
  time_budget; goal 0) and how many of those measured over the TPOT SLO; all LS iterations measured over it.
- Greedy tokens: BE and LS outputs of both pipelines compared token by token, and the BE outputs against a
  `be_decode_placement="device"` reference run of the same BE prompts with no LS (fp32 can flip a token from
  rounding in other batch shapes: reported, not asserted).
- Bookkeeping, apart from the runs. Scheduler: a Scheduler of --sched-requests offloaded requests (tokens in flight,
  CPU results ready at layers spread over all 30) beside 4 decoding LS requests, this machine's latency profile and
  the SLOs, executed by the one-layer fake runner the scheduler tests use (sim.one_layer_outputs: results back by
  the next iteration); schedule() + update() + results_ready() per iteration, median over --sched-iterations
  (goal 0.5 ms). Runner: a fresh
  multi-layer engine holding --runner-requests short offloaded BE requests, timed over --runner-steps steps from
  the engine's iteration records: the offloaded rows' bookkeeping in the runner (sending rows, taking results,
  choosing the rows that join a layer) less the waits for results and the pool's own calls (submit; poll outside
  the waits), which are reported apart; the runner's tensor work for offloaded rows (stacking residuals and results)
  is not counted.

    python benchmarks/bench_multi_layer.py --markdown multi_layer.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from multi_layer_report import (
    BOOK_COLUMNS, LS_METRICS, METRICS, PIPELINES, TOKEN_COLUMNS, bookkeeping_rows, metric_rows,
    token_rows,
)

from omniserve.bench.engine_run import StepRecords, drain
from omniserve.bench.engine_run import params as greedy
from omniserve.bench.machine import CpuMeter, proc_cpu_seconds, wait_for_quiet
from omniserve.bench.report import (
    command_line,
    cpu_model,
    engine_integrity,
    git_revision,
    percentile,
    print_report,
    write_markdown,
)
from omniserve.bench.smoke import SMOKE_MAX_MODEL_LEN, SMOKE_MAX_NUM_BATCHED_TOKENS
from omniserve.bench.workload import SHAREGPT, load_prompts
from omniserve.engine.observer import IterationRecord

BLOCK = 16  # tokens per KV page
MAX_MODEL_LEN = 2048  # with 512 batched tokens and 16-token pages: the profile bench_policies caches for this machine


# ------------------------------------------------------------------------------------------------------ engines
def build_llm(args: argparse.Namespace, placement: str, pipeline: str = "multi-layer", slos: bool = True):
    from omniserve import LLM
    from omniserve.cpu_attention import PoolConfig

    pool = PoolConfig(num_workers=1, threads_per_worker=1, worker_cores=((args.pool_core,),))
    extra = dict(ls_ttft_slo=args.ls_ttft_slo, ls_tpot_slo=args.ls_tpot_slo) if slos else {}
    return LLM(seed=args.seed, dtype="float32", device="cpu", threads=1, max_model_len=args.max_model_len,
               max_num_batched_tokens=args.max_num_batched_tokens, block_size=BLOCK,
               num_gpu_blocks_override=kv_pages(args), be_decode_placement=placement, offload_pipeline=pipeline,
               pool_config=pool, **extra)


def kv_pages(args: argparse.Namespace) -> int:
    """Device pages for every BE request at its final length (before its swap-out) and 8 LS requests, plus some."""
    pages = lambda prompt, out: math.ceil((prompt + out + 1) / BLOCK)  # noqa: E731
    return args.be_requests * pages(args.be_prompt_len, args.be_output_len) + 8 * pages(
        args.ls_prompt_len, args.ls_output_len) + 64


def worker_cpu_seconds(engine) -> float:
    pool = engine.cpu_pool
    return 0.0 if pool is None else sum(proc_cpu_seconds(pid) for pid in pool.worker_pids() if pid is not None)


def warm_up(engine, ls_prompt: list[int], be_prompts: list[list[int]], ls_out: int) -> float:
    """A lone LS request (its decode steps timed: the lone decode step, returned), then a small mixed run that
    starts the pool's worker and offloads a little; the offloaded-token timings it leaves are dropped."""
    engine.add_request("warmup-lone", ls_prompt, greedy(ls_out, "ls"))
    steps = drain(engine, 120)
    lone_decode = statistics.median(steps[-(ls_out - 1):][2:] or steps[-1:])  # the first decodes warm caches up
    engine.add_request("warmup-ls", ls_prompt[:64], greedy(8, "ls"))
    for index, prompt in enumerate(be_prompts[:2]):
        engine.add_request(f"warmup-be{index}", prompt[:128], greedy(8, "be"))
    drain(engine, 300)
    engine.scheduler.take_offloaded_token_timings()
    return lone_decode


# ---------------------------------------------------------------------------------------------------- one run
@dataclass
class Step:
    """One engine step as the figures need it."""

    seconds: float  # the whole engine.step(), an idle wait on the pool included
    offloaded: bool  # it ran offloaded rows (admitted ones, or rows going on beyond them)
    ls_rows: bool  # a device chunk of an LS request
    over_budget: bool  # planned time (the pipeline's, else the prediction) above the time budget
    cpu_wait_s: float
    idle: bool  # nothing planned: the engine waited for the pool


def step_of(record: IterationRecord, seconds: float) -> Step:
    plan = record.plan
    planned = plan.pipeline.planned_s if plan.pipeline.planned_s is not None else plan.predicted_time
    over = plan.time_budget is not None and planned is not None and planned > plan.time_budget * (1 + 1e-9)
    ls = any(chunk.params.service_class.value == "ls" for chunk in plan.chunks)
    return Step(seconds, record.ran_offloaded, ls, over, record.cpu_wait_seconds, plan.empty)


@dataclass
class Run:
    """What one timed run's loop saw, per request id: every token's time (stamped when its step returns), the tokens
    and how it ended."""

    tag: str
    start: float
    be_ids: list[str]
    ls_arrivals: list[float]  # seconds from the start
    ls_ids: list[str] = field(default_factory=list)  # the LS requests submitted, in arrival order
    stamps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    def be_done(self) -> bool:
        return all(rid in self.reasons for rid in self.be_ids)

    def note(self, outputs, now: float) -> bool:
        """Stamps the outputs' new tokens; True if there were any."""
        progress = False
        for out in outputs:
            completion = out.outputs[0]
            self.stamps[out.request_id].extend([now] * len(completion.delta_token_ids))
            progress |= bool(completion.delta_token_ids)
            if out.finished:
                self.tokens[out.request_id] = list(completion.token_ids)
                self.reasons[out.request_id] = completion.finish_reason
        return progress


def drive(engine, run: Run, ls_prompts: list[list[int]], ls_params, timeout_s: float, stall_s: float) -> float:
    """Submits LS requests as they come due while any BE request is unfinished and steps the engine until every
    request ended; a run without a token for stall_s, or longer than timeout_s, is a hang. Returns its end."""
    records = StepRecords(engine)
    last_progress = run.start
    while True:
        now = time.perf_counter()
        while (not run.be_done() and len(run.ls_ids) < len(run.ls_arrivals)
               and run.start + run.ls_arrivals[len(run.ls_ids)] <= now):
            rid = f"{run.tag}-ls{len(run.ls_ids)}"
            engine.add_request(rid, ls_prompts[len(run.ls_ids)], ls_params)
            run.ls_ids.append(rid)
        if not engine.has_unfinished_requests():
            return time.perf_counter()
        outputs = engine.step()
        end = time.perf_counter()
        record = records.take()
        if not record.failed:  # a failed iteration's requests fail: checked afterwards
            run.steps.append(step_of(record, end - now))
        if run.note(outputs, end):
            last_progress = end
        if end - last_progress > stall_s or end - run.start > timeout_s:
            raise SystemExit(f"{run.tag}: engine hang after {len(run.steps)} steps: {len(engine.scheduler.waiting)} "
                             f"waiting, {len(engine.scheduler.running)} running, {len(engine.scheduler.offloaded)} "
                             f"offloaded, {engine.runner.num_offloaded_in_flight} offloaded tokens in flight")


@dataclass
class Result:
    figures: dict[str, float]  # keyed as METRICS
    be_tokens: list[list[int]]
    ls_tokens: dict[int, list[int]]  # by arrival index: the LS requests that returned their whole output
    lone_decode_s: float
    integrity: str


def timed_run(args: argparse.Namespace, pipeline: str, tag: str, ls_prompts, be_prompts) -> Result:
    """A fresh engine of this pipeline, its warm-up, then the workload."""
    llm = build_llm(args, "cpu", pipeline)
    engine = llm.engine
    try:
        lone = warm_up(engine, ls_prompts[0], be_prompts, min(16, args.ls_output_len))
        wait_for_quiet(args.quiet_wait, ours=lambda: worker_cpu_seconds(engine))
        arrivals = [i * args.ls_interval for i in range(math.ceil(args.duration / args.ls_interval))]
        meter = CpuMeter(args.engine_core, args.pool_core, [p for p in engine.cpu_pool.worker_pids() if p])
        run = Run(tag, time.perf_counter(), [f"{tag}-be{i}" for i in range(len(be_prompts))], arrivals)
        for rid, prompt in zip(run.be_ids, be_prompts):
            engine.add_request(rid, prompt, greedy(args.be_output_len, "be"))
        end = drive(engine, run, ls_prompts, greedy(args.ls_output_len, "ls"), args.timeout, args.stall_timeout)
        timings = engine.scheduler.take_offloaded_token_timings()
        figures = run_figures(args, run, timings, engine.model_config.num_layers)
        others_engine, others_pool, busy = meter.shares()
        figures |= dict(busy=busy, others_engine=others_engine, others_pool=others_pool, wall=end - run.start)
        for rid in run.be_ids:
            if run.reasons.get(rid) != "length" or len(run.tokens[rid]) != args.be_output_len:
                raise SystemExit(f"{tag}: BE request {rid} ended {run.reasons.get(rid)!r} with "
                                 f"{len(run.tokens.get(rid, []))} tokens")
        ls_tokens = {i: run.tokens[rid] for i, rid in enumerate(run.ls_ids) if run.reasons.get(rid) == "length"}
        return Result(figures, [run.tokens[rid] for rid in run.be_ids], ls_tokens, lone, engine_integrity(engine))
    finally:
        engine.shutdown()


def run_figures(args: argparse.Namespace, run: Run, timings, num_layers: int) -> dict[str, float]:
    """The METRICS of one run (but the pool core's and other processes' shares and the wall time)."""
    be = [t for t in timings if t.service_class == "be"]
    seconds = [t.seconds for t in be]
    offloaded = [s for s in run.steps if s.offloaded]
    iteration = statistics.fmean(s.seconds for s in offloaded) if offloaded else math.nan
    ls_steps = [s for s in run.steps if s.ls_rows]
    over = [s for s in ls_steps if s.over_budget]
    be_end = max(run.stamps[rid][-1] for rid in run.be_ids)
    prefilled = max(run.stamps[rid][0] for rid in run.be_ids)  # every BE request has its first token: all offloaded
    after = sum(t > prefilled for rid in run.be_ids for t in run.stamps[rid])
    return dict(
        tok50=percentile(seconds, 50), tok90=percentile(seconds, 90), iter=iteration * 1e3,
        goal=percentile(seconds, 50) / (num_layers * iteration),
        lpi=statistics.fmean(t.layers_per_iteration for t in be) if be else math.nan,
        lpi50=percentile([t.layers_per_iteration for t in be], 50), ipt=percentile([t.iterations for t in be], 50),
        be_tps=len(run.be_ids) * args.be_output_len / (be_end - run.start), prefill=prefilled - run.start,
        be_tps_after=after / (be_end - prefilled) if be_end > prefilled else math.nan,
        wait=statistics.fmean(s.cpu_wait_s for s in offloaded) * 1e3 if offloaded else math.nan,
        wait_share=sum(s.cpu_wait_s for s in offloaded) / sum(s.seconds for s in offloaded) if offloaded else math.nan,
        ls_iters=len(ls_steps), over=len(over), over_slow=sum(s.seconds > args.ls_tpot_slo for s in over),
        slow=sum(s.seconds > args.ls_tpot_slo for s in ls_steps), idle=sum(s.idle for s in run.steps),
        steps=len(run.steps), **ls_figures(args, run),
    )


def ls_figures(args: argparse.Namespace, run: Run) -> dict[str, float]:
    """SLO attainment of the LS requests submitted, TTFT (from the scheduled arrival) and mean TPOT p90 / SLO."""
    ttfts, tpots, met = [], [], 0
    for index, rid in enumerate(run.ls_ids):
        stamps = run.stamps.get(rid)
        if not stamps:  # rejected (or failed) before any token: a miss
            continue
        ttft = stamps[0] - (run.start + run.ls_arrivals[index])
        tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else math.inf
        ttfts.append(ttft)
        tpots.append(tpot)
        met += run.reasons.get(rid) == "length" and ttft <= args.ls_ttft_slo and tpot <= args.ls_tpot_slo
    return dict(att=met / len(run.ls_ids) if run.ls_ids else math.nan, ls_n=len(run.ls_ids),
                rej=sum(run.reasons.get(rid) == "rejected" for rid in run.ls_ids),
                ttft=percentile(ttfts, 90) / args.ls_ttft_slo, tpot=percentile(tpots, 90) / args.ls_tpot_slo)


def prompts_and_reference(args: argparse.Namespace) -> tuple[list[list[int]], list[list[int]], list[list[int]], str]:
    """The BE and LS prompts (ShareGPT first turns, each text used once; the tokenizer is the engine's), and the BE
    prompts' greedy tokens run alone with device decode (no LS, no SLOs, no pool): the tokens to compare with."""
    llm = build_llm(args, "device", slos=False)
    try:
        num_ls = math.ceil(args.duration / args.ls_interval)
        length = max(args.be_prompt_len, args.ls_prompt_len)
        prompts = load_prompts(llm.tokenizer, args.be_requests + num_ls, length,
                               llm.engine.model_config.vocab_size, args.seed, SHAREGPT)
        be = [p[:args.be_prompt_len] for p in prompts[:args.be_requests]]
        ls = [p[:args.ls_prompt_len] for p in prompts[args.be_requests:]]
        outputs = llm.generate(be, greedy(args.be_output_len, "be"), use_tqdm=False)
        source = "ShareGPT first turns" if SHAREGPT.is_file() and llm.tokenizer is not None else "random ids"
        return be, ls, [list(out.outputs[0].token_ids) for out in outputs], source
    finally:
        llm.engine.shutdown()


# ------------------------------------------------------------------------------------------------- bookkeeping
def fake_step(scheduler, token: int = 7) -> tuple[float, float]:
    """One iteration with the fake runner; (seconds in schedule(), seconds in update() + results_ready())."""
    from omniserve.engine.scheduler.plan import RunnerOutput
    from omniserve.simulator.sim import one_layer_outputs

    started = time.perf_counter()
    plan = scheduler.schedule()
    planned = time.perf_counter()
    sampled, cpu_rows = one_layer_outputs(plan, scheduler.state.num_layers, token)
    output = RunnerOutput(sampled, [t.request_id for t in plan.swap_outs], [t.request_id for t in plan.swap_ins])
    booking = time.perf_counter()
    scheduler.update(plan, output)
    scheduler.results_ready(cpu_rows)
    return planned - started, time.perf_counter() - booking


def loaded_scheduler(args: argparse.Namespace, latency_model, pipeline: str):
    """A Scheduler of the engine's settings with 4 LS requests decoding on the device and --sched-requests offloaded
    BE requests, each with a token in flight whose CPU result is back at a layer spread over all of them."""
    from omniserve.engine.scheduler import Scheduler
    from omniserve.engine.scheduler.config import SchedulerConfig
    from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
    from omniserve.kv_cache import PageAllocator, PageTable

    layers = latency_model.num_layers
    config = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, be_decode_placement="cpu",
                             offload_pipeline=pipeline)
    pages = 1024
    scheduler = Scheduler(config, PageTable(PageAllocator(pages), BLOCK), eos_token_ids=(2,), num_layers=layers,
                          latency_model=latency_model, default_tpot_slo=args.ls_tpot_slo)
    ls_tokens = pages * BLOCK // 4 - args.ls_prompt_len  # a quarter of the device each: they decode throughout
    for index in range(4):
        scheduler.add_request(Request(f"ls{index}", list(range(100, 100 + args.ls_prompt_len)),
                                      greedy(ls_tokens, "ls"), ls_tokens, ttft_slo=args.ls_ttft_slo,
                                      tpot_slo=args.ls_tpot_slo))
    for _ in range(100):  # until every LS request decodes
        if all(r.num_output_tokens for r in scheduler.requests.values()):
            break
        fake_step(scheduler)
    for index in range(args.sched_requests):
        request = Request(f"be{index}", list(range(1000, 1000 + args.be_prompt_len)), greedy(10**6, "be"), 10**6)
        request.token_ids.append(7)
        request.num_computed_tokens = request.num_tokens - 1
        request.status, request.placement, request.token_in_flight = RequestStatus.RUNNING, Placement.HOST, True
        request.offload_layer, request.result_ready_since = index % layers, scheduler.state.iteration
        request.token_started = (scheduler.state.iteration, scheduler.state.clock())
        scheduler.requests[request.request_id] = request
        scheduler.offloaded.append(request)
    return scheduler


def scheduler_bookkeeping(args: argparse.Namespace, latency_model) -> dict[str, dict[str, float]]:
    """Per pipeline, the scheduler's own seconds per iteration (medians over --sched-iterations, after 20 untimed)."""
    figures = {}
    for pipeline in PIPELINES:
        scheduler = loaded_scheduler(args, latency_model, pipeline)
        for _ in range(20):
            fake_step(scheduler)
        times = [fake_step(scheduler) for _ in range(args.sched_iterations)]
        figures[pipeline] = dict(schedule=statistics.median(t[0] for t in times) * 1e3,
                                 book=statistics.median(t[1] for t in times) * 1e3,
                                 total=statistics.median(a + b for a, b in times) * 1e3,
                                 offloaded=len(scheduler.offloaded))
    return figures


def offload_all(engine, args: argparse.Namespace, be_prompts) -> list[str]:
    """Queues --runner-requests BE requests of 32-token prompts and steps until every one is offloaded."""
    ids = [f"bk{i}" for i in range(args.runner_requests)]
    for index, rid in enumerate(ids):  # 256 tokens: a final KV small enough for the host to take them all
        engine.add_request(rid, be_prompts[index % len(be_prompts)][:32], greedy(256, "be"))
    deadline = time.perf_counter() + args.timeout
    while len(engine.scheduler.offloaded) < len(ids):
        engine.step()
        if time.perf_counter() > deadline:
            raise SystemExit("runner bookkeeping: the BE requests were not all offloaded in time")
    return ids


def runner_bookkeeping(args: argparse.Namespace, be_prompts) -> tuple[dict[str, float], object]:
    """A fresh multi-layer engine holding --runner-requests offloaded requests, --runner-steps steps timed: the
    runner's bookkeeping (see the module docstring) less the pool's submit and its polls outside the waits, which
    are reported apart. Returns the figures (medians per step, ms) and the engine's latency model."""
    llm = build_llm(args, "cpu", "multi-layer")
    engine = llm.engine
    try:
        ids = offload_all(engine, args, be_prompts)
        records = StepRecords(engine)
        own, pool, rows, started = [], [], 0, time.perf_counter()
        for _ in range(args.runner_steps):
            engine.step()
            record = records.take()
            calls = record.pool_seconds.get("submit", 0.0) + record.pool_seconds.get("poll", 0.0)  # outside waits
            own.append(record.offload_seconds - record.cpu_wait_seconds - calls)
            pool.append(calls)
            rows += record.num_offloaded_rows
        step_ms = (time.perf_counter() - started) / args.runner_steps * 1e3
        for rid in ids:
            engine.abort_request(rid)
        return dict(total=statistics.median(own) * 1e3, pool=statistics.median(pool) * 1e3, step=step_ms,
                    rows=rows / args.runner_steps, offloaded=len(ids)), engine.latency_model
    finally:
        engine.shutdown()


def info_lines(args: argparse.Namespace, results, lone: list[float], total_s: float, source: str) -> list[str]:
    import torch

    return [
        f"command: `{command_line()}` (omniserve at commit {git_revision()})",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
        f"{platform.python_version()}; engine pinned to core {args.engine_core} with 1 torch thread, CPU attention "
        f"pool: 1 worker with 1 thread pinned to core {args.pool_core}",
        f"workload: SmolLM2-135M-Instruct fp32 (30 layers), be_decode_placement=cpu; {args.be_requests} BE requests "
        f"({args.be_prompt_len}-token prompts, {args.be_output_len} output tokens) queued at the start, LS requests "
        f"({args.ls_prompt_len}-token prompts, {args.ls_output_len} output tokens) one every {args.ls_interval:g} s "
        f"from the start while BE requests run (at most {args.duration:g} s); greedy, EOS ignored, prompts from "
        f"{source}; max_num_batched_tokens {args.max_num_batched_tokens}, max_model_len {args.max_model_len}, "
        f"{kv_pages(args)} KV pages of {BLOCK} tokens",
        f"LS SLOs: TTFT {args.ls_ttft_slo:g} s, TPOT {args.ls_tpot_slo * 1e3:.0f} ms (a lone LS decode step measured "
        f"{statistics.median(lone) * 1e3:.1f} ms in the warm-ups = TPOT SLO / "
        f"{args.ls_tpot_slo / statistics.median(lone):.1f}); iterations are planned within 0.85 x the TPOT SLO",
        f"{args.repeats} run(s) per pipeline on fresh engines, interleaved, each after a warm-up; median [min-max]; "
        f"the whole benchmark took {total_s:.0f} s; engine integrity after the runs: "
        + "; ".join(sorted({r.integrity for rs in results.values() for r in rs})),
    ]


# ---------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--be-requests", type=int, default=32)
    add("--be-prompt-len", type=int, default=512)
    add("--be-output-len", type=int, default=64)
    add("--ls-interval", type=float, default=1.5, help="seconds between LS arrivals")
    add("--ls-prompt-len", type=int, default=128)
    add("--ls-output-len", type=int, default=32)
    add("--duration", type=float, default=300, help="no LS arrival after this many seconds")
    add("--ls-ttft-slo", type=float, default=1.0)
    add("--ls-tpot-slo", type=float, default=0.1)
    add("--repeats", type=int, default=1, help="timed runs per pipeline, interleaved")
    add("--max-num-batched-tokens", type=int, default=512)
    add("--sched-requests", type=int, default=400, help="offloaded requests in the scheduler bookkeeping section")
    add("--sched-iterations", type=int, default=200)
    add("--runner-requests", type=int, default=200, help="offloaded requests in the runner bookkeeping section")
    add("--runner-steps", type=int, default=30)
    add("--engine-core", type=int, default=0, help="core the engine process is pinned to")
    add("--pool-core", type=int, default=1, help="core the CPU attention worker is pinned to")
    add("--seed", type=int, default=0)
    add("--quiet-wait", type=float, default=10, help="seconds to wait for other processes to go quiet before a run")
    add("--timeout", type=float, default=900, help="seconds one run may take before it is a hang")
    add("--stall-timeout", type=float, default=60, help="seconds without any token: a hang")
    add("--markdown", type=Path, help="also write the results as a markdown section here")
    add("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    args.max_model_len = MAX_MODEL_LEN
    if args.smoke:
        args.be_requests, args.be_prompt_len, args.be_output_len, args.duration = 2, 32, 8, 3.0
        args.ls_interval, args.ls_prompt_len, args.ls_output_len = 1.0, 16, 4
        args.max_num_batched_tokens = SMOKE_MAX_NUM_BATCHED_TOKENS
        args.sched_requests, args.sched_iterations, args.runner_requests, args.runner_steps = 20, 5, 4, 3
        args.quiet_wait, args.timeout, args.max_model_len = 0.0, 300.0, SMOKE_MAX_MODEL_LEN
        args.ls_ttft_slo, args.ls_tpot_slo = 10.0, 1.0  # LS requests admitted on a busy machine too
    if args.be_requests < 1 or args.ls_output_len < 2 or args.repeats < 1 or args.ls_interval <= 0:
        parser.error("need a BE request, 2 LS output tokens (for a TPOT), a repeat and --ls-interval above 0")
    return args


def main() -> None:
    args = parse_args()
    os.sched_setaffinity(0, {args.engine_core})  # before torch starts any thread; spawned workers inherit it
    import torch

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    be_prompts, ls_prompts, reference, source = prompts_and_reference(args)
    print(f"device reference run done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    results: dict[str, list[Result]] = {p: [] for p in PIPELINES}
    for repeat in range(args.repeats):
        for pipeline in PIPELINES if repeat % 2 == 0 else PIPELINES[::-1]:
            r = timed_run(args, pipeline, f"r{repeat}-{pipeline}", ls_prompts, be_prompts)
            results[pipeline].append(r)
            f = r.figures
            print(f"repeat {repeat + 1}/{args.repeats} {pipeline}: wall {f['wall']:.1f} s, BE {f['be_tps']:.1f} tok/s, "
                  f"token p50 {f['tok50']:.3f} s = {f['goal']:.3f} x layers x step, {f['lpi']:.1f} layers/iteration, "
                  f"LS attainment {f['att']:.1%} of {f['ls_n']:.0f}, {f['over']:.0f} LS steps planned over budget "
                  f"(at {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    runner, latency_model = runner_bookkeeping(args, be_prompts)
    sched = scheduler_bookkeeping(args, latency_model)
    print(f"bookkeeping sections done (at {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    columns = lambda metrics: {"pipeline": "offloaded pipeline"} | {k: c for k, c, _, _ in metrics}  # noqa: E731
    tables = [(columns(METRICS), metric_rows(results, METRICS)),
              (columns(LS_METRICS), metric_rows(results, LS_METRICS)),
              (TOKEN_COLUMNS, token_rows(results, reference)), (BOOK_COLUMNS, bookkeeping_rows(sched, runner))]
    info = info_lines(args, results, [r.lone_decode_s for rs in results.values() for r in rs],
                      time.perf_counter() - started, source)
    print_report(info, tables)
    write_markdown(args.markdown, "omniserve multi-layer offloaded pipeline benchmark", info, tables)


if __name__ == "__main__":
    main()
