"""A latency profile taken while every core is busy, then used on the idle machine: does the server still admit the
LS requests it can serve, and does it say at start that the profile is off?

1. `omniserve profile` of the built-in SmolLM2-135M-Instruct while --busy processes spin (one per core by default).
2. The machine idle: a lone 64-token prefill is timed (median of 5), and the busy profile's prediction for it.
3. An engine with the busy profile and a TTFT SLO of 2x the measured prefill (which the profile alone says it
   misses, when it is off by more than 2x); --requests lone LS requests, one after another: how many are admitted,
   and whether the start-up calibration warned.

    python benchmarks/bench_busy_profile.py --markdown busy_profile.md
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown

PROMPT_TOKENS = 64


def spin() -> None:
    while True:
        pass


def busy_profile(args: argparse.Namespace, path: Path) -> tuple[float, str]:
    """Profiles while --busy processes spin; (seconds, the command's output)."""
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for spinner in spinners:
        spinner.start()
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "omniserve", "profile", "--output", str(path), "--force",
                               *engine_flags(args)], capture_output=True, text=True, timeout=args.profile_timeout)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        output = f"(stopped after {args.profile_timeout:.0f} s)\n{exc.stdout or ''}{exc.stderr or ''}"
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()
    return time.monotonic() - started, output


def engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--max-model-len", str(args.max_model_len), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]


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


def admitted_with(path: Path, args: argparse.Namespace, ttft_slo: float) -> tuple[int, bool, float]:
    """(LS requests admitted, whether start-up warned about the profile, the scheduler's correction at start)."""
    from omniserve import LLM
    from omniserve.sampling.params import SamplingParams

    warnings = _Warnings()
    logging.getLogger("omniserve").addHandler(warnings)
    llm = LLM(profile_path=str(path), max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              ls_ttft_slo=ttft_slo, ls_tpot_slo=1.0)
    logging.getLogger("omniserve").removeHandler(warnings)
    correction = llm.engine.scheduler.correction.value
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    admitted = 0
    for i in range(args.requests):
        out = llm.generate([[3 + (i + j) % 500 for j in range(PROMPT_TOKENS)]], params, use_tqdm=False)[0]
        admitted += out.outputs[0].finish_reason != "rejected"
    llm.engine.shutdown()
    return admitted, any("not trustworthy" in m for m in warnings.messages), correction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes while profiling")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256,
                        help="the iteration's token budget (the profile's widest batch: a smaller one profiles faster)")
    parser.add_argument("--profile-timeout", type=float, default=1800.0)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    from omniserve import LLM
    from omniserve.engine.scheduler.latency_model import BatchShape, LatencyModel, prefill_interactions

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "busy.json"
        profile_s, output = busy_profile(args, path)
        if not path.is_file():
            sys.exit(f"the busy profile failed (which is the noise check refusing it):\n{output[-3000:]}")
        latency = LatencyModel.from_json(path.read_text())
        predicted = latency.iteration_time(BatchShape(PROMPT_TOKENS, prefill_interactions(0, PROMPT_TOKENS), 0, 0, 1))
        llm = LLM(max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens)
        measured = lone_prefill_seconds(llm)
        llm.engine.shutdown()
        del llm
        slo = 2 * measured
        admitted, warned, correction = admitted_with(path, args, slo)
    rows = [dict(figure="busy profile's lone prefill / measured idle", value=f"{predicted * 1e3:.1f} / "
                 f"{measured * 1e3:.1f} ms", ratio=f"{predicted / measured:.2f}", goal="(> 2: the SLO is missed "
                 "by the profile alone)"),
            dict(figure="start-up calibration: measured / predicted", value="", ratio=f"{correction:.2f}", goal=""),
            dict(figure="start-up warning about the profile", value=str(warned), ratio="",
                 goal="True when off > 2x"),
            dict(figure="LS requests admitted / sent (TTFT SLO 2x the idle prefill)",
                 value=f"{admitted}/{args.requests}", ratio=f"{admitted / args.requests:.2f}", goal="1.00")]
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}",
            f"the built-in model, {' '.join(engine_flags(args))}; profiled in {profile_s:.0f} s beside "
            f"{args.busy} spinning processes; TTFT SLO {slo * 1e3:.0f} ms; {args.requests} lone LS requests of "
            f"{PROMPT_TOKENS} prompt tokens"]
    tables = [(dict(figure="figure", value="value", ratio="ratio", goal="goal"), rows)]
    print_report(info, tables)
    write_markdown(args.markdown, "A profile taken on a busy machine, used on an idle one", info, tables)


if __name__ == "__main__":
    main()
