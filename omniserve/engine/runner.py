"""Executes an IterationPlan on the device, layer by layer, with offloaded rows piggybacking on the device batch.

At layer l the dense halves run on a different set of rows:

    pre_attention(l):   device rows + offloaded rows that finished layer l-1 in this iteration
                        (at layer 0: offloaded requests starting a new token)
    attention(l):       device rows -> paged attention on the device
                        offloaded rows -> q, k, v to the CPU pool; their residual is kept until the result returns
    post_attention(l):  device rows + offloaded rows whose CPU result for layer l came back (admitted by the plan)

so an offloaded token advances about one layer per iteration and the device never waits for the CPU. Rows that
finish the last layer go through the LM head and the sampler like any device row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from omniserve.attention import PagedAttention
from omniserve.cpu_attention import CPUAttentionPool
from omniserve.engine.scheduler.plan import IterationPlan, KVTransfer, RunnerOutput
from omniserve.kv_cache.page_pool import PagePool
from omniserve.models.llama import LlamaForCausalLM
from omniserve.sampling.params import SampledToken, SamplingParams
from omniserve.sampling.sampler import SamplingRow, sample


@dataclass
class _OffloadedToken:
    """An offloaded request's token on its way through the layers."""

    position: int
    params: SamplingParams
    num_generated: int
    layer: int = 0
    """The layer whose attention is out on the CPU (or has come back)."""
    residual: torch.Tensor | None = None
    """[hidden_size] the residual stream entering `layer`, kept for post_attention."""
    result: torch.Tensor | None = None
    """[num_heads, head_dim] the CPU's attention output for `layer`, once back; on the host until an iteration admits
    it (the results admitted together go to the device in one copy)."""


@dataclass
class _PendingCopy:
    """A swap-out whose device-to-host copy runs on the side stream (CUDA)."""

    request_id: str
    k: torch.Tensor
    v: torch.Tensor
    done: torch.cuda.Event
    final_tokens: int


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, pool: PagePool, device: torch.device, cpu_pool: CPUAttentionPool | None = None
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.attention = PagedAttention(pool, device)
        self.cpu_pool = cpu_pool
        self.eos_token_ids = model.config.eos_token_ids
        self._offloaded: dict[str, _OffloadedToken] = {}
        self._swapping_in: dict[str, KVTransfer] = {}
        self._copies: list[_PendingCopy] = []
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def release(self, request_ids: list[str]) -> None:
        """Offloaded requests that ended: drop their residuals, rows in flight, pending copies and host KV."""
        if not request_ids:
            return
        gone = set(request_ids)
        for request_id in gone:
            self._offloaded.pop(request_id, None)
            self._swapping_in.pop(request_id, None)
        self._copies = [c for c in self._copies if c.request_id not in gone]
        if self.cpu_pool is not None:
            self.cpu_pool.free(list(gone))

    @property
    def num_offloaded_in_flight(self) -> int:
        """Offloaded tokens between layers (each holds one residual)."""
        return len(self._offloaded)

    # ---------------------------------------------------------------------------------------------------- step
    def poll_cpu_results(self) -> list[tuple[str, int]]:
        """CPU attention results that came back since the last poll, kept until the plan admits them; returns their
        (request id, layer) for the scheduler."""
        if self.cpu_pool is None:
            return []
        ready = []
        for result in self.cpu_pool.poll():
            token = self._offloaded.get(result.request_id)
            if token is not None and token.layer == result.layer:
                token.result = result.out
                ready.append((result.request_id, result.layer))
        return ready

    @torch.inference_mode()
    def execute(self, plan: IterationPlan) -> RunnerOutput:
        lost = self._check_pool()
        swapped_out = self._swap_out(plan.swap_outs)
        for transfer in plan.swap_ins:
            self._swapping_in[transfer.request_id] = transfer
            self.cpu_pool.request_export(transfer.request_id)
        if lost:  # rows of requests whose worker died cannot run: the scheduler rebuilds them
            plan = replace(plan, offloaded_starts=[t for t in plan.offloaded_starts if t.request_id not in lost],
                           returning=[(r, layer) for r, layer in plan.returning if r not in lost])
        returning: dict[int, list[str]] = {}
        for request_id, layer in plan.returning:
            returning.setdefault(layer, []).append(request_id)
        sampled = self._forward(plan, returning) if plan.chunks or plan.offloaded_starts or returning else {}
        return RunnerOutput(sampled, swapped_out, self._finish_swap_ins(), lost)

    def _check_pool(self) -> list[str]:
        if self.cpu_pool is None:
            return []
        lost = self.cpu_pool.check_workers()
        for request_id in lost:
            self._offloaded.pop(request_id, None)
            self._swapping_in.pop(request_id, None)
        return lost

    def _device_inputs(self, plan: IterationPlan):
        """Token ids, positions, rows to sample and attention metadata of the device chunks."""
        token_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for chunk in plan.chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_position, chunk.start_position + len(chunk.token_ids)))
            if chunk.sample:
                sample_rows.append(len(token_ids) - 1)
        meta = None
        if plan.chunks:
            spans = [(c.start_position, len(c.token_ids), c.page_ids) for c in plan.chunks]
            meta = self.attention.build_metadata(spans)
        return token_ids, positions, sample_rows, meta

    def _forward(self, plan: IterationPlan, returning: dict[int, list[str]]) -> dict[str, SampledToken]:
        model, device = self.model, self.device
        token_ids, positions, sample_rows, meta = self._device_inputs(plan)
        num_device = len(token_ids)

        # Offloaded tokens starting at layer 0 join the device tokens' embedding.
        for start in plan.offloaded_starts:
            token_ids.append(start.token_id)
            positions.append(start.position)
            self._offloaded[start.request_id] = _OffloadedToken(start.position, start.params, start.num_generated)
        hidden_all = model.embed(torch.tensor(token_ids, device=device, dtype=torch.long))
        angles_all = model.rope_angles(torch.tensor(positions, device=device, dtype=torch.long))
        device_hidden, device_angles = hidden_all[:num_device], _rows(angles_all, slice(0, num_device))
        carry_ids = [s.request_id for s in plan.offloaded_starts]  # offloaded rows entering the current layer
        carry_hidden, carry_angles = hidden_all[num_device:], _rows(angles_all, slice(num_device, None))

        results_back = self._results_to_device(returning)
        sent_keys: list[tuple[str, int]] = []
        sent_q, sent_k, sent_v = [], [], []
        for layer in range(model.config.num_layers):
            rows_in = num_device + len(carry_ids)
            device_attn = None
            if rows_in:
                hidden_in = torch.cat([device_hidden, carry_hidden]) if carry_ids else device_hidden
                angles = _cat_rows(device_angles, carry_angles) if carry_ids else device_angles
                q, k, v = model.pre_attention(layer, hidden_in, angles)
                if num_device:
                    device_attn = self.attention(layer, q[:num_device], k[:num_device], v[:num_device], meta)
                for row, request_id in enumerate(carry_ids):
                    token = self._offloaded[request_id]
                    token.layer, token.residual, token.result = layer, carry_hidden[row].clone(), None
                    sent_keys.append((request_id, layer))
                if carry_ids:
                    sent_q.append(q[num_device:])
                    sent_k.append(k[num_device:])
                    sent_v.append(v[num_device:])

            back_ids = returning.get(layer, [])
            if not num_device and not back_ids:
                carry_ids = []
                continue
            attn_parts = [device_attn] if num_device else []
            residual_parts = [device_hidden] if num_device else []
            if back_ids:
                attn_parts.append(results_back[layer])
                residual_parts.append(torch.stack([self._offloaded[r].residual for r in back_ids]))
            out = model.post_attention(layer, torch.cat(attn_parts), torch.cat(residual_parts))
            device_hidden, carry_hidden = out[:num_device], out[num_device:]
            carry_ids = back_ids  # they finished this layer and go on to the next one in this iteration
            if carry_ids:
                back_positions = [self._offloaded[r].position for r in carry_ids]
                carry_angles = model.rope_angles(torch.tensor(back_positions, device=device, dtype=torch.long))

        if sent_keys:
            self.cpu_pool.submit(sent_keys, torch.cat(sent_q), torch.cat(sent_k), torch.cat(sent_v))
        return self._sample(plan, device_hidden[sample_rows], carry_ids, carry_hidden)

    def _results_to_device(self, returning: dict[int, list[str]]) -> dict[int, torch.Tensor]:
        """The CPU results admitted this iteration, per layer ([rows, num_heads, head_dim], in `returning`'s order),
        moved to the device in one copy: a copy per row would cost a host-to-device round trip each on a GPU."""
        if not returning:
            return {}
        layers = list(returning)
        host = torch.stack([self._offloaded[r].result for layer in layers for r in returning[layer]])
        moved = host.to(self.device, self.pool.k[0].dtype)
        return dict(zip(layers, moved.split([len(returning[layer]) for layer in layers])))

    def _sample(self, plan, device_final, finished_ids: list[str], finished_hidden) -> dict[str, SampledToken]:
        """LM head + sampling for device chunks that reached their last token and offloaded tokens that finished
        the last layer."""
        sampling_chunks = [c for c in plan.chunks if c.sample]
        rows = [SamplingRow(c.params, c.num_generated) for c in sampling_chunks]
        request_ids = [c.request_id for c in sampling_chunks]
        for request_id in finished_ids:
            token = self._offloaded.pop(request_id)
            rows.append(SamplingRow(token.params, token.num_generated))
            request_ids.append(request_id)
        if not rows:
            return {}
        hidden = torch.cat([device_final, finished_hidden]) if finished_ids else device_final
        tokens = sample(self.model.compute_logits(hidden), rows, self.eos_token_ids)
        return dict(zip(request_ids, tokens))

    # -------------------------------------------------------------------------------------------------- swaps
    def _swap_out(self, transfers: list[KVTransfer]) -> list[str]:
        """Copies device KV to the host pool. On the CPU the copy is immediate; on CUDA it runs on a side stream
        into pinned memory and the request is reported once its event has completed (a later iteration)."""
        finished = []
        for transfer in transfers:
            k, v = self.pool.gather(transfer.page_ids, transfer.num_tokens)  # [layers, tokens, kv_heads, head_dim]
            if self._copy_stream is None:
                self.cpu_pool.load(transfer.request_id, k, v, transfer.final_tokens)
                finished.append(transfer.request_id)
                continue
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                k_host = torch.empty(k.shape, dtype=k.dtype, pin_memory=True).copy_(k, non_blocking=True)
                v_host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            self._copies.append(_PendingCopy(transfer.request_id, k_host, v_host, done, transfer.final_tokens))
        still_copying = []
        for copy in self._copies:
            if copy.done.query():
                self.cpu_pool.load(copy.request_id, copy.k, copy.v, copy.final_tokens)
                finished.append(copy.request_id)
            else:
                still_copying.append(copy)
        self._copies = still_copying
        return finished

    def _finish_swap_ins(self) -> list[str]:
        if self.cpu_pool is None:
            return []
        done = []
        for exported in self.cpu_pool.take_exported():
            transfer = self._swapping_in.pop(exported.request_id, None)
            if transfer is None:  # released meanwhile
                continue
            self.pool.scatter(transfer.page_ids, transfer.num_tokens, exported.k, exported.v)
            done.append(exported.request_id)
        return done


def _rows(angles: tuple[torch.Tensor, torch.Tensor], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    return angles[0][rows], angles[1][rows]


def _cat_rows(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
