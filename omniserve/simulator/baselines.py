"""The OmniServe paper's baselines as the paper ran them, beside the scheduler's own policies (policy.py), in the
simulator only:

- `llumnix-cpu`: headroom reservation on the GPU (the `llumnix` policy: BE may hold at most 1 - ls_headroom of the
  device pages), and the BE requests that the GPU's share cannot take when they arrive (a BE request already waits
  there, or its prompt does not fit the BE pages left) go to an instance serving the whole model on a CPU host
  (`profiles.cpu_instance_profile`: dense work and attention from the host's published peaks), one per CPU host,
  taken in turn. Llumnix's migration between instances is not modelled: a request stays where it was sent.
- `neo-sync`: NEO's own pipeline. Any request may be offloaded when device pages run short (the `neo` policy), and an
  offloaded token runs every layer within one iteration, the device waiting on its CPU attention at each layer
  (the `sync` offload pipeline); admission keeps that CPU time within the iteration's time budget. The device
  overlaps only its own attention with the CPU's, as omniserve's runner does; NEO's two sub-batches, which also
  overlap the dense work, are not modelled, so this is a lower bound of NEO when both devices are busy.

Beside them, `omniserve-one-layer`: omniserve with the paper's own pipeline (an offloaded token advances one layer per
iteration), to measure what the multi-layer pipeline adds.

`run(profile, config, workload, ...)` runs any policy: these here, the others as a plain Simulation.
"""

from __future__ import annotations

import math
from dataclasses import replace

from omniserve.engine.scheduler.policy import POLICIES
from omniserve.sampling.params import ServiceClass
from omniserve.simulator.profiles import DEFAULT_CPU_HOST, SystemProfile, cpu_instance_profile
from omniserve.simulator.sim import SimConfig, SimRequest, SimResult, Simulation

BASELINES = ("llumnix-cpu", "neo-sync", "omniserve-one-layer")


def run(profile: SystemProfile, config: SimConfig, workload: list[SimRequest], until: float | None = None,
        progress=None, measure_from: float = 0.0) -> SimResult:
    """One simulated run of `config.policy` on the workload (sorted by arrival)."""
    if config.policy not in POLICIES + BASELINES:
        raise ValueError(f"unknown policy {config.policy!r}: the scheduler's {', '.join(POLICIES)}, or the paper's "
                         f"baselines {', '.join(BASELINES)}")
    if config.prefix_caching and not any(r.blocks for r in workload):
        config = replace(config, prefix_caching=False)  # no prompt shares anything: nothing to hash
    if config.policy == "llumnix-cpu":
        return _llumnix_cpu(profile, config, workload, until, progress, measure_from)
    if config.policy == "neo-sync":
        config = replace(config, policy="neo", offload_pipeline="sync")
    elif config.policy == "omniserve-one-layer":
        config = replace(config, policy="omniserve", offload_pipeline="one-layer")
    simulation = Simulation(profile, config)
    return simulation.run(workload, until, progress, measure_from)


def _gpu_takes(simulation: Simulation, request: SimRequest) -> bool:
    """Whether the GPU instance's BE share takes an arriving BE request now: none of its BE requests waits, and the
    request's prompt fits the BE pages left under the headroom."""
    scheduler, config = simulation.scheduler, simulation.config
    if any(r.is_best_effort for r in scheduler.waiting):
        return False
    table = scheduler.page_table
    be_pages = sum(len(table.pages(r.request_id)) for r in scheduler.running if r.is_best_effort)
    needed = math.ceil((request.input_len + 1) / config.page_size)
    return be_pages + needed <= (1.0 - config.ls_headroom) * table.allocator.num_pages


def _llumnix_cpu(profile: SystemProfile, config: SimConfig, workload: list[SimRequest], until: float | None,
                 progress, measure_from: float) -> SimResult:
    model = profile.latency.metadata.get("model")
    if profile.latency.metadata.get("kind") != "analytic (roofline)" or not model:
        raise ValueError("llumnix-cpu needs an analytic profile (its CPU instance is modelled from the host's peaks)")
    gpu = Simulation(profile, replace(config, policy="llumnix"))
    overflow: list[SimRequest] = []

    def divert(simulation: Simulation, request: SimRequest) -> bool:
        if request.service_class is not ServiceClass.BE or _gpu_takes(simulation, request):
            return False
        overflow.append(request)
        return True

    gpu.divert = divert
    result = gpu.run(workload, until, progress, measure_from)  # the CPU instances never feed back to the GPU
    host_name = profile.latency.metadata.get("cpu_host", "").split(" ")[0]  # "xeon-gold-6342 (its description)"
    instance = cpu_instance_profile(model, host_name or DEFAULT_CPU_HOST)
    limits = ("page_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len", "seed")  # the rest: defaults
    plain = SimConfig(policy="fcfs", **{name: getattr(config, name) for name in limits})
    records, seconds, cpu_busy = list(result.records), result.seconds, list(result.cpu_busy)
    for host in range(profile.num_cpu_hosts):
        share = overflow[host::profile.num_cpu_hosts]
        if not share:
            continue
        on_cpu = Simulation(instance, plain).run(share, until, progress)
        records += on_cpu.records
        seconds = max(seconds, on_cpu.seconds)
        cpu_busy[host] += on_cpu.device_busy * profile.cpu_workers_per_host  # every core of the host
    counters = {**result.counters, "cpu_instance_requests": len(overflow)}
    return replace(result, records=records, seconds=seconds, cpu_busy=cpu_busy, counters=counters)
