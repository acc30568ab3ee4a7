"""Piggyback admission for the scheduler: offloaded rows (new tokens at layer 0, CPU attention results at their
layer) that join the device batch, within each layer's share of the time budget."""

from __future__ import annotations

import math
from dataclasses import replace

from omniserve.engine.scheduler.budget import IterationBudget
from omniserve.engine.scheduler.plan import OffloadedToken
from omniserve.engine.scheduler.request import Placement


class Piggybacking:
    """Part of Scheduler (scheduler.py): admits rows of its offloaded requests."""

    def results_ready(self, keys: list[tuple[str, int]]) -> None:
        """CPU attention results that came back: (request id, layer)."""
        for request_id, layer in keys:
            request = self.requests.get(request_id)
            if request is not None and request.placement is Placement.HOST and request.offload_layer == layer:
                request.result_ready_since = self.iteration

    def _admit_piggyback(self, batch: IterationBudget) -> tuple[list[OffloadedToken], list[tuple[str, int]]]:
        """Offloaded rows that join the device batch: tokens starting at layer 0 and CPU results re-entering at their
        layer. Each layer stays within budget / layers; longest-waiting rows first, then the lowest layers."""
        candidates = []  # (waiting since, layer, request); a new token enters "before" layer 0
        for request in self.offloaded:
            if not request.token_in_flight:
                candidates.append((request.result_ready_since or 0, -1, request))
            elif request.result_ready_since is not None:
                candidates.append((request.result_ready_since, request.offload_layer, request))
        candidates.sort(key=lambda c: (c[0], c[1]))
        shape = batch.shape
        layer_budget = None
        if batch.time_budget is not None:
            budget = batch.time_budget / batch.correction - batch.swap_seconds  # in the model's own units
            layer_budget = (budget - batch.model.head_time(shape.num_sampled)) / self.num_layers
        extra = [0] * self.num_layers
        starts, returning = [], []
        cpu_rows = cpu_context = 0  # synchronous CPU attention (sync_cpu_workers): the new tokens' rows and context
        # A layer's time is its dense work on its rows plus the device attention, which is the same at every layer.
        attention = batch.model.attention_time(shape) if layer_budget is not None else 0.0
        for _, layer, request in candidates:
            row_layer = max(layer, 0)
            extra[row_layer] += 1
            # As in largest_chunk, an iteration never runs nothing: the first row goes in whatever the budget says.
            over = layer_budget is not None and (shape.num_rows or starts or returning) and (
                batch.model.dense_time(shape.num_rows + extra[row_layer]) + attention > layer_budget)
            if not over and self.sync_cpu_workers and layer < 0:
                path = self._sync_cpu_path(cpu_rows + 1, cpu_context + request.num_tokens)
                over = layer_budget is not None and (shape.num_rows or starts) and path > budget
            if over:
                extra[row_layer] -= 1
                continue
            if layer < 0:
                cpu_rows, cpu_context = cpu_rows + 1, cpu_context + request.num_tokens
                request.token_in_flight = True
                request.offload_layer, request.result_ready_since = 0, None
                starts.append(OffloadedToken(
                    request.request_id, request.token_ids[-1], request.num_tokens - 1, request.params,
                    request.num_output_tokens,
                ))
            else:
                returning.append((request.request_id, layer))
                request.offload_layer, request.result_ready_since = layer + 1, None
        if self.sync_cpu_workers:  # each new token's row runs at every layer, and the device waits on the CPU
            extra = [len(starts)] * self.num_layers
            batch.cpu_path = self._sync_cpu_path(cpu_rows, cpu_context) if cpu_rows else 0.0
        batch.shape = replace(shape, extra_rows=tuple(extra))
        return starts, returning

    def _sync_cpu_path(self, rows: int, context: int) -> float:
        """Synchronous CPU attention (NEO): the seconds the pool's workers take for `rows` new tokens of `context`
        tokens in all at every layer, the rows spread evenly over the workers, one layer after another."""
        workers = min(self.sync_cpu_workers, rows)
        return self.num_layers * self.latency_model.cpu_attention_time(context / workers, math.ceil(rows / workers))
