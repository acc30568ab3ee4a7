"""`omniserve bench --compare`: the same workload (same seed) against one `omniserve serve` per policy, started and
stopped in turn, and one table of LS SLO attainment and BE throughput with omniserve's ratios to each baseline.

Every server gets the same LS SLOs. They are given (--ttft-slo/--tpot-slo), or set from the latency profile of the
server's model and engine settings (omniserve.bench.slos: profiled once if missing; the servers then find it in the
cache)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from omniserve.bench import runner
from omniserve.bench.metrics import Slo

_LISTENING = re.compile(r"serving .* on (http://\S+)")


class ServerError(RuntimeError):
    """A server of the comparison did not start; the message holds the end of its log."""


class Server:
    """`omniserve serve --policy P` in a process of its own, on a free port; its log and its batch database go beside
    each other."""

    def __init__(self, policy: str, slo: Slo, server_args: list[str], log_path: Path, start_timeout: float) -> None:
        command = [sys.executable, "-m", "omniserve", "serve", "--port", "0", "--policy", policy, *server_args]
        if "--batch-db" not in server_args:  # its own: not the user's server's (which holds it), nor its batches
            command += ["--batch-db", str(log_path.parent / "batches.db")]
        if slo.ttft is not None:
            command += ["--ls-ttft-slo", f"{slo.ttft:.6f}"]
        if slo.tpot is not None:
            command += ["--ls-tpot-slo", f"{slo.tpot:.6f}"]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = self._wait_until_ready(start_timeout)

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_until_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the server exited with {self.process.returncode}:\n{self._log_tail()}")
            if url is None and (match := _LISTENING.search(self.log_path.read_text(errors="replace"))):
                url = match.group(1)
            if url is not None:
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"the server was not ready within {timeout:.0f} s:\n{self._log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the server drains and exits); SIGKILL if it has not exited in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def compare(config: runner.BenchConfig, server_args: str, policies: tuple[str, ...], output_dir: Path,
            tokenizer, start_timeout: float = 900.0) -> list[dict]:
    """Runs the workload against each policy's server in turn; returns the results in policy order."""
    workload = runner.build_workload(config, tokenizer)
    args = shlex.split(server_args)
    results = []
    for n, policy in enumerate(policies):
        print(f"[{n + 1}/{len(policies)}] starting the {policy} server", file=sys.stderr, flush=True)
        folder = output_dir / policy
        folder.mkdir(parents=True, exist_ok=True)
        server = Server(policy, config.slo, args, folder / "server.log", start_timeout)
        try:
            result, records = runner.run(replace(config, base_url=server.url, label=policy), workload, tokenizer)
        finally:
            server.stop()
        result["policy"] = policy
        runner.write_outputs(result, records, folder, config.slo)
        print(runner.one_line(result), flush=True)
        results.append(result)
    return results


def _figure(result: dict, service_class: str, key: str) -> float | None:
    return result["summary"].get(service_class, {}).get(key)


def comparison_table(results: list[dict]) -> str:
    """Markdown: per policy, LS SLO attainment, LS TTFT/TPOT p99, rejections, BE tokens/s; then omniserve's ratios
    to each baseline."""
    lines = ["| policy | LS SLO attainment | LS TTFT p99 (ms) | LS TPOT p99 (ms) | LS rejected | BE tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ls, be = r["summary"].get("ls", {}), r["summary"].get("be", {})
        attainment = ls.get("slo_attainment")
        ttft, tpot = (ls.get("ttft") or {}).get("p99"), (ls.get("tpot") or {}).get("p99")
        lines.append(
            f"| {r['policy']} | {'-' if attainment is None else f'{attainment:.1%}'} | "
            f"{'-' if ttft is None else f'{ttft * 1e3:.0f}'} | {'-' if tpot is None else f'{tpot * 1e3:.0f}'} | "
            f"{ls.get('rejected', '-')} | {be.get('output_throughput', 0.0):.1f} |")
    ours = next((r for r in results if r["policy"] == "omniserve"), None)
    if ours is not None and len(results) > 1:
        lines += ["", "| omniserve vs | LS SLO attainment (ratio) | BE tokens/s (ratio) |", "|---|---|---|"]
        for r in results:
            if r is ours:
                continue
            cells = []
            for c, key in (("ls", "slo_attainment"), ("be", "output_throughput")):
                mine, theirs = _figure(ours, c, key), _figure(r, c, key)
                if mine is None or theirs is None:
                    cells.append("-")
                else:
                    cells.append(f"{mine / theirs:.2f}x" if theirs else "- (theirs 0)")
            lines.append(f"| {r['policy']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
