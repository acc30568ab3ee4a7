"""Soak benchmark: does the server's memory level off under sustained mixed load, worker deaths and disconnects?

Starts `omniserve serve` (the built-in model, a free port, the default `omniserve` policy with its CPU attention
pool; --server-args adds flags, by default few enough device KV pages that BE requests are offloaded), then for
--duration minutes keeps --ls-clients latency-sensitive and --be-clients best-effort (`service_tier: "flex"`)
streaming clients in a closed loop, each client alternating chat and completions, with ShareGPT prompts
(omniserve.bench's workload and client). A --disconnect-share of the requests is dropped mid-stream on purpose (the
client closes the connection after a random number of chunks), and every --kill-every seconds a CPU attention worker
process (a child of the server) is SIGKILLed. Every --sample-every seconds it reads the memory of the server and of
each child from /proc (RSS, PSS, anonymous and shared-memory pages) and the gauges of /metrics.

At the end, after the clients have finished their last requests and the server has gone idle, it reports:
- lost requests (goal: 0): every request sent must have a complete answer, a status it should get (429: an LS
  request the scheduler cannot serve in time), or have been disconnected on purpose;
- the count of 5xx answers;
- the /metrics gauges (running, waiting, offloaded, CPU pool rows in flight, KV use) back at 0 once idle;
- the memory series and the verdict: "flat after warm-up" when the total RSS samples after the first third of the
  run (the warm-up: the last 20 of 30 minutes) are within 5% of each other (max / min), with the growth and the trend
  (least-squares slope) over them, the same for the server alone, for the workers (whose RSS follows their live host
  KV), for the total less that live host KV (the workers' own figure, omniserve:host_kv_allocated_bytes: what is left
  is what could leak) and for the open file descriptors (server and children), and the ratio to the idle server
  before the load.

    python benchmarks/bench_soak.py --duration 30 --markdown soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import cycle
from pathlib import Path

import httpx
import psutil

from omniserve.bench.client import Target, http_client, request_body, send
from omniserve.bench.compare import Server
from omniserve.bench.metrics import Record, Slo
from omniserve.bench.report import cpu_model, git_revision
from omniserve.bench.workload import PromptMaker, StreamSpec, build_stream

DEFAULT_SERVER_ARGS = "--max-model-len 2048 --num-gpu-blocks-override 512"
GAUGES = {  # what must be back at 0 once the server is idle
    "running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
    "offloaded": "omniserve:num_requests_offloaded", "pool rows in flight": "omniserve:cpu_pool_queue_depth",
    "KV use": "vllm:kv_cache_usage_perc", "host KV allocated": "omniserve:host_kv_allocated_bytes",
}
FLAT_WITHIN = 0.05  # "flat after warm-up": the samples after the warm-up within 5% of each other
WARM_UP_SHARE = 1 / 3  # the first third of the load is warm-up; the rest is judged
_STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


# ------------------------------------------------------------------------------------------------------ memory
def role(process: psutil.Process) -> str:
    """What a child of the server is: a CPU attention worker (a spawned multiprocessing child), the resource
    tracker, or something else."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "gone"
    if "resource_tracker" in command:
        return "resource tracker"
    return "cpu attention worker" if "spawn_main" in command else "other"


def attention_workers(server_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.Error:
        return []
    return [c for c in children if role(c) == "cpu attention worker"]


def process_memory(pid: int) -> dict[str, int] | None:
    """Bytes of one process: rss (= anon + file + shmem), pss (its share of pages mapped by several processes),
    and fds (open file descriptors: shared-memory segments handed over by descriptor show up there)."""
    memory: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in _STATUS_FIELDS:
                    memory[_STATUS_FIELDS[name]] = int(value.split()[0]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    memory["pss"] = int(line.split()[1]) * 1024
        memory["fds"], memory["shm_fd_bytes"] = shared_memory_fds(pid)
    except (OSError, ValueError):
        return None
    return memory


def shared_memory_fds(pid: int) -> tuple[int, int]:
    """The process's open file descriptors, and the bytes of the shared-memory segments among them (torch hands
    tensors to other processes as descriptors of deleted /dev/shm files: one held open keeps its memory alive, though
    no process maps it, so no RSS shows it)."""
    fds, shm_bytes = os.listdir(f"/proc/{pid}/fd"), 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"):
                shm_bytes += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return len(fds), shm_bytes


def memory_sample(server_pid: int, t: float, label: str = "") -> dict:
    """The server's and each child's memory now, and their sums."""
    processes = {"server": process_memory(server_pid)}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        memory = process_memory(child.pid)
        if memory is not None:
            processes[f"{role(child)} {child.pid}"] = memory
    processes = {name: m for name, m in processes.items() if m is not None}
    keys = ("rss", "pss", "anon", "shmem", "fds", "shm_fd_bytes")
    total = {key: sum(m.get(key, 0) for m in processes.values()) for key in keys}
    return {"t": t, "label": label, "total": total, "processes": processes}


# ----------------------------------------------------------------------------------------------------- metrics
def gauges(base_url: str) -> dict[str, float]:
    """The GAUGES' values now (summed over labels)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    values = {}
    for key, name in GAUGES.items():
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
        values[key] = sum(float(v) for v in pattern.findall(text))
    return values


def wait_idle(base_url: str, timeout: float) -> tuple[dict[str, float], float]:
    """Polls /metrics until every gauge is 0 (or timeout); returns the last gauges and the seconds waited."""
    started = time.monotonic()
    while True:
        values = gauges(base_url)
        if not any(values.values()) or time.monotonic() - started > timeout:
            return values, time.monotonic() - started
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------- the load
@dataclass
class Chaos:
    """What the run did on purpose, and when (seconds from the start)."""

    kills: list[tuple[float, int | None]] = field(default_factory=list)  # (when, worker pid or None: none alive)
    disconnects: int = 0


@dataclass(frozen=True)
class ClientPlan:
    service_class: str
    targets: tuple[Target, Target]  # completions, chat: a client alternates them


async def disconnect_midway(client: httpx.AsyncClient, target: Target, body: dict, record: Record, clock,
                            chunks: int, chaos: Chaos) -> None:
    """Sends the request and closes the connection once `chunks` chunks have come (unless it ended first)."""
    task = asyncio.ensure_future(send(client, target, body, record, clock))
    while not task.done() and len(record.token_times) < chunks:
        await asyncio.sleep(0.02)
    if task.done():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    record.error = "disconnected on purpose"
    chaos.disconnects += 1


async def client_loop(http: httpx.AsyncClient, plan: ClientPlan, source, stop_at: float, clock, records: list,
                      rng: random.Random, disconnect_share: float, tokenizer, chaos: Chaos) -> None:
    """One closed-loop client: the next request as soon as the previous one ends, until stop_at."""
    turn = 0
    while clock() < stop_at:
        request = next(source)
        target = plan.targets[turn % 2]
        turn += 1
        record = Record(plan.service_class, clock(), request.input_len, request.output_len)
        records.append(record)
        body = request_body(target, request, tokenizer)
        if rng.random() < disconnect_share:
            chunks = rng.randint(1, max(1, request.output_len - 1))
            await disconnect_midway(http, target, body, record, clock, chunks, chaos)
        else:
            await send(http, target, body, record, clock)


async def kill_workers(server_pid: int, every: float, offset: float, stop_at: float, clock, chaos: Chaos) -> None:
    """SIGKILLs one CPU attention worker every `every` seconds (from `offset`: not when memory is sampled, so that
    no sample misses a worker that was about to restart) until stop_at."""
    n = 1
    while offset + n * every < stop_at:
        await asyncio.sleep(offset + n * every - clock())
        n += 1
        workers = attention_workers(server_pid)
        if workers:
            os.kill(workers[0].pid, signal.SIGKILL)
        chaos.kills.append((clock(), workers[0].pid if workers else None))
        print(f"[{clock():7.1f} s] SIGKILL CPU attention worker {workers[0].pid if workers else '(none alive)'}",
              file=sys.stderr, flush=True)


async def sample_memory(server_pid: int, base_url: str, every: float, stop_at: float, clock, samples: list) -> None:
    """A memory sample (with the gauges) every `every` seconds until stop_at."""
    while clock() + every <= stop_at + 1.0:
        await asyncio.sleep(every - clock() % every)
        sample = await asyncio.to_thread(memory_sample, server_pid, clock())
        sample["gauges"] = await asyncio.to_thread(gauges, base_url)
        samples.append(sample)
        print(f"[{sample['t']:7.1f} s] RSS {_gb(sample['total']['rss'])} GB (PSS {_gb(sample['total']['pss'])}), "
              f"gauges {sample['gauges']}", file=sys.stderr, flush=True)


async def soak(args: argparse.Namespace, server_pid: int, base_url: str, plans: list[tuple[ClientPlan, list]],
               tokenizer) -> tuple[list[Record], list[dict], Chaos, float]:
    """Runs the clients, the worker killer and the sampler; returns the records, samples, chaos and run seconds."""
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    stop_at, records, samples, chaos = args.duration * 60, [], [], Chaos()
    rng = random.Random(args.seed)
    async with http_client(args.request_timeout) as http:
        clients = []
        for plan, requests in plans:
            source = cycle(requests)
            clients += [asyncio.create_task(client_loop(
                http, plan, source, stop_at, clock, records, random.Random(rng.random()), args.disconnect_share,
                tokenizer, chaos)) for _ in range(args.ls_clients if plan.service_class == "ls" else args.be_clients)]
        side = [asyncio.create_task(sample_memory(server_pid, base_url, args.sample_every, stop_at, clock, samples))]
        if args.kill_every > 0:
            killer = kill_workers(server_pid, args.kill_every, args.sample_every / 2, stop_at, clock, chaos)
            side.append(asyncio.create_task(killer))
        await asyncio.gather(*side)
        _, open_clients = await asyncio.wait(clients, timeout=max(1.0, stop_at + args.drain_timeout - clock()))
        for task in open_clients:  # still streaming after the drain: counted as lost ("cancelled")
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return records, samples, chaos, clock()


# --------------------------------------------------------------------------------------------------- summaries
def outcomes(records: list[Record]) -> dict:
    """Requests by outcome; lost = neither answered in full, nor refused with a status it should get, nor
    disconnected on purpose."""
    counts = {"sent": len(records), "ok": 0, "rejected (429)": 0, "disconnected on purpose": 0, "5xx": 0, "lost": 0}
    errors: dict[str, int] = {}
    for record in records:
        if record.status == "ok":
            counts["ok"] += 1
        elif record.status == "rejected":
            counts["rejected (429)"] += 1
        elif record.error == "disconnected on purpose":
            counts["disconnected on purpose"] += 1
        else:
            counts["lost"] += 1
            counts["5xx"] += record.error.startswith("HTTP 5")
            errors[record.error[:120]] = errors.get(record.error[:120], 0) + 1
    counts["errors"] = errors
    counts["output tokens"] = sum(r.output_tokens for r in records if r.status == "ok")
    return counts


def verdict(samples: list[dict], duration_s: float, value=lambda sample: sample["total"]["rss"]) -> dict:
    """After the warm-up (WARM_UP_SHARE of the load), `value` (default: the total RSS): its spread (max / min - 1), its growth
    (last / first - 1), its trend (least-squares slope, as a share of the mean per 10 minutes: growth, told apart from
    the swings of live data such as the offloaded requests' host KV), and whether it is flat (spread within
    FLAT_WITHIN)."""
    during = [s for s in samples if not s["label"]]
    points = [(s["t"], value(s)) for s in during if s["t"] >= duration_s * WARM_UP_SHARE]
    points = points or [(during[-1]["t"], value(during[-1]))]
    times, values = [t for t, _ in points], [v for _, v in points]
    mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
    variance = sum((t - mean_t) ** 2 for t in times)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / variance if variance else 0.0
    return {"samples": len(values), "spread": max(values) / min(values) - 1, "growth": values[-1] / values[0] - 1,
            "trend": slope * 600 / mean_v, "flat": max(values) / min(values) - 1 <= FLAT_WITHIN}


def verdict_line(name: str, figures: dict) -> str:
    return (f"- {name} after the warm-up ({figures['samples']} samples): spread {figures['spread']:.1%}, growth "
            f"{figures['growth']:+.1%}, trend {figures['trend']:+.1%} per 10 min: "
            + ("**flat after warm-up**" if figures["flat"] else f"**not flat** (spread above {FLAT_WITHIN:.0%})"))


def _gb(value: int) -> str:
    return f"{value / 1e9:.3f}"


def _workers_rss(sample: dict) -> int:
    return sum(m["rss"] for name, m in sample["processes"].items() if name.startswith("cpu attention worker"))


def _host_kv(sample: dict) -> float:
    return sample.get("gauges", {}).get("host KV allocated", 0.0)


def series_table(samples: list[dict]) -> list[str]:
    """One row per sample: the totals, the server's and the workers' RSS and the gauges."""
    base = samples[0]["total"]["rss"]
    lines = ["| t (min) | total RSS GB | vs idle start | total PSS GB | server RSS GB | server anon GB | "
             "workers RSS GB | host KV held GB | shm held by fds GB | fds | running/waiting/offloaded |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in samples:
        server = s["processes"].get("server", {})
        g = s.get("gauges", {})
        lines.append(
            f"| {s['t'] / 60:.1f}{' ' + s['label'] if s['label'] else ''} | {_gb(s['total']['rss'])} | "
            f"{s['total']['rss'] / base:.2f}x | {_gb(s['total']['pss'])} | {_gb(server.get('rss', 0))} | "
            f"{_gb(server.get('anon', 0))} | {_gb(_workers_rss(s))} | {_gb(_host_kv(s))} | "
            f"{_gb(s['total']['shm_fd_bytes'])} | "
            f"{s['total']['fds']} | "
            f"{g.get('running', 0):.0f}/{g.get('waiting', 0):.0f}/{g.get('offloaded', 0):.0f} |")
    return lines


def report(args: argparse.Namespace, counts: dict, samples: list[dict], chaos: Chaos, idle: dict[str, float],
           idle_wait: float, run_s: float, kv_pages: str) -> str:
    duration_s = args.duration * 60
    server_rss = verdict(samples, duration_s, lambda sample: sample["processes"]["server"]["rss"])
    first, last_busy, idle_sample = samples[0], [s for s in samples if not s["label"]][-1], samples[-1]
    kills = [pid for _, pid in chaos.kills]
    lines = [
        f"- command: `python benchmarks/bench_soak.py {shlex.join(sys.argv[1:])}` at {git_revision()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; server args `{args.server_args}` ({kv_pages})",
        f"- load: {args.ls_clients} LS + {args.be_clients} BE (flex) closed-loop streaming clients, chat and "
        f"completions alternating, ShareGPT prompts up to {args.max_input_len} tokens, LS {args.ls_output_len} / BE "
        f"{args.be_output_len} output tokens; {args.duration:g} min of load ({run_s / 60:.1f} min with the drain); "
        f"{chaos.disconnects} requests disconnected mid-stream on purpose; {len([k for k in kills if k])} CPU "
        f"attention workers SIGKILLed (every {args.kill_every:g} s; {kills.count(None)} times none was alive)",
        f"- requests: {counts['sent']} sent, {counts['ok']} complete ({counts['output tokens']} output tokens), "
        f"{counts['rejected (429)']} rejected with 429, {counts['disconnected on purpose']} disconnected on purpose; "
        f"**lost: {counts['lost']}**, of which 5xx: {counts['5xx']}; {counts['output tokens'] / run_s:.1f} output "
        f"tokens/s",
        *(f"  - {n} x {error}" for error, n in counts["errors"].items()),
        f"- gauges once idle ({idle_wait:.1f} s after the last answer): "
        + ", ".join(f"{k} {v:g}" for k, v in idle.items()) + (" (all 0)" if not any(idle.values()) else " (NOT 0)"),
        verdict_line("total RSS (server and children)", verdict(samples, duration_s)),
        verdict_line("total PSS", verdict(samples, duration_s, lambda sample: sample["total"]["pss"])),
        verdict_line("server RSS alone (workers restart after each kill)", server_rss),
        verdict_line("CPU attention workers' RSS (their live host KV included)", verdict(
            samples, duration_s, lambda sample: _workers_rss(sample) or 1)),
        verdict_line("total RSS less the host KV the workers hold (live data, omniserve:host_kv_allocated_bytes)",
                     verdict(samples, duration_s, lambda sample: sample["total"]["rss"] - _host_kv(sample))),
        verdict_line("open file descriptors (server and children)", verdict(
            samples, duration_s, lambda sample: sample["total"]["fds"])),
        verdict_line("the server's open file descriptors", verdict(
            samples, duration_s, lambda sample: sample["processes"]["server"]["fds"])),
        f"- total RSS: {last_busy['total']['rss'] / first['total']['rss']:.2f}x the idle server's before the load at "
        f"the end of the load, {idle_sample['total']['rss'] / first['total']['rss']:.2f}x once idle again",
        "", *series_table(samples)]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="minutes of load")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds between memory samples")
    parser.add_argument("--ls-clients", type=int, default=32, help="closed-loop LS streaming clients")
    parser.add_argument("--be-clients", type=int, default=32, help="closed-loop BE (flex) streaming clients")
    parser.add_argument("--max-input-len", type=int, default=512, help="ShareGPT prompts cut to this many tokens")
    parser.add_argument("--ls-output-len", default="16:128", metavar="N|LOW:HIGH")
    parser.add_argument("--be-output-len", default="64:384", metavar="N|LOW:HIGH")
    parser.add_argument("--disconnect-share", type=float, default=0.1,
                        help="share of requests whose client disconnects mid-stream, after a random number of chunks")
    parser.add_argument("--kill-every", type=float, default=180.0,
                        help="seconds between SIGKILLs of a CPU attention worker (0: never)")
    parser.add_argument("--drain-timeout", type=float, default=900.0,
                        help="seconds the last requests may take after the load ends; still open then: lost")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="longest wait for the server's next byte")
    parser.add_argument("--idle-sample-after", type=float, default=5.0,
                        help="seconds of idleness before the last memory sample")
    parser.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="more `omniserve serve` flags")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("/tmp/omniserve-soak-server.log"), help="the server's log")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples and outcomes here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works "
                        "(seconds of load, a worker killed, the server's log in the working directory)")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.sample_every, args.ls_clients, args.be_clients = 0.15, 3.0, 1, 2
        args.max_input_len, args.ls_output_len, args.be_output_len = 32, "4:8", "8:16"
        args.disconnect_share, args.kill_every, args.drain_timeout, args.idle_sample_after = 0.3, 4.0, 120.0, 1.0
        args.server_args = "--max-model-len 256 --num-gpu-blocks-override 16 --be-decode-placement cpu"
        args.log = Path("soak-server.log")
    return args


def client_plans(args: argparse.Namespace, base_url: str, tokenizer) -> list[tuple[ClientPlan, list]]:
    """Each class's two targets (completions, chat) and its pool of requests (ShareGPT prompts, seeded)."""
    from omniserve.bench.runner import served_model

    model, rng = served_model(base_url, None), random.Random(args.seed)
    maker, plans = PromptMaker(tokenizer, rng), []
    for service_class, output_len in (("ls", args.ls_output_len), ("be", args.be_output_len)):
        if not (args.ls_clients if service_class == "ls" else args.be_clients):
            continue
        spec = StreamSpec(concurrency=1, dataset="sharegpt", output_len=output_len, max_input_len=args.max_input_len)
        tier = "flex" if service_class == "be" else None
        targets = (Target(base_url, model, "completions", tier), Target(base_url, model, "chat", tier))
        plans.append((ClientPlan(service_class, targets), build_stream(spec, 0.0, maker, rng, max_requests=1000)))
    return plans


def main() -> None:
    from omniserve.models.loader import resolve_model
    from omniserve.tokenizer import load_tokenizer

    args = parse_args()
    tokenizer = load_tokenizer(*resolve_model(None, "auto"))
    server = Server("omniserve", Slo(), shlex.split(args.server_args), args.log, start_timeout=900.0)
    try:
        pid, url = server.process.pid, server.url
        pages = re.search(r"(\d+) KV pages of (\d+) tokens", args.log.read_text(errors="replace"))
        kv_pages = f"{pages.group(1)} device KV pages of {pages.group(2)} tokens" if pages else "KV pages unknown"
        plans = client_plans(args, url, tokenizer)
        before = {**memory_sample(pid, 0.0, "idle before"), "gauges": gauges(url)}
        records, samples, chaos, run_s = asyncio.run(soak(args, pid, url, plans, tokenizer))
        samples.insert(0, before)
        idle, idle_wait = wait_idle(url, timeout=120.0)
        time.sleep(args.idle_sample_after)  # an idle engine gives freed memory back after a second
        samples.append({**memory_sample(pid, run_s + idle_wait + args.idle_sample_after, "idle"), "gauges": idle})
    finally:
        server.stop()
    counts = outcomes(records)
    text = report(args, counts, samples, chaos, idle, idle_wait, run_s, kv_pages)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "outcomes": counts,
                                         "samples": samples, "chaos": asdict(chaos)}, indent=1))


if __name__ == "__main__":
    main()
