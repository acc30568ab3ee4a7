"""What the HTTP layer costs: the OpenAI-compatible server (`omniserve serve`, its own process) against the same
engine called in-process through AsyncEngine, with the built-in SmolLM2-135M-Instruct (fp32, CPU).

Both serve the same closed loop: --clients concurrent clients, each sending its next streaming request as soon as
the previous one ends, until --requests have completed; prompts of exactly --prompt-len token ids cut from ShareGPT
(sent as token ids, so both sides see the same tokens), greedy outputs of a length drawn once per request, uniformly
from [--output-len / 2, 3 * --output-len / 2] (EOS ignored): requests end at different times, as they do in service,
so arrivals are staggered on both sides alike.

- requests/s: completed requests / wall time of the run;
- TTFT: from sending a request to receiving its first token (first SSE chunk, or first engine output), per request;
  engine-side TTFT: from the request's arrival_time (when the engine thread takes it in, at the end of the iteration
  running when it was posted) to its first token, as the engine records it (the server's from its /metrics): the
  difference is the time spent outside the engine, that wait included;
- event loop CPU ms/request: CPU time of the serving process's main thread (where the event loop runs: HTTP parsing,
  validation, SSE writing in the server; just the consumers in process) / requests: the HTTP layer's own cost, which
  shows even where the cores are not saturated;
- CPU s/request: CPU time of the whole serving process (engine included) / requests;
- lone TTFT: one client sending --lone-requests requests one after the other (1 output token each): the latency the
  HTTP path adds to a request, without the batching effects of the loaded runs.

The HTTP clients (httpx, minimal SSE parsing) run in this process. Fixed seed, a warm-up run of each, then --repeats
pairs of runs (in process, then server), each pair started once other processes leave the cores alone (up to
--quiet-wait seconds) and run again if they used more than --max-interference of the CPU during it; figures are
medians with the min-max spread in brackets, and the ratios are medians of the per-pair ratios (a pair shares the
machine's conditions).

    python benchmarks/bench_server.py --clients 16 --requests 64 --repeats 3 --markdown bench.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from omniserve.bench.machine import OtherLoad, own_cpu_seconds, proc_cpu_seconds, wait_for_quiet
from omniserve.bench.report import command_line, cpu_model, print_report, spread, write_markdown
from omniserve.bench.workload import load_prompts
from omniserve.engine.async_engine import AsyncEngine
from omniserve.engine.llm_engine import LLMEngine
from omniserve.sampling.params import SamplingParams


class Run:
    """One closed-loop run's measurements."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tokens = 0
        self.seconds = 0.0
        self.cpu = 0.0
        """CPU seconds of the serving process."""
        self.loop_cpu = 0.0
        """CPU seconds of its main thread (the event loop)."""
        self.engine_ttft_s = 0.0
        """Sum over requests of arrival at the engine to first token, as the engine records it."""

    def requests_per_s(self) -> float:
        return len(self.ttft) / self.seconds


async def closed_loop(clients: int, prompts: list[list[int]], one_request) -> Run:
    """`clients` workers share the list of prompts; each sends its next request when the previous one ends."""
    run = Run()
    pending = list(enumerate(prompts))

    async def worker() -> None:
        while pending:
            index, prompt = pending.pop(0)
            ttft, tokens = await one_request(index, prompt)
            run.ttft.append(ttft)
            run.tokens += tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    run.seconds = time.perf_counter() - start
    return run


def run_in_process(async_engine: AsyncEngine, clients: int, prompts: list[list[int]], output_lens: list[int],
                   tag: str) -> Run:
    engine_ttft: list[float] = []

    async def one_request(index: int, prompt: list[int]) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=output_lens[index], ignore_eos=True)
        sent = time.perf_counter()
        ttft, tokens = None, 0
        async for out in async_engine.generate(f"{tag}-{index}", prompt, params):
            new = len(out.outputs[0].delta_token_ids)
            if new and ttft is None:
                ttft = time.perf_counter() - sent
                engine_ttft.append(out.metrics.first_token_time - out.metrics.arrival_time)
            tokens += new
        return ttft, tokens

    pid = os.getpid()
    cpu, loop_cpu = own_cpu_seconds(), proc_cpu_seconds(pid, pid)
    run = asyncio.run(closed_loop(clients, prompts, one_request))
    run.cpu, run.loop_cpu = own_cpu_seconds() - cpu, proc_cpu_seconds(pid, pid) - loop_cpu
    run.engine_ttft_s = sum(engine_ttft)
    return run


def engine_ttft_sum(url: str) -> float:
    """The server's vllm:time_to_first_token_seconds_sum over every label set."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "vllm:time_to_first_token_seconds_sum")


def run_server(url: str, server_pid: int, clients: int, prompts: list[list[int]], output_lens: list[int]) -> Run:
    async def main() -> Run:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as http:
            async def one_request(index: int, prompt: list[int]) -> tuple[float, int]:
                body = {"model": "smollm2", "prompt": prompt, "max_tokens": output_lens[index], "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                sent = time.perf_counter()
                ttft, tokens = None, 0
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if ttft is None:  # the server sends no chunk before the first token
                            ttft = time.perf_counter() - sent
                        if '"usage":{' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                return ttft, tokens

            return await closed_loop(clients, prompts, one_request)

    cpu, loop_cpu = proc_cpu_seconds(server_pid), proc_cpu_seconds(server_pid, server_pid)
    engine_ttft = engine_ttft_sum(url)
    run = asyncio.run(main())
    run.cpu = proc_cpu_seconds(server_pid) - cpu
    run.loop_cpu = proc_cpu_seconds(server_pid, server_pid) - loop_cpu
    time.sleep(0.2)  # the metrics are recorded on the engine thread just after the last answer went out
    run.engine_ttft_s = engine_ttft_sum(url) - engine_ttft
    return run


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "omniserve", "serve", "--port", "0", "--served-model-name", "smollm2",
               "--max-model-len", str(args.max_model_len), "--seed", str(args.seed), "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += ["--batch-db", str(Path(tempfile.mkdtemp(prefix="bench-server-")) / "batches.db")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    deadline = time.monotonic() + 300
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line.startswith("omniserve: serving"):
            return process, line.split(" on ")[-1].strip()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lone-requests", type=int, default=8, help="requests of the one-client TTFT runs")
    parser.add_argument("--quiet-wait", type=float, default=300, help="most seconds to wait for a quiet machine")
    parser.add_argument("--max-interference", type=float, default=0.05,
                        help="a pair during which other processes used more of the CPU than this is run again")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="engine CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown section here")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works "
                        "(its one pair kept whatever else runs on the machine)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.prompt_len, args.output_len, args.repeats = 2, 4, 16, 4, 1
        args.lone_requests, args.quiet_wait, args.max_interference, args.max_model_len = 2, 0.0, 1.0, 256
    return args


class Pairs:
    """The pairs of runs kept (in process, then server: loaded, then lone), the share of the CPU other processes
    used during each, and how many pairs were discarded for more than --max-interference."""

    def __init__(self) -> None:
        self.local: list[Run] = []
        self.remote: list[Run] = []
        self.lone_local: list[Run] = []
        self.lone_remote: list[Run] = []
        self.interference: list[float] = []
        self.discarded = 0


def run_pairs(args: argparse.Namespace, async_engine: AsyncEngine, server: subprocess.Popen, url: str,
              prompts: list[list[int]], output_lens: list[int]) -> Pairs:
    """--repeats pairs on a quiet enough machine, at most 3 x --repeats tries."""
    pairs, lone = Pairs(), prompts[:args.lone_requests]
    server_cpu = lambda: proc_cpu_seconds(server.pid)  # noqa: E731
    for attempt in range(3 * args.repeats):
        if len(pairs.local) == args.repeats:
            break
        wait_for_quiet(args.quiet_wait, ours=server_cpu)
        others = OtherLoad(server_cpu)
        pair = (run_in_process(async_engine, args.clients, prompts, output_lens, f"r{attempt}"),
                run_server(url, server.pid, args.clients, prompts, output_lens),
                run_in_process(async_engine, 1, lone, [1] * len(lone), f"lone{attempt}"),
                run_server(url, server.pid, 1, lone, [1] * len(lone)))
        share = others.share()
        for name, run in (("in-process", pair[0]), ("server", pair[1])):
            assert run.tokens == sum(output_lens), f"{name}: wrong number of tokens"
        print(f"pair {attempt}: in-process {pair[0].requests_per_s():.2f} req/s, server "
              f"{pair[1].requests_per_s():.2f} req/s; other processes {share:.0%} of the CPU",
              file=sys.stderr, flush=True)
        if share > args.max_interference:  # someone else's work skews the two runs unevenly: measure again
            pairs.discarded += 1
            continue
        for runs, run in zip((pairs.local, pairs.remote, pairs.lone_local, pairs.lone_remote), pair):
            runs.append(run)
        pairs.interference.append(share)
    if len(pairs.local) < args.repeats:
        raise SystemExit(f"only {len(pairs.local)} of {args.repeats} pairs ran on a quiet enough machine")
    return pairs


def figures(runs: list[Run], lone: list[Run]) -> dict[str, list[float]]:
    """Each run's figures, keyed as NAMES."""
    return {
        "rps": [r.requests_per_s() for r in runs],
        "tps": [r.tokens / r.seconds for r in runs],
        "ttft50": [statistics.median(r.ttft) * 1e3 for r in runs],
        "ttft90": [statistics.quantiles(r.ttft, n=10)[-1] * 1e3 for r in runs],
        "ttft_mean": [statistics.mean(r.ttft) * 1e3 for r in runs],
        "engine_ttft": [r.engine_ttft_s / len(r.ttft) * 1e3 for r in runs],
        "loop": [r.loop_cpu / len(r.ttft) * 1e3 for r in runs],
        "cpu": [r.cpu / len(r.ttft) for r in runs],
        "lone": [statistics.median(r.ttft) * 1e3 for r in lone],
    }


def ratio(local: list[float], server: list[float]) -> str:
    """Median [min-max] of the pairs' server/in-process ratios; `-` where no pair has a figure (a CPU time under the
    clock's tick in a short run)."""
    text = spread([y / x if x else float("nan") for x, y in zip(local, server)])
    return text if text == "-" else text + "x"


NAMES = {"rps": "requests/s", "tps": "output tok/s", "ttft50": "TTFT p50 ms", "ttft90": "TTFT p90 ms",
         "ttft_mean": "TTFT mean ms", "engine_ttft": "engine-side TTFT mean ms",
         "loop": "event loop CPU ms/request", "cpu": "CPU s/request", "lone": "lone TTFT p50 ms"}
COLUMNS = {"metric": "metric", "local": "in-process (AsyncEngine)", "server": "server (HTTP, SSE)",
           "ratio": "server/in-process"}


def info_lines(args: argparse.Namespace, threads: int, pairs: Pairs, output_lens: list[int],
               a: dict[str, list[float]], b: dict[str, list[float]]) -> list[str]:
    return [
        f"command: `{command_line()}`",
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {threads} threads, python "
        f"{platform.python_version()}; other processes used {statistics.mean(pairs.interference):.0%} of the CPU "
        f"during the pairs kept ({pairs.discarded} discarded for more than {args.max_interference:.0%})",
        f"workload: {args.clients} concurrent streaming clients in a closed loop, {args.requests} requests per run, "
        f"{args.prompt_len}-token prompts, {args.output_len // 2}-{3 * args.output_len // 2} greedy output tokens "
        f"(mean {statistics.mean(output_lens):.1f}, EOS ignored), fp32; {args.repeats} pairs of runs after a warm-up; "
        "median [min-max]",
        f"HTTP layer's cost in throughput: {1 - statistics.median(y / x for x, y in zip(a['rps'], b['rps'])):.1%} "
        "(1 - median of the pairs' server/in-process requests/s; goal: under 10%); the event loop's CPU is "
        f"{statistics.median(b['loop']) / 1e3 / statistics.median(b['cpu']):.1%} of the server's",
    ]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    engine = LLMEngine(max_model_len=args.max_model_len, seed=args.seed, threads=args.threads)
    threads = torch.get_num_threads()
    prompts = load_prompts(engine.tokenizer, args.requests, args.prompt_len, engine.model_config.vocab_size, args.seed)
    rng = random.Random(args.seed)
    output_lens = [rng.randint(args.output_len // 2, 3 * args.output_len // 2) for _ in prompts]
    async_engine = AsyncEngine(engine)
    server, url = start_server(args)
    try:
        warm = prompts[:args.clients]
        run_in_process(async_engine, args.clients, warm, [8] * len(warm), "warmup")
        run_server(url, server.pid, args.clients, warm, [8] * len(warm))
        pairs = run_pairs(args, async_engine, server, url, prompts, output_lens)
    finally:
        server.terminate()
        server.wait(60)
        async_engine.shutdown()
    a, b = figures(pairs.local, pairs.lone_local), figures(pairs.remote, pairs.lone_remote)
    rows = [{"metric": name, "local": spread(a[k]), "server": spread(b[k]), "ratio": ratio(a[k], b[k])}
            for k, name in NAMES.items()]
    info = info_lines(args, threads, pairs, output_lens, a, b)
    print_report(info, [(COLUMNS, rows)])
    write_markdown(args.markdown, "OpenAI-compatible server vs the engine in-process", info, [(COLUMNS, rows)])


if __name__ == "__main__":
    main()
