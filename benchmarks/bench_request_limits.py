"""Requests that ask the server for too much, beside a running stream: how fast each is refused, whether any of its
work ran, and the stream's largest inter-token gap meanwhile (against its median gap before them).

`omniserve serve` with the built-in SmolLM2-135M-Instruct and a services file: `smollm2-chat`, an LS service with a
1 s TTFT SLO (a short prompt meets it alone; 2,000 of them in one request cannot). The stream is a plain
`smollm2` completion. Sent one after another while it runs:

- 50,000 prompts in one request (the limit: 2,048 prompts x n)
- a 24 MiB prompt (under the 25 MiB body limit; longer than any context)
- a 100,000-character stop string (the limit: 1,024)
- 2,000 prompts to `smollm2-chat`: rejected by admission (429), and none of its prompts may run (the prompt
  tokens of requests that started, /metrics' vllm:prefix_cache_queries, before and after)

The first start profiles the model for the SLO scheduler (cached after; an iteration of at most 256 tokens keeps that
short). Port --port.

    python benchmarks/bench_request_limits.py --markdown limits.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown
from omniserve.bench.serve_process import start_serve

SERVICES = '[services.chat]\nclass = "ls"\nttft_slo = 1.0\ntpot_slo = 0.5\n'


def start_server(args: argparse.Namespace, services: Path) -> subprocess.Popen:
    return start_serve(["--port", str(args.port), "--services", str(services), "--max-model-len", "1024",
                        "--max-num-batched-tokens", "256", "--log-level", "warning"], timeout_s=args.start_timeout)


def stream(url: str, arrivals: list[float], stop: threading.Event) -> None:
    """A long streamed completion; the time of every chunk."""
    with httpx.stream("POST", url + "/v1/completions", timeout=600, json={
            "model": "smollm2", "prompt": "Tell me a long story about a dragon.", "max_tokens": 900,
            "ignore_eos": True, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
            if stop.is_set():
                return


def prompt_tokens(url: str) -> float:
    """Prompt tokens of the requests that started (each is looked up in the prefix cache as it starts)."""
    families = text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text)
    return sum(s.value for f in families if f.name == "vllm:prefix_cache_queries" for s in f.samples
               if s.name.endswith("_total"))


def refusals(url: str) -> list[dict]:
    """Each oversized request: its answer's status, how long it took, and the prompt tokens computed meanwhile."""
    cases = [
        ("50,000 prompts", {"model": "smollm2", "prompt": ["Hello there"] * 50_000, "max_tokens": 4}, 400),
        ("a 24 MiB prompt", {"model": "smollm2", "prompt": "x " * (12 * 2**20), "max_tokens": 4}, 400),
        ("a 100,000-character stop", {"model": "smollm2", "prompt": "Hi", "stop": ["y" * 100_000]}, 400),
        ("2,000 prompts to an LS service", {"model": "smollm2-chat", "prompt": [f"Say {i} twice." for i in range(2000)],
                                            "max_tokens": 4}, 429),
    ]
    rows = []
    for name, body, expected in cases:
        before = prompt_tokens(url)
        started = time.monotonic()
        answer = httpx.post(url + "/v1/completions", json=body, timeout=600)
        seconds = time.monotonic() - started
        time.sleep(0.5)  # prompt tokens a refused request ran would be counted by now
        rows.append(dict(request=name, status=f"{answer.status_code} (goal {expected})", seconds=f"{seconds:.2f}",
                         prompt_tokens_run=f"{prompt_tokens(url) - before:.0f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as folder:
        services = Path(folder) / "services.toml"
        services.write_text(SERVICES)
        server = start_server(args, services)
        try:
            arrivals: list[float] = []
            stop = threading.Event()
            streaming = threading.Thread(target=stream, args=(url, arrivals, stop), daemon=True)
            streaming.start()
            while len(arrivals) < 40:
                time.sleep(0.05)
            baseline = statistics.median(b - a for a, b in zip(arrivals, arrivals[1:]))
            first = len(arrivals)
            rows = refusals(url)
            last = len(arrivals)
            stop.set()
            worst = max(b - a for a, b in zip(arrivals[first - 1:last], arrivals[first:last + 1]))
        finally:
            server.terminate()
            server.wait(timeout=120)
    gap = [dict(request="the stream's largest gap while they were refused", status="", seconds=f"{worst:.2f}",
                prompt_tokens_run=f"{worst / baseline:.1f}x its median gap before ({baseline * 1e3:.0f} ms); goal "
                "<= 1 s")]
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}", "the built-in model; one stream running; goals: "
            "each refused within 1 s, none of a refused request's prompts run, the stream's gaps <= 1 s"]
    columns = dict(request="request", status="status", seconds="answered in s", prompt_tokens_run="prompt tokens run")
    tables = [(columns, rows + gap)]
    print_report(info, tables)
    write_markdown(args.markdown, "Requests over the limits beside a stream", info, tables)


if __name__ == "__main__":
    main()
