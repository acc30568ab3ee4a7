"""The simulator: its speed at paper scale, and its error against real runs of the engine on this machine.

Speed: one 30-minute experiment at the paper's scale (Llama-2-70B TP4 on 4 x A100, LS ShareGPT Poisson, BE
CNN/DailyMail-like on the Azure code trace at 182.6 requests/min) per policy; simulated requests per wall-clock
second, and the wall time against the goal of 2 minutes.

Validation (--validate DIR, the output folder of `benchmarks/bench_serving.py`): the very requests each policy's
real run sent (arrival, class, prompt and output length, from its result.json) are simulated with this machine's
measured profile and the servers' settings (one thread, 256 KV pages of 16 tokens, 512-token iterations, 2,048-token
context, the same SLOs); LS TTFT and TPOT p50/p99 and BE tokens/s, simulated / real.

CPU hosts (--hosts): BE output tokens/s of omniserve at the paper's scale (the speed experiment's setup, --duration
simulated seconds) with 0 to 4 CPU-only hosts beside the GPU server's own CPU, as a ratio to 0 hosts, with BE decode
placed as the engine places it by default (`auto`: offloaded when device KV runs short or the time budget leaves it
out) and with every BE decode offloaded (`cpu`), where the CPU pool's capacity bounds BE throughput.

    python benchmarks/bench_simulator.py --validate bench-serving --markdown simulator.md
    python benchmarks/bench_simulator.py --no-speed --hosts --duration 600
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from omniserve.simulator import experiment
from omniserve.simulator.profiles import get_profile
from omniserve.simulator.sim import SimConfig, SimRequest, Simulation
from omniserve.simulator.workload import ClassLoad


def speed(duration: float, policies: list[str]) -> list[str]:
    profile = get_profile("llama-2-70b@a100x4", num_cpu_hosts=1)
    loads = {"ls": ClassLoad(rate=2.0, lengths="sharegpt", max_input=4096, max_output=2048),
             "be": ClassLoad(trace="azure-code", rate=experiment.PAPER_BE_RATE, lengths="cnn", max_input=16384,
                             max_output=2048)}
    base = SimConfig(ls_ttft_slo=3.0, ls_tpot_slo=0.25, max_model_len=20000)
    lines = ["| policy | requests | simulated s | wall s | simulated requests / wall s | wall / 120 s goal |",
             "|---|---|---|---|---|---|"]
    for policy in policies:
        summary, result = experiment.simulate(profile, replace(base, policy=policy), loads, duration)
        lines.append(f"| {policy} | {len(result.records)} | {result.seconds:.0f} | {summary['wall_seconds']:.1f} | "
                     f"{summary['requests_per_wall_second']:.0f} | {summary['wall_seconds'] / 120:.2f} |")
        print(experiment.one_line(summary), flush=True)
    return lines


def hosts_scaling(duration: float, max_hosts: int, drain: float) -> list[str]:
    loads = {"ls": ClassLoad(rate=2.0, lengths="sharegpt", max_input=4096, max_output=2048),
             "be": ClassLoad(trace="azure-code", rate=experiment.PAPER_BE_RATE, lengths="cnn", max_input=16384,
                             max_output=2048)}
    lines = ["| BE decode placement | CPU hosts | BE tok/s | vs 0 hosts | LS SLO attainment | swap-outs | "
             "busiest host's CPU pool |", "|---|---|---|---|---|---|---|"]
    for placement in ("auto", "cpu"):
        base_tok_s = None
        for hosts in range(max_hosts + 1):
            profile = get_profile("llama-2-70b@a100x4", num_cpu_hosts=1 + hosts)
            config = SimConfig(ls_ttft_slo=3.0, ls_tpot_slo=0.25, max_model_len=20000, be_decode_placement=placement,
                               max_num_seqs=4096)
            summary, _ = experiment.simulate(profile, config, loads, duration, drain=drain)
            be = summary["summary"].get("be", {}).get("output_throughput", 0.0)
            ls = summary["summary"].get("ls", {}).get("slo_attainment") or 0.0
            base_tok_s = be if base_tok_s is None else base_tok_s
            ratio = f"{be / base_tok_s:.2f}x" if base_tok_s else "-"
            lines.append(f"| {placement} | {hosts} | {be:.0f} | {ratio} | {ls:.1%} | "
                         f"{summary['counters'].get('swap_outs', 0)} | {max(summary['cpu_pool_utilisation']):.0%} |")
    return lines


def _figure(summary: dict, service_class: str, metric: str, key: str) -> float | None:
    block = summary.get(service_class, {})
    return block.get(metric) if key is None else (block.get(metric) or {}).get(key)


def validate(folder: Path, profile_path: str | None) -> list[str]:
    kw = {"path": profile_path} if profile_path else {}
    profile = replace(get_profile("smollm2-135m@this-machine", **kw), device_kv_tokens=256 * 16)
    lines = ["| policy | LS TTFT p50 | LS TTFT p99 | LS TPOT p50 | LS TPOT p99 | BE tokens/s | LS SLO attainment "
             "(sim / real) |", "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*/result.json")):
        real = json.loads(path.read_text())
        policy = real.get("policy") or path.parent.name
        workload = [SimRequest(r["arrival"], r["service_class"], r["input_len"], r["output_len"])
                    for r in real["records"]]
        slo = real["slo"]["ls"]
        config = SimConfig(policy=policy, ls_ttft_slo=slo["ttft"], ls_tpot_slo=slo["tpot"], max_num_batched_tokens=512,
                           max_model_len=2048)
        duration = real["duration"]
        result = Simulation(profile, config).run(workload, until=real["run_seconds"])
        simulated = experiment.summarize(result, profile, config, duration)["summary"]
        cells = []
        for service_class, metric, key in (("ls", "ttft", "median"), ("ls", "ttft", "p99"), ("ls", "tpot", "median"),
                                           ("ls", "tpot", "p99"), ("be", "output_throughput", None),
                                           ("ls", "slo_attainment", None)):
            mine, theirs = _figure(simulated, service_class, metric, key), _figure(real["summary"], service_class,
                                                                                  metric, key)
            cells.append("-" if mine is None or not theirs else f"{mine / theirs:.2f}x")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800.0, help="simulated seconds of the speed experiment")
    parser.add_argument("--policies", default="omniserve,sarathi,llumnix,neo")
    parser.add_argument("--validate", type=Path, default=None, help="a bench_serving.py output folder")
    parser.add_argument("--profile-path", default=None, help="this machine's latency profile (default: the cache's)")
    parser.add_argument("--hosts", action="store_true", help="BE throughput vs CPU hosts (0-4)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed experiment")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks that the script works "
                        "(speed and hosts, a few simulated seconds each; --validate as given)")
    args = parser.parse_args()
    args.max_hosts, args.drain = 4, 300.0  # the hosts experiment's: 0-4 CPU hosts, 300 simulated s to drain
    if args.smoke:
        args.duration, args.no_speed, args.hosts, args.max_hosts, args.drain = 5.0, False, True, 1, 5.0
    started = time.perf_counter()
    lines = []
    if not args.no_speed:
        lines += ["Speed, one 30-minute experiment at paper scale per policy:", ""]
        lines += speed(args.duration, args.policies.split(","))
    if args.hosts:
        lines += ["", f"BE throughput vs CPU hosts, omniserve, {args.duration:.0f} simulated s:", ""]
        lines += hosts_scaling(args.duration, args.max_hosts, args.drain)
    if args.validate:
        lines += ["", f"Validation against the real runs in {args.validate}, simulated / real:", ""]
        lines += validate(args.validate, args.profile_path)
    lines += ["", f"({time.perf_counter() - started:.0f} s in all)"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
