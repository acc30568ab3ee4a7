"""A discrete-event simulation of one engine: the real Scheduler (any policy) plans every iteration on a simulated
clock, and a simulated executor stands in for the device, the CPU attention pool and the copies between them.

- Device: an iteration runs layer by layer as the runner does (`_layers`): each layer takes the latency model's time
  for the rows it ran (optionally with noise), plus any wait for CPU results the plan allowed; offloaded rows join a
  layer's output projection when their result is back by the time the device has done its own attention for that
  layer (the plan's pipeline: row limit, wait). The scheduler is told the "measured" time, as the engine tells it
  (Scheduler.observe).
- CPU attention pool: `num_cpu_hosts` hosts (the first is the GPU server's own), each with `cpu_workers_per_host`
  workers. An offloaded request lives on one host (placed at swap-out by the pool's rule, placement.py: room kept for
  the KV it reaches when done, on the host with the largest share of its memory left) and one worker of it. An
  offloaded row's attention for a layer is dispatched when the device has done that layer's QKV; a worker runs the
  rows dispatched to it at once as one batch, in turn with its earlier batches, in the time the profile's
  `cpu_attention` gives; a remote host adds the network's latency and the rows' bytes each way. The result is
  reported to the scheduler once it is back, if no layer took it first.
- Swaps: KV crosses PCIe at `pcie_bytes_per_s` (and the network once, to a remote host); the copy runs beside the
  device (async), and the scheduler learns it is done at the first iteration that ends after it. A swap-out frees
  the device pages once the KV is in host memory; a remote host attends to the request only once the network copy
  has brought it there.

Only the executor is simulated: admission, placement decisions, chunking, piggyback admission and preemption are the
scheduler's own code, driven through its public seams (schedule, update, results_ready, observe, an injected clock).

Besides the requests' records a run reports what the resources held over time (`Usage`: device and host KV, the
offloaded requests and their rows, the BE backlog), sampled once per iteration, for the regime map (regime.py).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable

from omniserve.bench.metrics import Record
from omniserve.bench.workload import BLOCK_TOKENS
from omniserve.config import CacheConfig
from omniserve.cpu_attention.placement import LOCAL, HostRoom, choose_host, least_loaded
from omniserve.engine.scheduler import Scheduler
from omniserve.engine.scheduler.config import SchedulerConfig, SchedulerSettings
from omniserve.engine.scheduler.latency_model import batch_shape_of_chunks
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput
from omniserve.engine.scheduler.request import Placement, Request, RequestStatus
from omniserve.kv_cache import PageAllocator, PageTable, PrefixCache
from omniserve.kv_cache.host_tier import HostTier
from omniserve.sampling.params import InvalidRequestError, SampledToken, SamplingParams, ServiceClass
from omniserve.simulator.profiles import SystemProfile

_TOKEN = 7  # every simulated token; EOS is ignored, so outputs are exactly max_tokens long
_EOS = 2


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulated workload."""

    arrival: float
    service_class: ServiceClass  # "ls" or "be" is taken too
    input_len: int
    output_len: int
    blocks: tuple[int, ...] = ()
    """Hashes of the prompt's blocks of BLOCK_TOKENS tokens, from a trace that has them (equal hashes: equal text);
    empty: a prompt that shares nothing with any other."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "service_class", ServiceClass(self.service_class))


@dataclass(frozen=True)
class SimConfig(SchedulerSettings):
    """The simulated engine's settings: the scheduler's (inherited from their one declaration, with the engine's
    defaults) and the simulator's own. `policy` also takes the paper's baselines (baselines.py)."""

    ls_ttft_slo: float | None = None
    ls_tpot_slo: float | None = None
    page_size: int = CacheConfig.page_size
    latency_noise: float = 0.0  # relative standard deviation of iteration times around the prediction
    seed: int = 0
    prefix_caching: bool = True
    """Requests reuse the KV of prompt blocks an earlier one computed (as the engine's --enable-prefix-caching);
    only requests with blocks share any."""
    kv_offloading_gib: float = 0.0
    """The prefix cache's host tier (the engine's --kv-offloading-size), in the local host's KV budget, which it
    gives way to offloaded KV in: pages the device evicts are copied there and back over PCIe, synchronously at the
    iteration's start as the engine does, and offloaded requests read their shared prefix there (0: none)."""

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.of(self)


def one_layer_outputs(plan: IterationPlan, num_layers: int, token: int) -> tuple[dict[str, SampledToken],
                                                                                 list[tuple[str, int]]]:
    """What a plan produces under the paper's one-layer pipeline, times apart: a token for every chunk that samples
    and for every returning row that has passed the last layer; and the rows whose CPU attention the iteration sends
    to the pool, (request id, layer): offloaded tokens starting at layer 0, returning rows at their next layer. The
    scheduler tests' fake runner and the bookkeeping benchmark drive the scheduler with it; the simulator itself
    runs the plan's pipeline layer by layer (Simulation._layers)."""
    sampled = {chunk.request_id: SampledToken(token) for chunk in plan.chunks if chunk.sample}
    cpu_rows = [(start.request_id, 0) for start in plan.offloaded_starts]
    for request_id, layer in plan.returning:
        if layer + 1 < num_layers:
            cpu_rows.append((request_id, layer + 1))
        else:
            sampled[request_id] = SampledToken(token)
    return sampled, cpu_rows


def block_prompt(blocks: tuple[int, ...], length: int) -> list[int]:
    """Prompt tokens for a trace's block hashes: each block's first tokens spell its hash (so equal prefixes of
    blocks give equal tokens, and nothing else does), the rest is one token; small ints, which Python shares, so a
    long prompt costs a pointer per token."""
    tokens: list[int] = []
    for block in blocks:
        spelled = [(block >> shift) & 255 for shift in range(0, 48, 8)]
        tokens += spelled + [_TOKEN] * (BLOCK_TOKENS - len(spelled))
        if len(tokens) >= length:
            break
    return (tokens + [_TOKEN] * max(0, length - len(tokens)))[:length]


_QKV_SHARE = 0.2  # of a layer's dense work, the part before attention (norm, QKV, RoPE): the rest is O and the MLP


@dataclass
class _LayersRun:
    """What an iteration's layers did (Simulation._layers)."""

    rows: list[int]
    """Offloaded rows in each layer's dense work."""
    waited: float = 0.0
    end: float = 0.0
    finished: list[str] = field(default_factory=list)
    """Offloaded tokens that passed the last layer."""
    sent: set[str] = field(default_factory=set)
    advanced: dict[str, int] = field(default_factory=dict)
    """Offloaded tokens sent to the pool and not finished: the layer each is out at."""


@dataclass
class _Host:
    free_tokens: int
    remote: bool
    worker_free_at: list[float]


@dataclass
class Usage:
    """Time-weighted averages of what the resources held while requests arrived (until the last arrival, as the
    throughput counts the arrival window): each is read once per iteration, after the plan (and once per idle wait),
    and weighted by the simulated seconds until the next reading."""

    device_kv: float = 0.0
    """Share of the device KV pages in use or set aside for the running BE prefills' prompts (pages_committed)."""
    host_kv: list[float] = field(default_factory=list)
    """Per host: share of its KV budget kept for offloaded requests (each at the size it reaches when done)."""
    offloaded: float = 0.0
    """Offloaded requests (KV in the CPU pool)."""
    offloaded_waiting_cpu: float = 0.0
    """Of those, the ones whose row is out on the CPU (sent this iteration or earlier, its result not yet heard of)."""
    offloaded_ready: float = 0.0
    """Of those, the ones whose row could join the device batch (a CPU result back, or a new token to start) but was
    left out of this iteration."""
    be_waiting: float = 0.0
    """BE requests waiting for admission (new or preempted)."""
    be_stalled: float = 0.0
    """BE requests holding device pages with a token to decode that the plan left out."""
    iteration_fill: float = 0.0
    """Over the iterations that ran while a BE request waited for admission: the larger of predicted time / time
    budget and tokens / token budget (capped at 1). Whether BE waits because the device has no time left."""
    offloaded_tokens: int = 0
    """Output tokens sampled by offloaded rows passing the last layer (a count, not an average)."""
    seconds: float = 0.0
    """The window measured: from the start (or the end of a warm-up, Simulation.run) to the last arrival."""
    iteration_seconds: float = 0.0
    """The mean iteration's duration in that window."""
    device_busy: float = 0.0
    """Share of that window the device ran iterations."""
    cpu_busy: list[float] = field(default_factory=list)
    """Per host: share of its workers' time in that window spent on attention (by when the rows were sent)."""
    recompute_share: float = 0.0
    """Share of the device's prompt (prefill) tokens that computed KV again, after a preemption (by tokens)."""


@dataclass
class SimResult:
    records: list[Record]
    seconds: float  # simulated
    iterations: int
    device_busy: float  # simulated seconds the device ran iterations
    cpu_busy: list[float]  # per host: worker-seconds of CPU attention
    counters: dict[str, int] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)


class _UsageMeter:
    """Accumulates Usage: `read` takes a reading after a plan, `weigh` charges it with the seconds that followed."""

    _AVERAGED = ("device_kv", "offloaded", "offloaded_waiting_cpu", "offloaded_ready", "be_waiting", "be_stalled")

    def __init__(self, num_hosts: int, token_budget: int, workers_per_host: int) -> None:
        self.workers_per_host = workers_per_host
        self.cpu_busy = [0.0] * num_hosts  # worker-seconds, as Simulation.cpu_busy, within the window
        self.token_budget = token_budget
        self.start, self.end = 0.0, float("inf")  # readings count in [start, end): a warm-up, the last arrival
        self.sums = dict.fromkeys(self._AVERAGED, 0.0)
        self.host_sums = [0.0] * num_hosts
        self.fill_sum = self.seconds = self.backlogged_seconds = self.busy_seconds = 0.0
        self.iterations = 0
        self.offloaded_tokens = self.prefill_tokens = self.recomputed_tokens = 0
        self.computed: dict[str, int] = {}  # the most tokens of KV each request has had computed
        self.reading: dict[str, float] = {}
        self.host_reading: list[float] = []
        self.fill = 0.0

    def read(self, scheduler: Scheduler, plan: IterationPlan, hosts: list[_Host], host_kv_tokens: int,
             ls_open: set[str]) -> None:
        scheduled = {chunk.request_id for chunk in plan.chunks}
        pending = [r for r in scheduler.offloaded if r.token_in_flight and r.result_ready_since is None]
        stalled = sum(1 for r in scheduler.running if r.is_best_effort and r.placement is Placement.DEVICE
                      and r.num_output_tokens and r.request_id not in scheduled)
        ls_waiting = sum(1 for rid in ls_open  # a rejected one has left the scheduler already
                         if (r := scheduler.requests.get(rid)) is not None and r.status is RequestStatus.WAITING)
        allocator = scheduler.page_table.allocator
        self.reading = {"device_kv": scheduler.pages.committed() / allocator.num_pages,
                        "offloaded": len(scheduler.offloaded), "offloaded_waiting_cpu": len(pending),
                        "offloaded_ready": len(scheduler.offloaded) - len(pending),
                        "be_waiting": len(scheduler.waiting) - ls_waiting, "be_stalled": stalled}
        self.host_reading = [1.0 - host.free_tokens / host_kv_tokens for host in hosts]
        self._count_recompute(plan)
        tokens = sum(len(chunk.token_ids) for chunk in plan.chunks) / self.token_budget
        timed = plan.predicted_time / plan.time_budget if plan.predicted_time and plan.time_budget else 0.0
        self.fill = min(1.0, max(tokens, timed))

    def _count_recompute(self, plan: IterationPlan) -> None:
        for chunk in plan.chunks:
            count, start = len(chunk.token_ids), chunk.start_position
            if count > 1:
                self.prefill_tokens += count
                self.recomputed_tokens += max(0, min(count, self.computed.get(chunk.request_id, 0) - start))
            self.computed[chunk.request_id] = max(start + count, self.computed.get(chunk.request_id, 0))

    def weigh(self, start: float, end: float, iteration: bool) -> None:
        seconds = max(0.0, min(end, self.end) - max(start, self.start))
        for name, value in self.reading.items():
            self.sums[name] += value * seconds
        for host, value in enumerate(self.host_reading):
            self.host_sums[host] += value * seconds
        self.seconds += seconds
        if iteration and seconds > 0:
            self.busy_seconds += seconds
            self.iterations += 1
        if iteration and self.reading["be_waiting"] > 0:
            self.fill_sum += self.fill * seconds
            self.backlogged_seconds += seconds

    def usage(self) -> Usage:
        share = 1.0 / self.seconds if self.seconds else 0.0
        return Usage(**{name: total * share for name, total in self.sums.items()},
                     host_kv=[total * share for total in self.host_sums],
                     iteration_fill=self.fill_sum / self.backlogged_seconds if self.backlogged_seconds else 0.0,
                     offloaded_tokens=self.offloaded_tokens, seconds=self.seconds,
                     iteration_seconds=self.busy_seconds / self.iterations if self.iterations else 0.0,
                     device_busy=self.busy_seconds * share,
                     cpu_busy=[busy * share / self.workers_per_host for busy in self.cpu_busy],
                     recompute_share=self.recomputed_tokens / self.prefill_tokens if self.prefill_tokens else 0.0)


class Simulation:
    def __init__(self, profile: SystemProfile, config: SimConfig) -> None:
        self.profile, self.config = profile, config
        self.now = 0.0
        self.rng = random.Random(config.seed)
        pages = self._page_table()
        self.tier = pages.host_tier
        """The prefix cache's host tier: it shares the local host's KV budget with offloaded KV, and gives way."""
        self.scheduler = Scheduler(config.scheduler_config(), pages, eos_token_ids=(_EOS,),
                                   num_layers=profile.num_layers,
                                   latency_model=profile.latency, default_tpot_slo=config.ls_tpot_slo,
                                   clock=lambda: self.now, host_capacity=self._host_capacity,
                                   cpu_workers=profile.num_cpu_hosts * profile.cpu_workers_per_host)
        workers = profile.cpu_workers_per_host
        self.hosts = [_Host(profile.host_kv_tokens, n > 0, [0.0] * workers) for n in range(profile.num_cpu_hosts)]
        # offloaded request -> (host, worker, KV tokens kept room for, KV tokens held)
        self.placement: dict[str, tuple[int, int, int, int]] = {}
        self.host_ready: dict[str, float] = {}  # offloaded request -> when its host has its KV (after a swap-out)
        self.cpu_results: list[tuple[float, int, str, int]] = []  # heap of (ready time, seq, request id, layer)
        # Offloaded rows out on the CPU, by layer: request id -> when its result is back (until a layer takes it).
        self.out_at: dict[int, dict[str, float]] = {}
        self.out_layer: dict[str, int] = {}  # request id -> the layer its row is out at
        self.swaps: list[tuple[float, str, str]] = []  # (done time, "out" | "in", request id)
        self.records: dict[str, Record] = {}
        self.device_busy = 0.0
        self.cpu_busy = [0.0] * profile.num_cpu_hosts
        self._seq = itertools.count()
        self.meter = _UsageMeter(profile.num_cpu_hosts, config.max_num_batched_tokens, profile.cpu_workers_per_host)
        self._ls_open: set[str] = set()  # LS requests not yet ended (to count the BE ones among the waiting)
        self.divert: Callable[[Simulation, SimRequest], bool] | None = None
        """Called with each arriving request: True takes it away from this engine (baselines.py)."""

    def _page_table(self) -> PageTable:
        """The device's pages, with the prefix cache and its host tier as the config says, judged as the engine
        does: a host hit is copied back only where PCIe is faster than computing it."""
        profile, config = self.profile, self.config
        cache = PrefixCache() if config.prefix_caching else None
        tier = None
        if cache is not None and config.kv_offloading_gib > 0:
            tier_tokens = int(config.kv_offloading_gib * 2**30) // profile.kv_bytes_per_token
            tier = HostTier(max(1, min(tier_tokens, profile.host_kv_tokens) // config.page_size))
        pages = PageTable(PageAllocator(max(1, profile.device_kv_tokens // config.page_size), cache),
                          config.page_size, tier)
        if tier is not None:
            pages.offload_reads_host_tier = True
            latency, per_token = profile.latency, profile.kv_bytes_per_token / profile.pcie_bytes_per_s
            pages.copy_beats_recompute = (
                lambda start, count, copied: copied * per_token < latency.recompute_time(start, count))
        return pages

    def _host_capacity(self) -> int:
        """Host KV tokens the scheduler may offload up to: every host's budget, less the tier's pages that cannot
        give way now (as the engine counts it)."""
        kept = 0 if self.tier is None else self.tier.num_kept * self.config.page_size
        return self.profile.host_kv_tokens * self.profile.num_cpu_hosts - kept

    def _tier_tokens(self) -> int:
        return 0 if self.tier is None else len(self.tier) * self.config.page_size

    def _tier_gives_way(self, plan: IterationPlan) -> None:
        """After each plan, the tier may fill what the local host's offloaded KV (this plan's swap-outs included)
        leaves (the engine's LLMEngine._host_tier_gives_way)."""
        if self.tier is None:
            return
        page_size = self.config.page_size
        planned = sum(t.host_tokens(page_size) for t in plan.swap_outs)
        self.tier.set_limit((self.hosts[0].free_tokens - planned) // page_size)

    # ------------------------------------------------------------------------------------------------ requests
    def _add(self, request_id: str, request: SimRequest) -> bool:
        """Gives an arriving request to the scheduler, or to `divert` (a baseline's other instance) if that takes it;
        whether the scheduler has it."""
        if self.divert is not None and self.divert(self, request):
            return False
        ls = request.service_class is ServiceClass.LS
        # Without blocks, every simulated prompt is the same tokens: a salt of its own keeps it from sharing.
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0,
                                service_class=request.service_class, cache_salt=None if request.blocks else request_id)
        prompt = block_prompt(request.blocks, request.input_len) if request.blocks else [_TOKEN] * request.input_len
        self.records[request_id] = record = Record(request.service_class.value, request.arrival, request.input_len,
                                                   request.output_len, sent=request.arrival)
        try:
            self.scheduler.add_request(Request(
                request_id, prompt, params, request.output_len, arrival_time=request.arrival,
                ttft_slo=self.config.ls_ttft_slo if ls else None, tpot_slo=self.config.ls_tpot_slo if ls else None))
        except InvalidRequestError as exc:  # it can never fit the device: refused, as the engine refuses it
            record.status, record.error, record.end = "rejected", str(exc), self.now
            return False
        if ls:
            self._ls_open.add(request_id)
        return True

    # ------------------------------------------------------------------------------------------------ the pool
    def _place(self, request_id: str, tokens: int, final_tokens: int) -> tuple[int, int]:
        """Where the pool puts a request's host KV (the rule of omniserve.cpu_attention.placement): room is kept for
        the KV it will hold when done."""
        requests = [[0] * len(h.worker_free_at) for h in self.hosts]  # per host, per worker
        for host, worker, _, _ in self.placement.values():
            requests[host][worker] += 1
        budget, tier = self.profile.host_kv_tokens, self._tier_tokens()
        rooms = [HostRoom(h.free_tokens - (tier if i == 0 else 0), budget, sum(requests[i]))
                 for i, h in enumerate(self.hosts)]
        reserved = max(tokens, final_tokens)
        remote = choose_host(rooms[0], rooms[1:], reserved)
        host = 0 if remote == LOCAL else 1 + remote  # hosts[0] is the local host
        worker = least_loaded(requests[host])
        self.placement[request_id] = (host, worker, reserved, tokens)
        self.hosts[host].free_tokens -= reserved
        return host, worker

    def _grow(self, request_id: str) -> None:
        """An offloaded token's KV is appended on its request's host (within the room kept for it, if it lasts)."""
        host, worker, reserved, tokens = self.placement[request_id]
        if tokens + 1 > reserved:
            reserved += 1
            self.hosts[host].free_tokens -= 1
        self.placement[request_id] = (host, worker, reserved, tokens + 1)

    def _release(self, request_id: str) -> None:
        """Frees the host memory kept for a request (and forgets any row of it out on the CPU)."""
        layer = self.out_layer.pop(request_id, None)
        if layer is not None:
            self.out_at[layer].pop(request_id, None)
        placed = self.placement.pop(request_id, None)
        self.host_ready.pop(request_id, None)
        if placed is not None:
            self.hosts[placed[0]].free_tokens += placed[2]

    def _dispatch_cpu(self, rows: list[tuple[str, int, int]], at: dict[int, float]) -> None:
        """Rows (request id, layer, context) whose attention leaves for the pool at `at[layer]`: each worker runs
        the rows it gets at one dispatch time as one batch."""
        batches: dict[tuple[int, int, float], list[tuple[str, int, int]]] = {}
        for request_id, layer, context in rows:
            host, worker, _, _ = self.placement[request_id]
            batches.setdefault((host, worker, at[layer]), []).append((request_id, layer, context))
        profile = self.profile
        for (host, worker, sent), batch in sorted(batches.items(), key=lambda item: item[0][2]):
            transfer = 0.0
            if self.hosts[host].remote:
                transfer = profile.network_latency_s + len(batch) * profile.row_bytes_per_layer / (
                    profile.network_bytes_per_s)
            ready = max(self.host_ready.get(request_id, 0.0) for request_id, _, _ in batch)
            start = max(self.hosts[host].worker_free_at[worker], sent + transfer, ready)
            busy = profile.latency.cpu_attention_time(sum(c for _, _, c in batch), len(batch))
            self.hosts[host].worker_free_at[worker] = start + busy
            self.cpu_busy[host] += busy
            if self.meter.start <= sent < self.meter.end:
                self.meter.cpu_busy[host] += busy
            for request_id, layer, _ in batch:
                ready = start + busy + transfer
                heapq.heappush(self.cpu_results, (ready, next(self._seq), request_id, layer))
                self.out_at.setdefault(layer, {})[request_id] = ready
                self.out_layer[request_id] = layer

    # ------------------------------------------------------------------------------------------------ iterations
    def _copy_seconds(self, num_tokens: int, host: int) -> tuple[float, float]:
        """A swap's KV copy: over PCIe, and then over the network to or from a remote host."""
        nbytes = num_tokens * self.profile.kv_bytes_per_token
        network = 0.0
        if self.hosts[host].remote:
            network = self.profile.network_latency_s + nbytes / self.profile.network_bytes_per_s
        return nbytes / self.profile.pcie_bytes_per_s, network

    def _run_iteration(self, plan: IterationPlan) -> None:
        began = self.now
        noise = max(0.2, self.rng.gauss(1.0, self.config.latency_noise)) if self.config.latency_noise else 1.0
        # The prefix cache's copies to and from the host tier run first, and the device waits for them (as the
        # engine's runner does).
        tier_pages = len(plan.prefix_saves) + len(plan.prefix_loads)
        start = began + tier_pages * self.config.page_size * self.profile.kv_bytes_per_token / (
            self.profile.pcie_bytes_per_s)
        for token in plan.offloaded_starts:
            self._grow(token.request_id)
        for transfer in plan.swap_outs:
            # Only the KV after a prefix the request reads in the host tier moves (and is kept room for).
            tokens = transfer.num_tokens - len(transfer.host_prefix_pages) * self.config.page_size
            host, _ = self._place(transfer.request_id, tokens, transfer.final_tokens)
            # The device's pages are free once the KV is in host memory; a remote host has it a network copy later
            # (the pool hands it over asynchronously), and attends to the request's rows only then.
            pcie, network = self._copy_seconds(tokens, host)
            self.swaps.append((start + pcie, "out", transfer.request_id))
            self.host_ready[transfer.request_id] = start + pcie + network
        for transfer in plan.swap_ins:  # the pages the prefix cache still had are not copied
            host = self.placement.get(transfer.request_id, (0,))[0]  # 0: local, whose copies take PCIe only
            copied = transfer.num_tokens - transfer.cached_tokens
            self.swaps.append((start + sum(self._copy_seconds(copied, host)), "in", transfer.request_id))
        sampled = {chunk.request_id: SampledToken(_TOKEN) for chunk in plan.chunks if chunk.sample}
        ran = self._layers(plan, start, noise)
        sampled.update({request_id: SampledToken(_TOKEN) for request_id in ran.finished})
        if self.meter.start <= start < self.meter.end:
            self.meter.offloaded_tokens += len(ran.finished)
        self.now = ran.end
        self.device_busy += ran.end - began
        output = RunnerOutput(sampled, offload_layers=ran.advanced, offloaded_rows=tuple(ran.rows),
                              cpu_wait_s=ran.waited)
        self.scheduler.observe(plan, ran.end - began, output)
        self._book(plan, output)

    def _layers(self, plan: IterationPlan, start: float, noise: float) -> _LayersRun:
        """The iteration on the device, layer by layer, as the runner runs it: at layer l the rows entering it go to
        the pool after the layer's QKV (_QKV_SHARE of its dense work), the device does its own attention, and then
        the offloaded rows whose result for l is back join its output projection (the plan's `returning` first, then,
        multi-layer, any other, the device waiting for the rest while the plan's wait lasts, up to its row limit)
        and go on to layer l + 1. The iteration's time is the latency model's for the rows each layer ran, plus the
        waits."""
        model, layers, pipeline = self.profile.latency, self.profile.num_layers, plan.pipeline
        shape = plan.shape or batch_shape_of_chunks(plan.chunks)
        attention = noise * model.attention_time(shape)
        limit = math.inf if pipeline.row_limit is None else pipeline.row_limit
        returning: dict[int, list[str]] = {}
        for request_id, layer in plan.returning:
            returning.setdefault(layer, []).append(request_id)
        run = _LayersRun(rows=[0] * layers)
        carry, wait_left, now = [t.request_id for t in plan.offloaded_starts], pipeline.wait_s, start
        requests = self.scheduler.requests
        for layer in range(layers):
            qkv_done = now + noise * _QKV_SHARE * model.dense_time(shape.num_rows + len(carry))
            if carry:
                self._dispatch_cpu([(r, layer, requests[r].num_tokens) for r in carry if r in requests],
                                   {layer: qkv_done})
                run.sent.update(carry)
            out = self.out_at.setdefault(layer, {})
            joining = list(returning.get(layer, []))
            for request_id in joining:
                out.pop(request_id, None)
            waited, room = 0.0, limit - len(joining)
            if pipeline.row_limit != 0 and room > 0 and out:
                soonest = heapq.nsmallest(int(min(room, len(out))), out.items(), key=lambda item: item[1])
                waited = min(wait_left, max(0.0, soonest[-1][1] - (qkv_done + attention)))
                joining += [r for r, ready in soonest if ready <= qkv_done + attention + waited]
            for request_id in joining:
                out.pop(request_id, None)
                self.out_layer.pop(request_id, None)
            wait_left -= waited
            run.waited += waited
            run.rows[layer] = max(len(carry), len(joining))
            now += noise * (model.dense_time(shape.num_rows + run.rows[layer])) + attention + waited
            carry = joining
        run.finished = carry
        run.end = now + noise * model.head_time(shape.num_sampled) + plan.swap_seconds
        run.advanced = {r: self.out_layer[r] for r in run.sent if r in self.out_layer}
        return run

    def _book(self, plan: IterationPlan, output: RunnerOutput) -> bool:
        """Tells the scheduler what the iteration produced and which copies have ended by now; whether any had."""
        done_out = [rid for t, kind, rid in self.swaps if kind == "out" and t <= self.now]
        done_in = [rid for t, kind, rid in self.swaps if kind == "in" and t <= self.now]
        self.swaps = [s for s in self.swaps if s[0] > self.now]
        for request_id in done_in:
            self._release(request_id)
        for request in self.scheduler.update(plan, replace(output, swapped_out=done_out, swapped_in=done_in)):
            self.records[request.request_id].token_times.append(self.now)
        return bool(done_out or done_in)

    def _end_requests(self, pending: set[str]) -> set[str]:
        """Records the requests the scheduler let go (finished or rejected), frees their host memory, and returns
        the ids still pending."""
        for request_id in self.scheduler.take_released():
            self._release(request_id)
        still = set()
        for request_id in pending:
            record = self.records[request_id]
            if request_id in self.scheduler.requests:
                still.add(request_id)
            elif record.token_times:
                record.status, record.end, record.output_tokens = "ok", record.token_times[-1], len(record.token_times)
            else:
                record.status, record.error, record.end = "rejected", "SLO admission", self.now
            if request_id not in still:
                self._release(request_id)
                self._ls_open.discard(request_id)
        return still

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, workload: list[SimRequest], until: float | None = None, progress=None,
            measure_from: float = 0.0) -> SimResult:
        """Simulates the workload (sorted by arrival) until every request ends, or until `until` seconds (then the
        rest count as cancelled). Usage is measured from `measure_from` (a warm-up) to the last arrival."""
        arrivals = sorted(enumerate(workload), key=lambda item: item[1].arrival)
        next_arrival, iterations, pending = 0, 0, set()
        self.meter.end = arrivals[-1][1].arrival if arrivals else 0.0
        self.meter.start = min(measure_from, self.meter.end)
        while True:
            while next_arrival < len(arrivals) and arrivals[next_arrival][1].arrival <= self.now:
                index, request = arrivals[next_arrival]
                if self._add(f"r{index}", request):
                    pending.add(f"r{index}")
                next_arrival += 1
            self.scheduler.results_ready(self._cpu_results_back())
            if until is not None and self.now >= until:
                break
            plan = self.scheduler.schedule() if self.scheduler.has_unfinished() else IterationPlan()
            self._tier_gives_way(plan)
            self.meter.read(self.scheduler, plan, self.hosts, self.profile.host_kv_tokens, self._ls_open)
            before = self.now
            busy = bool(plan.chunks or plan.returning or plan.offloaded_starts or plan.swap_outs or plan.swap_ins)
            if busy:
                self._run_iteration(plan)
                iterations += 1
            else:
                self._idle(plan, arrivals[next_arrival][1].arrival if next_arrival < len(arrivals) else None)
            self.meter.weigh(before, self.now, busy)
            count = len(pending)
            pending = self._end_requests(pending)
            if progress is not None and count != len(pending):
                progress(count - len(pending))
            if not pending and next_arrival >= len(arrivals):
                break
        return self._result(iterations)

    def _cpu_results_back(self) -> list[tuple[str, int]]:
        """The CPU results back by now that no layer took meanwhile: (request id, layer)."""
        ready = []
        while self.cpu_results and self.cpu_results[0][0] <= self.now:
            at, _, request_id, layer = heapq.heappop(self.cpu_results)
            if self.out_at.get(layer, {}).get(request_id) == at:  # not taken by a layer meanwhile
                ready.append((request_id, layer))
        return ready

    def _idle(self, plan: IterationPlan, next_arrival: float | None) -> None:
        """The device idles until something happens: an arrival, a CPU result, the end of a copy."""
        copied = self._book(plan, RunnerOutput())  # a copy that ends now lets its request run in the next plan
        wake = [t for t in (self.cpu_results[0][0] if self.cpu_results else None,
                            min((s[0] for s in self.swaps), default=None), next_arrival) if t is not None]
        if wake:
            self.now = max(self.now, min(wake))
        elif self.scheduler.has_unfinished() and not plan.rejected and not copied:
            raise RuntimeError("the simulation is stuck: requests wait but nothing can run")

    def _result(self, iterations: int) -> SimResult:
        """The run's result, the requests still open counted as cancelled."""
        for record in self.records.values():
            if record.status == "pending":
                record.status, record.error, record.end = "cancelled", "still open at the end", self.now
        stats = self.scheduler.stats
        counters = {"preemptions": stats.num_preemptions, "swap_outs": stats.num_swap_outs,
                    "swap_ins": stats.num_swap_ins, "rejected": stats.num_rejected,
                    "prefix_cache_queries": stats.prefix_cache_queries, "prefix_cache_hits": stats.prefix_cache_hits}
        return SimResult(list(self.records.values()), self.now, iterations, self.device_busy, self.cpu_busy, counters,
                         self.meter.usage())
