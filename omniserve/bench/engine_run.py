"""Offline engine runs for the benchmarks that drive an LLMEngine themselves: requests added at their arrival times,
the engine stepped back to back while anything is unfinished, every token stamped when its step returns, every step
timed (with the latency model's prediction, from the engine's iteration records), then the LS requests judged against
the SLOs; and the pieces other such loops share (warm-up drains, greedy parameters, the scheduler's counters)."""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from dataclasses import astuple, dataclass, field

from omniserve.bench.machine import CpuMeter, proc_cpu_seconds, side_thread_cpu_seconds
from omniserve.bench.metrics import Record, Slo
from omniserve.bench.report import engine_integrity
from omniserve.engine.observer import IterationRecord


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the run starts."""
    request_id: str
    prompt: list[int]
    max_tokens: int
    service_class: str
    """`ls` or `be`."""


def drain(engine, limit_s: float = 120.0) -> list[float]:
    """Steps until the engine is idle (a warm-up); returns each step's seconds."""
    times, deadline = [], time.perf_counter() + limit_s
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            raise SystemExit("a warm-up did not finish: the engine hangs")
    return times


def params(max_tokens: int, service_class: str):
    """Greedy, exactly max_tokens tokens (EOS ignored)."""
    from omniserve import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, service_class=service_class)


class StepRecords:
    """The engine's record of each step (an iteration observer), kept until taken: what a loop that calls
    `engine.step()` itself needs to know of the step it just ran."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.last: IterationRecord | None = None
        engine.add_iteration_observer(self.note)

    def note(self, record: IterationRecord) -> None:
        self.last = record

    def take(self) -> IterationRecord | None:
        """The latest step's record (None if no step ran since the last take)."""
        record, self.last = self.last, None
        return record

    def remove(self) -> None:
        self.engine.remove_iteration_observer(self.note)


class PlanProbe(StepRecords):
    """Keeps each step's plan and predicted time, and counts the prefill tokens computed again after a preemption
    (the work preemption throws away)."""

    def __init__(self, engine) -> None:
        self.plan = None
        self.predicted: float | None = None
        self.computed: dict[str, int] = {}  # request id -> the furthest position ever in its KV
        self.recomputed = 0
        super().__init__(engine)

    def note(self, record: IterationRecord) -> None:
        super().note(record)
        plan = self.plan = record.plan
        self.predicted = plan.predicted_time if plan.chunks or plan.offloaded_starts or plan.returning else None
        for chunk in plan.chunks:
            start, end = chunk.start_position, chunk.start_position + len(chunk.token_ids)
            furthest = self.computed.get(chunk.request_id, 0)
            self.recomputed += max(0, min(end, furthest) - start)
            self.computed[chunk.request_id] = max(furthest, end)


class RequestLog:
    """Each request's Record as the run goes: its arrival, the time of each step that gave it tokens, and how it
    ended: `ok` (its full length), `rejected`, `failed` (any other reason) or `cancelled` (open when the run ended)."""

    def __init__(self, workload: list[Arrival], duration: float) -> None:
        self.records = {a.request_id: Record(a.service_class, a.at, len(a.prompt), a.max_tokens) for a in workload}
        self.duration = duration
        self.tokens: dict[str, list[int]] = {}  # greedy tokens of each finished request
        self.decoding_ls: set[str] = set()  # LS requests that have their first token and have not finished
        self.be_tokens_in_window = 0

    def of(self, service_class: str) -> list[Record]:
        return [r for r in self.records.values() if r.service_class == service_class]

    def note(self, outputs, stamp: float) -> None:
        for out in outputs:
            record, completion = self.records[out.request_id], out.outputs[0]
            new = len(completion.token_ids) - record.output_tokens
            record.output_tokens = len(completion.token_ids)
            if new > 0:
                if not record.token_times and record.service_class == "ls":
                    self.decoding_ls.add(out.request_id)
                record.token_times.append(stamp)
                if record.service_class == "be" and stamp <= self.duration:
                    self.be_tokens_in_window += new
            if out.finished:
                reason = completion.finish_reason
                record.status = {"length": "ok", "rejected": "rejected"}.get(reason, "failed")
                record.error, record.end = "" if record.status != "failed" else str(reason), stamp
                self.tokens[out.request_id] = list(completion.token_ids)
                self.decoding_ls.discard(out.request_id)

    def ls_open(self) -> bool:
        return any(r.status == "pending" for r in self.of("ls"))

    def cancel_open(self) -> list[str]:
        """Marks the requests still open as cancelled; returns their ids."""
        open_ids = [rid for rid, r in self.records.items() if r.status == "pending"]
        for rid in open_ids:
            self.records[rid].status = "cancelled"
        return open_ids


@dataclass
class StepStats:
    """The timed steps: all of them, those that ran while an LS request was decoding (it had its first token and
    had not finished), how many of those took longer than the TPOT SLO and the slowest, and measured / predicted
    time (policies with a time budget)."""

    tpot_slo: float
    steps: int = 0
    ls_steps: int = 0
    ls_steps_over: int = 0
    worst_ls_step: float = 0.0
    measured_over_predicted: list[float] = field(default_factory=list)

    def note(self, elapsed: float, ls_decoding: bool, predicted: float | None) -> None:
        self.steps += 1
        if ls_decoding:
            self.ls_steps += 1
            self.ls_steps_over += elapsed > self.tpot_slo
            self.worst_ls_step = max(self.worst_ls_step, elapsed)
        if predicted:
            self.measured_over_predicted.append(elapsed / predicted)


class StepTrace:
    """--trace: one JSON line per timed step (plan, predicted and measured time, queues, free pages, CPU of the
    engine's side threads and of the pool worker during the step)."""

    def __init__(self, file, policy: str, pids: list[int]) -> None:
        self.file, self.policy, self.pids = file, policy, pids
        self.side0 = self.worker0 = 0.0

    def before_step(self) -> None:
        self.side0, self.worker0 = side_thread_cpu_seconds(), sum(proc_cpu_seconds(pid) for pid in self.pids)

    def write(self, engine, plan, stamp: float, elapsed: float, ls_decoding: bool) -> None:
        scheduler = engine.scheduler
        self.file.write(json.dumps({
            "policy": self.policy, "t": round(stamp, 4), "step_ms": round(elapsed * 1e3, 2),
            "predicted_ms": None if plan.predicted_time is None else round(plan.predicted_time * 1e3, 2),
            "budget_ms": None if plan.time_budget is None else round(plan.time_budget * 1e3, 2),
            "ls_decoding": ls_decoding, "rows": plan.num_tokens,
            "chunks": [(c.request_id, len(c.token_ids), c.start_position) for c in plan.chunks],
            "offloaded_starts": len(plan.offloaded_starts), "returning": len(plan.returning),
            "swap_outs": [t.request_id for t in plan.swap_outs], "swap_ins": [t.request_id for t in plan.swap_ins],
            "rejected": plan.rejected, "waiting": len(scheduler.waiting), "running": len(scheduler.running),
            "offloaded": len(scheduler.offloaded), "free_pages": engine.allocator.num_free,
            "side_threads_ms": round((side_thread_cpu_seconds() - self.side0) * 1e3, 1),
            "worker_ms": round((sum(proc_cpu_seconds(pid) for pid in self.pids) - self.worker0) * 1e3, 1),
        }) + "\n")


@dataclass(frozen=True)
class Counters:
    """The scheduler's counters (engine.scheduler.stats)."""

    preemptions: int
    swap_outs: int
    swap_ins: int
    rejected: int

    @classmethod
    def of(cls, scheduler) -> Counters:
        stats = scheduler.stats
        return cls(stats.num_preemptions, stats.num_swap_outs, stats.num_swap_ins, stats.num_rejected)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(astuple(self), astuple(other))))


@dataclass
class LsFigures:
    """The LS requests of a run against the SLOs: counts, and TTFT and mean TPOT as ratios to their SLO."""

    total: int = 0
    attained: int = 0
    ttft_ok: int = 0
    tpot_ok: int = 0
    rejected: int = 0
    cut: int = 0
    ttft_ratios: list[float] = field(default_factory=list)
    tpot_ratios: list[float] = field(default_factory=list)


def ls_figures(records: list[Record], slo: Slo, end: float) -> LsFigures:
    """Rejected requests are misses and have no TTFT. TTFT counts from the scheduled arrival, so a request that
    arrives while a long step runs pays for the wait; a request cut at the end of the run (`end`, seconds) without a
    first token counts with its wait so far. TPOT needs the full length and at least two tokens."""
    figures = LsFigures(total=len(records))
    for r in records:
        if r.status == "rejected":
            figures.rejected += 1
            continue
        figures.cut += r.status == "cancelled"
        ttft = (r.token_times[0] if r.token_times else end) - r.arrival  # no first token yet: a lower bound
        figures.ttft_ratios.append(ttft / slo.ttft)
        tpot = (r.token_times[-1] - r.token_times[0]) / (r.output_tokens - 1) if r.output_tokens >= 2 else None
        if tpot is not None:
            figures.tpot_ratios.append(tpot / slo.tpot)
        good_ttft = bool(r.token_times) and ttft <= slo.ttft
        good_tpot = r.status == "ok" and tpot is not None and tpot <= slo.tpot
        figures.ttft_ok += good_ttft
        figures.tpot_ok += good_tpot
        figures.attained += good_ttft and good_tpot
    return figures


@dataclass
class RunResult:
    policy: str
    ls: LsFigures
    steps: StepStats
    be_tps: float
    """BE output tokens/s over the arrival window."""
    be_finished: int
    """BE requests finished within the window."""
    be_total: int
    counters: Counters
    """Over the timed run."""
    recomputed: int
    """Prefill tokens computed again after a preemption (the work preemption throws away)."""
    add_lag: list[float]
    """Seconds between a request's scheduled arrival and its add_request (a step was running)."""
    wall_s: float
    others_engine_core: float
    """Share of the timed run that other processes held the engine's core."""
    others_pool_core: float
    pool_busy: float
    """Share of the timed run the pool workers were on a core."""
    integrity: str
    ls_tokens: dict[str, list[int]]
    """Greedy tokens of each LS request that finished."""
    quiet_wait: tuple[float, float] = (0.0, 0.0)
    """Seconds waited for a quiet machine before the run, and the others' load then (cores)."""


def drive(engine, policy: str, workload: list[Arrival], args: argparse.Namespace, slo: Slo, trace) -> RunResult:
    """Adds each request at its arrival and steps the engine while anything is unfinished. The run ends once the
    arrival window (--duration) is over and every LS request has ended, BE requests still running then aborted, or
    is cut at --duration + --drain seconds. `trace`: a file for --trace's lines, or None."""
    counters0, probe = Counters.of(engine.scheduler), PlanProbe(engine)
    log, stats = RequestLog(workload, args.duration), StepStats(slo.tpot)
    pids = [pid for pid in engine.cpu_pool.worker_pids() if pid] if engine.cpu_pool is not None else []
    tracer = None if trace is None else StepTrace(trace, policy, pids)
    meter = CpuMeter(args.engine_core, args.pool_core, pids)
    pending, added, add_lag = deque(workload), [], []
    cut, start = False, time.perf_counter()
    while True:
        now = time.perf_counter() - start
        while pending and pending[0].at <= now:
            a = pending.popleft()
            engine.add_request(a.request_id, a.prompt, params(a.max_tokens, a.service_class))
            added.append(a.request_id)
            add_lag.append(now - a.at)
        if not pending and not log.ls_open() and now >= args.duration:
            break  # arrival window over, every LS request ended: BE requests still running are aborted below
        if now >= args.duration + args.drain:
            cut = True
            break
        if not engine.has_unfinished_requests():
            if not pending:
                break
            time.sleep(max(0.0, min(pending[0].at - now, args.duration - now if now < args.duration else 1.0)))
            continue
        timed_step(engine, probe, log, stats, start, tracer)
    end = time.perf_counter() - start
    shares = meter.shares()
    integrity = close_run(engine, probe, log, set(added), cut)
    be = log.of("be")
    ls_done = [rid for rid, r in log.records.items() if r.service_class == "ls" and r.status == "ok"]
    return RunResult(
        policy=policy, ls=ls_figures(log.of("ls"), slo, end), steps=stats,
        be_tps=log.be_tokens_in_window / args.duration,
        be_finished=sum(r.status == "ok" and r.end <= args.duration for r in be), be_total=len(be),
        counters=Counters.of(engine.scheduler) - counters0, recomputed=probe.recomputed, add_lag=add_lag, wall_s=end,
        others_engine_core=shares[0], others_pool_core=shares[1], pool_busy=shares[2], integrity=integrity,
        ls_tokens={rid: log.tokens[rid] for rid in ls_done},
    )


def timed_step(engine, probe: PlanProbe, log: RequestLog, stats: StepStats, start: float,
               tracer: StepTrace | None) -> None:
    ls_was_decoding = bool(log.decoding_ls)
    probe.plan = probe.predicted = None
    if tracer is not None:
        tracer.before_step()
    t0 = time.perf_counter()
    outputs = engine.step()
    t1 = time.perf_counter()
    stats.note(t1 - t0, ls_was_decoding, probe.predicted)
    if tracer is not None and probe.plan is not None:
        tracer.write(engine, probe.plan, t1 - start, t1 - t0, ls_was_decoding)
    log.note(outputs, t1 - start)


def close_run(engine, probe: PlanProbe, log: RequestLog, added: set[str], cut: bool) -> str:
    """Aborts what is still open, checks the engine's integrity (returned as text) and stops observing."""
    for rid in log.cancel_open():
        if rid in added:
            engine.abort_request(rid)
    integrity = engine_integrity(engine)
    probe.remove()
    return integrity + ("; cut at the drain limit" if cut else "")


