"""Simulated experiments: one run per policy on the same workload, summarised with the benchmark's own metrics (so
simulated and measured figures mean the same thing), and the OmniServe paper's preset."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omniserve.bench import metrics, plots
from omniserve.bench.metrics import Slo
from omniserve.sampling.params import ServiceClass
from omniserve.simulator import baselines
from omniserve.simulator.profiles import SystemProfile, get_profile
from omniserve.simulator.sim import SimConfig, SimRequest, SimResult
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
            f"{max(summary['cpu_pool_utilisation'], default=0):.0%} (busiest host)" + _prefix_hits(summary))


def _prefix_hits(summary: dict) -> str:
    queries = summary["counters"].get("prefix_cache_queries", 0)
    hits = summary["counters"].get("prefix_cache_hits", 0)
    return f"; prefix cache {hits / queries:.0%} of prompt tokens" if hits else ""


def simulate(profile: SystemProfile, config: SimConfig, loads: dict[ServiceClass, ClassLoad], duration: float,
             drain: float = 600.0, progress=None, backlog: tuple[SimRequest, ...] = (),
             measure_from: float = 0.0) -> tuple[dict, SimResult]:
    """One simulated run; requests still open `drain` seconds after the arrivals end are cancelled. `backlog`:
    requests besides the loads' arrivals (a batch queued at the start); resource use is measured from
    `measure_from`."""
    workload = sorted([*build_workload(loads, duration, config.seed), *backlog], key=lambda r: r.arrival)
    started = time.perf_counter()
    result = baselines.run(profile, config, workload, until=duration + drain, progress=progress,
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
    group: str = ""
    """Cases of one group differ only in the LS rate (the heaviest-load summary is per group)."""


# The paper's BE arrivals: an Azure trace at 182.6 requests/min on average (the code trace, rescaled to that rate).
PAPER_BE_RATE = 182.6 / 60
PAPER_POLICIES = ("omniserve", "sarathi", "llumnix-cpu", "neo-sync")
"""omniserve, the strongest GPU-only baseline, and the paper's two baselines as it ran them (baselines.py)."""
PAPER_LS_RATES = (1.0, 2.0, 4.0)
PAPER_MODELS = (("llama-2-70b", "llama-2-70b@a100x4", 3.0, 0.25), ("yi-34b", "yi-34b@a100x4", 2.0, 0.2))
"""Llama-2-70B (TP4, SLOs 3 s / 0.25 s) and Yi-34B (TP2, 2 s / 0.2 s) on 4 x A100."""
PAPER_GOALS = {0: 3.47, 4: 9.85}
"""The paper's BE throughput over its Llumnix, by CPU hosts beyond the GPU server's own (1G: 3.47x, 1G4C: 9.85x)."""


def paper_cases(ls_rates: tuple[float, ...] = PAPER_LS_RATES) -> list[PaperCase]:
    """Each model with LongBench-v2-like and CNN/DailyMail-like BE, with the local CPU only (1G) and with 4 CPU
    hosts (1G4C), at each LS rate; and Llama-2-70B at the tighter TPOT SLO of 0.15 s, where headroom reservation
    loses most LS attainment."""
    cases = []
    for model, profile, ttft, tpot in PAPER_MODELS:
        for hosts in (1, 5):
            for lengths in ("longbench", "cnn"):
                group = f"{model} {lengths} {'1G' if hosts == 1 else '1G4C'}"
                cases += [PaperCase(f"{group} LS {rate:g}/s", profile, hosts, ttft, tpot, rate, lengths, group)
                          for rate in ls_rates]
    cases.append(PaperCase("llama-2-70b cnn 1G TPOT 0.15 s LS 2/s", "llama-2-70b@a100x4", 1, 3.0, 0.15, 2.0, "cnn",
                           "llama-2-70b cnn 1G TPOT 0.15 s"))
    return cases


def _paper_loads(ls_rate: float, be_lengths: str) -> dict[ServiceClass, ClassLoad]:
    return {ServiceClass.LS: ClassLoad(rate=ls_rate, lengths="sharegpt", max_input=4096, max_output=2048),
            ServiceClass.BE: ClassLoad(trace="azure-code", rate=PAPER_BE_RATE, lengths=be_lengths, max_input=16384,
                                       max_output=2048)}


def run_paper(duration: float, seed: int = 0, cases: list[PaperCase] | None = None, progress=None,
              policies: tuple[str, ...] = PAPER_POLICIES, drain: float = 600.0) -> list[dict]:
    """Every case under every policy; returns one row per case with each policy's figures."""
    rows = []
    for case in cases or paper_cases():
        profile = get_profile(case.profile, num_cpu_hosts=case.num_cpu_hosts)
        base = SimConfig(ls_ttft_slo=case.ttft_slo, ls_tpot_slo=case.tpot_slo, seed=seed, max_model_len=20000)
        row = {"case": case.name, "group": case.group, "cpu_hosts": case.num_cpu_hosts - 1, "ls_rate": case.ls_rate,
               "policies": {}}
        for policy in policies:
            summary, _ = simulate(profile, replace(base, policy=policy), _paper_loads(case.ls_rate, case.be_lengths),
                                  duration, drain, progress)
            row["policies"][policy] = summary
        rows.append(row)
    return rows


def _figures(summary: dict) -> tuple[float, float]:
    """(LS SLO attainment, BE output tokens/s) of one run."""
    classes = summary["summary"]
    return (classes.get("ls", {}).get("slo_attainment") or 0.0,
            classes.get("be", {}).get("output_throughput") or 0.0)


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "- (theirs 0)"


def paper_table(rows: list[dict]) -> str:
    """Markdown: per case, omniserve's LS attainment and BE tokens/s, and its ratios to each baseline; then, per
    group, the heaviest LS load where omniserve keeps >= 90% LS attainment, against the paper's goal over Llumnix."""
    baselines = [p for p in (*PAPER_POLICIES[1:], "llumnix", "neo") if rows and p in rows[0]["policies"]]
    head = ("| case | omniserve LS attainment | omniserve BE tok/s | "
            + " | ".join(f"vs {b}: LS / BE" for b in baselines) + " |")
    lines = [head, "|" + "---|" * (3 + len(baselines))]
    for row in rows:
        figures = {p: _figures(s) for p, s in row["policies"].items()}
        ours = figures["omniserve"]
        cells = [f"{_ratio(ours[0], figures[b][0])} / {_ratio(ours[1], figures[b][1])}" for b in baselines]
        lines.append(f"| {row['case']} | {ours[0]:.1%} | {ours[1]:.0f} | " + " | ".join(cells) + " |")
    if rows and "llumnix-cpu" in rows[0]["policies"]:
        lines += ["", "| group | heaviest LS rate with omniserve >= 90% LS | BE tok/s omniserve / llumnix-cpu | "
                      "the paper's | LS attainment llumnix-cpu |", "|---|---|---|---|---|"]
        for group in dict.fromkeys(row["group"] for row in rows):
            held = [r for r in rows if r["group"] == group and _figures(r["policies"]["omniserve"])[0] >= 0.9]
            if not held:
                lines.append(f"| {group} | none | - | - | - |")
                continue
            row = max(held, key=lambda r: r["ls_rate"])
            ours, theirs = _figures(row["policies"]["omniserve"]), _figures(row["policies"]["llumnix-cpu"])
            goal = PAPER_GOALS.get(row["cpu_hosts"])
            lines.append(f"| {group} | {row['ls_rate']:g}/s | {_ratio(ours[1], theirs[1])} | "
                         f"{'-' if goal is None else f'{goal:g}x'} | {theirs[0]:.1%} |")
    return "\n".join(lines)


def run_host_sweep(duration: float, seed: int = 0, hosts: tuple[int, ...] = (0, 1, 2, 3, 4), progress=None,
                   policies: tuple[str, ...] = ("omniserve", "llumnix-cpu"), drain: float = 600.0,
                   case: PaperCase | None = None) -> list[dict]:
    """BE throughput against CPU hosts beyond the GPU server's own (the paper's scaling figure): Llama-2-70B with
    LongBench-like BE at LS 2/s unless `case` says otherwise; one row per host count."""
    case = case or PaperCase("", "llama-2-70b@a100x4", 1, 3.0, 0.25, 2.0, "longbench")
    return run_paper(duration, seed, [replace(case, name=f"{count} CPU hosts", num_cpu_hosts=1 + count)
                                      for count in hosts], progress, policies, drain)


def host_sweep_table(rows: list[dict]) -> str:
    """Markdown: BE tok/s per policy against CPU hosts, each as a ratio to the same policy with none."""
    policies = list(rows[0]["policies"]) if rows else []
    first = {p: _figures(rows[0]["policies"][p])[1] for p in policies} if rows else {}
    lines = ["| CPU hosts | " + " | ".join(f"{p}: BE tok/s (x of 0 hosts), LS" for p in policies) + " |",
             "|" + "---|" * (1 + len(policies))]
    for row in rows:
        cells = []
        for p in policies:
            ls, be = _figures(row["policies"][p])
            cells.append(f"{be:.1f} ({_ratio(be, first[p])}), {ls:.1%}")
        lines.append(f"| {row['cpu_hosts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
