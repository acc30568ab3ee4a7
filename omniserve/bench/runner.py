"""One benchmark run against a server: build the workload, send it, summarise it, write JSON and plots."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from omniserve.bench import batch, metrics, plots, server_metrics
from omniserve.bench.client import Stream, Target, auth_headers, run_streams
from omniserve.bench.metrics import Record, Slo
from omniserve.bench.workload import PromptMaker, Request, StreamSpec, WorkloadError, build_stream

CLASSES = ("ls", "be")


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # default: the first model the server lists
    endpoint: str = "completions"
    api_key: str | None = None
    streams: dict[str, StreamSpec] = field(default_factory=dict)  # "ls" / "be"
    models: dict[str, str | None] = field(default_factory=dict)  # a class's own model name, if any
    service_tiers: dict[str, str | None] = field(default_factory=lambda: {"ls": None, "be": "flex"})
    extra_bodies: dict[str, dict] = field(default_factory=dict)  # more request fields per class
    slo: Slo = Slo()  # the LS SLOs
    duration: float = 60.0
    drain_timeout: float = 120.0
    request_timeout: float = 300.0
    seed: int = 0
    bin_s: float | None = None  # timeline bins; default: duration / 60, at least one second
    label: str = ""
    be_batch: bool = False  # the BE stream as one OpenAI batch, not HTTP requests (omniserve.bench.batch)


def build_workload(config: BenchConfig, tokenizer) -> dict[str, list[Request]]:
    """Every stream's requests, from the seed alone: the same for every server and policy of a comparison."""
    workload = {}
    for service_class in CLASSES:
        spec = config.streams.get(service_class)
        if spec is not None and spec.enabled:
            rng = random.Random(f"{config.seed}-{service_class}")  # streams independent of each other's draws
            # A closed loop cycles through a pool of requests for as long as the run lasts.
            pool = 1000 if spec.concurrency else None
            workload[service_class] = build_stream(spec, config.duration, PromptMaker(tokenizer, rng), rng, pool)
    return workload


def served_model(base_url: str, api_key: str | None) -> str:
    """The first model id of GET /v1/models."""
    headers = auth_headers(api_key)
    response = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def run(config: BenchConfig, workload: dict[str, list[Request]], tokenizer=None, progress: bool = True,
        position: int = 0) -> tuple[dict, list[Record]]:
    """Runs the workload against config.base_url; returns the result (JSON-ready) and the records. With
    config.be_batch the BE stream goes as one batch: its summary is the batch's (BatchOutcome.summary)."""
    model = config.model or served_model(config.base_url, config.api_key)
    streams = [_stream(config, service_class, requests, model) for service_class, requests in workload.items()]
    job = None
    if config.be_batch and "be" in workload:
        be = next(s for s in streams if s.service_class == "be")
        if be.concurrency:
            raise WorkloadError("--be-batch sends the BE requests of a rate, rate steps or a trace as one batch; a "
                                "closed loop (--be-concurrency) has no fixed set of requests to send")
        streams.remove(be)
        job = batch.BatchJob(be.target, be.requests)
    total = sum(len(s.requests) for s in streams if not s.concurrency) + (len(job.requests) if job else 0) or None
    scraper = server_metrics.Scraper(config.base_url, config.api_key)
    before = scraper.snapshot()
    bar = tqdm(total=total, desc=config.label or "bench", unit="req", position=position, leave=True,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        records, run_seconds, outcome = _send(config, streams, job, tokenizer, bar)
    finally:
        bar.close()
    after = scraper.snapshot() if before is not None else None  # without a baseline the totals say nothing
    slos = {"ls": config.slo}
    summary = metrics.summarize(records, config.duration, run_seconds, slos)
    if outcome is not None:
        summary["be"] = outcome.summary()
    bin_s = config.bin_s or max(1.0, config.duration / 60)
    result = {
        "label": config.label, "base_url": config.base_url, "model": model, "endpoint": config.endpoint,
        "seed": config.seed, "duration": config.duration, "run_seconds": run_seconds, "be_batch": job is not None,
        "slo": {"ls": asdict(config.slo)},
        "streams": {c: asdict(config.streams[c]) for c in workload},
        "summary": summary,
        "offloaded_tokens": server_metrics.offloaded_tokens(before, after),
        "timeline": metrics.timeline(records, run_seconds, bin_s),
    }
    return result, records


def _stream(config: BenchConfig, service_class: str, requests: list[Request], model: str) -> Stream:
    target = Target(config.base_url, config.models.get(service_class) or model, config.endpoint,
                    config.service_tiers.get(service_class), config.api_key,
                    config.extra_bodies.get(service_class, {}))
    return Stream(service_class, target, requests, config.streams[service_class].concurrency)


def _send(config: BenchConfig, streams: list[Stream], job: batch.BatchJob | None, tokenizer, bar: tqdm
          ) -> tuple[list[Record], float, batch.BatchOutcome | None]:
    """The HTTP streams, and the batch beside them when there is one."""
    def on_done(record: Record) -> None:
        bar.update(1)

    if job is None:
        records, run_seconds = asyncio.run(run_streams(
            streams, config.duration, config.drain_timeout, config.request_timeout, tokenizer, on_done=on_done))
        return records, run_seconds, None
    lines_seen = [0]

    def on_lines(answered: int) -> None:  # the batch's answered lines, as its polls report them
        bar.update(max(0, answered - lines_seen[0]))
        lines_seen[0] = max(lines_seen[0], answered)

    return asyncio.run(batch.run_beside(streams, job, config.duration, config.drain_timeout, config.request_timeout,
                                        tokenizer, on_done=on_done, on_lines=on_lines))


def write_outputs(result: dict, records: list[Record], output_dir: str | Path, slo: Slo) -> list[Path]:
    """result.json (with every request's record), latency_cdf.png and timeline.png in output_dir."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "result.json", folder / "latency_cdf.png", folder / "timeline.png"]
    paths[0].write_text(json.dumps({**result, "records": [asdict(r) for r in records]}, indent=1))
    title = f"{result['label'] or result['model']} at {result['base_url']}"
    plots.latency_cdfs(records, {"ls": slo}, paths[1], title)
    plots.timeline_plot(result["timeline"], {"ls": slo}, paths[2], title)
    return paths


def one_line(result: dict) -> str:
    """The run as one JSON line: everything but the timeline."""
    return json.dumps({k: v for k, v in result.items() if k != "timeline"}, separators=(",", ":"))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def report(result: dict) -> str:
    """A short human summary of a run, per class."""
    lines = [f"{result['label'] or 'run'}: {result['model']} at {result['base_url']}, {result['duration']:g} s "
             f"arrival window, run {result['run_seconds']:.1f} s"]
    slo = result["slo"]["ls"]
    for c, s in result["summary"].items():
        offloaded = result.get("offloaded_tokens", {}).get(c)
        if s.get("mode") == "batch":
            lines += _batch_lines(c, s)
            if offloaded and offloaded["count"] > 0:
                lines.append(_offloaded_line(offloaded))
            continue
        lines.append(
            f"  {c.upper()}: {s['requests']} requests: {s['ok']} ok, {s['rejected']} rejected, {s['failed']} failed, "
            f"{s['cancelled']} cancelled; output {s['output_throughput']:.1f} tok/s in the window")
        lines.append(
            f"      TTFT ms mean/p50/p90/p99 {'/'.join(_ms(s['ttft'][k]) for k in ('mean', 'median', 'p90', 'p99'))}"
            f"   TPOT ms {'/'.join(_ms(s['tpot'][k]) for k in ('mean', 'median', 'p90', 'p99'))}"
            f"   ITL ms p50/p99 {_ms(s['itl']['median'])}/{_ms(s['itl']['p99'])}"
            f"   E2E s p50/p99 {s['e2e']['median'] or 0:.2f}/{s['e2e']['p99'] or 0:.2f}")
        if "slo_attainment" in s and s["slo_attainment"] is not None:
            lines.append(f"      SLO (TTFT {_ms(slo['ttft'])} ms, TPOT {_ms(slo['tpot'])} ms) attainment "
                         f"{s['slo_attainment']:.1%} (TTFT alone {s['ttft_attainment']:.1%}), goodput "
                         f"{s['goodput']:.2f} req/s")
        if offloaded and offloaded["count"] > 0:
            lines.append(_offloaded_line(offloaded))
        for error, count in s["errors"].items():
            lines.append(f"      {count} x {error}")
    return "\n".join(lines)


def _batch_lines(service_class: str, s: dict) -> list[str]:
    """A class sent as one batch: its lines and what the batch made of them per second of its wall time."""
    wall = "-" if s["wall_seconds"] is None else f"{s['wall_seconds']:.1f} s"
    lines = [f"  {service_class.upper()} (batch {s['batch_id'] or '-'}, {s['status']}): {s['lines']} lines: "
             f"{s['completed']} completed, {s['failed']} failed, {s['not_run']} not run",
             f"      wall {wall}: {s['lines_per_second']:.2f} lines/s, {s['output_throughput']:.1f} output tok/s "
             f"({s['output_tokens']} tokens)"]
    return lines + [f"      {count} x {error}" for error, count in s["errors"].items()]


def _offloaded_line(offloaded: dict) -> str:
    """The server's figures of the class's offloaded tokens (see server_metrics)."""
    def pair(figure: str, scale: float = 1.0, digits: int = 1) -> str:
        return "/".join("-" if offloaded[figure][k] is None else f"{offloaded[figure][k] * scale:.{digits}f}"
                        for k in ("mean", "p50"))

    return (f"      offloaded tokens {offloaded['count']}: iterations mean/p50 {pair('iterations')}   ms "
            f"{pair('seconds', 1e3, 0)}   layers/iteration {pair('layers_per_iteration')}")
