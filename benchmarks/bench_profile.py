"""Profiles the built-in SmolLM2-135M-Instruct (fp32) on this CPU, then checks the latency model's iteration-time
predictions against the runner.

Placement, as in bench_piggyback.py: "the device on one core, the CPU attention pool on another". This process (the
device) is pinned to --engine-core with one torch thread; the pool's one worker (one thread) to --pool-core.

1. Profiling: `profile_model` with max_num_tokens = --max-num-tokens; printed per latency model: the held-out median
   and p90 relative error (|predicted - measured| / measured, as ratios, on measurements left out of the fit), then
   the number of measurements and the profiling time.
2. Iteration-time accuracy, without the scheduler: a ModelRunner built as the engine builds it (PagePool, pages from a
   PageAllocator) executes --plans synthetic IterationPlans: decode rows of various contexts, prefill chunks of
   various sizes and starts (whole prompts and later chunks of long ones), and mixes of both, up to --max-num-tokens
   rows and --max-kv-tokens KV tokens per plan. KV pages hold random values (never-touched pages would read as the
   kernel's shared zero page, far faster than real KV). Each plan: a warm-up execute, then the median of --repeats.
   Prediction: `latency.iteration_time(batch_shape_of_chunks(plan.chunks))`. Printed per plan: measured and predicted
   ms and their ratio, and `padded`: decode rows x their longest context, the keys and values the CPU decode path
   really gathers (it pads every row to the longest); then the median and p90 relative error, overall, per kind of
   plan, and split by whether that gather exceeds 32 MiB (where the CPU path's time grows faster than linearly:
   fresh buffers of that size are page-faulted on every call) (goal: p90 < 0.10).

Fixed seeds throughout.

    python benchmarks/bench_profile.py --plans 40 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omniserve.bench.report import percentile
from omniserve.cpu_attention import PoolConfig
from omniserve.engine.runner import ModelRunner
from omniserve.engine.scheduler.latency_model import LatencyModel, batch_shape_of_chunks
from omniserve.engine.scheduler.plan import IterationPlan, ScheduledChunk
from omniserve.kv_cache import PageAllocator, PageTable
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.loader import load_model
from omniserve.profiler.profiler import accuracy_summary, profile_model, relative_errors
from omniserve.sampling.params import SamplingParams

PAGE_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)
KINDS = ("decode", "prefill", "later-chunk", "mixed")
LARGE_GATHER_BYTES = 32 << 20


# ------------------------------------------------------------------------------------------------------ workload
def synthesise_plans(count: int, rng: random.Random, max_rows: int, max_context: int, max_kv: int):
    """(kind, [(start, num_tokens, sample)]) per plan, cycling through KINDS."""
    plans = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        spans: list[tuple[int, int, bool]] = []
        if kind in ("decode", "mixed"):
            decodes = round(math.exp(rng.uniform(0, math.log(64))))
            longest = round(math.exp(rng.uniform(math.log(16), math.log(max_context))))
            spans += [(rng.randint(0, longest - 1), 1, True) for _ in range(decodes)]
        if kind in ("prefill", "mixed"):
            for _ in range(1 if kind == "mixed" else rng.randint(1, 3)):
                size = round(math.exp(rng.uniform(math.log(8), math.log(max_rows))))
                spans.append((0, size, True))
        if kind == "later-chunk" or (kind == "mixed" and rng.random() < 0.5):
            size = round(math.exp(rng.uniform(math.log(16), math.log(max_rows))))
            start = rng.randint(1, max(1, max_context - size))
            spans.append((start, size, rng.random() < 0.5))
        # Keep within the iteration's row budget and the KV pool, dropping the largest spans first.
        spans.sort(key=lambda s: s[1])
        while sum(n for _, n, _ in spans) > max_rows or sum(s + n for s, n, _ in spans) > max_kv:
            spans.pop()
        rng.shuffle(spans)
        plans.append((kind, spans))
    return plans


def build_plan(spans, page_table: PageTable, vocab: int, rng: random.Random, plan_index: int) -> IterationPlan:
    chunks = []
    for row, (start, count, sample) in enumerate(spans):
        request_id = f"plan{plan_index}-{row}"
        page_table.grow(request_id, start + count)
        chunks.append(ScheduledChunk(request_id, [rng.randrange(vocab) for _ in range(count)], start,
                                     page_table.pages(request_id), sample, GREEDY, 0))
    return IterationPlan(chunks=chunks)


def time_execute(runner: ModelRunner, plan: IterationPlan, repeats: int) -> float:
    runner.execute(plan)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(plan)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------- main
def print_profile(latency: LatencyModel) -> None:
    print(f"{'latency model':<20}{'median rel. error':>19}{'p90 rel. error':>16}{'points':>8}")
    for name, accuracy in latency.accuracy.items():
        print(f"{name:<20}{accuracy['median_rel_error']:>19.3f}{accuracy['p90_rel_error']:>16.3f}"
              f"{accuracy['points']:>8}")
    m = latency.metadata
    print(f"{m['measurements']} measurements in {m['profiling_seconds']} s; dense knots: {len(latency.dense.xs)}")
    print(f"head: {latency.head.intercept * 1e3:.2f} ms + {latency.head.slopes[0] * 1e3:.3f} ms per sampled row; "
          f"dense layer: {latency.dense_time(1) * 1e3:.2f} ms at 1 row, {latency.dense_time(2048) * 1e3:.1f} ms at "
          f"2048; decode attention: {latency.decode_attention.intercept * 1e6:.0f} us + "
          f"{latency.decode_attention.slopes[0] * 1e9:.1f} ns/context token + "
          f"{latency.decode_attention.slopes[1] * 1e6:.1f} us/request per layer; prefill attention "
          f"{latency.prefill_attention.slopes[0] * 1e9:.1f} ns/interaction per layer; CPU pool round trip "
          f"{latency.cpu_attention.intercept * 1e6:.0f} us + {latency.cpu_attention.slopes[0] * 1e9:.1f} ns/context "
          f"token + {latency.cpu_attention.slopes[1] * 1e6:.1f} us/row")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-num-tokens", type=int, default=2048, help="rows per iteration (profiled range)")
    parser.add_argument("--max-context", type=int, default=4096, help="longest context profiled and planned")
    parser.add_argument("--max-kv-tokens", type=int, default=32768, help="KV tokens of one synthetic plan")
    parser.add_argument("--plans", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-core", type=int, default=0)
    parser.add_argument("--pool-core", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=Path, default=None, help="also write the profile here")
    parser.add_argument("--quiet", action="store_true", help="no per-plan lines")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:  # one plan of each kind
        args.max_num_tokens, args.max_context, args.max_kv_tokens, args.plans, args.repeats = 32, 128, 1024, 4, 1
    return args


def build_runner(config, model, device: torch.device, dtype: torch.dtype, max_kv_tokens: int
                 ) -> tuple[ModelRunner, PageTable, PageAllocator]:
    """The runner, built as the engine builds it, over a KV pool that holds one plan. Its pages hold random values:
    never-touched pages would read as the kernel's shared zero page, far faster than real KV."""
    num_pages = max_kv_tokens // PAGE_SIZE + 64 * 2
    pool = PagePool(config, num_pages, PAGE_SIZE, device, dtype)
    for tensor in pool.k + pool.v:
        tensor.normal_()
    allocator = PageAllocator(num_pages)
    return ModelRunner(model, pool, device), PageTable(allocator, PAGE_SIZE), allocator


@dataclass
class Accuracy:
    """Measured and predicted seconds of every plan, and the relative errors by kind of plan and by the size of
    the decode gather."""

    measured: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    by_gather: dict[str, list[float]] = field(default_factory=lambda: {"gather <= 32 MiB": [], "gather > 32 MiB": []})


def time_plans(args: argparse.Namespace, latency: LatencyModel, runner: ModelRunner, page_table: PageTable, config,
               dtype: torch.dtype, rng: random.Random, max_context: int) -> Accuracy:
    """Executes each synthetic plan and sets its time against the latency model's (printed per plan unless
    --quiet)."""
    if not args.quiet:
        print(f"{'kind':<12}{'rows':>6}{'decodes':>8}{'decode ctx':>11}{'padded':>8}{'prefill inter.':>15}"
              f"{'measured ms':>13}{'predicted ms':>14}{'pred/meas':>11}")
    accuracy = Accuracy()
    bytes_per_token = 2 * config.kv_size * torch.empty((), dtype=dtype).element_size()
    for index, (kind, spans) in enumerate(synthesise_plans(args.plans, rng, args.max_num_tokens, max_context,
                                                           args.max_kv_tokens)):
        plan = build_plan(spans, page_table, config.vocab_size, rng, index)
        shape = batch_shape_of_chunks(plan.chunks)
        measured = time_execute(runner, plan, args.repeats)
        predicted = latency.iteration_time(shape)
        # The CPU decode path gathers every decode row's keys up to the longest context: what it really reads.
        decode_contexts = [c.start_position + 1 for c in plan.chunks if len(c.token_ids) == 1]
        padded = len(decode_contexts) * max(decode_contexts, default=0)
        for chunk in plan.chunks:
            page_table.release(chunk.request_id)
        accuracy.measured.append(measured)
        accuracy.predicted.append(predicted)
        accuracy.by_kind[kind] += relative_errors([predicted], [measured])
        large = padded * bytes_per_token > LARGE_GATHER_BYTES
        accuracy.by_gather["gather > 32 MiB" if large else "gather <= 32 MiB"] += relative_errors([predicted],
                                                                                                  [measured])
        if not args.quiet:
            print(f"{kind:<12}{shape.num_rows:>6}{shape.num_decodes:>8}{shape.decode_context:>11}{padded:>8}"
                  f"{shape.prefill_interactions:>15}{measured * 1e3:>13.2f}{predicted * 1e3:>14.2f}"
                  f"{predicted / measured:>11.3f}")
    return accuracy


def print_accuracy(accuracy: Accuracy) -> None:
    print(f"\n{'plans':<18}{'median rel. error':>19}{'p90 rel. error':>16}{'plans':>7}")
    for kind, errors in (accuracy.by_kind | accuracy.by_gather).items():
        if errors:
            print(f"{kind:<18}{statistics.median(errors):>19.3f}{percentile(errors, 90):>16.3f}{len(errors):>7}")
    overall = accuracy_summary(accuracy.predicted, accuracy.measured)
    errors = relative_errors(accuracy.predicted, accuracy.measured)
    print(f"{'all':<18}{overall['median_rel_error']:>19.3f}{percentile(errors, 90):>16.3f}{len(errors):>7}")
    ratios = [p / m for p, m in zip(accuracy.predicted, accuracy.measured)]
    print(f"predicted/measured: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; "
          f"goal p90 relative error < 0.10: {'met' if percentile(errors, 90) < 0.10 else 'MISSED'}")


def main() -> None:
    args = parse_args()
    os.sched_setaffinity(0, {args.engine_core})
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device, dtype = torch.device("cpu"), torch.float32
    loaded = load_model(None, device, dtype, None, "auto", args.seed)
    model, config = loaded.model, loaded.config
    max_context = min(args.max_context, config.max_context)

    print(f"# profiling {loaded.path.name} ({dtype}), device: core {args.engine_core}, 1 thread; "
          f"CPU attention pool: 1 worker on core {args.pool_core}")
    pool_config = PoolConfig(1, 1, worker_cores=((args.pool_core,),))
    latency = profile_model(model, device, dtype, max_num_tokens=args.max_num_tokens, max_context=max_context,
                            page_size=PAGE_SIZE, pool_config=pool_config, progress=sys.stderr.isatty())
    print_profile(latency)
    if args.profile:
        args.profile.write_text(latency.to_json())

    runner, page_table, allocator = build_runner(config, model, device, dtype, args.max_kv_tokens)
    print(f"\n# iteration time: runner.execute vs latency_model.iteration_time, {args.plans} plans, "
          f"median of {args.repeats} after a warm-up")
    accuracy = time_plans(args, latency, runner, page_table, config, dtype, rng, max_context)
    allocator.check_integrity()
    print_accuracy(accuracy)


if __name__ == "__main__":
    main()
