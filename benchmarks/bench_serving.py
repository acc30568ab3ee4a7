"""The five policies served over HTTP on this machine, one workload: `omniserve bench --compare` with the default
model, an LS stream of ShareGPT prompts (Poisson) near what the device sustains, SLOs set from the latency profile,
and BE arrivals replayed from the Azure code trace, time-scaled to this machine, with long-input lengths in the
shape of the OmniServe paper's CNN/DailyMail-like BE (1,964 in / 397 out on average), halved to fit this machine's
2,048-token context: random prompts of 512-1,024 tokens, 128-256 output tokens. (The code trace's own lengths, 13
output tokens at the median, make BE work nearly all prefill, which no placement of decode attention changes.)

Every server: the engine on one thread, device KV of --kv-pages pages of 16 tokens (few enough that BE prompts from
the trace fill them, so offloading, headroom and preemption all come into play), one CPU attention worker of one
thread. Prints the comparison table and checks the goals: omniserve's LS SLO attainment within 1% of sarathi's
(the LS-first, device-only policy) and its BE tokens/s above every baseline's.

    python benchmarks/bench_serving.py --markdown serving.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from omniserve.bench.smoke import SMOKE_ENGINE_FLAGS

# Engine settings of every server (besides --kv-pages) and the workload's lengths, at full size and at --smoke's.
ENGINE = "--max-model-len 2048 --max-num-batched-tokens 512"
LENGTHS = {"ls_max_input": "256", "ls_output": "32:64", "be_input": "512:1024", "be_output": "128:256"}
SMOKE_LENGTHS = {"ls_max_input": "32", "ls_output": "4:8", "be_input": "32:64", "be_output": "4:8"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--ls-rate", type=float, default=1.2)
    parser.add_argument("--be-time-scale", type=float, default=2.0, help="Azure code trace stretched this much")
    parser.add_argument("--kv-pages", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="omniserve,sarathi,llumnix,neo,fcfs")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-serving"))
    parser.add_argument("--markdown", type=Path, help="also write the section for BENCHMARKS.md here")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works "
                        "(seconds of load, short requests, omniserve and sarathi)")
    args = parser.parse_args()
    engine, lengths = ENGINE, LENGTHS
    if args.smoke:
        args.duration, args.kv_pages, args.policies = 3.0, 16, "omniserve,sarathi"
        engine, lengths = SMOKE_ENGINE_FLAGS, SMOKE_LENGTHS

    server_args = (f"--threads 1 {engine} --num-gpu-blocks-override {args.kv_pages} --cpu-attention-workers 1 "
                   "--cpu-attention-threads 1")
    command = [
        sys.executable, "-m", "omniserve", "bench", "--compare", "--policies", args.policies,
        "--duration", str(args.duration), "--drain-timeout", "60", "--seed", str(args.seed),
        "--ls-rate", str(args.ls_rate), "--ls-max-input-len", lengths["ls_max_input"],
        "--ls-output-len", lengths["ls_output"], "--be-trace", "azure-code", "--be-time-scale", str(args.be_time_scale),
        "--be-dataset", "random", "--be-input-len", lengths["be_input"], "--be-output-len", lengths["be_output"],
        "--server-args", server_args, "--output-dir", str(args.output_dir),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((args.output_dir / "comparison.json").read_text())
    table = (args.output_dir / "comparison.md").read_text().strip()
    by_policy = {r["policy"]: r["summary"] for r in results}
    slo = results[0]["slo"]["ls"]
    lines = [f"LS SLOs (from the latency profile): TTFT {slo['ttft'] * 1e3:.0f} ms, TPOT {slo['tpot'] * 1e3:.1f} ms",
             "", table, ""]
    ours = by_policy.get("omniserve")
    if ours and "sarathi" in by_policy:
        gap = ours["ls"]["slo_attainment"] - by_policy["sarathi"]["ls"]["slo_attainment"]
        lines.append(f"- goal: LS attainment within 1% of sarathi's: {gap:+.1%} points, "
                     f"{'met' if gap >= -0.01 else 'missed'}")
    if ours:
        others = {p: s["be"]["output_throughput"] for p, s in by_policy.items() if p != "omniserve"}
        best = max(others, key=others.get) if others else None
        if best:
            ratio = ours["be"]["output_throughput"] / max(others[best], 1e-9)
            lines.append(f"- goal: BE tokens/s above every baseline: {ratio:.2f}x the best baseline ({best}), "
                         f"{'met' if ratio > 1 else 'missed'}")
    for policy, summary in by_policy.items():
        be = summary["be"]
        lines.append(f"- {policy}: LS {summary['ls']['requests']} requests ({summary['ls']['rejected']} rejected, "
                     f"{summary['ls']['failed']} failed); BE {be['requests']} requests, {be['ok']} done, "
                     f"{be['cancelled']} still open at the end")
    text = "\n".join(lines)
    print(text)
    print("command: " + shlex.join(command[1:]))
    if args.markdown:
        args.markdown.write_text(text + "\n\nCommand: `python " + shlex.join(command[1:]) + "`\n")


if __name__ == "__main__":
    main()
