"""The regime map: where offloading BE decode attention to the CPU pays, and which resource binds where.

One sweep over (device KV available per BE request x LS load x BE shape x CPU hosts) runs omniserve, sarathi (the
strongest GPU-only LS-first baseline) and omniserve with the paper's one-layer pipeline on the same workload with the
same SLOs in each cell, and reports BE throughput, the LS attainments and, for each policy, the resource that binds
BE (`binding_resource`).

The axes, from the profile and the length sources rather than in absolute numbers, so that one sweep means the same
on any model and GPU:
- device KV per BE request: the device KV is set (dataclasses.replace on the profile) to the LS load's mean KV in use
  (Little's law, `LengthStats.resident`) plus N times one BE request's mean KV (prompt + output);
- LS load: a fraction of the device's LS saturation rate (`saturation_rate`), or absolute rates;
- BE shape: a length source of workload.py (`longbench`, `cnn`, `fixed:IN:OUT`, ...): a batch queued at the start
  (`be_backlog` times what the device and every host can hold of the shape) and Poisson arrivals at `be_load` times
  the device's BE saturation rate, so that BE always queues;
- host KV per host (`host_kv_requests`, optional): the memory each host gives the pool, in BE requests' mean KV.

Figures are the steady state's: BE throughput and resource use are counted after a warm-up (`warmup` seconds) in
which the backlog fills the device and the hosts. An offloaded request holds its host memory for (output tokens x
layers x iteration time), minutes for long outputs, so a run that starts empty measures mostly its own ramp.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omniserve.bench import metrics, plots
from omniserve.bench.metrics import Slo
from omniserve.bench.slos import slos_from_latency
from omniserve.engine.scheduler.config import SchedulerConfig
from omniserve.engine.scheduler.latency_model import BatchShape, prefill_interactions
from omniserve.sampling.params import ServiceClass
from omniserve.simulator.profiles import SystemProfile, get_profile
from omniserve.simulator.sim import SimConfig, SimRequest, SimResult, Usage
from omniserve.simulator.workload import ClassLoad, draw_lengths

# ------------------------------------------------------------------------------------- the binding-resource rule
DEVICE_BUSY = 0.95
"""The device runs iterations at least this share of the time..."""
ITERATION_FULL = 0.9
"""...and they fill at least this share of their time (or token) budget: device time binds."""
KV_FULL = 0.9
"""Device KV pages in use at least this share of the time-weighted pool (pages are handed out whole, and the next
request's chunk needs a run of them, so a pool that binds never reads 100%)."""
RECOMPUTE_SHARE = 0.2
"""At least this share of the prompt tokens the device computed were recomputed after preemptions: the device's time
goes to thrashing for pages, so device KV binds however full the iterations are."""
HOST_FULL = 0.9
"""Host KV in use, all hosts together, at least this share of their budgets."""
CPU_BUSY = 0.9
"""The busiest host's CPU workers busy at least this share of the time."""
BE_BACKLOG = 1.0
"""BE requests waiting for admission, on average, at least this many: BE is held back, not served as it comes."""
OFFLOADED_MANY = 1.0
"""Offloaded requests, on average, at least this many for the offloaded pipeline to count."""
PIPELINE_SHARE = 0.5
"""At least this share of the offloaded requests have their row out on the CPU (not ready and left out)."""

RESOURCES = ("device time", "device KV", "host KV", "CPU pool", "offloaded pipeline", "scheduler", "BE load")


@dataclass(frozen=True)
class ResourceUse:
    """A run's time-weighted resource use over its arrival window, the binding-resource rule's input (sim.Usage)."""

    device_busy: float
    """Share of the time the device ran iterations."""
    iteration_fill: float
    """Share of their budget the iterations filled while BE waited (time or tokens, the larger)."""
    device_kv: float
    """Share of the device KV pages in use."""
    host_kv: float
    """Share of all hosts' KV budgets in use."""
    cpu_pool: float
    """The busiest host's workers: share of the time busy."""
    offloaded: float
    """Offloaded requests."""
    offloaded_waiting_cpu: float
    """Offloaded requests whose row is out on the CPU."""
    be_waiting: float
    """BE requests waiting for admission."""
    recompute_share: float = 0.0
    """Share of the prompt tokens computed that were recomputed after preemptions."""
    device_kv_room: float = math.inf
    """Device KV neither in use nor set aside for running prefills, in BE requests of the run's mean size: below 1,
    the next BE request cannot start however long the device has."""

    @classmethod
    def of(cls, usage: Usage, device_kv_tokens: int, be_request_kv: float) -> ResourceUse:
        room = (1.0 - usage.device_kv) * device_kv_tokens / be_request_kv if be_request_kv > 0 else math.inf
        return cls(device_busy=usage.device_busy, iteration_fill=usage.iteration_fill, device_kv=usage.device_kv,
                   host_kv=sum(usage.host_kv) / max(1, len(usage.host_kv)), cpu_pool=max(usage.cpu_busy, default=0.0),
                   offloaded=usage.offloaded, offloaded_waiting_cpu=usage.offloaded_waiting_cpu,
                   be_waiting=usage.be_waiting, recompute_share=usage.recompute_share, device_kv_room=room)


def binding_resource(use: ResourceUse) -> str:
    """The resource that binds BE throughput in a run, by the first rule that holds:

    1. device KV (thrash): BE waits (>= BE_BACKLOG requests) and >= RECOMPUTE_SHARE of the prompt tokens computed
       were recomputed after preemptions;
    2. device time: the device is busy (>= DEVICE_BUSY of the time) with iterations that fill their budget
       (>= ITERATION_FULL) while BE waits or offloaded rows could run but were left out;
    3. host KV: BE waits, device KV is full (>= KV_FULL, or what is left holds less than one mean BE request) and
       so is the hosts' KV (>= HOST_FULL);
       device KV: BE waits, device KV is full, and nothing is offloaded (< OFFLOADED_MANY requests);
    4. CPU pool: the busiest host's workers are busy >= CPU_BUSY of the time;
    5. offloaded pipeline: requests are offloaded (>= OFFLOADED_MANY) and most of them (>= PIPELINE_SHARE) have
       their row out on the CPU: rows wait for the CPU (with the one-layer pipeline, offloaded BE throughput is
       bounded by offloaded requests / (layers x iteration time));
    6. scheduler: BE waits but none of the above holds (the sequence limit, the swap-out budget, a wait rule);
    7. BE load: nothing waits; BE is served as it arrives.
    """
    backlog = use.be_waiting >= BE_BACKLOG
    offloading = use.offloaded >= OFFLOADED_MANY
    held_out_rows = offloading and use.offloaded_waiting_cpu < PIPELINE_SHARE * use.offloaded
    if backlog and use.recompute_share >= RECOMPUTE_SHARE:
        return "device KV"
    if use.device_busy >= DEVICE_BUSY and use.iteration_fill >= ITERATION_FULL and (backlog or held_out_rows):
        return "device time"
    if backlog and (use.device_kv >= KV_FULL or use.device_kv_room < 1.0):
        if use.host_kv >= HOST_FULL:
            return "host KV"
        if not offloading:
            return "device KV"
    if use.cpu_pool >= CPU_BUSY:
        return "CPU pool"
    if offloading and not held_out_rows:
        return "offloaded pipeline"
    return "scheduler" if backlog else "BE load"


# ------------------------------------------------------------------------------------------------ the axes
@dataclass(frozen=True)
class LengthStats:
    """Means of a length source (capped as the workload caps it), from a fixed sample."""

    prompt: float
    output: float
    request_kv: float
    """One request's KV when it ends: prompt + output."""
    resident: float
    """KV in use per request per second of arrivals at one token per iteration: E[output x (prompt + output / 2)]
    (a request holds its prompt plus half its output on average, for as many iterations as it has output tokens)."""

    @classmethod
    def of(cls, source: str, max_input: int, max_output: int, samples: int = 4000) -> LengthStats:
        rng = random.Random(f"lengths-{source}")
        pairs = [draw_lengths(source, rng, max_input, max_output) for _ in range(samples)]
        prompt = sum(i for i, _ in pairs) / samples
        output = sum(o for _, o in pairs) / samples
        resident = sum(o * (i + o / 2) for i, o in pairs) / samples
        return cls(prompt, output, prompt + output, resident)


def saturation_rate(profile: SystemProfile, lengths: LengthStats, iteration_s: float,
                    token_budget: int = SchedulerConfig.max_num_batched_tokens) -> float:
    """Requests/s of one shape that the device alone serves at iterations of `iteration_s` seconds: the largest rate
    whose steady-state iteration fits both budgets and whose KV fits the device. Per iteration at rate r:
    r x iteration_s prompts arrive (their prefill tokens and interactions), and r x output x iteration_s requests
    decode (Little's law); they hold r x iteration_s x `resident` tokens of KV."""
    latency = profile.latency

    def fits(rate: float) -> bool:
        arriving = rate * iteration_s
        decodes = arriving * lengths.output
        prefill = arriving * lengths.prompt
        shape = BatchShape(num_rows=decodes + prefill,
                           prefill_interactions=arriving * prefill_interactions(0, round(lengths.prompt)),
                           decode_context=arriving * lengths.resident, num_decodes=decodes,
                           num_sampled=decodes + arriving, prefill_tokens=prefill)
        return (decodes + prefill <= token_budget and latency.iteration_time(shape) <= iteration_s
                and arriving * lengths.resident <= profile.device_kv_tokens)

    low, high = 0.0, 1.0
    while fits(high) and high < 1e6:
        low, high = high, high * 2
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


# ------------------------------------------------------------------------------------------------ the sweep
TPOT_FACTOR, TTFT_FACTOR = 5.0, 3.0
"""Default LS SLOs from the profile (bench/slos.py): TPOT = 5 x a lone decode step at the longest LS prompt, TTFT =
3 x that prompt's prefill in budget-sized chunks (llama-3-8b@h100: 37 ms and 0.39 s)."""
POLICIES = ("omniserve", "omniserve-one-layer", "sarathi")
"""omniserve against sarathi (the strongest GPU-only LS-first baseline) and against itself with the paper's one-layer
pipeline (what the multi-layer pipeline adds)."""
LS_MAX = (4096, 2048)  # LS prompt and output caps, as in the paper preset


@dataclass(frozen=True)
class RegimeSpec:
    """One regime map: the axes and what every cell shares."""

    profile: str = "llama-3-8b@h100"
    be_lengths: tuple[str, ...] = ("longbench", "reasoning")
    ls_loads: tuple[float, ...] = (0.25, 0.5)
    """LS rates as fractions of the device's LS saturation rate (ignored when ls_rates is given)."""
    ls_rates: tuple[float, ...] = ()
    """LS rates in requests/s."""
    device_kv_requests: tuple[float, ...] = (1.0, 4.0, 16.0)
    """Device KV beyond the LS load's mean, in BE requests' mean KV."""
    cpu_hosts: tuple[int, ...] = (0, 4)
    """CPU-only hosts besides the GPU server's own CPU."""
    ls_lengths: str = "sharegpt"
    be_max: tuple[int, int] = (16384, 8192)
    """BE prompt and output caps (LongBench-like prompts, long reasoning outputs)."""
    be_load: float = 1.5
    """BE Poisson rate as a fraction of the device's BE saturation rate."""
    be_backlog: float = 1.0
    """BE requests queued at the start, as a multiple of what the device KV and every host's KV hold of the shape."""
    host_kv_requests: float | None = None
    """Each host's KV memory, in BE requests' mean KV (None: the profile's host memory)."""
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    duration: float = 200.0
    warmup: float = 100.0
    """Seconds at the start that BE throughput and resource use do not count."""
    drain: float = 30.0
    """Seconds after the arrivals end before the rest is cancelled: the LS requests' time to finish (no BE token
    after the window counts)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("be_lengths", "device_kv_requests", "cpu_hosts"):
            if not getattr(self, name):
                raise ValueError(f"the regime map needs at least one value of {name.replace('_', '-')}")
        if not (self.ls_loads or self.ls_rates):
            raise ValueError("the regime map needs LS loads or LS rates")
        if min(self.device_kv_requests) < 0 or min(self.cpu_hosts) < 0 or min(self.ls_loads + self.ls_rates) < 0:
            raise ValueError("device KV, CPU hosts and LS loads must be >= 0")
        if not 0 <= self.warmup < self.duration:
            raise ValueError(f"the warm-up ({self.warmup:g} s) must be shorter than the duration ({self.duration:g} s)")
        if self.be_backlog < 0 or (self.host_kv_requests is not None and self.host_kv_requests <= 0):
            raise ValueError("the BE backlog must be >= 0 and host KV per host > 0")
        for source in (self.ls_lengths, *self.be_lengths):  # a bad source fails before any run
            ClassLoad(lengths=source)


def default_slos(profile: SystemProfile, budget_share: float = SchedulerConfig.iteration_budget_share) -> Slo:
    return slos_from_latency(profile.latency, LS_MAX[0], SchedulerConfig.max_num_batched_tokens, budget_share,
                             TPOT_FACTOR, TTFT_FACTOR)


def ls_attainment(records: list[metrics.Record], slo: Slo) -> tuple[float | None, int]:
    """The share of LS requests that met their SLOs, and how many were still open when the run was cut. An open one
    counts as met if it is on track: its first token within the TTFT SLO, its tokens since at most the TPOT SLO
    apart on average. (A policy whose iterations are slower but within the SLO leaves more LS requests open at the
    cut; counting those as misses would charge it for the length of the drain, not for its latency.)"""
    ls = [r for r in records if r.service_class == ServiceClass.LS]
    if not ls:
        return None, 0
    open_ = [r for r in ls if r.status == "cancelled"]

    def on_track(r: metrics.Record) -> bool:
        times = r.token_times
        if not times or times[0] - r.arrival > slo.ttft:
            return False
        return len(times) < 2 or (times[-1] - times[0]) / (len(times) - 1) <= slo.tpot

    met = sum(slo.met(r) for r in ls) + sum(on_track(r) for r in open_)
    return met / len(ls), len(open_)


def _policy_figures(result: SimResult, profile: SystemProfile, be_request_kv: float, window: tuple[float, float],
                    slo: Slo) -> dict:
    """One policy's figures in a cell: BE throughput in the window, LS attainment (whole run), what binds and the
    measurements behind it."""
    usage = result.usage
    use = ResourceUse.of(usage, profile.device_kv_tokens, be_request_kv)
    iteration_s = usage.iteration_seconds
    be_records = [r for r in result.records if r.service_class == ServiceClass.BE]
    attainment, ls_open = ls_attainment(result.records, slo)
    return {
        "be_tok_s": metrics.tokens_in(be_records, *window) / (window[1] - window[0]),
        "ls_attainment": attainment, "ls_open_at_cut": ls_open,
        "binds": binding_resource(use), "use": asdict(use), "counters": result.counters,
        "iteration_s": iteration_s, "host_kv": usage.host_kv,
        "be_stalled": usage.be_stalled, "offloaded_ready": usage.offloaded_ready,
        "offloaded_tok_s": usage.offloaded_tokens / usage.seconds if usage.seconds else 0.0,
        "pipeline_bound_tok_s": use.offloaded / (profile.num_layers * iteration_s) if iteration_s else 0.0,
    }


def cell_profile(spec: RegimeSpec, hosts: int, device_kv_tokens: int, be_request_kv: float) -> SystemProfile:
    """The spec's profile with `hosts` CPU-only hosts, the cell's device KV and the spec's host KV per host."""
    profile = replace(get_profile(spec.profile, num_cpu_hosts=1 + hosts), device_kv_tokens=device_kv_tokens)
    if spec.host_kv_requests is not None:
        profile = replace(profile, host_kv_tokens=max(1, round(spec.host_kv_requests * be_request_kv)))
    return profile


def be_backlog(spec: RegimeSpec, source: str, profile: SystemProfile, be_request_kv: float) -> tuple[SimRequest, ...]:
    """The batch queued at the start: be_backlog x the BE requests of the shape's mean size that the device KV and
    every host's KV hold."""
    room = profile.device_kv_tokens + profile.num_cpu_hosts * profile.host_kv_tokens
    count = math.ceil(spec.be_backlog * room / be_request_kv)
    rng = random.Random(f"{spec.seed}-be-backlog")
    return tuple(SimRequest(0.0, ServiceClass.BE, *draw_lengths(source, rng, *spec.be_max)) for _ in range(count))


def _run_cell(spec: RegimeSpec, config: SimConfig, loads: dict[ServiceClass, ClassLoad], kv_tokens: int, cell: dict,
              progress=None) -> list[dict]:
    """One (BE shape, LS load, device KV) cell at every CPU host count: omniserve at each, sarathi once (it has no
    CPU pool, so hosts change nothing for it). Every run gets the backlog of the most hosts."""
    from omniserve.simulator.experiment import simulate

    rows, sarathi = [], None
    window = (spec.warmup, spec.duration)
    backlog = be_backlog(spec, cell["be_lengths"], cell_profile(spec, max(spec.cpu_hosts), kv_tokens,
                                                                 cell["be_request_kv"]), cell["be_request_kv"])
    for hosts in spec.cpu_hosts:
        profile = cell_profile(spec, hosts, kv_tokens, cell["be_request_kv"])
        figures = {}
        for policy in POLICIES:
            if policy == "sarathi" and sarathi is not None:
                figures[policy] = sarathi
                continue
            _, result = simulate(profile, replace(config, policy=policy), loads, spec.duration, spec.drain, progress,
                                 backlog, measure_from=spec.warmup)
            figures[policy] = _policy_figures(result, profile, cell["be_request_kv"], window,
                                              Slo(config.ls_ttft_slo, config.ls_tpot_slo))
        sarathi = figures.get("sarathi")
        rows.append({**cell, "cpu_hosts": hosts, "device_kv_tokens": kv_tokens, "be_backlog": len(backlog),
                     "host_kv_tokens": profile.host_kv_tokens, "policies": figures})
    return rows


def run_regime_map(spec: RegimeSpec, progress=None) -> list[dict]:
    """Every cell of the map, one row per (BE shape, LS load, device KV, CPU hosts), with both policies' figures."""
    base = get_profile(spec.profile, num_cpu_hosts=1)
    derived = default_slos(base)
    slo = Slo(spec.ttft_slo or derived.ttft, spec.tpot_slo or derived.tpot)
    config = SimConfig(ls_ttft_slo=slo.ttft, ls_tpot_slo=slo.tpot, seed=spec.seed,
                       max_model_len=max(sum(spec.be_max), sum(LS_MAX)))
    iteration_s = config.iteration_budget_share * slo.tpot
    ls_stats = LengthStats.of(spec.ls_lengths, *LS_MAX)
    ls_saturation = saturation_rate(base, ls_stats, iteration_s)
    ls_cells = ([(None, rate) for rate in spec.ls_rates] if spec.ls_rates
                else [(load, load * ls_saturation) for load in spec.ls_loads])
    rows = []
    for be_source in spec.be_lengths:
        be_stats = LengthStats.of(be_source, *spec.be_max)
        be_rate = spec.be_load * saturation_rate(base, be_stats, iteration_s)
        for ls_load, ls_rate in ls_cells:
            loads = {ServiceClass.LS: ClassLoad(rate=ls_rate, lengths=spec.ls_lengths, max_input=LS_MAX[0],
                                                max_output=LS_MAX[1]),
                     ServiceClass.BE: ClassLoad(rate=be_rate, lengths=be_source, max_input=spec.be_max[0],
                                                max_output=spec.be_max[1])}
            ls_kv = ls_rate * iteration_s * ls_stats.resident  # Little's law: the LS load's mean KV in use
            for n in spec.device_kv_requests:
                kv_tokens = max(1, min(base.device_kv_tokens, round(ls_kv + n * be_stats.request_kv)))
                cell = {"be_lengths": be_source, "be_rate": be_rate, "be_request_kv": be_stats.request_kv,
                        "ls_load": ls_load, "ls_rate": ls_rate, "device_kv_requests": n,
                        "slo": asdict(slo), "profile": spec.profile}
                rows += _run_cell(spec, config, loads, kv_tokens, cell, progress)
    return rows


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def regime_table(rows: list[dict]) -> str:
    """Markdown, one line per cell (see docs/simulator.md for the columns)."""
    lines = ["| BE shape | LS load | CPU hosts (KV tokens each) | device KV: BE requests (tokens) | BE tok/s omniserve "
             "| sarathi | gain | one-layer | multi / one-layer "
             "| LS attainment omniserve / sarathi / one-layer | binds: omniserve | binds: sarathi "
             "| recomputed omniserve / sarathi | swap-outs / ins | offloaded: mean / tok/s / pipeline bound "
             "| CPU busy omniserve / one-layer |", "|" + "---|" * 16]
    for row in rows:
        ours, theirs = row["policies"]["omniserve"], row["policies"]["sarathi"]
        one = row["policies"].get("omniserve-one-layer")
        gain = f"{ours['be_tok_s'] / theirs['be_tok_s']:.2f}x" if theirs["be_tok_s"] else "-"
        one_gain = f"{ours['be_tok_s'] / one['be_tok_s']:.2f}x" if one and one["be_tok_s"] else "-"
        load = f"{row['ls_rate']:.2f} req/s" if row["ls_load"] is None else (
            f"{row['ls_load']:g} ({row['ls_rate']:.2f} req/s)")
        offloaded = (f"{ours['use']['offloaded']:.1f} / {ours['offloaded_tok_s']:.0f} / "
                     f"{ours['pipeline_bound_tok_s']:.0f}")
        lines.append(
            f"| {row['be_lengths']} | {load} | {row['cpu_hosts']} ({row['host_kv_tokens']:,}) "
            f"| {row['device_kv_requests']:g} "
            f"({row['device_kv_tokens']:,}) | {ours['be_tok_s']:.0f} | {theirs['be_tok_s']:.0f} | {gain} "
            f"| {one['be_tok_s'] if one else float('nan'):.0f} | {one_gain} "
            f"| {_share(ours['ls_attainment'])} / {_share(theirs['ls_attainment'])} / "
            f"{_share(one['ls_attainment'] if one else None)} | {ours['binds']} "
            f"| {theirs['binds']} | {ours['use']['recompute_share']:.0%} / {theirs['use']['recompute_share']:.0%} "
            f"| {ours['counters'].get('swap_outs', 0)} / {ours['counters'].get('swap_ins', 0)} | {offloaded} "
            f"| {_share(ours['use']['cpu_pool'])} / {_share(one['use']['cpu_pool'] if one else None)} |")
    return "\n".join(lines)


SHORT = {"device time": "time", "device KV": "dev KV", "host KV": "host KV", "CPU pool": "CPU",
         "offloaded pipeline": "pipeline", "scheduler": "sched", "BE load": "load"}
"""Cell notes of the plot: the binding resource, shortened."""


def regime_plot(rows: list[dict], path: Path) -> None:
    """A heatmap of omniserve's BE gain over sarathi per (BE shape, CPU hosts): LS load across, device KV per BE
    request up, each cell noted with what binds omniserve / sarathi."""
    panels: dict[str, list] = {}
    for row in rows:
        ours, theirs = row["policies"]["omniserve"], row["policies"]["sarathi"]
        gain = ours["be_tok_s"] / theirs["be_tok_s"] if theirs["be_tok_s"] else None
        x = row["ls_rate"] if row["ls_load"] is None else row["ls_load"]
        panels.setdefault(f"{row['be_lengths']}, {row['cpu_hosts']} CPU hosts", []).append(
            (x, row["device_kv_requests"], gain, f"{SHORT[ours['binds']]} /\n{SHORT[theirs['binds']]}"))
    xlabel = "LS rate (req/s)" if rows and rows[0]["ls_load"] is None else "LS load (of the device's saturation)"
    title = f"BE tok/s, omniserve / sarathi, on {rows[0]['profile'] if rows else ''}\n(cell: gain, what binds " \
            "omniserve / sarathi)"
    plots.gain_heatmaps(panels, path, title, xlabel, "device KV per BE request")


def write_outputs(rows: list[dict], folder: Path) -> str:
    """regime.md (the table), regime.json (every figure) and regime.png in `folder`; returns the table."""
    folder.mkdir(parents=True, exist_ok=True)
    table = regime_table(rows)
    (folder / "regime.md").write_text(table + "\n")
    (folder / "regime.json").write_text(json.dumps(rows, indent=1))
    regime_plot(rows, folder / "regime.png")
    return table
