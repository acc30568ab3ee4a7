"""Piggybacked best-effort decode on a CPU-only machine: "the device on one core, the CPU attention pool on another".

The engine process (standing in for the device) is pinned to --engine-core with one torch thread; the CPU attention
pool gets one worker with one thread pinned to --pool-core. The same workload runs once per placement of best-effort
(BE) decode attention:

- `device`: BE requests decode like any other request (attention over device KV pages, in the engine process);
- `cpu`:    BE requests are swapped out after prefill and their decode attention runs in the pool, while their dense
            work (QKV, MLP, LM head) piggybacks on the engine's batch, one layer per iteration.

Workload (built-in SmolLM2-135M-Instruct, fp32): --ls-requests latency-sensitive (LS) requests and --be-requests long
BE requests, all queued at once, LS first (FCFS admission: BE first would keep LS waiting behind every BE prefill);
with `--ls-arrival after-be-prefill` the LS requests are queued only once every BE request has its first token, to
measure LS decode against BE decode alone. Prompts are exactly the given number of token ids cut from ShareGPT (repeated
to length), greedy outputs of exactly the given length (EOS ignored). The script drives `llm.engine.step()` itself
and timestamps every token when its step returns.

Per placement: LS TTFT (median over LS requests), LS TPOT p50/p99 (gaps between consecutive LS tokens after the first,
pooled over LS requests; also split into gaps that ended while some BE request was still prefilling and gaps after
every BE request had its first token, the phase in which the two placements differ), BE output tokens/s (all BE
output tokens / time until the last BE request ends; BE tokens produced inside the LS window / its length; BE tokens
after the BE prefill phase / its remaining time), wall time, and the cpu/device ratio of each (per repeat, then
median). Greedy LS tokens must be the same under both placements ("LS tokens identical"). Details per placement:
length of the BE prefill phase, iterations, iterations that ended in the engine's idle wait on the pool (it waits
when an iteration ran nothing at all, i.e. only CPU attention was in flight),
swap-outs, preemptions, and the engine side of the piggyback bookkeeping: time spent in the CPU pool's methods
(submit, poll, load, free, ...; from the engine's iteration records) per iteration, as the median over iterations that sent
offloaded rows and the mean over all iterations with offloaded requests; the gathering of swapped-out KV
(the runner's swap-out copies) in total; the CPU time of the engine's non-main threads per iteration (the queues' feeder
threads, which pickle tensors into shared memory); and how busy the pool's core was. Not counted: the runner's own
extra tensor work for offloaded rows (concatenations, residual copies) inside the forward pass.

Fixed seeds, a short warm-up run per placement (it also starts the pool's worker), then --repeats runs per placement,
interleaved (order alternating per repeat); figures are medians with the min-max spread in brackets.

    python benchmarks/bench_piggyback.py --repeats 1 --markdown piggyback.md
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
from dataclasses import dataclass, field
from pathlib import Path

from omniserve.bench.machine import OtherLoad, proc_cpu_seconds, side_thread_cpu_seconds
from omniserve.bench.report import (
    command_line,
    cpu_model,
    engine_integrity,
    git_revision,
    percentile,
    print_report,
    spread,
    write_markdown,
)
from omniserve.bench.workload import SHAREGPT, shuffled_texts
from omniserve.engine.observer import IterationRecord

PLACEMENTS = ("device", "cpu")
BLOCK = 16  # tokens per KV page
POOL_METHODS = ("check_workers", "poll", "submit", "load", "free", "request_export", "take_exported")


# ------------------------------------------------------------------------------------------------------- helpers
def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def make_prompts(tokenizer, texts, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """One prompt of exactly `length` ids per entry of `lengths`, each from a different ShareGPT first human turn
    (repeated to length when short); random ids if the data set or the tokenizer is missing."""
    rng = random.Random(seed)
    if tokenizer is None or texts is None:
        print(f"note: {SHAREGPT} or tokenizer missing, using random token ids", file=sys.stderr)
        return [[rng.randrange(1000, vocab) for _ in range(n)] for n in lengths]
    prompts: list[list[int]] = []
    source = iter(texts)
    for length in lengths:
        for text in source:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= 16:  # skip one-liners: a prompt that is one short turn repeated 100 times is odd text
                prompts.append((ids * (length // len(ids) + 1))[:length])
                break
        else:
            raise SystemExit(f"{SHAREGPT} has fewer than {len(lengths)} usable prompts")
    return prompts


# ------------------------------------------------------------------------------------------------ instrumentation
class Probe:
    """One engine's iteration records (an observer), per step: the seconds the engine spent in the CPU pool's methods
    (POOL_METHODS, waits on results included), whether it sent offloaded rows, whether it ended in the idle wait; and
    over a run, the seconds per pool method and in the swap-outs' copies."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.pool_s = 0.0  # pool time in the current step
        self.submitted = False  # the current step sent offloaded rows to the pool
        self.idle = False
        self.per_method: dict[str, float] = {}
        self.swap_out_s = 0.0
        engine.add_iteration_observer(self.note)

    def note(self, record: IterationRecord) -> None:
        self.pool_s, self.submitted, self.idle = 0.0, "submit" in record.pool_seconds, record.idle_wait
        for key, seconds in record.pool_seconds.items():
            name = key.removesuffix(" while waiting")
            if name in POOL_METHODS:
                self.pool_s += seconds
                self.per_method[name] = self.per_method.get(name, 0.0) + seconds
        self.swap_out_s += record.swap_out_seconds

    def worker_cpu_seconds(self) -> float:
        pool = self.engine.cpu_pool
        if pool is None:
            return 0.0
        return sum(proc_cpu_seconds(pid) for pid in pool.worker_pids() if pid is not None)


@dataclass
class RunResult:
    ls_ttft_ms: float
    ls_tpot_p50_ms: float
    ls_tpot_p99_ms: float
    ls_tpot_prefill_p50_ms: float  # gaps that ended while some BE request was still prefilling
    ls_tpot_after_p50_ms: float  # gaps that ended after every BE request had its first token
    ls_tpot_after_p99_ms: float
    be_tps: float
    be_tps_ls_window: float
    be_tps_after_prefill: float  # BE tokens after every BE request had its first token / time from then to the end
    be_prefill_s: float  # from the start until every BE request had its first token
    wall_s: float
    ls_tokens: list[list[int]]
    be_tokens: list[list[int]]
    iterations: int
    idle_iterations: int
    swap_outs: int
    preemptions: int
    pool_ms_per_iter: float  # median over iterations that sent offloaded rows to the pool
    pool_ms_per_iter_mean: float  # mean over iterations with offloaded requests
    offloaded_iterations: int
    per_method_ms: dict[str, float] = field(default_factory=dict)
    swap_out_s: float = 0.0
    side_thread_ms_per_iter: float = 0.0
    worker_busy: float = 0.0  # share of the wall time the pool's worker was on a core
    integrity: str = "ok"


@dataclass
class Run:
    """One run's requests and what its loop saw: every token's time (stamped when its step returns), the greedy
    tokens, when each request was queued, and the pool time of the iterations with offloaded requests."""

    tag: str
    ls_ids: list[str]
    be_ids: list[str]
    stamps: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    submitted: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    idle_iterations: int = 0
    pool_per_iter: list[float] = field(default_factory=list)  # iterations with offloaded requests
    pool_per_submit_iter: list[float] = field(default_factory=list)  # ... of which those that sent rows
    start: float = 0.0
    end: float = 0.0

    def __post_init__(self) -> None:
        self.stamps = {rid: [] for rid in self.ls_ids + self.be_ids}

    def all_submitted(self) -> bool:
        return len(self.submitted) == len(self.stamps)

    def be_prefilled(self) -> bool:
        return all(self.stamps[rid] for rid in self.be_ids)


def step_until_done(engine, probe: Probe, run: Run, submit_ls, timeout_s: float, stall_s: float) -> None:
    """Steps the engine until every request is queued (`submit_ls()` queues the LS requests once every BE request
    has its first token, if they are not yet) and finished; a run without tokens for stall_s, or longer than
    timeout_s, is a hang."""
    scheduler = engine.scheduler
    last_progress = run.start
    while engine.has_unfinished_requests() or not run.all_submitted():
        if not run.all_submitted() and run.be_prefilled():
            submit_ls()  # --ls-arrival after-be-prefill
        offloaded = bool(scheduler.offloaded)
        probe.pool_s, probe.submitted = 0.0, False
        outputs = engine.step()
        now = time.perf_counter()
        run.iterations += 1
        run.idle_iterations += probe.idle
        if offloaded or scheduler.offloaded:
            run.pool_per_iter.append(probe.pool_s)
            if probe.submitted:
                run.pool_per_submit_iter.append(probe.pool_s)
        if note_outputs(run, outputs, now):
            last_progress = now
        if now - last_progress > stall_s or now - run.start > timeout_s:
            what = "no token for %.0f s" % (now - last_progress) if now - last_progress > stall_s else "timeout"
            raise SystemExit(
                f"{run.tag}: engine hang ({what}) after {run.iterations} iterations: {len(scheduler.waiting)} waiting, "
                f"{len(scheduler.running)} running, {len(scheduler.offloaded)} offloaded, "
                f"{engine.runner.num_offloaded_in_flight} offloaded tokens in flight, tokens so far "
                f"{ {rid: len(s) for rid, s in run.stamps.items()} }"
            )
    run.end = time.perf_counter()


def note_outputs(run: Run, outputs, now: float) -> bool:
    """Stamps the outputs' new tokens; True if there were any."""
    progress = False
    for out in outputs:
        if out.request_id not in run.stamps:
            continue
        completion = out.outputs[0]
        run.stamps[out.request_id].extend([now] * len(completion.delta_token_ids))
        progress |= bool(completion.delta_token_ids)
        if out.finished:
            run.tokens[out.request_id] = list(completion.token_ids)
            if completion.finish_reason != "length":
                raise SystemExit(f"{run.tag}: request {out.request_id} ended with {completion.finish_reason!r}")
    return progress


def check_run(engine, run: Run, ls_out: int, be_out: int) -> str:
    """Every request returned its length; the engine's integrity check, as text."""
    for rid in run.ls_ids + run.be_ids:
        want = ls_out if rid in run.ls_ids else be_out
        if len(run.tokens.get(rid, [])) != want or len(run.stamps[rid]) != want:
            raise SystemExit(f"{run.tag}: request {rid} returned {len(run.tokens.get(rid, []))} tokens "
                             f"({len(run.stamps[rid])} stamped), expected {want}")
    return engine_integrity(engine, run.tag)


def run_once(llm, probe: Probe, ls_prompts, be_prompts, ls_out: int, be_out: int, ls_arrival: str, tag: str,
             timeout_s: float, stall_s: float) -> RunResult:
    from omniserve import SamplingParams

    engine = llm.engine
    ls_params = SamplingParams(temperature=0, max_tokens=ls_out, ignore_eos=True, service_class="ls")
    be_params = SamplingParams(temperature=0, max_tokens=be_out, ignore_eos=True, service_class="be")
    run = Run(tag, [f"{tag}-ls{i}" for i in range(len(ls_prompts))], [f"{tag}-be{i}" for i in range(len(be_prompts))])

    def submit(ids, prompts, params) -> None:
        now = time.perf_counter()
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, prompt, params)
            run.submitted[rid] = now

    scheduler = engine.scheduler
    preemptions0, swap_outs0 = scheduler.stats.num_preemptions, scheduler.stats.num_swap_outs
    side0, worker0 = side_thread_cpu_seconds(), probe.worker_cpu_seconds()
    probe.per_method.clear()
    probe.swap_out_s = 0.0
    run.start = time.perf_counter()
    if ls_arrival == "start":
        submit(run.ls_ids, ls_prompts, ls_params)
    submit(run.be_ids, be_prompts, be_params)
    step_until_done(engine, probe, run, lambda: submit(run.ls_ids, ls_prompts, ls_params), timeout_s, stall_s)
    integrity = check_run(engine, run, ls_out, be_out)
    return RunResult(
        **run_figures(run, be_out), ls_tokens=[run.tokens[rid][:] for rid in run.ls_ids],
        be_tokens=[run.tokens[rid][:] for rid in run.be_ids], iterations=run.iterations,
        idle_iterations=run.idle_iterations, swap_outs=scheduler.stats.num_swap_outs - swap_outs0,
        preemptions=scheduler.stats.num_preemptions - preemptions0,
        pool_ms_per_iter=median_or_nan(run.pool_per_submit_iter) * 1e3,
        pool_ms_per_iter_mean=(statistics.fmean(run.pool_per_iter) * 1e3) if run.pool_per_iter else float("nan"),
        offloaded_iterations=len(run.pool_per_iter), per_method_ms={k: v * 1e3 for k, v in probe.per_method.items()},
        swap_out_s=probe.swap_out_s, side_thread_ms_per_iter=(side_thread_cpu_seconds() - side0) * 1e3 / run.iterations,
        worker_busy=(probe.worker_cpu_seconds() - worker0) / (run.end - run.start), integrity=integrity,
    )


def run_figures(run: Run, be_out: int) -> dict[str, float]:
    """The LS latencies and BE throughputs of a run (RunResult's first fields; see the module docstring)."""
    stamps, ls_ids, be_ids, start = run.stamps, run.ls_ids, run.be_ids, run.start
    be_prefilled = max(stamps[rid][0] for rid in be_ids)
    gaps, gaps_prefill, gaps_after = [], [], []
    for rid in ls_ids:
        for before, after in zip(stamps[rid], stamps[rid][1:]):
            gaps.append(after - before)
            (gaps_prefill if after <= be_prefilled else gaps_after).append(after - before)
    ls_start = min(run.submitted[rid] for rid in ls_ids)
    ls_end = max(stamps[rid][-1] for rid in ls_ids)
    be_end = max(stamps[rid][-1] for rid in be_ids)
    be_in_window = sum(ls_start <= t <= ls_end for rid in be_ids for t in stamps[rid])
    return dict(
        ls_ttft_ms=statistics.median(stamps[rid][0] - run.submitted[rid] for rid in ls_ids) * 1e3,
        ls_tpot_p50_ms=percentile(gaps, 50) * 1e3,
        ls_tpot_p99_ms=percentile(gaps, 99) * 1e3,
        ls_tpot_prefill_p50_ms=percentile(gaps_prefill, 50) * 1e3,
        ls_tpot_after_p50_ms=percentile(gaps_after, 50) * 1e3,
        ls_tpot_after_p99_ms=percentile(gaps_after, 99) * 1e3,
        be_tps=len(be_ids) * be_out / (be_end - start),
        be_tps_ls_window=be_in_window / (ls_end - ls_start),
        be_tps_after_prefill=(sum(t > be_prefilled for rid in be_ids for t in stamps[rid]) / (be_end - be_prefilled)
                              if be_end > be_prefilled else float("nan")),
        be_prefill_s=be_prefilled - start,
        wall_s=run.end - start,
    )


# ---------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ls-requests", type=int, default=2)
    parser.add_argument("--ls-prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128, help="output tokens of each LS request")
    parser.add_argument("--be-requests", type=int, default=16)
    parser.add_argument("--be-prompt-len", type=int, default=1920)
    parser.add_argument("--be-output-len", type=int, default=64, help="output tokens of each BE request")
    parser.add_argument("--ls-arrival", choices=("start", "after-be-prefill"), default="start",
                        help="queue the LS requests with the BE ones, or once every BE request has its first token")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per placement")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="a short untimed run per placement first (starts the pool's worker)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--engine-core", type=int, default=0, help="core the engine process is pinned to")
    parser.add_argument("--pool-core", type=int, default=1, help="core the CPU attention worker is pinned to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take before it is a hang")
    parser.add_argument("--stall-timeout", type=float, default=120, help="seconds without any token: a hang")
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:
        args.ls_requests, args.ls_prompt_len, args.output_len, args.repeats = 1, 16, 4, 1
        args.be_requests, args.be_prompt_len, args.be_output_len = 2, 32, 4
        args.max_model_len, args.max_num_batched_tokens, args.timeout = 256, 64, 300
    if args.ls_requests < 1 or args.be_requests < 1 or args.output_len < 2 or args.be_output_len < 1:
        parser.error("need at least one LS and one BE request, and at least 2 LS output tokens (for a TPOT)")
    return args


def kv_pages(args: argparse.Namespace) -> int:
    """Enough KV pages of BLOCK tokens for every request at once, plus some."""
    return sum(math.ceil((p + o + 1) / BLOCK) for p, o in
               [(args.ls_prompt_len, args.output_len)] * args.ls_requests
               + [(args.be_prompt_len, args.be_output_len)] * args.be_requests) + 64


class Bench:
    """One LLM per placement (the same settings otherwise), its probe, and the workload's prompts."""

    def __init__(self, args: argparse.Namespace) -> None:
        from omniserve import LLM
        from omniserve.cpu_attention import PoolConfig

        self.args, self.pages = args, kv_pages(args)
        pool_config = PoolConfig(num_workers=1, threads_per_worker=1, worker_cores=((args.pool_core,),))
        self.llms, self.probes = {}, {}
        for placement in PLACEMENTS:
            self.llms[placement] = LLM(
                seed=args.seed, dtype="float32", device="cpu", threads=1, max_model_len=args.max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens, be_decode_placement=placement,
                num_gpu_blocks_override=self.pages, block_size=BLOCK, pool_config=pool_config,
            )
            self.probes[placement] = Probe(self.llms[placement].engine)
        llm0 = self.llms[PLACEMENTS[0]]
        texts = shuffled_texts(SHAREGPT, args.seed)
        self.source = "ShareGPT first turns" if texts is not None and llm0.tokenizer is not None else "random token ids"
        prompts = make_prompts(llm0.tokenizer, texts, [args.ls_prompt_len] * args.ls_requests
                               + [args.be_prompt_len] * args.be_requests, llm0.engine.model_config.vocab_size,
                               args.seed)
        self.ls_prompts, self.be_prompts = prompts[:args.ls_requests], prompts[args.ls_requests:]

    def run(self, placement: str, tag: str, ls, be, ls_out: int, be_out: int) -> RunResult:
        return run_once(self.llms[placement], self.probes[placement], ls, be, ls_out, be_out, self.args.ls_arrival,
                        tag, self.args.timeout, self.args.stall_timeout)

    def warm_up(self) -> None:
        """A short run per placement: 32-token LS prompts, two BE prompts of up to 256 tokens, 8 output tokens."""
        be_len = min(256, self.args.be_prompt_len)
        for placement in PLACEMENTS:
            start = time.perf_counter()
            self.run(placement, f"warmup-{placement}", [p[:32] for p in self.ls_prompts],
                     [p[:be_len] for p in self.be_prompts[:2]], 8, 8)
            print(f"warm-up {placement}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def timed_runs(self) -> tuple[dict[str, list[RunResult]], float, float]:
        """--repeats runs per placement, interleaved; (results, seconds they took, other processes' CPU share)."""
        args = self.args
        results: dict[str, list[RunResult]] = {p: [] for p in PLACEMENTS}
        others = OtherLoad(lambda: sum(p.worker_cpu_seconds() for p in self.probes.values()))
        for repeat in range(args.repeats):
            for placement in PLACEMENTS if repeat % 2 == 0 else PLACEMENTS[::-1]:
                r = self.run(placement, f"r{repeat}-{placement}", self.ls_prompts, self.be_prompts, args.output_len,
                             args.be_output_len)
                results[placement].append(r)
                print(f"repeat {repeat + 1}/{args.repeats} {placement}: wall {r.wall_s:.1f} s, LS TPOT p50 "
                      f"{r.ls_tpot_p50_ms:.1f} ms p99 {r.ls_tpot_p99_ms:.1f} ms, LS TTFT {r.ls_ttft_ms:.0f} ms, BE "
                      f"{r.be_tps:.1f} tok/s ({r.be_tps_ls_window:.1f} in the LS window), {r.iterations} iterations",
                      file=sys.stderr, flush=True)
        return results, others.wall(), others.share()

    def shutdown(self) -> None:
        for llm in self.llms.values():
            llm.engine.shutdown()


def same_tokens(results: dict[str, list[RunResult]]) -> tuple[bool, float]:
    """Whether greedy LS tokens are the same in every run (they must not depend on where BE requests decode), and
    the share of BE requests with the same tokens under both placements (CPU and device attention round apart)."""
    device_runs, cpu_runs = results["device"], results["cpu"]
    ls_same = all(d.ls_tokens == c.ls_tokens for d in device_runs for c in cpu_runs)
    ls_same &= all(r.ls_tokens == device_runs[0].ls_tokens for r in device_runs + cpu_runs)
    be_same = statistics.fmean(sum(a == b for a, b in zip(d.be_tokens, c.be_tokens)) / len(d.be_tokens)
                               for d, c in zip(device_runs, cpu_runs))
    return ls_same, be_same


METRICS = [  # key, column, format, attribute
    ("ttft", "LS TTFT ms", "{:.0f}", "ls_ttft_ms"),
    ("p50", "LS TPOT p50 ms", "{:.1f}", "ls_tpot_p50_ms"),
    ("p99", "LS TPOT p99 ms", "{:.1f}", "ls_tpot_p99_ms"),
    ("pre", "LS TPOT p50 during BE prefill ms", "{:.1f}", "ls_tpot_prefill_p50_ms"),
    ("post", "LS TPOT p50 after BE prefill ms", "{:.1f}", "ls_tpot_after_p50_ms"),
    ("post99", "LS TPOT p99 after BE prefill ms", "{:.1f}", "ls_tpot_after_p99_ms"),
    ("be", "BE tok/s", "{:.1f}", "be_tps"),
    ("bewin", "BE tok/s in LS window", "{:.1f}", "be_tps_ls_window"),
    ("bedec", "BE tok/s after BE prefill", "{:.1f}", "be_tps_after_prefill"),
    ("wall", "wall s", "{:.1f}", "wall_s"),
]
COLUMNS = {"placement": "BE decode placement"} | {key: col for key, col, _, _ in METRICS} | {
    "same": "LS tokens identical"}
DETAIL_COLUMNS = {
    "placement": "BE decode placement", "prefill": "BE prefill phase s", "iters": "iterations",
    "idle": "idle-wait iterations", "swaps": "swap-outs", "preempt": "preemptions",
    "pool": "pool calls ms/iter sending rows (median)", "poolmean": "pool calls ms/iter offloaded (mean)",
    "swapout": "swap-out ms total", "side": "feeder threads CPU ms/iter", "busy": "pool core busy",
    "methods": "pool method totals ms", "integrity": "engine integrity after run",
}


def summary_rows(results: dict[str, list[RunResult]], ls_same: bool) -> list[dict[str, str]]:
    """Per placement the METRICS (median [min-max] over repeats), then the cpu/device ratio of each."""
    rows = []
    for placement in PLACEMENTS:
        row = {"placement": placement}
        row |= {key: spread([getattr(r, attr) for r in results[placement]], fmt) for key, _, fmt, attr in METRICS}
        row["same"] = "reference" if placement == "device" else ("yes" if ls_same else "NO")
        rows.append(row)
    ratio = {"placement": "cpu/device"}
    for key, _, _, attr in METRICS:
        value = spread([getattr(c, attr) / getattr(d, attr) if getattr(d, attr) else float("nan")
                        for d, c in zip(results["device"], results["cpu"])], "{:.2f}")
        ratio[key] = value if value == "-" else value + "x"
    ratio["same"] = "yes" if ls_same else "NO"
    return rows + [ratio]


def detail_row(placement: str, rs: list[RunResult]) -> dict[str, str]:
    methods = sorted({m for r in rs for m in r.per_method_ms})
    pooled = placement == "cpu"
    return {
        "placement": placement,
        "prefill": spread([r.be_prefill_s for r in rs], "{:.1f}"),
        "iters": spread([r.iterations for r in rs], "{:.0f}"),
        "idle": spread([r.idle_iterations for r in rs], "{:.0f}"),
        "swaps": spread([r.swap_outs for r in rs], "{:.0f}"),
        "preempt": spread([r.preemptions for r in rs], "{:.0f}"),
        "pool": spread([r.pool_ms_per_iter for r in rs], "{:.3f}"),
        "poolmean": spread([r.pool_ms_per_iter_mean for r in rs], "{:.3f}"),
        "swapout": spread([r.swap_out_s * 1e3 for r in rs], "{:.0f}") if pooled else "-",
        "side": spread([r.side_thread_ms_per_iter for r in rs], "{:.3f}") if pooled else "-",
        "busy": spread([r.worker_busy * 100 for r in rs], "{:.0f}") + "%" if pooled else "-",
        "methods": ", ".join(f"{m} {statistics.median(r.per_method_ms.get(m, 0.0) for r in rs):.0f}"
                             for m in methods) or "-",
        "integrity": "; ".join(sorted({r.integrity for r in rs})),
    }


def info_lines(args: argparse.Namespace, bench: Bench, interference: float, total_wall: float, ls_same: bool,
               be_same: float) -> list[str]:
    import torch

    return [
        f"command: `{command_line()}` (omniserve at commit {git_revision()})",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
        f"{platform.python_version()}; engine pinned to core {args.engine_core} with 1 torch thread, CPU attention "
        f"pool: 1 worker with 1 thread pinned to core {args.pool_core}; other processes used {interference:.0%} of "
        "the CPU during the timed runs",
        f"workload: SmolLM2-135M-Instruct fp32, {args.ls_requests} LS requests ({args.ls_prompt_len}-token prompts, "
        f"{args.output_len} greedy output tokens) and {args.be_requests} BE requests ({args.be_prompt_len}-token "
        f"prompts, {args.be_output_len} greedy output tokens), EOS ignored, prompts from {bench.source}; "
        + ("all queued at once, LS first" if args.ls_arrival == "start"
           else "LS queued once every BE request had its first token")
        + f"; max_num_batched_tokens {args.max_num_batched_tokens}, max_model_len {args.max_model_len}, "
        f"{bench.pages} KV pages of {BLOCK} tokens (enough for every request at once)",
        f"{args.repeats} timed run(s) per placement, interleaved, "
        + ("after a short warm-up run per placement" if args.warmup else "no warm-up")
        + f"; median [min-max]; the timed runs took {total_wall:.0f} s in all",
        f"greedy LS tokens identical across placements and repeats: {'yes' if ls_same else 'NO'}; BE requests with "
        f"identical greedy tokens in both placements: {be_same:.0%} (CPU and device attention differ in rounding)",
    ]


def main() -> None:
    args = parse_args()
    os.sched_setaffinity(0, {args.engine_core})  # before torch starts any thread; spawned workers inherit it
    import torch

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    bench = Bench(args)
    if args.warmup:
        bench.warm_up()
    results, total_wall, interference = bench.timed_runs()
    if interference > 0.05:
        print(f"warning: other processes used {interference:.0%} of the CPU during the runs", file=sys.stderr)
    bench.shutdown()
    ls_same, be_same = same_tokens(results)
    tables = [(COLUMNS, summary_rows(results, ls_same)),
              (DETAIL_COLUMNS, [detail_row(placement, results[placement]) for placement in PLACEMENTS])]
    info = info_lines(args, bench, interference, total_wall, ls_same, be_same)
    print_report(info, tables)
    write_markdown(args.markdown, "omniserve piggyback benchmark (CPU pool on its own core)", info, tables)
    if not ls_same:
        sys.exit("LS tokens differ between placements")


if __name__ == "__main__":
    main()
