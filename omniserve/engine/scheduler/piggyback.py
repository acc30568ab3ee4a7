"""Piggyback admission for the scheduler: offloaded rows (new tokens at layer 0, CPU attention results at their
layer) that join the device batch, within each layer's share of the time budget; and how far beyond them the
iteration's offloaded rows may go (OffloadedPipeline: the row limit per layer and the time the device may wait for
CPU results)."""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import replace

from omniserve.engine.scheduler.budget import IterationBudget, largest_fitting
from omniserve.engine.scheduler.plan import ONE_LAYER, OffloadedPipeline, OffloadedToken
from omniserve.engine.scheduler.request import Placement


_WAIT_MARGIN = 2.0  # the planned wait bound over the wait the latency model expects
_SYNC_WAIT_WITHOUT_MODEL_S = 10.0


class Piggybacking:
    """Part of Scheduler (scheduler.py): admits rows of its offloaded requests."""

    def results_ready(self, keys: list[tuple[str, int]]) -> None:
        """CPU attention results that came back: (request id, layer)."""
        for request_id, layer in keys:
            request = self.requests.get(request_id)
            if (request is not None and request.placement is Placement.HOST and request.token_in_flight
                    and request.offload_layer == layer):
                request.result_ready_since = self.iteration

    def _admit_piggyback(self, batch: IterationBudget) -> tuple[list[OffloadedToken], list[tuple[str, int]],
                                                                OffloadedPipeline]:
        """Offloaded rows that join the device batch: tokens starting at layer 0 and CPU results re-entering at their
        layer. Each layer stays within budget / layers; longest-waiting rows first, then the lowest layers."""
        candidates = []  # (waiting since, layer, request); a new token enters "before" layer 0
        in_flight = in_flight_context = 0  # tokens out in the layers (for the pipeline's plan)
        for request in self.offloaded:
            if not request.token_in_flight:
                candidates.append((request.result_ready_since or 0, -1, request))
            else:
                in_flight, in_flight_context = in_flight + 1, in_flight_context + request.num_tokens
                if request.result_ready_since is not None:
                    candidates.append((request.result_ready_since, request.offload_layer, request))
        candidates.sort(key=lambda c: (c[0], c[1]))
        shape = batch.shape
        layer_budget = None
        if batch.time_budget is not None:
            budget = batch.time_budget / batch.correction - batch.swap_seconds  # in the model's own units
            layer_budget = (budget - batch.model.head_time(shape.num_sampled)) / self.num_layers
        sync = self.config.offload_pipeline == "sync"
        extra, starts, returning = [0] * self.num_layers, [], []
        cpu_rows = cpu_context = 0  # rows admitted (new and returning) and their context: sync runs all their layers
        # A layer's time is its dense work on its rows plus the device attention, which is the same at every layer:
        # so every layer takes the same most offloaded rows (one bisection, not a prediction per candidate; only
        # the sync pipeline, whose CPU time adds to the device's, predicts the iteration per candidate).
        cap = len(candidates)
        if layer_budget is not None:
            attention = batch.model.attention_time(shape)
            cap = largest_fitting(
                lambda n: batch.model.dense_time(shape.num_rows + n) + attention <= layer_budget, len(candidates))
        for _, layer, request in candidates:
            row_layer = max(layer, 0)
            extra[row_layer] += 1
            # As in largest_chunk, an iteration never runs nothing: the first row goes in whatever the budget says.
            over = extra[row_layer] > cap and bool(shape.num_rows or starts or returning)
            if not over and sync and layer_budget is not None and (shape.num_rows or starts or returning):
                # The device waits for the CPU at every layer, overlapping only its own attention: the CPU's time
                # for every row the iteration carries (new and returning) comes on top of the device's, as
                # _plan_sync plans it.
                carried = replace(shape, extra_rows=tuple(itertools.accumulate(extra)))
                device = batch.model.iteration_time(carried)
                over = self._cpu_path(cpu_rows + 1, cpu_context + request.num_tokens) > budget - device
            if over:
                extra[row_layer] -= 1
                continue
            cpu_rows, cpu_context = cpu_rows + 1, cpu_context + request.num_tokens
            if layer < 0:
                in_flight, in_flight_context = in_flight + 1, in_flight_context + request.num_tokens
                request.token_in_flight = True
                request.offload_layer, request.result_ready_since = 0, None
                request.token_started = (self.iteration, self.clock())
                starts.append(OffloadedToken(
                    request.request_id, request.token_ids[-1], request.num_tokens - 1, request.params,
                    request.num_output_tokens,
                ))
            else:
                returning.append((request.request_id, layer))
                request.offload_layer, request.result_ready_since = layer + 1, None
        if sync:
            return starts, returning, self._plan_sync(batch, extra, cpu_rows, cpu_context)
        batch.shape = replace(shape, extra_rows=tuple(extra))
        return starts, returning, self._plan_pipeline(batch, in_flight, in_flight_context)

    def _plan_sync(self, batch: IterationBudget, entering: list[int], rows: int, context: int) -> OffloadedPipeline:
        """NEO's pipeline: each admitted row (`entering` per layer) runs every layer from its own on, the device
        waiting for the CPU's `rows` rows of `context` tokens at every layer."""
        extra = list(itertools.accumulate(entering))
        batch.shape = replace(batch.shape, extra_rows=tuple(extra))
        # Without a latency model nothing predicts the CPU's time: the device waits until the rows are back, up to a
        # bound that only keeps a hung worker from stalling the engine.
        wait = self._cpu_path(rows, context) if batch.model is not None else _SYNC_WAIT_WITHOUT_MODEL_S
        planned = None if batch.model is None else batch.time() + batch.correction * wait
        return OffloadedPipeline(max(extra), wait, planned)

    def _plan_pipeline(self, batch: IterationBudget, in_flight: int, context: int) -> OffloadedPipeline:
        """How far the offloaded rows may go beyond the admitted ones (multi-layer): the row limit per layer and the
        wait that give the most tokens per second while the iteration, at that limit and wait, still fits the time
        budget. A row advances a layer when its CPU result is back by the time the device has done that layer's
        attention, so with `limit` rows a layer the device waits about cpu(limit) - attention per layer, and each
        such wait buys a layer for `limit` rows; but it lengthens the iteration for every device row too, so a wait
        that buys fewer tokens than the sampled device rows lose is not taken. Prefill chunks count for nothing
        here, so a wait may slow the prefills that share its iteration: valuing a prefill token as a sampled one
        was measured to cut the BE tokens/s of a decode-heavy L4 cell with 4 hosts from 1,169 to 911 (the
        offloaded pipeline binds there, not the prefills). Without a budget, rows advance when back in time, and
        the device waits for them only when no LS row runs (nobody's TPOT is at stake then). `in_flight`: offloaded
        tokens out in the layers, of `context` tokens in all."""
        if self.config.offload_pipeline == "one-layer" or not in_flight:
            return ONE_LAYER
        if batch.model is None:
            return OffloadedPipeline(None, 0.0)
        mean_context = context / in_flight
        shape, model, layers = batch.shape, batch.model, self.num_layers
        attention = model.attention_time(shape)

        def wait_per_layer(limit: int) -> float:
            return max(0.0, self._cpu_path(limit, limit * mean_context) / layers - attention)

        if batch.time_budget is None:
            ls_running = any(self._is_ls(r) for r in self.running)
            return OffloadedPipeline(None, 0.0 if ls_running else wait_per_layer(in_flight) * layers)
        admitted = max(shape.extra_rows, default=0)
        budget = batch.time_budget / batch.correction - batch.swap_seconds

        # The iteration's time with at least `limit` offloaded rows at every layer: layers of equal rows cost the same.
        layer_rows = collections.Counter(shape.extra_rows)
        layer_rows[0] += layers - len(shape.extra_rows)
        base = model.iteration_time(replace(shape, extra_rows=()))
        bare = model.dense_time(shape.num_rows)

        def time_at(limit: int) -> float:
            return base + sum(count * (model.dense_time(shape.num_rows + max(limit, rows)) - bare)
                              for rows, count in layer_rows.items())

        fitting = max(admitted, largest_fitting(lambda k: time_at(k) <= budget, in_flight))
        best = (-1.0, admitted, 0.0)  # (tokens per second, limit, wait)
        for limit in {admitted, fitting, *(fitting >> shift for shift in range(1, 8))}:
            if limit < admitted:
                continue
            seconds, per_layer = time_at(limit), wait_per_layer(limit)
            slack = max(0.0, budget - seconds)
            for share in (0.0, 0.25, 0.5, 1.0):
                expected = min(slack, per_layer * (layers - 1) * share)  # the wait the device is expected to spend
                advanced = layers if per_layer == 0 else min(layers, 1 + expected / per_layer)
                rate = (shape.num_sampled + limit * advanced / layers) / max(seconds + expected, 1e-9)
                # The bound leaves room for what the estimate misses (rows unevenly spread over the workers, the
                # round trip's jitter): a row that runs out of wait at the last layers costs a whole iteration more.
                best = max(best, (rate, limit, min(slack, _WAIT_MARGIN * expected)))
        _, limit, wait = best
        planned = batch.correction * (time_at(limit) + batch.swap_seconds + wait)
        return OffloadedPipeline(limit, wait, planned)

    def _cpu_path(self, rows: int, context: int) -> float:
        """The seconds the pool's workers take for `rows` rows of `context` tokens in all at every layer, the rows
        spread evenly over the workers, one layer after another."""
        if not rows or self.latency_model is None:
            return 0.0
        workers = min(self.cpu_workers, rows)
        return self.num_layers * self.latency_model.cpu_attention_time(context / workers, math.ceil(rows / workers))
