"""A server started while every core is busy, used once the machine is idle: does it still admit the LS requests
it can serve, and does it say at start that its profile is not to be trusted?

1. Idle: a lone 64-token prefill of the built-in SmolLM2-135M-Instruct is timed (median of 5).
2. Busy (--busy processes spin, one per core by default): an engine with a TTFT SLO of 2x that prefill starts, and
   profiles the model (no profile is cached: $OMNISERVE_CACHE_DIR is a fresh folder). Its profile's prediction for
   the prefill, and the warnings it logged, are kept.
3. Idle again, after --settle seconds (longer than the scheduler's 30 s, after which measurements count as old):
   --requests lone LS requests, one after another: how many are admitted. Twice: through the offline LLM, then
   through the server's engine thread (AsyncEngine), each after its own --settle seconds of idleness.

    python benchmarks/bench_busy_profile.py --markdown busy_profile.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown

PROMPT_TOKENS = 64


def spin() -> None:
    while True:
        pass


class Spinners:
    """--busy processes that keep the cores busy while the block runs."""

    def __init__(self, count: int) -> None:
        self.processes = [multiprocessing.Process(target=spin, daemon=True) for _ in range(count)]

    def __enter__(self) -> "Spinners":
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
            process.join()


def lone_prefill_seconds(llm, repeats: int = 5) -> float:
    from omniserve.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompt = [[3 + i for i in range(PROMPT_TOKENS)]]
    llm.generate(prompt, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def started_busy(args: argparse.Namespace, ttft_slo: float):
    """(the engine, started and profiled beside the spinners; the warnings it logged)."""
    from omniserve import LLM

    warnings = _Warnings()
    logging.getLogger("omniserve").addHandler(warnings)
    try:
        with Spinners(args.busy):
            llm = LLM(max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                      ls_ttft_slo=ttft_slo, ls_tpot_slo=1.0)
    finally:
        logging.getLogger("omniserve").removeHandler(warnings)
    return llm, warnings.messages


def _ls_prompt(i: int) -> list[int]:
    return [3 + (i + j) % 500 for j in range(PROMPT_TOKENS)]


def admitted(llm, count: int) -> int:
    """Of `count` lone LS requests through the offline LLM, one after another: how many were admitted."""
    from omniserve.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    served = 0
    for i in range(count):
        out = llm.generate([_ls_prompt(i)], params, use_tqdm=False)[0]
        served += out.outputs[0].finish_reason != "rejected"
    return served


def admitted_by_server(llm, count: int, settle_s: float) -> int:
    """As admitted, through the server's engine thread (AsyncEngine) after settle_s idle seconds on it. Shuts the
    engine down."""
    from omniserve.engine.async_engine import AsyncEngine
    from omniserve.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    served_engine = AsyncEngine(llm.engine)

    async def one_after_another() -> int:
        served = 0
        for i in range(count):
            final = None
            async for output in served_engine.generate(f"ls-{i}", _ls_prompt(i), params):
                final = output
            served += final.outputs[0].finish_reason != "rejected"
        return served

    try:
        time.sleep(settle_s)
        return asyncio.run(one_after_another())
    finally:
        served_engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes while profiling")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256,
                        help="the iteration's token budget (the profile's widest batch: a smaller one profiles faster)")
    parser.add_argument("--settle", type=float, default=35.0, help="idle seconds before the requests")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["OMNISERVE_CACHE_DIR"] = folder  # no cached profile: the busy start measures one
        from omniserve import LLM
        from omniserve.engine.scheduler.latency_model import BatchShape, prefill_interactions

        idle = LLM(max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens)
        measured = lone_prefill_seconds(idle)
        idle.engine.shutdown()
        del idle
        slo = 2 * measured
        started = time.monotonic()
        llm, warnings = started_busy(args, slo)
        start_s = time.monotonic() - started
        latency = llm.engine.latency_model
        predicted = latency.iteration_time(BatchShape(PROMPT_TOKENS, prefill_interactions(0, PROMPT_TOKENS), 0, 0, 1))
        correction = llm.engine.scheduler.correction.value
        time.sleep(args.settle)
        served = admitted(llm, args.requests)
        served_by_server = admitted_by_server(llm, args.requests, args.settle)
    best_attempt = any("serving with the best of" in m for m in warnings)
    calibration_warned = any("not trustworthy" in m for m in warnings)
    rows = [dict(figure="busy start's profile: lone prefill predicted / measured idle",
                 value=f"{predicted * 1e3:.1f} / {measured * 1e3:.1f} ms", ratio=f"{predicted / measured:.2f}",
                 goal="(> 2: the profile alone misses the SLO)"),
            dict(figure="profile kept although implausible (warned, not cached)", value=str(best_attempt), ratio="",
                 goal=""),
            dict(figure="start-up calibration (busy): measured / predicted", value=str(calibration_warned and
                 "warned" or "no warning"), ratio=f"{correction:.2f}", goal="a warning when off > 2x"),
            dict(figure="LS requests admitted / sent, idle, offline LLM (TTFT SLO 2x the idle prefill)",
                 value=f"{served}/{args.requests}", ratio=f"{served / args.requests:.2f}", goal="1.00"),
            dict(figure="LS requests admitted / sent, idle, server's engine thread (same SLO)",
                 value=f"{served_by_server}/{args.requests}", ratio=f"{served_by_server / args.requests:.2f}",
                 goal="1.00")]
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}",
            f"the built-in model, --max-model-len {args.max_model_len} --max-num-batched-tokens "
            f"{args.max_num_batched_tokens}; started (profiling included) in {start_s:.0f} s "
            f"beside {args.busy} spinning processes; then idle {args.settle:g} s before each series; "
            f"TTFT SLO {slo * 1e3:.0f} ms; "
            f"{args.requests} lone LS requests of {PROMPT_TOKENS} prompt tokens"]
    tables = [(dict(figure="figure", value="value", ratio="ratio", goal="goal"), rows)]
    print_report(info, tables)
    write_markdown(args.markdown, "A server started on a busy machine, serving on an idle one", info, tables)


if __name__ == "__main__":
    main()
