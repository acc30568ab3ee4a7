"""The engine: requests in, RequestOutputs out, one iteration per `step()`.

    plan = scheduler.schedule(); output = runner.execute(plan); scheduler.update(plan, output)

plus what sits around that loop: input validation and n-way fan-out. Text, stop strings and RequestOutputs are the
output processor's (omniserve/engine/output_processor.py): step() runs it inline, AsyncEngine on a thread of its own.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType

from omniserve.config import CacheConfig, ConfigError
from omniserve.cpu_attention import CPUAttentionPool, PoolConfig
from omniserve.cpu_attention.remote import RemoteHosts, RemoteHostsConfig, connect_ray
from omniserve.engine.args import EngineArgs
from omniserve.engine.graphs import DecodeGraphs
from omniserve.engine.output_processor import CompletionUpdate, NewRequest, OutputProcessor
from omniserve.engine.outputs import RequestOutput
from omniserve.engine.observer import IterationObserver, IterationRecord, RunnerTimings
from omniserve.engine.runner import ModelRunner
from omniserve.engine.scheduler import Scheduler, SchedulerConfig
from omniserve.engine.scheduler.correction import REFRESH_AFTER_S
from omniserve.engine.scheduler.latency_model import LatencyModel
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput, ScheduledChunk
from omniserve.engine.scheduler.policy import POLICY_TABLE
from omniserve.engine.scheduler.request import Request, RequestGroup, RequestStatus
from omniserve.engine.services import ServiceRegistry
from omniserve.kv_cache import PageAllocator, PageTable, PrefixCache
from omniserve.kv_cache.host_tier import HostTier
from omniserve.kv_cache.page_pool import (PagePool, activation_peak_bytes, bytes_per_page, copy_bandwidth,
                                          pages_for_memory, weight_bytes)
from omniserve.models.loader import LoadedModel
from omniserve.sampling.params import InvalidRequestError, SamplingParams
from omniserve.sampling.structured import GrammarCompiler
from omniserve.tokenizer import load_tokenizer, set_chat_template

logger = logging.getLogger(__name__)

_PROFILE_TRUSTED = (0.5, 2.0)
"""Measured / predicted iteration time at start within which the profile describes the device; beyond, a warning."""
_REFRESH_RETRY_S = 5.0  # an idle refresh that measured nothing (interrupted) is tried again after this
_CALIBRATION_DECODES = 2
_CALIBRATION_TOKENS = 18  # a calibration's prefill (up to 16 tokens) and its decodes

_IDLE_WAIT_S = 0.01


@dataclass(frozen=True)
class IterationStats:
    """The latest iteration: what was planned (with its predicted time) and how long the runner took."""

    plan: IterationPlan
    seconds: float


def _remote_hosts(args: EngineArgs) -> RemoteHosts | None:
    """The remote CPU attention hosts asked for (Ray actors), started now, or None."""
    if args.cpu_attention_hosts in (None, "", "0"):
        return None
    count = args.cpu_attention_hosts
    if count != "auto" and not (count.isdigit() and int(count) > 0):
        raise ConfigError(f"--cpu-attention-hosts takes a number of hosts or `auto`, not {count!r}")
    connect_ray(args.ray_address)
    memory = None if args.cpu_attention_host_memory_gib is None else int(args.cpu_attention_host_memory_gib * 2**30)
    return RemoteHosts(RemoteHostsConfig(count, args.cpu_attention_threads, memory))


LatencyModelSource = Callable[[EngineArgs, LoadedModel, "torch.device", "torch.dtype", PoolConfig | None], LatencyModel]
"""Makes an engine's latency model from its args, loaded model, device, dtype and CPU pool settings (such as
omniserve.profiler.profiled_latency_model: the cached profile, or one measured now)."""


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, pool_config: PoolConfig | None = None,
                 latency_model: LatencyModel | LatencyModelSource | None = None, **overrides) -> None:
        """pool_config overrides the CPU attention pool settings derived from args (tests inject faults this way).
        latency_model is what the SLO-aware scheduler plans with, or what makes it once the model is loaded: used
        only when the policy and the SLOs need one (a source is then called, and profiling may take minutes); SLOs
        that need one without it are a ConfigError, never SLOs silently not held."""
        args = EngineArgs(**overrides) if args is None else args
        self.args = args
        cache = CacheConfig(args.block_size, args.num_gpu_blocks_override, args.kv_cache_memory_bytes,
                            args.gpu_memory_utilization)  # a bad value fails before the model loads
        if args.enable_auto_tool_choice and args.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
        loaded, self.device, self.dtype = args.load_model()
        self.model_config = loaded.config
        limit = loaded.config.max_context
        if args.max_model_len is not None and args.max_model_len > limit:
            raise ConfigError(f"max_model_len {args.max_model_len} exceeds the model's limit of {limit} tokens")
        self.scheduler_config = SchedulerConfig.of(args, max_model_len=args.max_model_len or limit)
        self.services = ServiceRegistry.build(args.ls_ttft_slo, args.ls_tpot_slo, args.services)
        self.tokenizer = load_tokenizer(loaded.kind, loaded.path)
        if args.chat_template is not None:
            set_chat_template(self.tokenizer, args.chat_template)

        num_pages = self._kv_pages(loaded, cache)
        self._kv_cache(loaded, args, num_pages, cache.page_size)
        # None: this engine never offloads
        pool_config = (pool_config or args.pool_config()) if self.scheduler_config.offload_mode.uses_pool else None
        self.latency_model = self._latency_model(latency_model, loaded, pool_config)
        self._judge_host_tier_copies()
        self.scheduler = Scheduler(
            self.scheduler_config, self.page_table, loaded.config.eos_token_ids, loaded.config.num_layers,
            self.latency_model, default_tpot_slo=self.services.tightest_tpot_slo, calibrates=True,
            host_capacity=None if pool_config is None else self._host_capacity_tokens,
            cpu_workers=1 if pool_config is None else pool_config.num_workers,
        )
        self.cpu_pool = None if pool_config is None else self._cpu_pool(pool_config)
        self.runner = self._runner(loaded, args.enforce_eager)
        self._next_refresh = -math.inf  # refresh_measurements tries again no sooner than this (the scheduler's clock)
        self.calibrate()
        self.last_iteration: IterationStats | None = None
        self._groups: dict[str, list[Request]] = {}  # the caller's request id -> its n scheduler requests
        self._group_of: dict[str, str] = {}  # scheduler request id -> the caller's request id
        self.output_processor = OutputProcessor(self.tokenizer, self.stop_completion)
        """What step() turns its iteration's updates into RequestOutputs with (AsyncEngine has its own)."""
        logger.info(
            "engine ready: %s on %s (%s), %d KV pages of %d tokens, max_model_len %d",
            loaded.path or args.model, self.device, self.dtype, num_pages, cache.page_size,
            self.scheduler_config.max_model_len,
        )

    def _runner(self, loaded: LoadedModel, enforce_eager: bool) -> ModelRunner:
        """The model runner, with its decode path unless enforce_eager: on CUDA decode graphs captured now (their
        memory is counted in the activation peak that sized the KV pages: a decode batch of max_num_seqs rows needs
        no more than a chunk of max_num_batched_tokens; the capture logs what it took), on the CPU the same forward
        run eagerly (engine/graphs.py)."""
        graphs = None
        if self.device.type in ("cuda", "cpu") and not enforce_eager:
            graphs = DecodeGraphs(loaded.model, self.pool, self.device, self.scheduler_config.max_num_seqs,
                                  self.scheduler_config.max_model_len, capture=self.device.type == "cuda", pad=False)
        return ModelRunner(loaded.model, self.pool, self.device, self.cpu_pool, graphs, self.host_pages)

    def _kv_cache(self, loaded: LoadedModel, args: EngineArgs, num_pages: int, page_size: int) -> None:
        """The device's KV pages and their bookkeeping, with the prefix cache and its host tier as the args say. The
        pool has a few pages more than the allocator hands out: the calibration's (calibrate), so that measuring an
        idle device, which a server does on its own while idle, touches nothing a request or the cache holds."""
        scratch = -(-_CALIBRATION_TOKENS // page_size)
        self.pool = PagePool(loaded.config, num_pages + scratch, page_size, self.device, self.dtype)
        self._calibration_pages = list(range(num_pages, num_pages + scratch))
        self.allocator = PageAllocator(num_pages, PrefixCache() if args.enable_prefix_caching else None)
        shared = self.scheduler_config.offload_mode.uses_pool and self._shared_memory_holds(args)
        self.host_pages = self._host_tier_pool(loaded, args, page_size, shared)
        self.page_table = PageTable(self.allocator, page_size,
                                    None if self.host_pages is None else HostTier(self.host_pages.num_pages))
        self.page_table.offload_reads_host_tier = self.host_pages is not None and shared

    def _cpu_pool(self, config: PoolConfig) -> CPUAttentionPool:
        """The CPU attention pool (its local workers start on first offload). With a host tier, the two share the
        pool's local host budget, and the tier gives way (_host_tier_gives_way); the workers read prefixes in the
        tier in place where it is in shared memory."""
        tier_bytes = None
        if self.host_pages is not None:
            tier_bytes = lambda: len(self.page_table.host_tier) * self.host_pages.page_bytes  # noqa: E731
        pool = CPUAttentionPool(config, _remote_hosts(self.args),
                                self.host_pages if self.page_table.offload_reads_host_tier else None, tier_bytes)
        weakref.finalize(self, pool.shutdown)  # workers end with the engine, not only with the process
        return pool

    def _host_tier_gives_way(self, plan: IterationPlan) -> None:
        """One host budget for offloaded KV and the prefix cache's host tier, and the tier gives way: after each
        plan, it may fill what the offloaded requests (counted as placement counts them, this plan's swap-outs
        included) leave of the pool's local budget; the least recently used pages beyond are evicted, and their
        memory given back. Offloaded KV, which is live, never waits for a cache."""
        if self.host_pages is None or self.cpu_pool is None:
            return
        cfg = self.model_config
        per_token = CPUAttentionPool.host_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        planned = per_token * sum(t.host_tokens(self.host_pages.page_size) for t in plan.swap_outs)
        left = self.cpu_pool.local_bytes_left() - planned
        self.host_pages.release_memory(self.page_table.host_tier.set_limit(left // self.host_pages.page_bytes))

    @staticmethod
    def _shared_memory_holds(args: EngineArgs) -> bool:
        """Whether shared memory (/dev/shm) has room for the host tier, so that the CPU pool's workers can read the
        prefixes offloaded requests share in place; else each offloaded request carries its own copy."""
        if not args.kv_offloading_size:
            return False
        try:
            stat = os.statvfs("/dev/shm")
            room = stat.f_bavail * stat.f_frsize
        except OSError:
            room = 0
        if room >= args.kv_offloading_size * 2**30:
            return True
        logger.warning("/dev/shm has %.2f GiB free, less than the host tier's %.2f GiB: offloaded requests keep "
                       "their own copies of shared prefixes", room / 2**30, args.kv_offloading_size)
        return False

    def _host_tier_pool(self, loaded: LoadedModel, args: EngineArgs, page_size: int,
                        shared: bool) -> PagePool | None:
        """The prefix cache's host tier: --kv-offloading-size GiB of host pages (pinned beside a GPU; in shared
        memory if `shared`, for the CPU pool's workers)."""
        import torch

        if not args.kv_offloading_size:
            return None
        if not args.enable_prefix_caching:
            raise ConfigError("--kv-offloading-size keeps the prefix cache's evicted pages: it needs prefix caching "
                              "(drop --no-enable-prefix-caching)")
        per_page = bytes_per_page(loaded.config, page_size, self.dtype)
        num_pages = int(args.kv_offloading_size * 2**30) // per_page
        if num_pages < 1:
            raise ConfigError(f"--kv-offloading-size {args.kv_offloading_size} GiB holds no KV page "
                              f"({per_page} bytes each)")
        logger.info("prefix cache host tier: %d pages of %d tokens (%.2f GiB)", num_pages, page_size,
                    num_pages * per_page / 2**30)
        return PagePool(loaded.config, num_pages, page_size, torch.device("cpu"), self.dtype,
                        pin_memory=self.device.type == "cuda", shared=shared)

    def _judge_host_tier_copies(self) -> None:
        """With a latency model, a prefix found in the host tier is copied back only where that is faster than
        computing it again (a small model on a fast device computes faster than its host link copies): a copy's time
        from the host link's bandwidth, measured now, against the model's time to compute those tokens."""
        if self.host_pages is None or self.latency_model is None:
            return
        bandwidth = copy_bandwidth(self.device)
        per_token = bytes_per_page(self.model_config, 1, self.dtype)
        model = self.latency_model
        logger.info("host tier: copies back at %.1f GB/s, %.2f us per token of KV; a 512-token prefix computes in "
                    "%.2f ms", bandwidth / 1e9, per_token / bandwidth * 1e6, model.recompute_time(0, 512) * 1e3)
        self.page_table.copy_beats_recompute = (
            lambda start, count, copied: copied * per_token / bandwidth < model.recompute_time(start, count))

    def _kv_pages(self, loaded: LoadedModel, cache: CacheConfig) -> int:
        """How many KV pages the memory settings give (pages_for_memory): a memory utilization's share must also hold
        the weights and the activation peak of the largest iteration the scheduler plans."""
        config = self.scheduler_config
        activations = activation_peak_bytes(loaded.config, self.dtype, config.max_num_batched_tokens,
                                            config.max_num_seqs, config.max_model_len)
        return pages_for_memory(loaded.config, cache, self.device, self.dtype, weight_bytes(loaded.model), activations)

    def _host_capacity_tokens(self) -> int:
        """Tokens of KV the CPU pool's hosts hold in all, as its placement counts them (remote hosts come and go)."""
        cfg = self.model_config
        per_token = CPUAttentionPool.host_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        kept = 0  # host-tier pages that cannot give way now (held by offloaded requests, or pinned by copies)
        if self.host_pages is not None:
            kept = self.page_table.host_tier.num_kept * self.host_pages.page_bytes
        return (self.cpu_pool.host_capacity_bytes() - kept) // per_token

    def _latency_model(self, given: LatencyModel | LatencyModelSource | None, loaded: LoadedModel,
                       pool_config: PoolConfig | None) -> LatencyModel | None:
        """The latency model given, made now if a source was given, when the policy and the SLOs need one."""
        policy = POLICY_TABLE[self.args.policy]
        has_slo = any(s.ttft_slo or s.tpot_slo for s in self.services.services.values())
        if not (has_slo and (policy.time_budget or policy.reject_late)):
            return None
        if given is None:
            raise ConfigError(
                f"the {self.args.policy} policy holds the SLOs set with a latency model, and none was given: pass "
                "latency_model=omniserve.profiler.profiled_latency_model (as LLM and `omniserve serve` do), or a "
                "LatencyModel")
        if isinstance(given, LatencyModel):
            return given
        return given(self.args, loaded, self.device, self.dtype, pool_config)

    def calibrate(self, interrupted: Callable[[], bool] | None = None, announce: bool = True) -> None:
        """Times a few scratch iterations (short prefills, then decodes) on the device and gives them to the
        scheduler's correction, so that admission judges by how fast the device is now, not only by the profile
        (which may be old, or taken while the machine was busier). Runs at start, on an idle engine whose
        measurements grow old (refresh_measurements), and when the scheduler asks: an LS request that would be
        rejected on an idle device whose measurements are old. `interrupted`: checked between the iterations, which
        stop (those measured stand) once it says so. `announce`: logs the outcome (at start); else at debug level."""
        self.scheduler.admission.calibration_wanted = False
        if self.latency_model is None:
            return
        scratch, decodes = "calibration", _CALIBRATION_DECODES
        length = max(1, min(_CALIBRATION_TOKENS - decodes, self.scheduler_config.max_model_len - 4))
        page_ids = self._calibration_pages  # its own: no request's page, no cached prefix, no page count moves
        vocab, greedy = self.model_config.vocab_size, SamplingParams(temperature=0.0)
        prompt = [3 + i % max(1, vocab - 3) for i in range(length)]
        prefill = ScheduledChunk(scratch, prompt, 0, page_ids, True, greedy, 0)
        # A warm-up, then two of each kind: the correction follows prefills and decodes apart (correction.py).
        steps = [prefill] * 3 + [ScheduledChunk(scratch, [prompt[-1]], length + i, page_ids, True, greedy, i + 1)
                                      for i in range(decodes)]
        for index, chunk in enumerate(steps):
            if interrupted is not None and interrupted():
                return
            plan = IterationPlan(chunks=[chunk], predicted_time=self.scheduler.predicted_time([chunk]))
            started = time.perf_counter()
            self.runner.execute(plan)
            if index == 1:  # measuring on purpose: the device as it is now replaces what was measured before
                self.scheduler.correction.forget()
            if index:  # the first is a warm-up: lazy allocations, cold caches
                self.scheduler.observe(plan, time.perf_counter() - started)
        self._log_calibration(len(steps) - 1, announce)

    def refresh_measurements(self, interrupted: Callable[[], bool] | None = None) -> bool:
        """On an idle engine whose latest measurements are about to grow old (REFRESH_AFTER_S): calibrates now, so
        that the next LS request is judged by the device as it is without paying for scratch iterations in its own
        TTFT (as it does when it comes after the measurements went stale). Returns whether it calibrated. Costs a
        few short iterations every REFRESH_AFTER_S of idleness; see calibrate for `interrupted`."""
        clock = self.scheduler.correction.clock
        if self.latency_model is None or self.has_unfinished_requests() or (
                self.scheduler.correction.age() < REFRESH_AFTER_S) or clock() < self._next_refresh:
            return False
        self._next_refresh = clock() + _REFRESH_RETRY_S  # when this one measures nothing (interrupted)
        self.calibrate(interrupted, announce=False)
        return True

    def _log_calibration(self, iterations: int, announce: bool) -> None:
        ratio = self.scheduler.correction.value
        if not announce:
            logger.debug("measurements refreshed on idle: this device runs at %.2fx the profile's times", ratio)
        elif _PROFILE_TRUSTED[0] <= ratio <= _PROFILE_TRUSTED[1]:
            logger.info("latency model calibrated on %d scratch iterations: this device runs at %.2fx the profile's "
                        "times", iterations, ratio)
        else:
            logger.warning(
                "the latency profile (%s) is not trustworthy on this device now: measured iterations take %.2fx its "
                "predictions (profiled on a busier or another machine, or this one is busy now). The scheduler "
                "scales every prediction by what it measures, iteration by iteration, so admission follows the "
                "device as it is; run `omniserve profile --force` with this server's model and flags on a quiet "
                "machine to fix the profile itself.",
                self.latency_model.metadata.get("created", "undated"), ratio)

    # ------------------------------------------------------------------------------------------------ intake
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer (random weights): pass token ids", "prompt")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queues a request. Raises InvalidRequestError (nothing queued) if it can never be served. `arrival_time`
        (time.monotonic) is when the request reached the server, if earlier than now: TTFT counts from then."""
        self.output_processor.add_request(self.enqueue_request(request_id, prompt, params, arrival_time))

    def enqueue_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                        arrival_time: float | None = None, group: RequestGroup | None = None) -> NewRequest:
        """add_request's part on the engine: validates and queues the request; returns what the output processor
        must be given of it. `group`: the other requests it is admitted or rejected with (its n completions are
        one group anyway)."""
        params = params or SamplingParams()
        if request_id in self._groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        service = self.services.resolve(params.service, params.service_class)
        params = replace(params, service=service.name, service_class=service.service_class)
        token_ids = self.tokenize(prompt)
        max_tokens = self._validate(token_ids, params)
        spec = params.structured_outputs
        if spec is not None:
            self.grammars.compile(spec)  # checked (400 if bad) before anything is queued; cached for the matchers
        children = []
        group = group if group is not None or params.n == 1 else RequestGroup()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for index in range(params.n):
            child_params = params
            if params.n > 1:  # each completion samples on its own; a seed still reproduces all of them
                seed = None if params.seed is None else params.seed + index
                child_params = replace(params, n=1, seed=seed)
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            children.append(Request(
                child_id, token_ids, child_params, max_tokens, arrival_time=arrival,
                ttft_slo=service.ttft_slo, tpot_slo=service.tpot_slo, service=service.name,
                siblings=request_id if params.n > 1 else None, group=group,
                grammar=None if spec is None else self.grammars.matcher(spec),
            ))
        self._groups[request_id] = children
        for request in children:
            self._group_of[request.request_id] = request_id
            self.scheduler.add_request(request)
        if group is not None:
            group.members.extend(children)
        return NewRequest(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, arrival,
                          service.ttft_slo, service.tpot_slo)

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs' grammars for this model's tokenizer (InvalidRequestError if it has none)."""
        return GrammarCompiler(self.tokenizer)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Returns max_tokens resolved against the context limit."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none", "stop")
        limit = self.scheduler_config.max_model_len
        room = limit - len(token_ids)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens, but the request has {len(token_ids)} prompt "
                f"tokens and asks for {params.max_tokens or 'at least 1'} more",
                "max_tokens" if room >= 1 else "prompt",
            )
        max_tokens = params.max_tokens or room
        self.scheduler.check_fits(len(token_ids) + max_tokens)
        return max_tokens

    def abort_request(self, request_id: str) -> None:
        """Ends a request and frees everything it holds; unknown or finished ids are ignored."""
        self.cancel_request(request_id)
        self.output_processor.abort_request(request_id)

    def cancel_request(self, request_id: str) -> None:
        """abort_request's part on the engine: the scheduler's requests and what they hold."""
        children = self._groups.get(request_id)
        if children is None:
            return
        for request in children:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
        self._forget(request_id)
        self.runner.release(self.scheduler.take_released())

    def stop_completion(self, request_id: str, index: int, stop: str) -> None:
        """Finishes completion `index` of a request, which the output processor found a stop string in (ignored if it
        ended meanwhile)."""
        children = self._groups.get(request_id)
        if children is None:
            return
        self.scheduler.finish_request(children[index].request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
        if all(r.status.finished for r in children):
            self._forget(request_id)
        self.runner.release(self.scheduler.take_released())

    def _forget(self, request_id: str) -> None:
        for request in self._groups.pop(request_id):
            del self._group_of[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def unfinished_request_ids(self):
        """The ids callers gave the requests that have not finished (a live view)."""
        return self._groups.keys()

    # -------------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns an output for every request that made progress or ended (the iteration, then
        the output processor on its updates, inline)."""
        return self.output_processor.process(self.run_iteration())

    def run_iteration(self) -> list[CompletionUpdate]:
        """step()'s part on the engine: runs one iteration; returns an update for each completion of every request
        that made progress or ended (plain data, for an output processor)."""
        step_started = time.perf_counter()
        if self._iteration_observers:
            self.runner.take_timings()  # this step's timings only, not those of calls made between steps
        self.scheduler.results_ready(self.runner.poll_cpu_results())
        plan = self.scheduler.schedule()
        self._host_tier_gives_way(plan)
        started = time.perf_counter()
        output, failed = self._execute(plan)
        self.last_iteration = IterationStats(plan, time.perf_counter() - started)
        self.scheduler.observe(plan, self.last_iteration.seconds, output)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("iteration %d: %s; took %.1f ms", self.scheduler.state.iteration, plan.summary(),
                         self.last_iteration.seconds * 1e3)
        updated = self.scheduler.update(plan, output)
        if plan.empty and self.cpu_pool is not None:
            self.cpu_pool.wait(_IDLE_WAIT_S)  # nothing ran: only CPU attention is in flight, so wait for its results

        updates = self._updates(plan, updated)
        self.runner.release(self.scheduler.take_released())
        if self.scheduler.admission.calibration_wanted:
            self.calibrate()
        if self._iteration_observers:
            self._notify_observers(plan, output, failed, step_started)
        return updates

    def _updates(self, plan: IterationPlan, updated: list[Request]) -> list[CompletionUpdate]:
        """Every completion of the requests that got a token, or that ended without one (errors, rejections), in that
        order; requests whose completions have all ended are forgotten."""
        touched = dict.fromkeys(self._group_of[r.request_id] for r in updated)
        for child_id in plan.touched_request_ids + plan.rejected:
            request_id = self._group_of.get(child_id)
            if request_id is not None and all(r.status.finished for r in self._groups[request_id]):
                touched[request_id] = None
        fresh = set(updated)
        updates = []
        for request_id in touched:
            children = self._groups[request_id]
            updates += [CompletionUpdate.of(request_id, i, r, r in fresh) for i, r in enumerate(children)]
            if all(r.status.finished for r in children):
                self._forget(request_id)
        return updates

    def _execute(self, plan: IterationPlan) -> tuple[RunnerOutput, bool]:
        """The runner's output for the plan, and whether the iteration failed (then the output is empty)."""
        try:
            return self.runner.execute(plan), False
        except Exception:  # a failed iteration fails its requests, never the engine
            # The runner may have started the plan's swaps before it failed: their requests are in an unknown state
            # (pages half copied, exports requested), so they fail too, and release frees whatever was started.
            failed = plan.touched_request_ids
            logger.exception("iteration failed; failing its %d requests", len(failed))
            self.page_table.abort_transfers()  # prefix pages it was to copy may hold anything
            for request_id in failed:
                self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
            return RunnerOutput(), True

    # ------------------------------------------------------------------------------------------- observation
    _iteration_observers: tuple[IterationObserver, ...] = ()

    def add_iteration_observer(self, observer: IterationObserver) -> None:
        """Calls `observer(record)` at the end of every step from now on, with an IterationRecord of the step's
        iteration: its plan, the runner's output, and timings (the runner keeps its timings only while someone
        observes). Observers run on the engine's thread: they should be quick."""
        self._iteration_observers = (*self._iteration_observers, observer)
        self.runner.keep_timings(True)

    def remove_iteration_observer(self, observer: IterationObserver) -> None:
        self._iteration_observers = tuple(o for o in self._iteration_observers if o != observer)
        self.runner.keep_timings(bool(self._iteration_observers))

    def _notify_observers(self, plan: IterationPlan, output: RunnerOutput, failed: bool, started: float) -> None:
        timings = self.runner.take_timings() or RunnerTimings()
        record = IterationRecord(
            plan, output, self.last_iteration.seconds, time.perf_counter() - started, failed=failed,
            idle_wait=plan.empty and self.cpu_pool is not None, swap_out_seconds=timings.swap_out_s,
            offload_seconds=timings.offload_s, pool_seconds=MappingProxyType(timings.pool_s))
        for observer in self._iteration_observers:
            observer(record)

    # ----------------------------------------------------------------------------------------------- health
    def load_report(self) -> dict:
        """What a router needs to place the next request here (call on the engine's thread):

        - ls_headroom: the share of an LS iteration's time budget and of the sequence slots still free (the smaller),
          less the LS requests queued, in sequence slots; at most 1, below 0 when the instance is behind.
        - be_spare_tokens: KV tokens free on the device and in host memory, less the tokens of queued BE requests.
        - prefix_cache_pages: device KV pages the prefix cache holds (in use or idle; idle ones are free too);
          host_prefix_cache_pages: those its host tier holds (--kv-offloading-size).
        - host_kv: per host of the CPU attention pool ("local", or a remote host's name), its KV budget and the bytes
          of it not counted on yet by offloaded requests (nor the host tier's pages); empty without a pool.
        """
        scheduler, max_seqs = self.scheduler, self.scheduler_config.max_num_seqs
        ls_waiting = sum(1 for r in scheduler.waiting if not r.is_best_effort)
        be_waiting_tokens = sum(r.num_tokens + r.max_tokens for r in scheduler.waiting if r.is_best_effort)
        budget = scheduler.time_budget()
        time_headroom = 1.0
        if budget and self.last_iteration is not None and scheduler.running:
            time_headroom = 1.0 - self.last_iteration.seconds / budget
        slots_headroom = 1.0 - len(scheduler.running) / max_seqs
        host_tokens = 0
        if self.cpu_pool is not None:
            config = self.model_config
            per_token = self.cpu_pool.host_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim)
            host_tokens = self.cpu_pool.free_host_bytes() // per_token
        return {
            "ls_headroom": max(0.0, min(time_headroom, slots_headroom)) - ls_waiting / max_seqs,
            "be_spare_tokens": self.allocator.num_free * self.page_table.page_size + host_tokens - be_waiting_tokens,
            "running": len(scheduler.running), "waiting": len(scheduler.waiting),
            "offloaded": len(scheduler.offloaded), "max_num_seqs": max_seqs,
            "prefix_cache_pages": self.prefix_cache_pages[0], "host_prefix_cache_pages": self.prefix_cache_pages[1],
            "host_kv": self.host_kv_bytes(),
        }

    def host_kv_bytes(self) -> dict[str, dict[str, int]]:
        """Per host of the CPU attention pool: {"budget_bytes", "free_bytes"} (what requests are counted on to grow
        to, see load_report) and "allocated_bytes" (what its workers hold now)."""
        if self.cpu_pool is None:
            return {}
        allocated = self.cpu_pool.allocated_host_kv()
        return {name: {"budget_bytes": room.budget, "free_bytes": max(0, room.free),
                       "allocated_bytes": allocated.get(name, 0)}
                for name, room in self.cpu_pool.host_memory().items()}

    @property
    def prefix_cache_pages(self) -> tuple[int, int]:
        """Pages the prefix cache holds on the device (in use or idle) and in its host tier."""
        cache, host_tier = self.allocator.cache, self.page_table.host_tier
        return (0 if cache is None else len(cache)), (0 if host_tier is None else len(host_tier))

    def check_integrity(self) -> None:
        """Page accounting holds; with no requests left, no device page, host KV byte, residual or queued row
        remains."""
        self.allocator.check_integrity()
        if self.page_table.host_tier is not None:
            self.page_table.host_tier.check_integrity()
        if self.scheduler.has_unfinished():
            return
        if self.allocator.num_used or self.page_table.num_requests or self.page_table.num_remembered:
            raise AssertionError(f"idle engine holds {self.allocator.num_used} KV pages, page keys of "
                                 f"{self.page_table.num_remembered} requests")
        if self.page_table.num_holding_host_prefix or (self.page_table.host_tier and self.page_table.host_tier.num_held):
            raise AssertionError("idle engine holds host-tier pages for offloaded requests")
        if self.runner.num_offloaded_entries:
            raise AssertionError(f"idle engine holds {self.runner.num_offloaded_entries} offloaded residuals or rows")
        if self.cpu_pool is not None:
            if self.cpu_pool.num_requests or self.cpu_pool.num_in_flight:
                raise AssertionError(f"idle CPU pool holds {self.cpu_pool.num_requests} requests")
            host_bytes = self.cpu_pool.host_kv_bytes()
            if host_bytes:
                raise AssertionError(f"idle CPU pool holds {host_bytes} bytes of host KV")

    def shutdown(self) -> None:
        """Stops the CPU attention workers (they are daemons, so they also end with this process)."""
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown()
