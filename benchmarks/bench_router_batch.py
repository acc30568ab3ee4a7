"""A batch behind `omniserve serve --instances N` through two crashes: kill -9 of the router part-way (the whole
server: the router's process is the Ray driver, so its instances go with it), a restart on the same batch database,
then kill -9 of one engine instance's process while lines run on it. Figures: results in the output file against
the lines sent, custom_ids answered more than once, lines in input order, and how long each recovery took.

The built-in SmolLM2-135M-Instruct on this machine's local Ray (a CPU each instance).

    python benchmarks/bench_router_batch.py --markdown router_batch.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import psutil

from omniserve.bench.report import command_line, cpu_model, print_report, write_markdown
from omniserve.bench.serve_process import start_serve


def start_server(args: argparse.Namespace, db: Path) -> subprocess.Popen:
    """`omniserve serve --instances N` on the batch database `db`, once its router listens."""
    return start_serve(["--instances", str(args.instances), "--port", str(args.port), "--batch-db", str(db),
                        "--max-model-len", "1024"], ready="routing to", timeout_s=args.start_timeout,
                       new_session=True)


def kill_9(server: subprocess.Popen) -> None:
    """kill -9 of the server's process alone (its Ray processes are left to notice, as after a crash)."""
    server.send_signal(signal.SIGKILL)
    server.wait()


def instance_pid(url: str) -> int:
    """The process that listens on an instance's port (its Ray actor)."""
    port = int(url.rsplit(":", 1)[1])
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    raise RuntimeError(f"no process listens on {url}")


def wait_for(client: openai.OpenAI, batch_id: str, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
            if done(batch):
                return batch
        except openai.APIConnectionError:
            pass  # the router is starting again
        if time.monotonic() > deadline:
            sys.exit(f"batch {batch_id} did not get there in {timeout_s:.0f} s")
        time.sleep(0.2)


def batch_file(lines: int, max_tokens: int) -> bytes:
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                      "messages": [{"role": "user", "content": f"Count from {i} to {i + 20}."}]}}
            for i in range(lines)]
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def crash_run(args: argparse.Namespace, db: Path, client: openai.OpenAI, url: str) -> tuple[list[dict], dict]:
    """The batch through kill -9 of the router, a restart, and kill -9 of an instance; (output lines, timings)."""
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(batch_file(args.lines, args.max_tokens))),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    first = args.lines // 5
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= first, args.run_timeout)
    kill_9(args.server)
    restarted = time.monotonic()
    args.server = start_server(args, db)
    before = wait_for(client, batch.id, lambda b: True, args.run_timeout).request_counts.completed
    wait_for(client, batch.id, lambda b: b.request_counts.completed > before, args.run_timeout)
    resumed_s = time.monotonic() - restarted
    victim = httpx.get(url + "/load", timeout=10).json()["instances"][0]["url"]
    os.kill(instance_pid(victim), signal.SIGKILL)
    lost = time.monotonic()
    at_loss = client.batches.retrieve(batch.id).request_counts.completed
    wait_for(client, batch.id, lambda b: b.request_counts.completed > at_loss, args.run_timeout)
    recovered_s = time.monotonic() - lost
    batch = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
                     args.run_timeout)
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()] \
        if batch.output_file_id else []
    return output, dict(status=batch.status, answered_before_kill=first, restart_to_progress_s=resumed_s,
                        instance_loss_to_progress_s=recovered_s, failed=batch.request_counts.failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--run-timeout", type=float, default=900.0)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "batches.db"
        args.server = start_server(args, db)
        try:
            output, run = crash_run(args, db, client, url)
        finally:
            args.server.send_signal(signal.SIGTERM)
            args.server.wait(timeout=120)
    ids = Counter(o["custom_id"] for o in output)
    in_order = [o["custom_id"] for o in output] == [f"q{i}" for i in range(args.lines)]
    rows = [dict(figure="results / lines sent", value=f"{len(ids)}/{args.lines}", ratio=f"{len(ids) / args.lines:.2f}",
                 goal="1.00"),
            dict(figure="custom_ids answered more than once", value=str(sum(n > 1 for n in ids.values())), ratio="",
                 goal="0"),
            dict(figure="failed lines", value=str(run["failed"]), ratio="", goal="0"),
            dict(figure="output in input order", value=str(in_order), ratio="", goal="True"),
            dict(figure="router kill -9 -> restart -> next line answered", value=f"{run['restart_to_progress_s']:.1f} s",
                 ratio="", goal=""),
            dict(figure="instance kill -9 -> next line answered", value=f"{run['instance_loss_to_progress_s']:.1f} s",
                 ratio="", goal="")]
    info = [f"command: {command_line()}", f"CPU: {cpu_model()}",
            f"{args.instances} instances of the built-in model on local Ray; a batch of {args.lines} chat lines of "
            f"{args.max_tokens} tokens; kill -9 of the router after {args.lines // 5} answers, restart, then kill -9 "
            f"of one instance; batch {run['status']}"]
    tables = [(dict(figure="figure", value="value", ratio="ratio", goal="goal"), rows)]
    print_report(info, tables)
    write_markdown(args.markdown, "A batch behind the router through kill -9", info, tables)


if __name__ == "__main__":
    main()
