"""SIGTERM to `omniserve serve --instances N` (engines on Ray behind the router) while streams run: how long the
process takes to exit against the drain's grace period + 5 s, what a new request gets meanwhile, and how every
stream ended (finished, or the `draining` error event then `data: [DONE]`; never cut).

The built-in SmolLM2-135M-Instruct on this machine's local Ray; each stream asks for more tokens than the grace
period lets it generate, so the drain has to end them.

    python benchmarks/bench_drain.py --markdown drain.md
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown
from omniserve.bench.serve_process import start_serve


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    """`omniserve serve --instances N`, once its router listens."""
    return start_serve(["--instances", str(args.instances), "--port", str(args.port), "--shutdown-timeout",
                        str(args.grace), "--max-model-len", "2048"], ready="routing to", timeout_s=args.start_timeout)


def stream(url: str, max_tokens: int, ends: dict, index: int) -> None:
    """One streamed completion; records its last two events."""
    last: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
                "model": "smollm2", "prompt": "Tell me a long story about a dragon.", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    last = (last + [line])[-2:]
    except httpx.HTTPError as exc:
        last = [f"cut: {exc!r}"]
    ends[index] = last


def how_it_ended(last: list[str]) -> str:
    if not last or last[-1] != "data: [DONE]":
        return "cut"
    return "draining event" if '"draining"' in last[0] else "finished"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--grace", type=float, default=5.0, help="the server's --shutdown-timeout")
    parser.add_argument("--run-before", type=float, default=8.0, help="seconds the streams run before SIGTERM")
    parser.add_argument("--max-tokens", type=int, default=1500, help="each stream's length (longer than the drain)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    server = start_server(args)
    ends: dict[int, list[str]] = {}
    streams = [threading.Thread(target=stream, args=(url, args.max_tokens, ends, i)) for i in range(args.streams)]
    for thread in streams:
        thread.start()
    time.sleep(args.run_before)
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        refused = str(httpx.post(url + "/v1/completions", json={"model": "smollm2", "prompt": "x"},
                                 timeout=10).status_code)
    except httpx.HTTPError as exc:
        refused = f"no answer ({type(exc).__name__})"
    server.wait(timeout=args.grace + 300)
    exit_s = time.monotonic() - signalled
    for thread in streams:
        thread.join(timeout=60)
    kinds = [how_it_ended(ends.get(i, [])) for i in range(args.streams)]
    limit = args.grace + 5
    rows = [dict(figure="exit after SIGTERM / (grace + 5 s)", value=f"{exit_s:.1f} s / {limit:.0f} s",
                 ratio=f"{exit_s / limit:.2f}", goal="<= 1"),
            dict(figure="exit status", value=str(server.returncode), ratio="", goal="0"),
            dict(figure="a new request during the drain", value=refused, ratio="", goal="503"),
            dict(figure="streams ended with the draining event or finished", value=(
                f"{sum(k != 'cut' for k in kinds)}/{args.streams} ({kinds.count('draining event')} draining, "
                f"{kinds.count('finished')} finished)"), ratio=f"{sum(k != 'cut' for k in kinds) / args.streams:.2f}",
                 goal="1.00")]
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}",
            f"{args.instances} instances of the built-in model on local Ray, {args.streams} streams of "
            f"{args.max_tokens} tokens, SIGTERM after {args.run_before:g} s, grace {args.grace:g} s"]
    tables = [(dict(figure="figure", value="value", ratio="ratio", goal="goal"), rows)]
    print_report(info, tables)
    write_markdown(args.markdown, "SIGTERM behind the router", info, tables)


if __name__ == "__main__":
    main()
