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
(what the SLO-aware scheduler does; omniserve.bench.slos.budgeted_prefill), the model scaled by measured / predicted
lone decode step. Every policy is told the same SLOs; fcfs and llumnix do not use them.

Workload (fixed seed, the same for every policy, open loop): LS requests arrive as a Poisson process of --ls-rate
per second over --duration seconds, prompts are ShareGPT first human turns (prompts_500.json) tokenized with the
engine's tokenizer and cut to at most --ls-max-prompt tokens, output lengths uniform in --ls-output; BE requests come
as a burst of --be-burst at t=0 plus a Poisson process of --be-rate per second, prompts of uniform length in
--be-prompt tokens made of ShareGPT text, --be-output-len output tokens. Greedy, EOS ignored. The script sleeps until
each arrival, adds the request, and calls engine.step() back to back while anything is unfinished; every token is
stamped when its step returns, and every step is timed (omniserve.bench.engine_run: one such run).

A run ends once the arrival window is over and every LS request has ended; BE requests still running then are
aborted. A run that reaches --duration + --drain seconds is cut: every request still open is aborted (an LS request
cut this way is a miss, counted as "LS cut").

Per policy:
- LS SLO attainment: share of LS requests that were not rejected, got their first token within the TTFT SLO (from the
  scheduled arrival, so a request that arrives while a long step runs pays for the wait) and finished with a mean
  TPOT ((last token - first token) / (tokens - 1)) within the TPOT SLO. Also TTFT-only and TPOT-only attainment
  (rejected requests are misses in both, cut ones in TPOT; a cut request's first token counts for TTFT), and the
  rejection count.
- LS TTFT p50/p99 (LS requests not rejected; a cut request without a first token counts with its wait so far, a lower
  bound) and mean-TPOT p50/p99 (LS requests with >= 2 tokens), as ratios to their SLO.
- BE output tokens/s over the arrival window [0, --duration] (the same window for every policy), and its ratio to
  fcfs in the same repeat; BE requests finished within the window.
- Scheduler counters over the timed run: preemptions, swap-outs, swap-ins, rejections (engine.scheduler.stats), and
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
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omniserve.bench.engine_run import Arrival, RunResult, drain, drive, params
from omniserve.bench.machine import wait_for_quiet
from omniserve.bench.metrics import Slo
from omniserve.bench.report import (
    command_line,
    cpu_model,
    git_revision,
    percentile,
    print_report,
    spread,
    write_markdown,
)
from omniserve.bench.smoke import SMOKE_MAX_MODEL_LEN, SMOKE_MAX_NUM_BATCHED_TOKENS
from omniserve.bench.slos import budgeted_ls_prefill, iteration_time, latency_chunk
from omniserve.bench.workload import SHAREGPT_500, gamma_arrivals, shuffled_texts
from omniserve.engine.scheduler.policy import POLICIES as ENGINE_POLICIES

# fcfs first (the baseline of the BE ratio), omniserve last, the others in the engine's order.
POLICIES = ("fcfs", *(p for p in ENGINE_POLICIES if p not in ("fcfs", "omniserve")), "omniserve")
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048


# ------------------------------------------------------------------------------------------------------ workload
def poisson_times(rng: random.Random, rate: float, duration: float) -> list[float]:
    """Poisson arrivals in [0, duration); none at rate 0."""
    return gamma_arrivals(rng, rate, duration) if rate > 0 else []


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
def build_engine(policy: str, args: argparse.Namespace, slo: Slo):
    from omniserve.cpu_attention import PoolConfig
    from omniserve.engine.args import EngineArgs
    from omniserve.engine.llm_engine import LLMEngine
    from omniserve.profiler import profiled_latency_model

    engine_args = EngineArgs(
        model=args.model, device="cpu", dtype="float32", threads=1, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=BLOCK_SIZE,
        num_gpu_blocks_override=args.kv_pages, policy=policy, ls_ttft_slo=slo.ttft, ls_tpot_slo=slo.tpot,
        profile_path=args.profile, seed=args.seed,
    )
    pool_config = PoolConfig(num_workers=1, threads_per_worker=1, worker_cores=((args.pool_core,),))
    return LLMEngine(engine_args, pool_config=pool_config, latency_model=profiled_latency_model)


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


# ---------------------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """What the SLOs are set from: a lone LS request timed on an engine, and the latency model's predictions."""

    build_s: float
    prompt_len: int
    context: int
    """Context of the measured decode steps (the middle of the lone request's output)."""
    decode_step: float
    lone_prefill: float
    """Measured seconds: a lone decode step, and the lone prompt's prefill (one chunk)."""
    predicted_decode: float
    predicted_prefill: float
    chunks: list[tuple[int, float]]
    """The budgeted prefill next to one LS decode: (tokens, scaled seconds) per chunk."""

    @property
    def scale(self) -> float:
        """This machine's present speed against the profile's: measured / predicted lone decode."""
        return self.decode_step / self.predicted_decode

    @property
    def budgeted(self) -> float:
        return sum(seconds for _, seconds in self.chunks)


def measure_lone_request(engine, prompt: list[int], out_len: int) -> tuple[float, float]:
    """(prefill s, decode step s) of a lone LS request, medians of two runs after a warm-up one; the first two
    decode steps after the prefill are left out."""
    prefill_s, decode_s = [], []
    for attempt in range(3):  # the first one warms up
        engine.add_request(f"calibrate{attempt}", prompt, params(out_len, "ls"))
        times = drain(engine)
        if attempt:
            prefill_s.append(sum(times[:-(out_len - 1)]))
            decode_s += times[-(out_len - 1):][2:]
    return statistics.median(prefill_s), statistics.median(decode_s)


def calibrate(args: argparse.Namespace, texts: list[str]):
    """SLOs from a lone LS request and the latency model. Returns (slo, explanation lines, tokenizer)."""
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
    lone_prefill, decode_step = measure_lone_request(engine, prompt, out_len)
    engine.shutdown()
    context = len(prompt) + out_len // 2
    predicted_decode = iteration_time(latency, [latency_chunk(1, context - 1, True)])
    tpot = args.tpot_factor * decode_step
    chunks = budgeted_ls_prefill(latency, len(prompt), context, decode_step / predicted_decode,
                                 args.max_num_batched_tokens, tpot)
    calibration = Calibration(build_s, len(prompt), context, decode_step, lone_prefill, predicted_decode,
                              iteration_time(latency, [latency_chunk(len(prompt), 0, True)]), chunks)
    slo = Slo(ttft=args.ttft_factor * calibration.budgeted, tpot=tpot)
    return slo, calibration_lines(args, calibration, latency, slo), tokenizer


def calibration_lines(args: argparse.Namespace, c: Calibration, latency, slo: Slo) -> list[str]:
    return [
        f"calibration (engine built in {c.build_s:.1f} s, latency model: "
        f"{latency.metadata.get('created', '?')}, {latency.metadata.get('measurements', '?')} measurements): "
        f"a lone LS decode step at context {c.context} takes {c.decode_step * 1e3:.1f} ms measured "
        f"(latency model: {c.predicted_decode * 1e3:.1f} ms = {c.predicted_decode / c.decode_step:.2f}x measured); "
        f"a lone {c.prompt_len}-token LS prefill takes {c.lone_prefill * 1e3:.0f} ms measured as one chunk (latency "
        f"model: {c.predicted_prefill * 1e3:.0f} ms = {c.predicted_prefill / c.lone_prefill:.2f}x measured); the "
        f"profile's own held-out median/p90 relative errors: " + ", ".join(
            f"{name} {a.get('median_rel_error', float('nan')):.2f}/{a.get('p90_rel_error', float('nan')):.2f}"
            for name, a in latency.accuracy.items()),
        f"TPOT SLO = {args.tpot_factor:g} x the measured lone decode step = {slo.tpot * 1e3:.1f} ms (the iteration "
        f"budget of the time-budgeted policies)",
        f"TTFT SLO = {args.ttft_factor:g} x {c.budgeted * 1e3:.0f} ms = {slo.ttft * 1e3:.0f} ms, where "
        f"{c.budgeted * 1e3:.0f} ms is the latency model's time (scaled by {c.scale:.2f}, measured/predicted lone "
        f"decode) to prefill the longest LS prompt ({c.prompt_len} tokens) next to one LS decode in {len(c.chunks)} "
        f"chunks that each fit the TPOT SLO ({c.chunks[0][0]} tokens first); that is "
        f"{slo.ttft / c.lone_prefill:.1f}x the measured lone one-chunk prefill",
    ]


# ---------------------------------------------------------------------------------------------------------- runs
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


def summary_row(policy: str, runs: list[RunResult], baseline: dict[int, float]) -> dict[str, str]:
    share = lambda attr: [getattr(r.ls, attr) / r.ls.total for r in runs if r.ls.total]  # noqa: E731
    counts = lambda values: spread(values, "{:.0f}")  # noqa: E731
    return {
        "policy": policy,
        "ls": counts([r.ls.total for r in runs]),
        "attain": spread(share("attained"), "{:.0%}"),
        "ttft_ok": spread(share("ttft_ok"), "{:.0%}"),
        "tpot_ok": spread(share("tpot_ok"), "{:.0%}"),
        "rejected": counts([r.ls.rejected for r in runs]),
        "cut": counts([r.ls.cut for r in runs]),
        "ttft50": spread([percentile(r.ls.ttft_ratios, 50) for r in runs]),
        "ttft99": spread([percentile(r.ls.ttft_ratios, 99) for r in runs]),
        "tpot50": spread([percentile(r.ls.tpot_ratios, 50) for r in runs]),
        "tpot99": spread([percentile(r.ls.tpot_ratios, 99) for r in runs]),
        "be_tps": spread([r.be_tps for r in runs], "{:.1f}"),
        "be_ratio": spread([r.be_tps / baseline[i] if baseline.get(i) else float("nan")
                            for i, r in enumerate(runs)]) + "x",
        "be_done": counts([r.be_finished for r in runs]) + f"/{runs[0].be_total}",
        "preempt": counts([r.counters.preemptions for r in runs]),
        "recomputed": counts([r.recomputed for r in runs]),
        "swaps": f"{counts([r.counters.swap_outs for r in runs])}/{counts([r.counters.swap_ins for r in runs])}",
    }


def detail_row(policy: str, runs: list[RunResult], slo: Slo) -> dict[str, str]:
    steps = [r.steps for r in runs]
    counts = lambda values: spread(values, "{:.0f}")  # noqa: E731
    return {
        "policy": policy,
        "steps": counts([s.steps for s in steps]),
        "ls_steps": counts([s.ls_steps for s in steps]),
        "over": counts([s.ls_steps_over for s in steps]),
        "over_share": spread([s.ls_steps_over / s.ls_steps if s.ls_steps else float("nan") for s in steps], "{:.0%}"),
        "worst": spread([s.worst_ls_step / slo.tpot for s in steps]),
        "mop50": spread([percentile(s.measured_over_predicted, 50) for s in steps]),
        "mop90": spread([percentile(s.measured_over_predicted, 90) for s in steps]),
        "lag": spread([percentile(r.add_lag, 99) * 1e3 for r in runs], "{:.0f}"),
        "rej": counts([r.counters.rejected for r in runs]),
        "wall": spread([r.wall_s for r in runs], "{:.1f}"),
        "pool": spread([r.pool_busy for r in runs], "{:.0%}"),
        "others": spread([r.others_engine_core for r in runs], "{:.0%}") + " / "
        + spread([r.others_pool_core for r in runs], "{:.0%}"),
        "integrity": "; ".join(sorted({r.integrity for r in runs})),
    }


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
def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works "
                        "(fcfs and omniserve, seconds of short requests, no wait for quiet)")
    args = parser.parse_args()
    args.max_model_len = MAX_MODEL_LEN
    if args.smoke:
        args.policies, args.duration, args.drain, args.quiet_wait = ["fcfs", "omniserve"], 4.0, 20.0, 0.0
        args.ls_rate, args.ls_max_prompt, args.ls_output, args.be_burst, args.be_prompt = 1.0, 32, (4, 8), 3, (32, 64)
        args.be_output_len, args.kv_pages = 8, 8  # BE work runs out of pages
        args.max_num_batched_tokens = SMOKE_MAX_NUM_BATCHED_TOKENS
        args.max_model_len = SMOKE_MAX_MODEL_LEN
    if args.ls_output[0] < 2 or args.ls_output[0] > args.ls_output[1] or args.be_prompt[0] > args.be_prompt[1]:
        parser.error("need 2 <= --ls-output MIN <= MAX and --be-prompt MIN <= MAX")
    if args.be_prompt[1] + args.be_output_len > args.max_model_len:
        parser.error(f"a BE request must fit max_model_len {args.max_model_len}")
    if math.ceil((args.be_prompt[1] + args.be_output_len) / BLOCK_SIZE) > args.kv_pages:
        parser.error("the longest BE request does not fit --kv-pages")
    return args


def set_up(args: argparse.Namespace) -> list[str]:
    """Pins this process, seeds, and returns the command and machine lines of the report."""
    os.sched_setaffinity(0, {args.engine_core})  # before torch starts any thread; spawned workers inherit it
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of model loading and profiling
    if args.trace is not None:
        args.trace.write_text("")
    import torch

    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return [
        f"command: `{command_line()}` (omniserve at commit {git_revision()})",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
        f"{platform.python_version()}; engine pinned to core {args.engine_core} with 1 torch thread, CPU attention "
        f"pool: 1 worker with 1 thread pinned to core {args.pool_core}",
    ]


def workload_line(args: argparse.Namespace, workload: list[Arrival]) -> str:
    ls = [a for a in workload if a.service_class == "ls"]
    be = [a for a in workload if a.service_class == "be"]
    be_pages = sum(math.ceil((len(a.prompt) + a.max_tokens) / BLOCK_SIZE) for a in be)
    return (
        f"workload (seed {args.seed}): {len(ls)} LS requests, Poisson {args.ls_rate:g}/s over {args.duration:g} s, "
        f"ShareGPT prompts of {min(len(a.prompt) for a in ls)}-{max(len(a.prompt) for a in ls)} tokens (median "
        f"{statistics.median(len(a.prompt) for a in ls):.0f}), {args.ls_output[0]}-{args.ls_output[1]} output tokens; "
        f"{len(be)} BE requests ({args.be_burst} at t=0"
        + (f", then Poisson {args.be_rate:g}/s" if args.be_rate else "")
        + f"), {args.be_prompt[0]}-{args.be_prompt[1]}-token prompts of ShareGPT text, {args.be_output_len} output "
        f"tokens; greedy, EOS ignored; SmolLM2-135M-Instruct fp32, max_model_len {args.max_model_len}, "
        f"max_num_batched_tokens {args.max_num_batched_tokens}, {args.kv_pages} device KV pages of {BLOCK_SIZE} tokens "
        f"(the BE requests alone need {be_pages}: {be_pages / args.kv_pages:.1f}x the cache); a run ends when every "
        f"LS request has ended after the window (BE aborted), or is cut at {args.duration + args.drain:g} s"
    )


def run_all(args: argparse.Namespace, workload: list[Arrival], slo: Slo) -> dict[str, list[RunResult]]:
    """--repeats runs of every policy, a fresh engine each; the order reversed every other repeat."""
    results: dict[str, list[RunResult]] = {p: [] for p in args.policies}
    for repeat in range(args.repeats):
        order = args.policies if repeat % 2 == 0 else args.policies[::-1]
        for policy in order:
            r = run_policy(policy, workload, args, slo)
            results[policy].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {policy}: LS attained {r.ls.attained}/{r.ls.total} "
                  f"(rejected {r.ls.rejected}, cut {r.ls.cut}), TTFT p99 {percentile(r.ls.ttft_ratios, 99):.2f}x "
                  f"SLO, TPOT p99 {percentile(r.ls.tpot_ratios, 99):.2f}x SLO, BE {r.be_tps:.1f} tok/s, "
                  f"{r.counters.preemptions} preemptions, {r.counters.swap_outs}/{r.counters.swap_ins} swap-outs/ins, "
                  f"{r.steps.ls_steps_over}/{r.steps.ls_steps} LS steps over budget, run {r.wall_s:.0f} s, "
                  f"{r.integrity}; waited {r.quiet_wait[0]:.0f} s for quiet, others then held the engine core "
                  f"{r.others_engine_core:.0%} and the pool core {r.others_pool_core:.0%} of the run",
                  file=sys.stderr, flush=True)
    return results


def report(args: argparse.Namespace, info: list[str], results: dict[str, list[RunResult]], slo: Slo) -> None:
    baseline = {i: r.be_tps for i, r in enumerate(results.get("fcfs", []))}
    tables = [(COLUMNS, [summary_row(p, runs, baseline) for p, runs in results.items()]),
              (DETAIL_COLUMNS, [detail_row(p, runs, slo) for p, runs in results.items()])]
    all_runs = [r for runs in results.values() for r in runs]
    compared, identical, differences = compare_ls_tokens(all_runs)
    interference = max(r.others_engine_core for r in all_runs)
    same = f"{identical}/{compared} identical" + ("" if identical == compared else " (MISMATCH)")
    info = [*info,
            f"{args.repeats} run(s) per policy, a fresh engine each with a short warm-up; "
            + ("median [min-max]; " if args.repeats > 1 else "")
            + f"before each run the script waited up to {args.quiet_wait:g} s for other processes to go quiet "
            f"(longest wait {max(r.quiet_wait[0] for r in all_runs):.0f} s); during the runs they held the engine's "
            f"core up to {interference:.0%} of the time",
            f"correctness: greedy tokens of LS requests that finished under several policies/repeats: {same}"]
    print_report(info[-2:], tables)
    if differences:
        print("\n".join(["", "LS token differences:", *differences[:20]]))
    if interference > 0.05:
        print(f"warning: other processes held the engine's core up to {interference:.0%} of a run's time",
              file=sys.stderr)
    extra = ["", "LS token differences:", "", *[f"- {d}" for d in differences[:20]]] if differences else []
    write_markdown(args.markdown, "omniserve scheduling policies on one LS + BE workload", info, tables, extra)


def main() -> None:
    args = parse_args()
    info = set_up(args)
    print("\n".join(info), flush=True)
    texts = shuffled_texts(SHAREGPT_500, args.seed)
    if texts is None:
        raise SystemExit(f"{SHAREGPT_500} is missing: this benchmark needs ShareGPT prompts")
    slo, slo_lines, tokenizer = calibrate(args, texts)
    print("\n".join(slo_lines), flush=True)
    workload = build_workload(tokenizer, texts, args)
    workload_text = workload_line(args, workload)
    print(workload_text, flush=True)
    results = run_all(args, workload, slo)
    report(args, [*info, *slo_lines, workload_text], results, slo)


if __name__ == "__main__":
    main()
