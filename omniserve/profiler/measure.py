"""The measurements behind the latency models of latency_model.py, on the real model and device.

Each model is timed the way the runner runs it, piece by piece:

- dense: layer pre_attention + post_attention on n random rows, n in [1, max_num_tokens], by recursive bisection
  (`bisect_piecewise`, one octave at a time), which finds where a GPU's GEMM time steps up with O(log n)
  measurements per step.
- prefill / decode attention: PagedAttention on a scratch PagePool over random KV, each request with pages of its
  own. The iteration builds its attention metadata once for all layers; 1/num_layers of that time is added to each
  per-layer measurement, since it grows with the same features (a later chunk's mask, the decode slot table).
- head: what runs once per iteration whatever the layers do: embedding and RoPE angles, final norm + LM head, the
  sampler, and the runner's Python around them (timed as the sum of those calls on n sampled rows).
- cpu_attention: one layer's rows sent to a real CPU attention pool worker and back (submit -> poll), over host KV of
  random requests. Without a pool (pool_config None) it is fitted from the same decode kernel called in this process:
  a lower bound (no transport, no queueing) that lets a simulator or a later pool start from a sensible number.

Every timed call starts with caches cleared of its data (see _Timer): in the runner a layer's weights and KV come
from memory, not from a cache that one layer timed over and over would stay in. (Building attention metadata, work
on a few small tensors just made, is timed warm.)

Every model is checked on measurements left out of its fit (dense: extra points between the knots); the median and
90th-percentile relative errors are stored in LatencyModel.accuracy.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omniserve.attention import PagedAttention
from omniserve.config import ModelConfig
from omniserve.cpu_attention import CPUAttentionPool, PoolConfig
from omniserve.cpu_attention.host_kv import HostKV
from omniserve.cpu_attention.kernel import decode_attention
from omniserve.engine.scheduler.latency_model import LinearModel, PiecewiseLinear, prefill_interactions
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.llama import LlamaForCausalLM
from omniserve.profiler.fitting import accuracy_summary, bisect_piecewise, fit_with_held_out, nondecreasing
from omniserve.sampling.params import SamplingParams
from omniserve.sampling.sampler import SamplingRow, sample

logger = logging.getLogger(__name__)

_SEED = 0
_HOST_KV_LAYERS = 2
"""Layers of a profiled offloaded request's host KV: round trips alternate between them, so that the pool worker
(whose cache the profiler does not clear) does not find the same layer's KV in its cache every time."""
_MIN_TIMED_S = 0.02
"""Repeat a cheap measurement until this much time is timed (the median of many short runs is steadier)..."""
_MAX_TIMING_WALL_S = 0.25
"""...or until one timing has taken this long, cache clearing included: clearing a large last-level cache (a
server CPU's is hundreds of MiB) takes 50-100 ms, and twenty cleared repeats of every sub-millisecond call made a
small model's profile take minutes."""
_MIN_REPEATS, _MAX_REPEATS = 3, 20
_MAX_PREFILL_WORK = 2048 * 4096
"""Largest count * (start + count) a prefill timing may take: beyond it the linear model extrapolates."""
_DECODE_TOKEN_BUDGET = 1 << 16
"""Most KV tokens of one timed decode batch (each request has pages of its own, as in a real batch)."""
_MAX_DECODE_BATCH = 64
_MAX_HEAD_ROWS = 256
_DENSE_GRID = 16
"""Dense segments wider than max_num_tokens / _DENSE_GRID are always split (see bisect_piecewise's max_gap)."""
_POOL_PATIENCE_S = 600.0
"""How long a live CPU attention worker may go without answering a profiling round trip before profiling gives up
(a loaded machine answers slowly, not never); a dead worker fails it at once."""
_POOL_NOTICE_S = 30.0
"""A wait this long is logged, so that a slow start is never silent."""


class _Timer:
    """Median wall time of a call after a warm-up, each call starting from caches that hold none of its data.

    In the runner, a layer's weights and KV were last touched a whole iteration ago, with every other layer's in
    between; so before each timed call the timer writes over a buffer as large as what the model's other layers
    would bring through the cache (its weights), up to twice the last-level cache (as triton's do_bench clears the
    L2). A model small enough to stay in cache is timed hot, as it runs. CUDA is synchronised around every timing.
    """

    def __init__(self, device: torch.device, bar: tqdm, evict_bytes: int) -> None:
        self.device = device
        self.bar = bar
        self.count = 0
        """Calls so far (warm-ups and repeats): callers rotate over scratch layers with it."""
        self.measurements = 0
        self._evict = torch.empty(max(1, evict_bytes // 4), dtype=torch.float32, device=device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _cold_call(self, fn: Callable[[int], object], cold: bool = True) -> float:
        if cold:
            self._evict.zero_()
        self._sync()
        start = time.perf_counter()
        fn(self.count)
        self._sync()
        self.count += 1
        return time.perf_counter() - start

    def __call__(self, fn: Callable[[int], object], min_seconds: float = _MIN_TIMED_S, cold: bool = True) -> float:
        """fn(i) is called with a running index; `cold=False` times it with warm caches (work on a few small
        objects, which the runner had just touched too)."""
        started = time.perf_counter()
        self._cold_call(fn, cold)
        times: list[float] = []
        while len(times) < _MIN_REPEATS or (len(times) < _MAX_REPEATS and sum(times) < min_seconds and
                                            time.perf_counter() - started < _MAX_TIMING_WALL_S):
            times.append(self._cold_call(fn, cold))
        self.measurements += 1
        self.bar.update(1)
        return statistics.median(times)


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's largest cache (from sysfs); 32 MiB when unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 32 << 20
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return max(sizes, default=0) or 32 << 20


class ModelProfiler:
    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, max_num_tokens: int,
                 max_context: int, page_size: int, bar: tqdm) -> None:
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.max_num_tokens = max_num_tokens
        self.max_context = max_context
        self.page_size = page_size
        self.bar = bar
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.time = _Timer(device, bar, min(weight_bytes, 2 * last_level_cache_bytes(device)))
        self.rng = random.Random(_SEED)
        self.accuracy: dict[str, dict[str, float]] = {}
        self.generator = torch.Generator(device=device).manual_seed(_SEED)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def _positions(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.max_context, (n,), generator=self.generator, device=self.device)

    # ------------------------------------------------------------------------------------------------ dense
    def dense(self) -> PiecewiseLinear:
        self.bar.set_postfix_str("dense")
        model = self.model

        def measure(n: int) -> float:
            hidden = self._randn(n, self.config.hidden_size)
            angles = model.rope_angles(self._positions(n))

            def run(i: int) -> None:
                q, _, _ = model.pre_attention(0, hidden, angles)  # every layer has layer 0's shapes
                model.post_attention(0, q, hidden)  # q has attention's output shape

            return self.time(run)

        measured: dict[int, float] = {}
        # One bisection per octave (1-2, 2-4, ..., up to max_num_tokens): small batches, where decode iterations
        # live and the time is far from linear (weights read once for few rows), get knots as dense as large ones
        # relative to their size. max_gap: a GPU's steps (one more wave of tiles) come every 64-128 rows or more;
        # within that, bisection finds them.
        max_gap = max(1, self.max_num_tokens // _DENSE_GRID)
        xs: set[float] = set()
        lo = 1
        while lo < self.max_num_tokens or not xs:
            hi = min(2 * lo, self.max_num_tokens)
            xs.update(bisect_piecewise(measure, lo, hi, max_gap=max_gap, measurements=measured).xs)
            lo = hi
        ordered = sorted(xs)
        # More rows never take less time: a dip between knots is noise (or a kernel choice not to count on).
        knots = PiecewiseLinear(tuple(ordered), nondecreasing([measured[int(x)] for x in ordered]))
        # Held out: points between the knots, log-spaced so that small batches (decode) are checked too. On a noisy
        # machine bisection measures many sizes, so a drawn size already measured moves to the nearest one that is not
        # (skipping them left no held-out point at all on a busy machine: an accuracy of NaN).
        candidates = {round(math.exp(self.rng.uniform(0, math.log(self.max_num_tokens)))) for _ in range(8)}
        held_out = sorted({n for n in (_nearest_unmeasured(c, measured, self.max_num_tokens) for c in candidates) if n})
        times = [measure(n) for n in held_out]
        self.accuracy["dense"] = accuracy_summary([knots(n) for n in held_out], times)
        return knots

    # --------------------------------------------------------------------------------------------- attention
    def _scratch_attention(self, num_tokens: int) -> PagedAttention:
        """PagedAttention over a scratch pool of one layer holding num_tokens tokens of random KV (pages never
        written would read as the kernel's shared zero page, faster than real KV)."""
        num_pages = -(-num_tokens // self.page_size) + 2
        config = replace(self.config, num_layers=1)
        pool = PagePool(config, num_pages, self.page_size, self.device, self.dtype)
        for tensor in pool.k + pool.v:
            tensor.normal_(generator=self.generator)
        return PagedAttention(pool, self.device)

    def _time_attention(self, attention: PagedAttention, spans: list[tuple[int, int, list[int]]]) -> float:
        """One layer's attention of these spans, plus 1/num_layers of building their metadata."""
        c = self.config
        rows = sum(count for _, count, _ in spans)
        q = self._randn(rows, c.num_heads, c.head_dim)
        k, v = self._randn(rows, c.num_kv_heads, c.head_dim), self._randn(rows, c.num_kv_heads, c.head_dim)
        meta = attention.build_metadata(spans)
        per_layer = self.time(lambda i: attention(0, q, k, v, meta))
        build = self.time(lambda i: attention.build_metadata(spans), cold=False)
        return per_layer + build / c.num_layers

    def prefill_attention(self, num_points: int = 24) -> LinearModel:
        self.bar.set_postfix_str("prefill attention")
        attention = self._scratch_attention(self.max_context)
        page_ids = list(range(attention.pool.num_pages))
        longest = min(self.max_num_tokens, self.max_context)
        points = []
        for index in range(num_points):
            count = max(2, round(math.exp(self.rng.uniform(math.log(2), math.log(max(2, longest))))))
            count = min(count, longest)
            start = 0
            if index % 2:  # a later chunk of a long prompt, within the work budget
                room = min(self.max_context - count, _MAX_PREFILL_WORK // count - count)
                start = self.rng.randint(1, room) if room >= 1 else 0
            seconds = self._time_attention(attention, [(start, count, page_ids)])
            points.append(((float(prefill_interactions(start, count)), float(count)), seconds))
        return fit_with_held_out("prefill_attention", points, self.rng, self.accuracy)

    def _decode_batches(self, num_points: int) -> list[list[int]]:
        """Context lengths of decode batches: batch sizes log-uniform up to _MAX_DECODE_BATCH, contexts uniform up to
        a longest one that is log-uniform up to max_context, within the token budget."""
        batches = []
        for _ in range(num_points):
            size = round(math.exp(self.rng.uniform(0, math.log(_MAX_DECODE_BATCH))))
            longest = round(math.exp(self.rng.uniform(math.log(min(16, self.max_context)), math.log(self.max_context))))
            contexts = [self.rng.randint(1, longest) for _ in range(size)]
            while len(contexts) > 1 and sum(contexts) > _DECODE_TOKEN_BUDGET:
                contexts.pop()
            batches.append(contexts)
        return batches

    def decode_attention(self, num_points: int = 32) -> LinearModel:
        self.bar.set_postfix_str("decode attention")
        budget = max(_DECODE_TOKEN_BUDGET, self.max_context)
        attention = self._scratch_attention(budget + _MAX_DECODE_BATCH * self.page_size)
        points = []
        for contexts in self._decode_batches(num_points):
            spans, next_page = [], 0
            for context in contexts:  # pages of its own for every request
                pages = -(-context // self.page_size)
                spans.append((context - 1, 1, list(range(next_page, next_page + pages))))
                next_page += pages
            seconds = self._time_attention(attention, spans)
            points.append(((float(sum(contexts)), float(len(contexts))), seconds))
        return fit_with_held_out("decode_attention", points, self.rng, self.accuracy)

    # -------------------------------------------------------------------------------------------------- head
    def head(self, num_points: int = 12) -> LinearModel:
        self.bar.set_postfix_str("head")
        model, c = self.model, self.config
        most = max(1, min(_MAX_HEAD_ROWS, self.max_num_tokens))
        sizes = sorted({round(math.exp(self.rng.uniform(0, math.log(most)))) for _ in range(num_points)} | {1, most})
        points = []
        for n in sizes:
            token_ids = torch.randint(0, c.vocab_size, (n,), generator=self.generator, device=self.device)
            positions = self._positions(n)
            params = SamplingParams(temperature=0.0)

            def run(i: int) -> None:
                rows = [SamplingRow(params, 0) for _ in range(n)]
                hidden = model.embed(token_ids)
                model.rope_angles(positions)
                sample(model.compute_logits(hidden), rows, c.eos_token_ids)

            points.append(((float(n),), self.time(run)))
        return fit_with_held_out("head", points, self.rng, self.accuracy)

    def swap_out(self, num_points: int = 8) -> LinearModel:
        """What a swap-out costs the engine, by tokens. On the CPU the runner gathers the request's KV from every
        layer and hands it to the pool, whose queue copies it into shared memory on the engine's own core: both are
        timed. On CUDA the copy runs on a side stream and costs the device's iteration nothing measurable."""
        if self.device.type != "cpu":
            return LinearModel(0.0, (0.0,))
        self.bar.set_postfix_str("swap-out")
        longest = max(2, min(self.max_context, 2048))
        pool = PagePool(self.config, -(-longest // self.page_size) + 1, self.page_size, self.device, self.dtype)
        for tensor in pool.k + pool.v:
            tensor.normal_(generator=self.generator)
        sizes = sorted({round(math.exp(self.rng.uniform(math.log(16), math.log(longest)))) for _ in range(num_points)}
                       | {16, longest})
        points = []
        for tokens in sizes:
            page_ids = list(range(-(-tokens // self.page_size)))

            def copy(i: int) -> None:
                k, v = pool.gather(page_ids, tokens)
                k.share_memory_()
                v.share_memory_()

            points.append(((float(tokens),), self.time(copy)))
        return fit_with_held_out("swap_out", points, self.rng, self.accuracy)

    # ------------------------------------------------------------------------------------------ CPU attention
    def cpu_attention(self, pool_config: PoolConfig | None, num_points: int = 24) -> LinearModel:
        self.bar.set_postfix_str("CPU attention")
        target = _PoolRoundTrip(self.config, pool_config) if pool_config else _InProcessKernel(self.config)
        points = []
        try:
            for contexts in self._decode_batches(num_points):
                batch = target.prepare(contexts)
                seconds = self.time(lambda i: target.run(batch, i % _HOST_KV_LAYERS))
                target.release(batch)
                points.append(((float(sum(contexts)), float(len(contexts))), seconds))
        finally:
            target.close()
        return fit_with_held_out("cpu_attention", points, self.rng, self.accuracy)


@dataclass
class _CPUBatch:
    """Offloaded requests (host KV of random values, fresh for each batch) and one layer's rows for them."""

    request_ids: list[str]
    q: torch.Tensor  # [rows, num_heads, head_dim]
    k: torch.Tensor  # [rows, num_kv_heads, head_dim]
    v: torch.Tensor


class _CPUAttentionTarget:
    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(_SEED)
        self._batches = 0

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def _new_batch(self, contexts: list[int]) -> tuple[_CPUBatch, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The batch and each request's KV [_HOST_KV_LAYERS, context, num_kv_heads, head_dim]."""
        c, n = self.config, len(contexts)
        self._batches += 1
        ids = [f"profile-{self._batches}-{row}" for row in range(n)]
        kv = [(self._randn(_HOST_KV_LAYERS, ctx, c.num_kv_heads, c.head_dim),
               self._randn(_HOST_KV_LAYERS, ctx, c.num_kv_heads, c.head_dim)) for ctx in contexts]
        rows = _CPUBatch(ids, self._randn(n, c.num_heads, c.head_dim), self._randn(n, c.num_kv_heads, c.head_dim),
                         self._randn(n, c.num_kv_heads, c.head_dim))
        return rows, kv


class _PoolRoundTrip(_CPUAttentionTarget):
    """A real pool worker: submit one layer's rows, wait until poll has returned them all. Every round trip appends
    one token per request, as in serving (a few tokens more than the batch's contexts by the end: negligible)."""

    def __init__(self, config: ModelConfig, pool_config: PoolConfig) -> None:
        super().__init__(config)
        # One worker: the model is per worker, and a request's rows all go to the worker that holds its KV.
        cores = pool_config.worker_cores[:1] if pool_config.worker_cores else None
        self.pool = CPUAttentionPool(replace(pool_config, num_workers=1, worker_cores=cores))

    def prepare(self, contexts: list[int]) -> _CPUBatch:
        batch, kv = self._new_batch(contexts)
        for request_id, (k, v) in zip(batch.request_ids, kv):
            self.pool.load(request_id, k, v)
        self._round_trip(batch, 0)  # waits for the loads (and the worker's start)
        return batch

    def run(self, batch: _CPUBatch, layer: int) -> None:
        self._round_trip(batch, layer)

    def _round_trip(self, batch: _CPUBatch, layer: int) -> None:
        """Waits as long as the worker lives and keeps answering within _POOL_PATIENCE_S, saying so every
        _POOL_NOTICE_S: a fixed short timeout failed profiles on loaded machines."""
        self.pool.submit([(r, layer) for r in batch.request_ids], batch.q, batch.k, batch.v)
        waiting = len(batch.request_ids)
        started = last_answer = notice = time.monotonic()
        while waiting:
            answered = len(self.pool.poll())
            waiting -= answered
            now = time.monotonic()
            if answered:
                last_answer = now
            if not waiting:
                break
            if self.pool.check_workers():
                raise RuntimeError("the CPU attention worker died while profiling (see the log above)")
            if now - last_answer > _POOL_PATIENCE_S:
                raise RuntimeError(f"the CPU attention worker did not answer for {_POOL_PATIENCE_S:.0f} s while "
                                   "profiling")
            if now - notice > _POOL_NOTICE_S:
                logger.info("profiling: still waiting for the CPU attention worker (%.0f s)", now - started)
                notice = now
            self.pool.wait(1.0)

    def release(self, batch: _CPUBatch) -> None:
        self.pool.free(batch.request_ids)

    def close(self) -> None:
        self.pool.shutdown()


class _InProcessKernel(_CPUAttentionTarget):
    """No pool: the workers' decode kernel over host KV, in this process (a lower bound of a worker's time)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.store: dict[str, HostKV] = {}

    def prepare(self, contexts: list[int]) -> _CPUBatch:
        batch, kv = self._new_batch(contexts)
        self.store = {request_id: HostKV(k, v) for request_id, (k, v) in zip(batch.request_ids, kv)}
        return batch

    def run(self, batch: _CPUBatch, layer: int) -> None:
        for row, request_id in enumerate(batch.request_ids):
            host = self.store[request_id]
            length = host.lengths[layer]  # attend over the stored context, appending nothing: contexts stay put
            decode_attention(batch.q[row], host.k[layer], host.v[layer][:, :length])

    def release(self, batch: _CPUBatch) -> None:
        self.store = {}

    def close(self) -> None:
        self.store = {}


def _nearest_unmeasured(n: int, measured: dict[int, float], high: int) -> int | None:
    """The size in [1, high] nearest to n that has not been measured (None: every size has)."""
    for distance in range(high):
        for size in (n - distance, n + distance):
            if 1 <= size <= high and size not in measured:
                return size
    return None
