"""Simulated experiments: one run per policy on the same workload, summarised with the benchmark's own metrics (so
simulated and measured figures mean the same thing), and the OmniServe paper's preset."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omniserve.bench import metrics, plots
from omniserve.bench.metrics import Slo
from omniserve.simulator.profiles import SystemProfile, get_profile
from omniserve.simulator.sim import SimConfig, SimRequest, SimResult, Simulation
from omniserve.simulator.workload import ClassLoad, build_workload


def summarize(result: SimResult, profile: SystemProfile, config: SimConfig, duration: float) -> dict:
    slo = Slo(config.ls_ttft_slo, config.ls_tpot_slo)
    workers = profile.cpu_workers_per_host
    return {
        "profile": profile.name, "policy": config.policy, "simulated_seconds": result.seconds,
        "iterations": result.iterations, "slo": {"ls": asdict(slo)},
        "summary": metrics.summarize(result.records, duration, result.seconds, {"ls": slo}),
        "device_utilisation": result.device_busy / result.seconds if result.seconds else 0.0,
        "cpu_pool_utilisation": [busy / (result.seconds * workers) if result.seconds else 0.0
                                 for busy in result.cpu_busy],
        "counters": result.counters,
    }


def one_line(summary: dict) -> str:
    ls, be = summary["summary"].get("ls", {}), summary["summary"].get("be", {})
    attainment = ls.get("slo_attainment")
    return (f"{summary['policy']:>9}: LS SLO attainment {'-' if attainment is None else f'{attainment:.1%}'} "
            f"({ls.get('requests', 0)} requests, {ls.get('rejected', 0)} rejected), LS TPOT p99 "
            f"{((ls.get('tpot') or {}).get('p99') or 0) * 1e3:.0f} ms, BE {be.get('output_throughput', 0.0):.1f} "
            f"tok/s; device {summary['device_utilisation']:.0%} busy, CPU pool "
            f"{max(summary['cpu_pool_utilisation'], default=0):.0%} (busiest host)")


def simulate(profile: SystemProfile, config: SimConfig, loads: dict[str, ClassLoad], duration: float,
             drain: float = 600.0, progress=None, backlog: tuple[SimRequest, ...] = (),
             measure_from: float = 0.0) -> tuple[dict, SimResult]:
    """One simulated run; requests still open `drain` seconds after the arrivals end are cancelled. `backlog`:
    requests besides the loads' arrivals (a batch queued at the start); resource use is measured from
    `measure_from`."""
    workload = sorted([*build_workload(loads, duration, config.seed), *backlog], key=lambda r: r.arrival)
    started = time.perf_counter()
    result = Simulation(profile, config).run(workload, until=duration + drain, progress=progress,
                                             measure_from=measure_from)
    summary = summarize(result, profile, config, duration)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["requests_per_wall_second"] = len(workload) / max(summary["wall_seconds"], 1e-9)
    return summary, result


def write_outputs(summary: dict, result: SimResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(summary, indent=1))
    slo = Slo(**summary["slo"]["ls"])
    title = f"simulated: {summary['policy']} on {summary['profile']}"
    plots.latency_cdfs(result.records, {"ls": slo}, folder / "latency_cdf.png", title)
    timeline = metrics.timeline(result.records, result.seconds, max(1.0, result.seconds / 120))
    plots.timeline_plot(timeline, {"ls": slo}, folder / "timeline.png", title)


# ---------------------------------------------------------------------------------------------------- the paper
@dataclass(frozen=True)
class PaperCase:
    """One comparison of the paper's evaluation (see `paper_cases`)."""

    name: str
    profile: str
    num_cpu_hosts: int
    ttft_slo: float
    tpot_slo: float
    ls_rate: float
    be_lengths: str


# The paper's BE arrivals: an Azure trace at 182.6 requests/min on average (the code trace, rescaled to that rate).
PAPER_BE_RATE = 182.6 / 60
PAPER_POLICIES = ("omniserve", "sarathi", "llumnix", "neo")


def paper_cases() -> list[PaperCase]:
    """Llama-2-70B (TP4, SLOs 3 s / 0.25 s) and Yi-34B (TP2, 2 s / 0.2 s) on 4 x A100 with the local CPU only and with
    4 CPU hosts, LongBench-v2-like and CNN/DailyMail-like BE, LS at a heavy rate; and Llama-2-70B at the tighter
    TPOT SLO of 0.15 s, where headroom reservation loses most LS attainment."""
    cases = []
    for model, profile, ttft, tpot, rate in (("llama-2-70b", "llama-2-70b@a100x4", 3.0, 0.25, 2.0),
                                             ("yi-34b", "yi-34b@a100x4", 2.0, 0.2, 2.0)):
        for hosts in (1, 5):
            for lengths in ("longbench", "cnn"):
                cases.append(PaperCase(f"{model} {lengths} {hosts - 1} CPU hosts", profile, hosts, ttft, tpot, rate,
                                       lengths))
    cases.append(PaperCase("llama-2-70b cnn TPOT 0.15 s", "llama-2-70b@a100x4", 1, 3.0, 0.15, 2.0, "cnn"))
    return cases


def run_paper(duration: float, seed: int = 0, cases: list[PaperCase] | None = None, progress=None,
              policies: tuple[str, ...] = PAPER_POLICIES, drain: float = 600.0) -> list[dict]:
    """Every case under every policy; returns one row per case with each policy's figures."""
    rows = []
    for case in cases or paper_cases():
        profile = get_profile(case.profile, num_cpu_hosts=case.num_cpu_hosts)
        loads = {"ls": ClassLoad(rate=case.ls_rate, lengths="sharegpt", max_input=4096, max_output=2048),
                 "be": ClassLoad(trace="azure-code", rate=PAPER_BE_RATE, lengths=case.be_lengths, max_input=16384,
                                 max_output=2048)}
        base = SimConfig(ls_ttft_slo=case.ttft_slo, ls_tpot_slo=case.tpot_slo, seed=seed, max_model_len=20000)
        row = {"case": case.name, "policies": {}}
        for policy in policies:
            summary, _ = simulate(profile, replace(base, policy=policy), loads, duration, drain, progress)
            row["policies"][policy] = summary
        rows.append(row)
    return rows


def paper_table(rows: list[dict]) -> str:
    """Markdown: per case, omniserve's LS attainment and BE tokens/s, and its ratios to each baseline."""
    baselines = ("llumnix", "neo", "sarathi")
    head = ("| case | omniserve LS attainment | omniserve BE tok/s | "
            + " | ".join(f"vs {b}: LS / BE" for b in baselines) + " |")
    lines = [head, "|" + "---|" * (3 + len(baselines))]
    for row in rows:
        figures = {p: (s["summary"].get("ls", {}).get("slo_attainment") or 0.0,
                       s["summary"].get("be", {}).get("output_throughput") or 0.0) for p, s in row["policies"].items()}
        ours = figures["omniserve"]
        cells = []
        for b in baselines:
            if b not in figures:
                cells.append("-")
                continue
            ls = f"{ours[0] / figures[b][0]:.2f}x" if figures[b][0] else "- (theirs 0)"
            be = f"{ours[1] / figures[b][1]:.2f}x" if figures[b][1] else "- (theirs 0)"
            cells.append(f"{ls} / {be}")
        lines.append(f"| {row['case']} | {ours[0]:.1%} | {ours[1]:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
