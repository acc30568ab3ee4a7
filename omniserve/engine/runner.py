"""Executes an IterationPlan on the device, layer by layer, with offloaded rows piggybacking on the device batch.

At layer l the dense halves run on a different set of rows:

    pre_attention(l):   device rows + offloaded rows that finished layer l-1 in this iteration
                        (at layer 0: offloaded requests starting a new token)
    attention(l):       device rows -> paged attention on the device
                        offloaded rows -> q, k, v to the CPU pool; their residual is kept until the result returns
    post_attention(l):  device rows + offloaded rows whose CPU result for layer l came back (admitted by the plan)

Which offloaded rows come back at layer l is the plan's pipeline (OffloadedPipeline): one layer per iteration, the
rows the plan admitted (the OmniServe paper's design: the device never waits for the CPU); or, multi-layer, also
any row whose CPU result for layer l is back by the time the device has done layer l's own attention (each layer's
rows are sent to the pool right after their QKV, so the CPU's attention overlaps the device's), the device waiting
for the rest while the plan's wait lasts, at most `row_limit` rows a layer. A row that is not back in time waits for
a later iteration at that layer. Rows that finish the last layer go through the LM head and the sampler like any
device row.

On CUDA the engine thread never waits for the GPU to send rows: their q, k, v are copied to pinned memory on the
stream, and each worker's inbox thread waits for the copy's event before sending (pool.py). Whether a result is back
is a look at the pool's pipes when the engine thread launches the layer's output projection, which does not wait
for the GPU either. The engine thread runs ahead of the GPU, so without a planned wait the rows that join are the
ones whose results came back from earlier iterations (the one-layer pipeline's rows, at no cost); rows sent in this
iteration join its later layers only while the plan lets the engine thread wait, and that wait, during which the
GPU drains the kernels already launched, is what the scheduler plans and charges to the iteration.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from dataclasses import dataclass, field, replace

import torch

from omniserve.attention import PagedAttention
from omniserve.cpu_attention import CPUAttentionPool
from omniserve.engine.graphs import DecodeGraphs
from omniserve.engine.observer import RunnerTimings, TimedPool
from omniserve.engine.scheduler.plan import IterationPlan, KVTransfer, RunnerOutput
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.llama import LlamaForCausalLM, layer_post_attention, layer_pre_attention
from omniserve.ops.transfer import to_device
from omniserve.sampling.params import SampledToken, SamplingParams
from omniserve.sampling.sampler import SamplingRow, sample
from omniserve.sampling.structured import RequestGrammar


@dataclass
class _OffloadedToken:
    """An offloaded request's token on its way through the layers."""

    position: int
    params: SamplingParams
    num_generated: int
    grammar: RequestGrammar | None = None
    seen_token_ids: list[int] | None = None
    layer: int = 0
    """The layer whose attention is out on the CPU (or has come back)."""
    residual: torch.Tensor | None = None
    """[hidden_size] the residual stream entering `layer`, kept for post_attention."""
    result: torch.Tensor | None = None
    """[num_heads, head_dim] the CPU's attention output for `layer`, once back; on the host until an iteration admits
    it (the results admitted together go to the device in one copy)."""


@dataclass
class _OffloadedLayers:
    """One iteration's offloaded pipeline as it runs: the plan's row limit and what is left of its wait, and what
    happened: the offloaded rows each layer's dense work ran, the seconds waited, the tokens sent to the CPU."""

    row_limit: int | None
    wait_left_s: float
    num_layers: int
    waited_s: float = 0.0
    rows: list[int] = field(init=False)
    sent: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rows = [0] * self.num_layers


def _timed(timing: str):
    """Adds the method's seconds to the step's RunnerTimings field `timing` while iterations are observed."""

    def decorate(method):
        @functools.wraps(method)
        def timed(self, *args):
            if self.timings is None:
                return method(self, *args)
            started = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                setattr(self.timings, timing, getattr(self.timings, timing) + time.perf_counter() - started)

        return timed

    return decorate


_offload_timed = _timed("offload_s")


@dataclass
class _PendingCopy:
    """A swap-out whose device-to-host copy runs on the side stream (CUDA)."""

    request_id: str
    k: torch.Tensor
    v: torch.Tensor
    """The host copies [num_layers, num_tokens, num_kv_heads, head_dim] (pinned), whole once `done` has completed."""
    done: torch.cuda.Event
    final_tokens: int
    sources: tuple[torch.Tensor, torch.Tensor]
    """The device tensors being read, held until `done`: see ModelRunner._start_host_copy."""
    host_prefix_pages: tuple[int, ...] = ()


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, pool: PagePool, device: torch.device, cpu_pool: CPUAttentionPool | None = None,
        graphs: DecodeGraphs | None = None, host_pages: PagePool | None = None,
    ) -> None:
        """host_pages: the prefix cache's host tier, which plans copy pages to and from."""
        self.model = model
        self.host_pages = host_pages
        self.layers = [layer.weights() for layer in model.layers]
        """Each layer's tensors, fetched once (the model's weights are loaded, and reloading copies in place)."""
        self.graphs = graphs
        """Decode iterations without offloaded rows run there (replayed CUDA graphs), when given."""
        self.pool = pool
        self.device = device
        self.attention = PagedAttention(pool, device)
        self.cpu_pool = cpu_pool
        self.eos_token_ids = model.config.eos_token_ids
        self._offloaded: dict[str, _OffloadedToken] = {}
        # Offloaded tokens by the layer whose CPU result they wait for: still out, or back and not yet used (in
        # arrival order); and the results back that the scheduler has not been told of.
        self._out: dict[int, set[str]] = collections.defaultdict(set)
        self._back: dict[int, dict[str, None]] = collections.defaultdict(dict)
        self._ready: dict[str, int] = {}
        self._swapping_in: dict[str, KVTransfer] = {}
        self._copies: list[_PendingCopy] = []
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.timings: RunnerTimings | None = None
        """Where this step's time went, kept only while iterations are observed (keep_timings)."""

    # ------------------------------------------------------------------------------------------------ timings
    def keep_timings(self, keep: bool) -> None:
        """Starts or stops keeping RunnerTimings; while kept, the CPU pool is called through a timing proxy."""
        pool = self.cpu_pool.pool if isinstance(self.cpu_pool, TimedPool) else self.cpu_pool
        self.timings = RunnerTimings() if keep else None
        self.cpu_pool = TimedPool(pool, self) if keep and pool is not None else pool

    def take_timings(self) -> RunnerTimings | None:
        """The timings kept since the last call (None when not kept), starting afresh."""
        timings = self.timings
        if timings is not None:
            self.timings = RunnerTimings()
        return timings

    # ------------------------------------------------------------------------------------------------ lifecycle
    def release(self, request_ids: list[str]) -> None:
        """Offloaded requests that ended: drop their residuals, rows in flight, pending copies and host KV."""
        if not request_ids:
            return
        gone = set(request_ids)
        for request_id in gone:
            self._forget(request_id)
            self._swapping_in.pop(request_id, None)
        self._copies = [c for c in self._copies if c.request_id not in gone]
        if self.cpu_pool is not None:
            self.cpu_pool.free(list(gone))

    @property
    def num_offloaded_in_flight(self) -> int:
        """Offloaded tokens between layers (each holds one residual)."""
        return len(self._offloaded)

    @property
    def num_offloaded_entries(self) -> int:
        """Everything held for offloaded tokens: the tokens and their entries in the per-layer indexes (0 when
        nothing is offloaded: no entry outlives its token)."""
        return len(self._offloaded) + len(self._ready) + sum(map(len, self._out.values())) + sum(
            map(len, self._back.values()))

    # ---------------------------------------------------------------------------------------------------- step
    @_offload_timed
    def poll_cpu_results(self) -> list[tuple[str, int]]:
        """CPU attention results that came back and no iteration has used yet (each reported once), kept until the
        plan admits them or a later iteration's layer takes them; returns their (request id, layer)."""
        self._take_results()
        ready, self._ready = list(self._ready.items()), {}
        return ready

    def _take_results(self) -> int:
        """Files the results that came back since the last look; returns how many."""
        if self.cpu_pool is None:
            return 0
        count = 0
        for result in self.cpu_pool.poll():
            token = self._offloaded.get(result.request_id)
            if token is not None and token.layer == result.layer and token.result is None:
                token.result = result.out
                self._out[result.layer].discard(result.request_id)
                self._back[result.layer][result.request_id] = None
                self._ready[result.request_id] = result.layer
                count += 1
        return count

    def _forget(self, request_id: str) -> None:
        token = self._offloaded.pop(request_id, None)
        if token is not None:
            self._out[token.layer].discard(request_id)
            self._back[token.layer].pop(request_id, None)
        self._ready.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, plan: IterationPlan) -> RunnerOutput:
        if plan.prefix_saves or plan.prefix_loads:  # first: this iteration may write the pages it evicted
            self.pool.copy_pages(plan.prefix_saves, to=self.host_pages)
            self.host_pages.copy_pages(plan.prefix_loads, to=self.pool)
        lost = self._check_pool()
        swapped_out = self._swap_out(plan.swap_outs)
        for transfer in plan.swap_ins:
            if transfer.request_id in lost:  # its worker died since the plan was made: rebuilt instead (lost)
                continue
            self._swapping_in[transfer.request_id] = transfer
            self.cpu_pool.request_export(transfer.request_id)
        if lost:  # rows of requests whose worker died cannot run: the scheduler rebuilds them
            plan = replace(plan, offloaded_starts=[t for t in plan.offloaded_starts if t.request_id not in lost],
                           returning=[(r, layer) for r, layer in plan.returning if r not in lost])
        returning: dict[int, list[str]] = {}
        for request_id, layer in plan.returning:
            returning.setdefault(layer, []).append(request_id)
        chasing = plan.pipeline.row_limit != 0 and bool(self._offloaded or plan.offloaded_starts)
        if not (plan.chunks or plan.offloaded_starts or returning or chasing):
            return RunnerOutput({}, swapped_out, self._finish_swap_ins(), lost)
        if self.graphs is not None and not (plan.offloaded_starts or returning or chasing) and self.graphs.fits(
                plan.chunks):
            sampled = self._sample(plan, self.graphs.run(plan.chunks), [], None)
            return RunnerOutput(sampled, swapped_out, self._finish_swap_ins(), lost)
        layers = _OffloadedLayers(plan.pipeline.row_limit, plan.pipeline.wait_s, self.model.config.num_layers)
        sampled = self._forward(plan, returning, layers)
        advanced = {r: self._offloaded[r].layer for r in layers.sent if r in self._offloaded}
        return RunnerOutput(sampled, swapped_out, self._finish_swap_ins(), lost, advanced,
                            tuple(layers.rows) if chasing else None, layers.waited_s)

    def _check_pool(self) -> list[str]:
        if self.cpu_pool is None:
            return []
        lost = self.cpu_pool.check_workers()
        for request_id in lost:
            self._forget(request_id)
            self._swapping_in.pop(request_id, None)
        return lost

    def _device_inputs(self, plan: IterationPlan):
        """Token ids and positions (the device chunks', then the offloaded rows' starting at layer 0) on the device,
        the number of device rows, the rows to sample and the device chunks' attention metadata: one copy in."""
        token_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for chunk in plan.chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_position, chunk.start_position + len(chunk.token_ids)))
            if chunk.sample:
                sample_rows.append(len(token_ids) - 1)
        num_device = len(token_ids)
        for start in plan.offloaded_starts:
            token_ids.append(start.token_id)
            positions.append(start.position)
        if not plan.chunks:
            ids_and_positions = to_device([token_ids, positions], self.device) if token_ids else torch.empty(
                2, 0, dtype=torch.long, device=self.device)
            return ids_and_positions, num_device, sample_rows, None
        spans = [(c.start_position, len(c.token_ids), c.page_ids) for c in plan.chunks]
        meta, (ids_and_positions,) = self.attention.build_inputs(spans, token_ids + positions)
        return ids_and_positions.view(2, -1), num_device, sample_rows, meta

    def _forward(self, plan: IterationPlan, returning: dict[int, list[str]],
                 layers: _OffloadedLayers) -> dict[str, SampledToken]:
        model = self.model
        ids_and_positions, num_device, sample_rows, meta = self._device_inputs(plan)

        # Offloaded tokens starting at layer 0 join the device tokens' embedding (their ids and positions follow the
        # device rows' in ids_and_positions).
        for start in plan.offloaded_starts:
            self._offloaded[start.request_id] = _OffloadedToken(start.position, start.params, start.num_generated,
                                                                start.grammar, start.seen_token_ids)
        device_hidden = device_angles = carry_hidden = carry_angles = None
        if ids_and_positions.shape[1]:
            hidden_all = model.embed(ids_and_positions[0])
            angles_all = model.rope_angles(ids_and_positions[1])
            device_hidden, device_angles = hidden_all[:num_device], _rows(angles_all, slice(0, num_device))
            carry_hidden, carry_angles = hidden_all[num_device:], _rows(angles_all, slice(num_device, None))
        carry_ids = [s.request_id for s in plan.offloaded_starts]  # offloaded rows entering the current layer
        if num_device and not carry_ids and not returning and (layers.row_limit == 0 or not self._offloaded):
            # No offloaded row can join (none starts, none is planned back, none may chase): the layers without
            # the per-layer bookkeeping below.
            device_hidden = model.run_layers(device_hidden, device_angles,
                                             lambda layer, q, k, v: self.attention(layer, q, k, v, meta), self.layers)
            return self._sample(plan, device_hidden if len(sample_rows) == num_device else device_hidden[sample_rows],
                                [], None)

        for layer in range(model.config.num_layers):
            device_attn = None
            if num_device or carry_ids:
                device_attn = self._attention(layer, (device_hidden, device_angles, meta), carry_ids,
                                              (carry_hidden, carry_angles), layers)
            back_ids = self._joining(layer, returning.get(layer, []), layers)
            layers.rows[layer] = max(len(carry_ids), len(back_ids))
            if not num_device and not back_ids:
                carry_ids = []
                continue
            attn_parts = [device_attn] if num_device else []
            residual_parts = [device_hidden] if num_device else []
            if back_ids:
                attn_parts.append(self._results_to_device(back_ids))
                residual_parts.append(torch.stack([self._offloaded[r].residual for r in back_ids]))
            out = layer_post_attention(model.config, self.layers[layer], _cat(attn_parts), _cat(residual_parts))
            device_hidden, carry_hidden = out[:num_device], out[num_device:]
            carry_ids = back_ids  # they finished this layer and go on to the next one in this iteration
            if carry_ids:
                back_positions = [self._offloaded[r].position for r in carry_ids]
                carry_angles = model.rope_angles(to_device(back_positions, self.device))
        device_final = None
        if num_device:  # a decode step samples every row: no gather
            device_final = device_hidden if len(sample_rows) == num_device else device_hidden[sample_rows]
        return self._sample(plan, device_final, carry_ids, carry_hidden)

    def _attention(self, layer: int, device: tuple, carry_ids: list[str], carry: tuple, layers: _OffloadedLayers):
        """QKV of the device rows (hidden, angles, attention metadata) and of the offloaded rows entering `layer`
        (hidden, angles); the offloaded rows' go to the CPU pool, the device rows' attention runs here (returned, or
        None without device rows)."""
        (device_hidden, device_angles, meta), (carry_hidden, carry_angles) = device, carry
        num_device = 0 if device_hidden is None else len(device_hidden)
        hidden_in = torch.cat([device_hidden, carry_hidden]) if num_device and carry_ids else (
            device_hidden if num_device else carry_hidden)
        angles = _cat_rows(device_angles, carry_angles) if num_device and carry_ids else (
            device_angles if num_device else carry_angles)
        q, k, v = layer_pre_attention(self.model.config, self.layers[layer], hidden_in, angles)
        if carry_ids:  # to the CPU first, so that its attention overlaps the device's
            self._send(layer, carry_ids, carry_hidden, q[num_device:], k[num_device:], v[num_device:])
            layers.sent.update(carry_ids)
        if not num_device:
            return None
        return self.attention(layer, q[:num_device], k[:num_device], v[:num_device], meta)

    @_offload_timed
    def _send(self, layer: int, request_ids: list[str], hidden, q, k, v) -> None:
        """Rows entering `layer`: their q, k, v go to the CPU pool, their residual stays here until the result is
        back."""
        out = self._out[layer]
        # One copy of the sent rows, each residual a view of it: a view of `hidden` itself would keep the whole
        # layer output alive (every device row, a prefill chunk's too) for as long as any token waits at the layer.
        hidden = hidden.clone()
        for row, request_id in enumerate(request_ids):
            token = self._offloaded[request_id]
            token.layer, token.residual, token.result = layer, hidden[row], None
            out.add(request_id)
        self.cpu_pool.submit([(r, layer) for r in request_ids], q, k, v)

    @_offload_timed
    def _joining(self, layer: int, planned: list[str], layers: _OffloadedLayers) -> list[str]:
        """The offloaded rows that go through `layer`'s output projection now: the ones the plan admitted, then
        (multi-layer) any other whose result for this layer is back, waiting for the rest while the plan's wait
        lasts, up to the plan's row limit."""
        joining = list(planned)
        if layers.row_limit == 0 or self.cpu_pool is None:
            for request_id in joining:
                self._back[layer].pop(request_id, None)
                self._ready.pop(request_id, None)
            return joining
        room = math.inf if layers.row_limit is None else layers.row_limit - len(joining)
        if self._out[layer]:  # results for other layers can wait for their own layer (or the next poll)
            self._take_results()
        if layers.wait_left_s > 0:
            self._wait_for_results(layer, len(joining) + room, layers)
        taken = set(joining)
        for request_id in self._back[layer]:
            if len(joining) - len(planned) >= room:
                break
            if request_id not in taken:
                joining.append(request_id)
        for request_id in joining:
            self._back[layer].pop(request_id, None)
            self._ready.pop(request_id, None)
        return joining

    def _wait_for_results(self, layer: int, wanted: float, layers: _OffloadedLayers) -> None:
        """Blocks until `wanted` results for `layer` are back, none is out, the plan's wait is used up, or a worker
        or host has died (its rows will not come back: the next iteration rebuilds its requests)."""
        started = time.perf_counter()
        deadline = started + layers.wait_left_s
        if self.timings is not None:  # the pool's calls during a wait are kept apart
            self.timings.waiting = True
        while self._out[layer] and len(self._back[layer]) < wanted:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self.cpu_pool.wait(left)
            if not self._take_results() and not self.cpu_pool.all_alive():
                break
        if self.timings is not None:
            self.timings.waiting = False
        spent = time.perf_counter() - started
        layers.waited_s += spent
        layers.wait_left_s -= spent

    def _results_to_device(self, request_ids: list[str]) -> torch.Tensor:
        """The CPU results of rows joining a layer ([rows, num_heads, head_dim]), moved to the device in one copy:
        a copy per row would cost a host-to-device round trip each on a GPU."""
        host = torch.stack([self._offloaded[r].result for r in request_ids])
        if self.device.type == "cuda":  # from pinned memory, so that the copy does not hold up the kernel launches
            return host.pin_memory().to(self.device, self.pool.k[0].dtype, non_blocking=True)
        return host.to(self.device, self.pool.k[0].dtype)

    def _sample(self, plan, device_final, finished_ids: list[str], finished_hidden) -> dict[str, SampledToken]:
        """LM head + sampling for device chunks that reached their last token and offloaded tokens that finished
        the last layer."""
        sampling_chunks = [c for c in plan.chunks if c.sample]
        rows = [SamplingRow(c.params, c.num_generated, c.grammar, c.seen_token_ids) for c in sampling_chunks]
        request_ids = [c.request_id for c in sampling_chunks]
        for request_id in finished_ids:
            token = self._offloaded.pop(request_id)
            rows.append(SamplingRow(token.params, token.num_generated, token.grammar, token.seen_token_ids))
            request_ids.append(request_id)
        if not rows:
            return {}
        hidden = _cat(([device_final] if device_final is not None else [])
                      + ([finished_hidden] if finished_ids else []))
        tokens = sample(self.model.compute_logits(hidden), rows, self.eos_token_ids)
        return dict(zip(request_ids, tokens))

    # -------------------------------------------------------------------------------------------------- swaps
    @_timed("swap_out_s")
    def _swap_out(self, transfers: list[KVTransfer]) -> list[str]:
        """Copies device KV to the host pool. On the CPU the copy is immediate; on CUDA it runs on a side stream
        into pinned memory and the request is reported once its event has completed (a later iteration)."""
        finished = []
        for transfer in transfers:
            # [layers, tokens, kv_heads, head_dim], after the prefix its host KV reads in the host tier (saved there
            # at the start of this iteration)
            prefix_tokens = len(transfer.host_prefix_pages) * self.pool.page_size
            k, v = self.pool.gather(transfer.page_ids, transfer.num_tokens, prefix_tokens)
            if self._copy_stream is None:
                self.cpu_pool.load(transfer.request_id, k, v, transfer.final_tokens, transfer.host_prefix_pages)
                finished.append(transfer.request_id)
                continue
            k_host, v_host, done = self._start_host_copy(k, v)
            self._copies.append(_PendingCopy(transfer.request_id, k_host, v_host, done, transfer.final_tokens, (k, v),
                                             transfer.host_prefix_pages))
        still_copying = []
        for copy in self._copies:
            if copy.done.query():
                self.cpu_pool.load(copy.request_id, copy.k, copy.v, copy.final_tokens, copy.host_prefix_pages)
                finished.append(copy.request_id)
            else:
                still_copying.append(copy)
        self._copies = still_copying
        return finished

    def _start_host_copy(self, k: torch.Tensor, v: torch.Tensor):
        """Starts copying k, v (device) into pinned host memory on the side stream; returns the copies and the event
        that completes with them. The ordering, both ways: the side stream first waits for the compute stream (k and
        v are a gather queued there); and k and v are marked as in use by the side stream (and held by the pending
        copy until its event completes), so that the caching allocator never hands their memory to a later kernel of
        the compute stream while the copy still reads it."""
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            k_host = torch.empty(k.shape, dtype=k.dtype, pin_memory=True).copy_(k, non_blocking=True)
            v_host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        k.record_stream(self._copy_stream)
        v.record_stream(self._copy_stream)
        return k_host, v_host, done

    def _finish_swap_ins(self) -> list[str]:
        if self.cpu_pool is None:
            return []
        done = []
        for exported in self.cpu_pool.take_exported():
            transfer = self._swapping_in.pop(exported.request_id, None)
            if transfer is None:  # released meanwhile
                continue
            self.pool.scatter(transfer.page_ids, transfer.num_tokens, exported.k, exported.v, transfer.cached_tokens)
            done.append(exported.request_id)
        return done


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts as one tensor; a lone part as it is (a copy of it would be a kernel launch per layer on a GPU)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows(angles: tuple[torch.Tensor, torch.Tensor], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    return angles[0][rows], angles[1][rows]


def _cat_rows(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
