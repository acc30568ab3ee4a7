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
(submit, poll, load, free, ...; wrapped on the instance) per iteration, as the median over iterations that sent
offloaded rows and the mean over all iterations with offloaded requests; the gathering of swapped-out KV
(`runner._swap_out`) in total; the CPU time of the engine's non-main threads per iteration (the queues' feeder
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
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    SHAREGPT_2978, cpu_model, git_revision, percentile, proc_cpu_seconds, shuffled_texts,
    side_thread_cpu_seconds, spread,
)

PLACEMENTS = ("device", "cpu")
POOL_METHODS = ("check_workers", "poll", "submit", "load", "free", "request_export", "take_exported")


# ------------------------------------------------------------------------------------------------------- helpers
def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def make_prompts(tokenizer, texts, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """One prompt of exactly `length` ids per entry of `lengths`, each from a different ShareGPT first human turn
    (repeated to length when short); random ids if the data set or the tokenizer is missing."""
    rng = random.Random(seed)
    if tokenizer is None or texts is None:
        print(f"note: {SHAREGPT_2978} or tokenizer missing, using random token ids", file=sys.stderr)
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
            raise SystemExit(f"{SHAREGPT_2978} has fewer than {len(lengths)} usable prompts")
    return prompts


def machine_busy_seconds() -> float:
    """CPU seconds used on this machine so far by everything (steal time included); Linux only."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------ instrumentation
class Probe:
    """Wraps one engine's `runner.execute` and the CPU pool's methods (on the instances) to time, per iteration,
    what the engine spends in the pool's methods, and to note iterations that ran nothing but an idle wait."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.pool_s = 0.0  # pool time in the current step
        self.submitted = False  # the current step sent offloaded rows to the pool
        self.per_method: dict[str, float] = {}
        self.swap_out_s = 0.0
        runner = engine.runner
        execute = runner.execute
        self.idle = False

        def timed_execute(plan):
            output = execute(plan)
            self.idle = plan.empty and not output.num_returned  # the engine's own test for its idle wait
            return output

        runner.execute = timed_execute
        pool = runner.cpu_pool
        if pool is not None:
            for name in POOL_METHODS:
                if hasattr(pool, name):
                    setattr(pool, name, self._timed(name, getattr(pool, name)))
        if hasattr(runner, "_swap_out"):  # device-side gather of the KV that leaves, plus `load`
            swap_out = runner._swap_out

            def timed_swap_out(transfers):
                start = time.perf_counter()
                try:
                    return swap_out(transfers)
                finally:
                    if transfers:
                        self.swap_out_s += time.perf_counter() - start

            runner._swap_out = timed_swap_out

    def _timed(self, name, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.pool_s += elapsed
                self.per_method[name] = self.per_method.get(name, 0.0) + elapsed
                self.submitted |= name == "submit"
        return wrapper

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


def run_once(llm, probe: Probe, ls_prompts, be_prompts, ls_out: int, be_out: int, ls_arrival: str, tag: str,
             timeout_s: float, stall_s: float) -> RunResult:
    from omniserve import SamplingParams

    engine = llm.engine
    ls_params = SamplingParams(temperature=0, max_tokens=ls_out, ignore_eos=True, service_class="ls")
    be_params = SamplingParams(temperature=0, max_tokens=be_out, ignore_eos=True, service_class="be")
    ls_ids = [f"{tag}-ls{i}" for i in range(len(ls_prompts))]
    be_ids = [f"{tag}-be{i}" for i in range(len(be_prompts))]
    stamps: dict[str, list[float]] = {rid: [] for rid in ls_ids + be_ids}
    tokens: dict[str, list[int]] = {}
    submitted: dict[str, float] = {}

    def submit(ids, prompts, params) -> None:
        now = time.perf_counter()
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, prompt, params)
            submitted[rid] = now

    scheduler = engine.scheduler
    preemptions0, swap_outs0 = scheduler.num_preemptions, scheduler.num_swap_outs
    side0, worker0 = side_thread_cpu_seconds(), probe.worker_cpu_seconds()
    probe.per_method.clear()
    probe.swap_out_s = 0.0
    iterations = idle_iterations = 0
    pool_per_iter: list[float] = []  # iterations with offloaded requests
    pool_per_submit_iter: list[float] = []  # ... of which those that sent rows

    start = time.perf_counter()
    if ls_arrival == "start":
        submit(ls_ids, ls_prompts, ls_params)
    submit(be_ids, be_prompts, be_params)
    last_progress = start
    while engine.has_unfinished_requests() or len(submitted) < len(stamps):
        if len(submitted) < len(stamps) and all(stamps[rid] for rid in be_ids):
            submit(ls_ids, ls_prompts, ls_params)  # --ls-arrival after-be-prefill
        offloaded = bool(scheduler.offloaded)
        probe.pool_s, probe.submitted = 0.0, False
        outputs = engine.step()
        now = time.perf_counter()
        iterations += 1
        idle_iterations += probe.idle
        if offloaded or scheduler.offloaded:
            pool_per_iter.append(probe.pool_s)
            if probe.submitted:
                pool_per_submit_iter.append(probe.pool_s)
        for out in outputs:
            if out.request_id not in stamps:
                continue
            completion = out.outputs[0]
            stamps[out.request_id].extend([now] * len(completion.delta_token_ids))
            if completion.delta_token_ids:
                last_progress = now
            if out.finished:
                tokens[out.request_id] = list(completion.token_ids)
                if completion.finish_reason != "length":
                    raise SystemExit(f"{tag}: request {out.request_id} ended with {completion.finish_reason!r}")
        if now - last_progress > stall_s or now - start > timeout_s:
            what = "no token for %.0f s" % (now - last_progress) if now - last_progress > stall_s else "timeout"
            raise SystemExit(
                f"{tag}: engine hang ({what}) after {iterations} iterations: {len(scheduler.waiting)} waiting, "
                f"{len(scheduler.running)} running, {len(scheduler.offloaded)} offloaded, "
                f"{engine.runner.num_offloaded_in_flight} offloaded tokens in flight, tokens so far "
                f"{ {rid: len(s) for rid, s in stamps.items()} }"
            )
    end = time.perf_counter()

    for rid in ls_ids + be_ids:
        want = ls_out if rid in ls_ids else be_out
        if len(tokens.get(rid, [])) != want or len(stamps[rid]) != want:
            raise SystemExit(f"{tag}: request {rid} returned {len(tokens.get(rid, []))} tokens "
                             f"({len(stamps[rid])} stamped), expected {want}")
    integrity = "ok"
    try:
        engine.check_integrity()
    except AssertionError as error:
        integrity = f"FAILED: {error}"
        print(f"warning: {tag}: engine integrity check failed: {error}", file=sys.stderr)

    be_prefilled = max(stamps[rid][0] for rid in be_ids)
    gaps, gaps_prefill, gaps_after = [], [], []
    for rid in ls_ids:
        for before, after in zip(stamps[rid], stamps[rid][1:]):
            gaps.append(after - before)
            (gaps_prefill if after <= be_prefilled else gaps_after).append(after - before)
    ls_start = min(submitted[rid] for rid in ls_ids)
    ls_end = max(stamps[rid][-1] for rid in ls_ids)
    be_end = max(stamps[rid][-1] for rid in be_ids)
    be_in_window = sum(ls_start <= t <= ls_end for rid in be_ids for t in stamps[rid])
    wall = end - start
    return RunResult(
        ls_ttft_ms=statistics.median(stamps[rid][0] - submitted[rid] for rid in ls_ids) * 1e3,
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
        wall_s=wall,
        ls_tokens=[tokens[rid][:] for rid in ls_ids],
        be_tokens=[tokens[rid][:] for rid in be_ids],
        iterations=iterations,
        idle_iterations=idle_iterations,
        swap_outs=scheduler.num_swap_outs - swap_outs0,
        preemptions=scheduler.num_preemptions - preemptions0,
        pool_ms_per_iter=median_or_nan(pool_per_submit_iter) * 1e3,
        pool_ms_per_iter_mean=(statistics.fmean(pool_per_iter) * 1e3) if pool_per_iter else float("nan"),
        offloaded_iterations=len(pool_per_iter),
        per_method_ms={k: v * 1e3 for k, v in probe.per_method.items()},
        swap_out_s=probe.swap_out_s,
        side_thread_ms_per_iter=(side_thread_cpu_seconds() - side0) * 1e3 / iterations,
        worker_busy=(probe.worker_cpu_seconds() - worker0) / wall,
        integrity=integrity,
    )


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
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
    args = parser.parse_args()
    if args.ls_requests < 1 or args.be_requests < 1 or args.output_len < 2 or args.be_output_len < 1:
        parser.error("need at least one LS and one BE request, and at least 2 LS output tokens (for a TPOT)")

    os.sched_setaffinity(0, {args.engine_core})  # before torch starts any thread; spawned workers inherit it
    import torch

    from omniserve import LLM
    from omniserve.cpu_attention import PoolConfig

    random.seed(args.seed)
    torch.manual_seed(args.seed)

    block = 16
    warm = dict(ls_prompt=32, ls_out=8, be_prompt=min(256, args.be_prompt_len), be_out=8, be=2)
    pages = sum(math.ceil((p + o + 1) / block) for p, o in
                [(args.ls_prompt_len, args.output_len)] * args.ls_requests
                + [(args.be_prompt_len, args.be_output_len)] * args.be_requests) + 64
    pool_config = PoolConfig(num_workers=1, threads_per_worker=1, worker_cores=((args.pool_core,),))
    llms, probes = {}, {}
    for placement in PLACEMENTS:
        llms[placement] = LLM(
            seed=args.seed, dtype="float32", device="cpu", threads=1, max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens, be_decode_placement=placement,
            num_gpu_blocks_override=pages, block_size=block, pool_config=pool_config,
        )
        probes[placement] = Probe(llms[placement].engine)
    llm0 = llms[PLACEMENTS[0]]
    vocab = llm0.engine.model_config.vocab_size
    texts = shuffled_texts(SHAREGPT_2978, args.seed)
    prompts = make_prompts(llm0.tokenizer, texts, [args.ls_prompt_len] * args.ls_requests
                           + [args.be_prompt_len] * args.be_requests, vocab, args.seed)
    ls_prompts, be_prompts = prompts[:args.ls_requests], prompts[args.ls_requests:]

    def run(placement: str, tag: str, ls, be, ls_out, be_out) -> RunResult:
        return run_once(llms[placement], probes[placement], ls, be, ls_out, be_out, args.ls_arrival, tag,
                        args.timeout, args.stall_timeout)

    if args.warmup:
        for placement in PLACEMENTS:
            start = time.perf_counter()
            run(placement, f"warmup-{placement}", [p[:warm["ls_prompt"]] for p in ls_prompts],
                [p[:warm["be_prompt"]] for p in be_prompts[:warm["be"]]], warm["ls_out"], warm["be_out"])
            print(f"warm-up {placement}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    results: dict[str, list[RunResult]] = {p: [] for p in PLACEMENTS}
    start_wall, start_busy, start_own = time.perf_counter(), machine_busy_seconds(), os.times()
    start_workers = sum(p.worker_cpu_seconds() for p in probes.values())
    for repeat in range(args.repeats):
        order = PLACEMENTS if repeat % 2 == 0 else PLACEMENTS[::-1]
        for placement in order:
            r = run(placement, f"r{repeat}-{placement}", ls_prompts, be_prompts, args.output_len, args.be_output_len)
            results[placement].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {placement}: wall {r.wall_s:.1f} s, LS TPOT p50 "
                  f"{r.ls_tpot_p50_ms:.1f} ms p99 {r.ls_tpot_p99_ms:.1f} ms, LS TTFT {r.ls_ttft_ms:.0f} ms, BE "
                  f"{r.be_tps:.1f} tok/s ({r.be_tps_ls_window:.1f} in the LS window), {r.iterations} iterations",
                  file=sys.stderr, flush=True)
    total_wall = time.perf_counter() - start_wall
    own = os.times()
    workers = sum(p.worker_cpu_seconds() for p in probes.values()) - start_workers
    own_cpu = own.user + own.system - start_own.user - start_own.system
    other = (machine_busy_seconds() - start_busy) - own_cpu - workers
    interference = max(0.0, other) / (total_wall * os.cpu_count())
    if interference > 0.05:
        print(f"warning: other processes used {interference:.0%} of the CPU during the runs", file=sys.stderr)
    for llm in llms.values():
        llm.engine.shutdown()

    # Correctness side effect: greedy LS tokens must not depend on where BE requests decode.
    device_runs, cpu_runs = results["device"], results["cpu"]
    ls_same = all(d.ls_tokens == c.ls_tokens for d in device_runs for c in cpu_runs)
    ls_same &= all(r.ls_tokens == device_runs[0].ls_tokens for r in device_runs + cpu_runs)
    be_same = statistics.fmean(sum(a == b for a, b in zip(d.be_tokens, c.be_tokens)) / len(d.be_tokens)
                               for d, c in zip(device_runs, cpu_runs))

    metrics = [  # key, column, format, attribute
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
    rows = []
    for placement in PLACEMENTS:
        row = {"placement": placement}
        row |= {key: spread([getattr(r, attr) for r in results[placement]], fmt) for key, _, fmt, attr in metrics}
        row["same"] = "reference" if placement == "device" else ("yes" if ls_same else "NO")
        rows.append(row)
    ratio = {"placement": "cpu/device"}
    for key, _, _, attr in metrics:
        value = spread([getattr(c, attr) / getattr(d, attr) if getattr(d, attr) else float("nan")
                        for d, c in zip(device_runs, cpu_runs)], "{:.2f}")
        ratio[key] = value if value == "-" else value + "x"
    ratio["same"] = "yes" if ls_same else "NO"
    rows.append(ratio)
    columns = {"placement": "BE decode placement"} | {key: col for key, col, _, _ in metrics}
    columns["same"] = "LS tokens identical"

    detail_rows = []
    for placement in PLACEMENTS:
        rs = results[placement]
        methods = sorted({m for r in rs for m in r.per_method_ms})
        detail_rows.append({
            "placement": placement,
            "prefill": spread([r.be_prefill_s for r in rs], "{:.1f}"),
            "iters": spread([r.iterations for r in rs], "{:.0f}"),
            "idle": spread([r.idle_iterations for r in rs], "{:.0f}"),
            "swaps": spread([r.swap_outs for r in rs], "{:.0f}"),
            "preempt": spread([r.preemptions for r in rs], "{:.0f}"),
            "pool": spread([r.pool_ms_per_iter for r in rs], "{:.3f}"),
            "poolmean": spread([r.pool_ms_per_iter_mean for r in rs], "{:.3f}"),
            "swapout": spread([r.swap_out_s * 1e3 for r in rs], "{:.0f}") if placement == "cpu" else "-",
            "side": spread([r.side_thread_ms_per_iter for r in rs], "{:.3f}") if placement == "cpu" else "-",
            "busy": spread([r.worker_busy * 100 for r in rs], "{:.0f}") + "%" if placement == "cpu" else "-",
            "methods": ", ".join(f"{m} {statistics.median(r.per_method_ms.get(m, 0.0) for r in rs):.0f}"
                                 for m in methods) or "-",
            "integrity": "; ".join(sorted({r.integrity for r in rs})),
        })
    detail_columns = {
        "placement": "BE decode placement", "prefill": "BE prefill phase s", "iters": "iterations",
        "idle": "idle-wait iterations", "swaps": "swap-outs", "preempt": "preemptions",
        "pool": "pool calls ms/iter sending rows (median)", "poolmean": "pool calls ms/iter offloaded (mean)",
        "swapout": "swap-out ms total", "side": "feeder threads CPU ms/iter", "busy": "pool core busy",
        "methods": "pool method totals ms", "integrity": "engine integrity after run",
    }

    command = shlex.join(["python", *sys.argv])
    cpu = cpu_model()
    source = "ShareGPT first turns" if texts is not None and llm0.tokenizer is not None else "random token ids"
    info = [
        f"command: `{command}` (omniserve at commit {git_revision()})",
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}; "
        f"engine pinned to core {args.engine_core} with 1 torch thread, CPU attention pool: 1 worker with 1 thread "
        f"pinned to core {args.pool_core}; other processes used {interference:.0%} of the CPU during the timed runs",
        f"workload: SmolLM2-135M-Instruct fp32, {args.ls_requests} LS requests ({args.ls_prompt_len}-token prompts, "
        f"{args.output_len} greedy output tokens) and {args.be_requests} BE requests ({args.be_prompt_len}-token "
        f"prompts, {args.be_output_len} greedy output tokens), EOS ignored, prompts from {source}; "
        + ("all queued at once, LS first" if args.ls_arrival == "start"
           else "LS queued once every BE request had its first token")
        + f"; max_num_batched_tokens {args.max_num_batched_tokens}, max_model_len {args.max_model_len}, "
        f"{pages} KV pages of {block} tokens (enough for every request at once)",
        f"{args.repeats} timed run(s) per placement, interleaved, "
        + ("after a short warm-up run per placement" if args.warmup else "no warm-up")
        + f"; median [min-max]; the timed runs took {total_wall:.0f} s in all",
        f"greedy LS tokens identical across placements and repeats: {'yes' if ls_same else 'NO'}; BE requests with "
        f"identical greedy tokens in both placements: {be_same:.0%} (CPU and device attention differ in rounding)",
    ]

    def table(cols: dict[str, str], body: list[dict[str, str]], sep: str, edge: str) -> list[str]:
        widths = {k: max(len(v), *(len(str(r[k])) for r in body)) for k, v in cols.items()}
        cells = [list(cols.values()), ["-" * widths[k] for k in cols]]
        cells += [[str(r[k]) for k in cols] for r in body]
        return [(edge + sep.join(c.ljust(widths[k]) for k, c in zip(cols, line)) + edge[::-1]).rstrip()
                for line in cells]

    print("\n" + "\n".join(info) + "\n\n" + "\n".join(table(columns, rows, "  ", ""))
          + "\n\n" + "\n".join(table(detail_columns, detail_rows, "  ", "")))
    if args.markdown:
        section = ["## omniserve piggyback benchmark (CPU pool on its own core)", ""] + [f"- {line}" for line in info]
        section += ["", *table(columns, rows, " | ", "| "), "", *table(detail_columns, detail_rows, " | ", "| ")]
        args.markdown.write_text("\n".join(section) + "\n")
        print(f"\nwrote {args.markdown}")
    if not ls_same:
        sys.exit("LS tokens differ between placements")


if __name__ == "__main__":
    main()
