"""The Batch API beside live traffic: one batch of short best-effort lines against the same lines sent as best-effort
HTTP requests, each next to the same steady latency-sensitive (LS) stream, on one `omniserve serve` (the built-in
SmolLM2-135M-Instruct, fp32 on the CPU; its own process, started once with the same settings for every phase).

Workload (fixed seed, the same requests in every phase):
- LS: ShareGPT prompts cut to --ls-max-input-len tokens, --ls-output-len output tokens, Poisson at --ls-rate for
  --duration seconds; SLOs from the server's latency profile as `omniserve bench --compare` sets them (TPOT = 3 x a
  lone decode step, TTFT = 3 x the budgeted prefill of the longest LS prompt) unless --ttft-slo/--tpot-slo are given.
- BE: --lines lines of ShareGPT prompts cut to --be-max-input-len tokens and --be-output-len output tokens; greedy,
  EOS ignored, so each line's answer is fixed.

Phases, in this order within a repeat ((b) and (c) swap on odd repeats), each after the machine goes quiet:
  (a) the LS stream alone: the LS SLO attainment to keep;
  (b) the LS stream + every BE line as its own streaming HTTP request (service_tier flex), all sent at the start:
      the natural HTTP baseline for "a batch of N requests" with no Batch API, which hands the scheduler the whole
      backlog at once (a client-side concurrency cap would hold part of it back);
  (c) the LS stream + the same lines as one batch (POST /v1/files, POST /v1/batches when the phase starts, polled
      every 0.25 s until it ends: omniserve.bench.batch, what `omniserve bench --be-batch` runs).
BE lines/s = lines answered / time from the start to the last answer (HTTP) or to the poll that found the batch ended.
LS figures are over every LS request of the window, and again over those that arrived while BE work ran (the window
may outlast the BE work). Where the time goes: CPU seconds of the server's event loop (its main thread), of its other
threads (the engine), of its CPU attention workers, of this process (the load generator), of other processes; and
the server's running/waiting/offloaded request gauges, sampled every second.

Goals: batch lines/s >= 0.95 x the HTTP BE lines/s; LS attainment with the batch within 1 point of LS alone; every
greedy line's batch text equal to its HTTP answer.

    python benchmarks/bench_batch.py --markdown batch.md
    python benchmarks/bench_batch.py --quick          # 200 lines, a 30 s LS window: a few minutes
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from omniserve.bench import batch, metrics, slos
from omniserve.bench.client import Stream, Target, run_streams
from omniserve.bench.compare import Server
from omniserve.bench.machine import machine_busy_seconds, own_cpu_seconds, proc_cpu_seconds, wait_for_quiet
from omniserve.bench.metrics import Record, Slo
from omniserve.bench.report import command_line, cpu_model, git_revision, print_report, spread, write_markdown
from omniserve.bench.smoke import SMOKE_ENGINE_FLAGS
from omniserve.bench.workload import PromptMaker, Request, StreamSpec, build_stream

SERVER_ARGS = ("--threads 1 --max-model-len 2048 --max-num-batched-tokens 512 --cpu-attention-workers 1 "
               "--cpu-attention-threads 1")
SMOKE_SERVER_ARGS = f"--threads 1 {SMOKE_ENGINE_FLAGS} --cpu-attention-workers 1 --cpu-attention-threads 1"
MODEL = "smollm2"
GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
          "omniserve:num_requests_offloaded": "offloaded"}


# ------------------------------------------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    ls: list[Request]
    be: list[Request]  # arrival 0: all at the start (HTTP), or one batch


def build_workload(args: argparse.Namespace, tokenizer) -> Workload:
    """The LS stream and the BE lines, from the seed alone (omniserve bench's workload module)."""
    rng = random.Random(f"{args.seed}-ls")
    ls_spec = StreamSpec(rate=args.ls_rate, dataset="sharegpt", output_len=args.ls_output_len,
                         max_input_len=args.ls_max_input_len)
    ls = build_stream(ls_spec, args.duration, PromptMaker(tokenizer, rng), rng)
    rng = random.Random(f"{args.seed}-be")
    be_spec = StreamSpec(concurrency=1, dataset="sharegpt", output_len=args.be_output_len,
                         max_input_len=args.be_max_input_len)
    be = build_stream(be_spec, args.duration, PromptMaker(tokenizer, rng), rng, max_requests=args.lines)
    return Workload(ls, [replace(r, arrival=0.0) for r in be])


# ------------------------------------------------------------------------------------------------- measurement
def descendants(pid: int) -> list[int]:
    """The process's children, their children, ... (the server's CPU attention workers), from /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


class CpuUse:
    """CPU seconds from its creation to `done()`: the server's main thread (its event loop), its other threads (the
    engine, uploads, SQLite writes), its child processes (the CPU attention workers), this process (the load
    generator) and everything else on the machine."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.start = self.sample()

    def sample(self) -> dict[str, float]:
        loop, server = proc_cpu_seconds(self.pid, self.pid), proc_cpu_seconds(self.pid)
        workers = sum(proc_cpu_seconds(p) for p in descendants(self.pid))
        return {"wall": time.perf_counter(), "loop": loop, "engine": server - loop, "workers": workers,
                "client": own_cpu_seconds(), "machine": machine_busy_seconds()}

    @staticmethod
    def others(before: dict[str, float], after: dict[str, float]) -> float:
        """CPU seconds of other processes between two samples."""
        ours = sum(after[k] - before[k] for k in ("loop", "engine", "workers", "client"))
        return max(0.0, after["machine"] - before["machine"] - ours)

    def done(self) -> dict[str, float]:
        end = self.sample()
        use = {k: end[k] - self.start[k] for k in ("wall", "loop", "engine", "workers", "client")}
        use["others"] = self.others(self.start, end)
        return use


async def sample(url: str, cpu: CpuUse, every_s: float, samples: dict[str, list[float]]) -> None:
    """Appends to `samples`, every `every_s` seconds until cancelled: the time since the start, the server's request
    gauges, and the cores other processes took since the previous sample."""
    start, previous = time.perf_counter(), cpu.sample()
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            await asyncio.sleep(every_s)
            try:
                text = (await client.get(url + "/metrics")).text
            except httpx.HTTPError:
                continue
            values = {name: 0.0 for name in GAUGES.values()}
            for family in text_string_to_metric_families(text):
                for gauge in family.samples:
                    if gauge.name in GAUGES:
                        values[GAUGES[gauge.name]] += gauge.value
            now = cpu.sample()
            values["others"] = cpu.others(previous, now) / max(now["wall"] - previous["wall"], 1e-9)
            values["t"], previous = time.perf_counter() - start, now
            for name, value in values.items():
                samples.setdefault(name, []).append(value)


@dataclass
class Phase:
    """One phase's measurements."""

    name: str
    ls: list[Record]
    run_seconds: float
    be: dict | None = None  # lines, completed, failed, wall_seconds, lines_per_second, output_throughput
    texts: dict[str, str | None] = field(default_factory=dict)  # custom_id -> answer
    cpu: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, list[float]] = field(default_factory=dict)


def http_be_summary(records: list[Record]) -> dict:
    """The BE lines sent over HTTP, in the batch summary's terms: the wall time ends with the last answer."""
    ok = [r for r in records if r.status == "ok"]
    wall = max((r.end for r in records if r.end is not None), default=None)
    tokens = sum(r.output_tokens for r in ok)
    return {"lines": len(records), "completed": len(ok), "failed": len(records) - len(ok), "wall_seconds": wall,
            "lines_per_second": len(ok) / wall if wall else 0.0, "output_tokens": tokens,
            "output_throughput": tokens / wall if wall else 0.0}


# ------------------------------------------------------------------------------------------------------ phases
async def _measured(url: str, cpu: CpuUse, work, phase: Phase) -> Phase:
    gauges: dict[str, list[float]] = {}
    sampler = asyncio.ensure_future(sample(url, cpu, 1.0, gauges))
    try:
        await work(phase)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    phase.gauges = gauges
    return phase


def run_phase(name: str, server: Server, args: argparse.Namespace, work) -> Phase:
    """One phase on a quiet machine, with its CPU use and gauges."""
    server_cpu = lambda: proc_cpu_seconds(server.process.pid) + sum(  # noqa: E731
        proc_cpu_seconds(p) for p in descendants(server.process.pid))
    waited, load = wait_for_quiet(args.quiet_wait, ours=server_cpu)
    if load >= 0.1:
        print(f"note: other processes still use {load:.2f} cores after {waited:.0f} s", file=sys.stderr)
    cpu = CpuUse(server.process.pid)
    phase = asyncio.run(_measured(server.url, cpu, work, Phase(name, [], 0.0)))
    phase.cpu = cpu.done()
    return phase


def phases(server: Server, args: argparse.Namespace, load: Workload, order: tuple[str, ...]) -> dict[str, Phase]:
    """The three phases of one repeat, (a) first, then (b) and (c) in `order`."""
    ls = Stream("ls", Target(server.url, MODEL), load.ls)
    be_target = Target(server.url, MODEL, service_tier="flex")
    timeout = args.be_timeout

    async def alone(phase: Phase) -> None:
        phase.ls, phase.run_seconds = await run_streams([ls], args.duration, timeout, 300.0)

    async def http(phase: Phase) -> None:
        (phase.ls, seconds), (be, be_seconds) = await asyncio.gather(
            run_streams([ls], args.duration, timeout, 300.0),
            run_streams([Stream("be", be_target, load.be)], 0.0, timeout, timeout, keep_text=True))
        phase.run_seconds, phase.be = max(seconds, be_seconds), http_be_summary(be)
        phase.texts = {batch.custom_id(n): r.text if r.status == "ok" else None for n, r in enumerate(be)}

    async def one_batch(phase: Phase) -> None:
        job = batch.BatchJob(be_target, load.be)
        phase.ls, phase.run_seconds, outcome = await batch.run_beside([ls], job, args.duration, timeout, 300.0)
        phase.be = outcome.summary()
        phase.texts = {cid: line.text if line.status == "completed" else None for cid, line in outcome.lines.items()}

    work = {"ls alone": alone, "ls + http be": http, "ls + batch": one_batch}
    out = {}
    for name in ("ls alone", *order):
        out[name] = run_phase(name, server, args, work[name])
        print(progress_line(out[name], args), file=sys.stderr, flush=True)
    return out


def progress_line(phase: Phase, args: argparse.Namespace) -> str:
    ls = metrics.summarize(phase.ls, args.duration, phase.run_seconds, {"ls": args.slo})["ls"]
    text = f"{phase.name}: {phase.run_seconds:.0f} s, LS attainment {ls['slo_attainment']:.1%} of {ls['requests']}"
    if phase.be:
        text += (f"; BE {phase.be['completed']}/{phase.be['lines']} lines in {phase.be['wall_seconds'] or 0:.1f} s "
                 f"= {phase.be['lines_per_second']:.2f} lines/s")
    return text


# ----------------------------------------------------------------------------------------------------- figures
def ls_figures(phase: Phase, args: argparse.Namespace) -> dict[str, float | None]:
    """LS attainment over the window and over the arrivals while BE work ran, p99s, rejections."""
    summary = metrics.summarize(phase.ls, args.duration, phase.run_seconds, {"ls": args.slo})["ls"]
    be_end = phase.be["wall_seconds"] if phase.be else None
    during = [r for r in phase.ls if be_end is None or r.arrival < be_end]
    met = sum(args.slo.met(r) for r in during)
    return {"n": summary["requests"], "att": summary["slo_attainment"],
            "att_be": met / len(during) if during else None, "n_be": len(during),
            "ttft99": (summary["ttft"]["p99"] or 0) * 1e3, "tpot99": (summary["tpot"]["p99"] or 0) * 1e3,
            "rejected": summary["rejected"]}


def phase_figures(phase: Phase, args: argparse.Namespace) -> dict[str, float | None]:
    figures = ls_figures(phase, args)
    be = phase.be or {}
    figures.update(done=be.get("completed"), wall=be.get("wall_seconds"), lps=be.get("lines_per_second"),
                   tps=be.get("output_throughput"))
    cpu = phase.cpu
    figures.update({f"cpu_{k}": v for k, v in cpu.items() if k != "wall"})
    figures["seconds"] = cpu["wall"]
    for name in GAUGES.values():
        values = phase.gauges.get(name) or []
        figures[name] = statistics.fmean(values) if values else None
    figures.update(miss_figures(phase, args))
    return figures


def miss_figures(phase: Phase, args: argparse.Namespace) -> dict[str, float | None]:
    """The LS requests that missed their SLOs, by cause, and the cores other processes took while they ran (the
    samples of the seconds from a request's arrival to its end) against the phase's mean."""
    slo, times, others = args.slo, phase.gauges.get("t", []), phase.gauges.get("others", [])
    missed = [r for r in phase.ls if not slo.met(r)]

    def cause(r: Record) -> str:
        if r.status != "ok":
            return r.status
        return "ttft" if slo.ttft is not None and r.ttft > slo.ttft else "tpot"

    causes = collections.Counter(map(cause, missed))
    during = [v for r in missed for t, v in zip(times, others)
              if r.arrival <= t <= (r.end if r.end is not None else r.arrival) + 1.0]
    return {"missed": len(missed), "m_rejected": causes["rejected"], "m_ttft": causes["ttft"],
            "m_tpot": causes["tpot"], "m_failed": causes["failed"] + causes["cancelled"],
            "others_mean": statistics.fmean(others) if others else None,
            "others_missed": statistics.fmean(during) if during else None}


def same_texts(repeats: list[dict[str, Phase]]) -> tuple[int, int, str]:
    """Lines answered both ways with the same text, lines answered both ways, the first that differs (per repeat)."""
    equal = compared = 0
    first = ""
    for phases_of_repeat in repeats:
        http, one = phases_of_repeat["ls + http be"].texts, phases_of_repeat["ls + batch"].texts
        for cid, text in one.items():
            if text is None or http.get(cid) is None:
                continue
            compared += 1
            equal += text == http[cid]
            if text != http[cid] and not first:
                first = f"{cid}: batch {text[:60]!r} vs HTTP {http[cid][:60]!r}"
    return equal, compared, first


PHASE_COLUMNS = {"phase": "phase", "n": "LS requests", "att": "LS SLO attainment",
                 "att_be": "LS attainment while BE ran", "ttft99": "LS TTFT p99 ms", "tpot99": "LS TPOT p99 ms",
                 "rejected": "LS rejected", "done": "BE lines done", "wall": "BE wall s", "lps": "BE lines/s",
                 "tps": "BE output tok/s"}
CPU_COLUMNS = {"phase": "phase", "seconds": "phase s", "cpu_loop": "server event loop CPU s",
               "cpu_engine": "server other threads CPU s", "cpu_workers": "CPU attention worker CPU s",
               "cpu_client": "load generator CPU s", "cpu_others": "other processes CPU s",
               "running": "running (mean)", "waiting": "waiting (mean)", "offloaded": "offloaded (mean)"}
MISS_COLUMNS = {"phase": "phase", "missed": "LS misses", "m_rejected": "rejected", "m_ttft": "over TTFT",
                "m_tpot": "over TPOT", "m_failed": "failed", "others_mean": "other processes, cores (phase mean)",
                "others_missed": "other processes, cores (while missed requests ran)"}
FORMATS = {"att": "{:.1%}", "att_be": "{:.1%}", "ttft99": "{:.0f}", "tpot99": "{:.0f}", "rejected": "{:.0f}",
           "n": "{:.0f}", "done": "{:.0f}", "wall": "{:.1f}", "lps": "{:.2f}", "tps": "{:.1f}", "seconds": "{:.0f}",
           "missed": "{:.0f}", "m_rejected": "{:.0f}", "m_ttft": "{:.0f}", "m_tpot": "{:.0f}", "m_failed": "{:.0f}",
           "others_mean": "{:.2f}", "others_missed": "{:.2f}"}


def rows(figures: dict[str, list[dict]], columns: dict[str, str]) -> list[dict]:
    out = []
    for name, per_repeat in figures.items():
        row = {"phase": name}
        for key in columns:
            if key != "phase":
                row[key] = spread([f[key] for f in per_repeat], FORMATS.get(key, "{:.1f}"))
        out.append(row)
    return out


def repeat_rows(figures: dict[str, list[dict]]) -> list[dict]:
    """Each repeat's phases on their own: what other processes took beside each (it varies on a shared machine)."""
    out = []
    for repeat in range(len(next(iter(figures.values())))):
        for name, per_repeat in figures.items():
            f = per_repeat[repeat]
            out.append({"repeat": repeat + 1, "phase": name, "att": FORMATS["att"].format(f["att"]),
                        "lps": spread([f["lps"]]), "others": spread([f["others_mean"]])})
    return out


REPEAT_COLUMNS = {"repeat": "repeat", "phase": "phase", "att": "LS SLO attainment", "lps": "BE lines/s",
                  "others": "other processes, cores"}


def ratio_rows(figures: dict[str, list[dict]], texts: tuple[int, int, str]) -> list[dict]:
    """The goals, from per-repeat pairs (a repeat's phases share the machine's conditions)."""
    alone, http, one = figures["ls alone"], figures["ls + http be"], figures["ls + batch"]
    lps = [b["lps"] / h["lps"] for b, h in zip(one, http) if h["lps"]]
    gap_batch = [(b["att"] - a["att"]) * 100 for b, a in zip(one, alone)]
    gap_http = [(h["att"] - a["att"]) * 100 for h, a in zip(http, alone)]
    gap_during = [((b["att_be"] or 0) - a["att"]) * 100 for b, a in zip(one, alone)]
    equal, compared, _ = texts

    def verdict(values: list[float], ok) -> str:
        return "-" if not values else ("met" if ok(statistics.median(values)) else "missed")

    return [
        {"figure": "batch lines/s / HTTP BE lines/s", "value": spread(lps) + "x", "goal": ">= 0.95x",
         "verdict": verdict(lps, lambda v: v >= 0.95)},
        {"figure": "LS attainment, batch - LS alone", "value": spread(gap_batch, "{:+.1f}") + " pt",
         "goal": ">= -1 pt", "verdict": verdict(gap_batch, lambda v: v >= -1.0)},
        {"figure": "... over LS arrivals while the batch ran", "value": spread(gap_during, "{:+.1f}") + " pt",
         "goal": ">= -1 pt", "verdict": verdict(gap_during, lambda v: v >= -1.0)},
        {"figure": "LS attainment, HTTP BE - LS alone", "value": spread(gap_http, "{:+.1f}") + " pt",
         "goal": "(reference)", "verdict": "-"},
        {"figure": "greedy lines: batch text = HTTP text", "value": f"{equal} of {compared}", "goal": "all",
         "verdict": "met" if compared and equal == compared else "missed"},
    ]


RATIO_COLUMNS = {"figure": "figure", "value": "value (median [min-max])", "goal": "goal", "verdict": "verdict"}


# -------------------------------------------------------------------------------------------------------- main
def warm_up(server: Server, load: Workload) -> None:
    """A few LS and BE requests over HTTP and a small batch, so that no phase pays for first calls."""
    ls = [replace(r, arrival=0.2 * n, output_len=4) for n, r in enumerate(load.ls[:4])]
    be = [replace(r, output_len=4) for r in load.be[:8]]
    be_target = Target(server.url, MODEL, service_tier="flex")

    async def both() -> None:
        await asyncio.gather(run_streams([Stream("be", be_target, be)], 0.0, 300.0, 300.0),
                             batch.run_beside([Stream("ls", Target(server.url, MODEL), ls)],
                                              batch.BatchJob(be_target, be), 1.0, 300.0, 300.0))

    asyncio.run(both())


def info_lines(args: argparse.Namespace, load: Workload, figures: dict[str, list[dict]], texts, total_s: float
               ) -> list[str]:
    import torch

    be_in = [r.input_len for r in load.be]
    outlasted = [f["wall"] is not None and f["wall"] >= args.duration for name, fs in figures.items()
                 if name != "ls alone" for f in fs]
    lines = [
        f"command: `{command_line()}` (omniserve at commit {git_revision()})",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; the server and this load "
        "generator share the cores",
        f"server: `omniserve serve --policy omniserve {args.server_args}` (SmolLM2-135M-Instruct fp32, served as "
        f"{MODEL}), batches kept in a fresh SQLite file, --batch-max-queued 64 (the default)",
        f"LS: {len(load.ls)} ShareGPT prompts cut to {args.ls_max_input_len} tokens, {args.ls_output_len} output "
        f"tokens, Poisson {args.ls_rate:g} req/s over {args.duration:g} s; SLOs TTFT {args.slo.ttft * 1e3:.0f} ms, "
        f"TPOT {args.slo.tpot * 1e3:.1f} ms ({args.slo_source})",
        f"BE: {len(load.be)} lines, ShareGPT prompts cut to {args.be_max_input_len} tokens (mean "
        f"{statistics.fmean(be_in):.1f}), {args.be_output_len} output tokens, greedy, EOS ignored; over HTTP all "
        "sent at the start, streamed, service_tier flex; as a batch one file, one batch, polled every 0.25 s",
        f"{args.repeats} repeat(s) of (a) LS alone, (b) LS + HTTP BE, (c) LS + batch ((b) and (c) swapped on odd "
        f"repeats), each phase once other processes left the cores; median [min-max]; the benchmark took "
        f"{total_s:.0f} s",
        f"BE work outlasted the LS window in {sum(outlasted)} of {len(outlasted)} BE phases (otherwise the column "
        "'LS attainment while BE ran' is the one to read)",
    ]
    if texts[2]:
        lines.append(f"first line whose batch text differs from its HTTP answer: {texts[2]}")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--lines", type=int, default=None, help="BE lines (default 1000; 200 with --quick)")
    add("--be-max-input-len", type=int, default=32, help="BE prompts are ShareGPT prompts cut to this many tokens")
    add("--be-output-len", default="16:32", metavar="N|LOW:HIGH")
    add("--ls-rate", type=float, default=1.0, help="LS requests/s (Poisson)")
    add("--ls-max-input-len", type=int, default=256)
    add("--ls-output-len", default="32:64", metavar="N|LOW:HIGH")
    add("--duration", type=float, default=None, help="seconds of LS arrivals per phase (default 120; 30 with --quick)")
    add("--quick", action="store_true", help="a smaller run: 200 lines, a 30 s LS window")
    add("--repeats", type=int, default=1)
    add("--ttft-slo", type=float, default=None, help="LS TTFT SLO, s (default: from the latency profile)")
    add("--tpot-slo", type=float, default=None, help="LS TPOT SLO, s (default: from the latency profile)")
    add("--server-args", default=SERVER_ARGS, help="`omniserve serve` arguments, the same for every phase")
    add("--be-timeout", type=float, default=1800.0, help="most seconds a phase's BE work may take")
    add("--quiet-wait", type=float, default=60.0, help="most seconds to wait for a quiet machine before a phase")
    add("--seed", type=int, default=0)
    add("--output-dir", type=Path, default=Path("bench-batch"), help="the server's log goes here")
    add("--markdown", type=Path, help="also write the results as a markdown section here")
    add("--smoke", action="store_true", help="a tiny run that only checks that the script works")
    args = parser.parse_args()
    if args.smoke:
        args.lines, args.be_max_input_len, args.be_output_len, args.duration = 4, 16, "4", 3.0
        args.ls_max_input_len, args.ls_output_len, args.repeats = 32, "4:8", 1
        args.be_timeout, args.quiet_wait, args.server_args = 300.0, 0.0, SMOKE_SERVER_ARGS
    args.lines = args.lines or (200 if args.quick else 1000)
    args.duration = args.duration or (30.0 if args.quick else 120.0)
    if args.lines < 1 or args.repeats < 1 or args.duration <= 0:
        parser.error("need a line, a repeat and a positive --duration")
    return args


def set_slos(args: argparse.Namespace, load: Workload) -> None:
    """args.slo: the given SLOs, or those `omniserve bench --compare` derives from the server's latency profile."""
    if args.ttft_slo is not None and args.tpot_slo is not None:
        args.slo, args.slo_source = Slo(args.ttft_slo, args.tpot_slo), "given"
        return
    longest = max(r.input_len for r in load.ls)
    derived = slos.slos_from_profile(shlex.split(args.server_args), longest, 3.0, 3.0)
    args.slo = Slo(args.ttft_slo or derived.ttft, args.tpot_slo or derived.tpot)
    args.slo_source = (f"from the latency profile: 3 x a lone decode step, 3 x the budgeted prefill of the longest "
                       f"LS prompt, {longest} tokens")


def main() -> None:
    from omniserve.models.loader import resolve_model
    from omniserve.tokenizer import load_tokenizer

    args = parse_args()
    started = time.perf_counter()
    load = build_workload(args, load_tokenizer(*resolve_model(None, "auto")))
    set_slos(args, load)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    repeats: list[dict[str, Phase]] = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        server_args = [*shlex.split(args.server_args), "--served-model-name", MODEL,
                       "--batch-db", str(Path(folder) / "batches.db")]
        server = Server("omniserve", args.slo, server_args, args.output_dir / "server.log", 900.0)
        try:
            warm_up(server, load)
            for repeat in range(args.repeats):
                order = ("ls + http be", "ls + batch")
                repeats.append(phases(server, args, load, order if repeat % 2 == 0 else order[::-1]))
        finally:
            server.stop()
    names = ("ls alone", "ls + http be", "ls + batch")
    figures = {name: [phase_figures(r[name], args) for r in repeats] for name in names}
    texts = same_texts(repeats)
    tables = [(PHASE_COLUMNS, rows(figures, PHASE_COLUMNS)), (RATIO_COLUMNS, ratio_rows(figures, texts)),
              (CPU_COLUMNS, rows(figures, CPU_COLUMNS)), (MISS_COLUMNS, rows(figures, MISS_COLUMNS)),
              (REPEAT_COLUMNS, repeat_rows(figures))]
    info = info_lines(args, load, figures, texts, time.perf_counter() - started)
    print_report(info, tables)
    write_markdown(args.markdown, "Batch API beside live traffic", info, tables)


if __name__ == "__main__":
    main()
