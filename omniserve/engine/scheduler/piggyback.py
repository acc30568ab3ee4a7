"""Piggyback admission: offloaded rows (new tokens at layer 0, CPU attention results at their layer) that join the
device batch, within each layer's share of the time budget; and how far beyond them the iteration's offloaded rows
may go (OffloadedPipeline: the row limit per layer and the time the device may wait for CPU results)."""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field, replace

from omniserve.engine.scheduler.budget import IterationBudget, largest_fitting
from omniserve.engine.scheduler.plan import ONE_LAYER, OffloadedPipeline, OffloadedToken
from omniserve.engine.scheduler.policy import OffloadPipeline
from omniserve.engine.scheduler.request import Placement, Request
from omniserve.engine.scheduler.state import SchedulerState

_WAIT_MARGIN = 2.0  # the planned wait bound over the wait the latency model expects
_SYNC_WAIT_WITHOUT_MODEL_S = 10.0


@dataclass
class _Admitted:
    """The offloaded rows admitted so far in one plan."""

    extra: list[int]
    """Rows entering at each layer."""
    starts: list[OffloadedToken] = field(default_factory=list)
    returning: list[tuple[str, int]] = field(default_factory=list)
    cpu_rows: int = 0
    """Rows admitted (new and returning) and their context: the sync pipeline runs all their layers."""
    cpu_context: int = 0
    in_flight: int = 0
    """Offloaded tokens out in the layers, and their context (for the multi-layer pipeline's plan)."""
    in_flight_context: int = 0


class PiggybackManager:
    """Admits rows of the offloaded requests into the device batch, and plans the offloaded pipeline."""

    def __init__(self, state: SchedulerState, cpu_workers: int = 1) -> None:
        """cpu_workers: the CPU pool's workers, for predicting how long a layer's offloaded rows take there."""
        self.state = state
        self.cpu_workers = max(1, cpu_workers)
        self.pipeline = state.config.offload_pipeline

    def results_ready(self, keys: list[tuple[str, int]]) -> None:
        """CPU attention results that came back: (request id, layer)."""
        for request_id, layer in keys:
            request = self.state.requests.get(request_id)
            if (request is not None and request.placement is Placement.HOST and request.token_in_flight
                    and request.offload_layer == layer):
                request.result_ready_since = self.state.iteration

    def admit(self, batch: IterationBudget) -> tuple[list[OffloadedToken], list[tuple[str, int]], OffloadedPipeline]:
        """Offloaded rows that join the device batch: tokens starting at layer 0 and CPU results re-entering at their
        layer. Each layer stays within budget / layers; longest-waiting rows first, then the lowest layers."""
        admitted = _Admitted([0] * self.state.num_layers)
        candidates = self._candidates(admitted)
        budget = layer_budget = None
        if batch.time_budget is not None:
            budget = batch.time_budget / batch.factor() - batch.swap_seconds  # in the model's own units
            layer_budget = (budget - batch.model.head_time(batch.shape.num_sampled)) / self.state.num_layers
        cap = self._rows_per_layer(batch, layer_budget, len(candidates))
        for _, layer, request in candidates:
            if self._admit_row(batch, admitted, layer, request, cap, budget):
                self._join(admitted, layer, request)
        if self.pipeline is OffloadPipeline.SYNC:
            return admitted.starts, admitted.returning, self._plan_sync(batch, admitted)
        batch.shape = replace(batch.shape, extra_rows=tuple(admitted.extra))
        return admitted.starts, admitted.returning, self._plan_pipeline(
            batch, admitted.in_flight, admitted.in_flight_context)

    def _candidates(self, admitted: _Admitted) -> list[tuple[int, int, Request]]:
        """(waiting since, layer, request) of every row that may join, in the order they are considered; a new
        token enters "before" layer 0. Counts the tokens already out in the layers into `admitted`."""
        candidates = []
        for request in self.state.offloaded:
            if not request.token_in_flight:
                candidates.append((request.result_ready_since or 0, -1, request))
            else:
                admitted.in_flight += 1
                admitted.in_flight_context += request.num_tokens
                if request.result_ready_since is not None:
                    candidates.append((request.result_ready_since, request.offload_layer, request))
        candidates.sort(key=lambda c: (c[0], c[1]))
        return candidates

    def _rows_per_layer(self, batch: IterationBudget, layer_budget: float | None, high: int) -> int:
        """The most offloaded rows any layer may take. A layer's time is its dense work on its rows plus the device
        attention, which is the same at every layer: so every layer takes the same most rows (one bisection, not a
        prediction per candidate; only the sync pipeline, whose CPU time adds to the device's, predicts the
        iteration per candidate)."""
        if layer_budget is None:
            return high
        shape, model = batch.shape, batch.model
        attention = model.attention_time(shape)
        return largest_fitting(lambda n: model.dense_time(shape.num_rows + n) + attention <= layer_budget, high)

    def _admit_row(self, batch: IterationBudget, admitted: _Admitted, layer: int, request: Request, cap: int,
                   budget: float | None) -> bool:
        """Whether one more row fits at its layer (counted into admitted.extra if it does)."""
        row_layer = max(layer, 0)
        admitted.extra[row_layer] += 1
        # As in largest_chunk, an iteration never runs nothing: the first row goes in whatever the budget says.
        anything = bool(batch.shape.num_rows or admitted.starts or admitted.returning)
        over = admitted.extra[row_layer] > cap and anything
        if not over and self.pipeline is OffloadPipeline.SYNC and budget is not None and anything:
            # The device waits for the CPU at every layer, overlapping only its own attention: the CPU's time for
            # every row the iteration carries (new and returning) comes on top of the device's, as _plan_sync plans.
            carried = replace(batch.shape, extra_rows=tuple(itertools.accumulate(admitted.extra)))
            device = batch.model.iteration_time(carried)
            over = self._cpu_path(admitted.cpu_rows + 1, admitted.cpu_context + request.num_tokens) > budget - device
        if over:
            admitted.extra[row_layer] -= 1
        return not over

    def _join(self, admitted: _Admitted, layer: int, request: Request) -> None:
        admitted.cpu_rows += 1
        admitted.cpu_context += request.num_tokens
        if layer >= 0:
            admitted.returning.append((request.request_id, layer))
            request.offload_layer, request.result_ready_since = layer + 1, None
            return
        admitted.in_flight += 1
        admitted.in_flight_context += request.num_tokens
        request.token_in_flight = True
        request.offload_layer, request.result_ready_since = 0, None
        request.token_started = (self.state.iteration, self.state.clock())
        admitted.starts.append(OffloadedToken(
            request.request_id, request.token_ids[-1], request.num_tokens - 1, request.params,
            request.num_output_tokens, request.grammar, request.seen_token_ids,
        ))

    def _plan_sync(self, batch: IterationBudget, admitted: _Admitted) -> OffloadedPipeline:
        """NEO's pipeline: each admitted row runs every layer from its own on, the device waiting for the CPU's rows
        at every layer."""
        extra = list(itertools.accumulate(admitted.extra))
        batch.shape = replace(batch.shape, extra_rows=tuple(extra))
        # Without a latency model nothing predicts the CPU's time: the device waits until the rows are back, up to a
        # bound that only keeps a hung worker from stalling the engine.
        wait = (self._cpu_path(admitted.cpu_rows, admitted.cpu_context) if batch.model is not None
                else _SYNC_WAIT_WITHOUT_MODEL_S)
        planned = None if batch.model is None else batch.time() + batch.factor() * wait
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
        if self.pipeline is OffloadPipeline.ONE_LAYER or not in_flight:
            return ONE_LAYER
        if batch.model is None:
            return OffloadedPipeline(None, 0.0)
        layers, mean_context = self.state.num_layers, context / in_flight
        attention = batch.model.attention_time(batch.shape)

        def wait_per_layer(limit: int) -> float:
            return max(0.0, self._cpu_path(limit, limit * mean_context) / layers - attention)

        if batch.time_budget is None:
            ls_running = any(self.state.is_ls(r) for r in self.state.running)
            return OffloadedPipeline(None, 0.0 if ls_running else wait_per_layer(in_flight) * layers)
        time_at = _time_with_rows(batch)
        budget = batch.time_budget / batch.factor() - batch.swap_seconds
        admitted = max(batch.shape.extra_rows, default=0)
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
                rate = (batch.shape.num_sampled + limit * advanced / layers) / max(seconds + expected, 1e-9)
                # The bound leaves room for what the estimate misses (rows unevenly spread over the workers, the
                # round trip's jitter): a row that runs out of wait at the last layers costs a whole iteration more.
                best = max(best, (rate, limit, min(slack, _WAIT_MARGIN * expected)))
        _, limit, wait = best
        planned = batch.factor() * (time_at(limit) + batch.swap_seconds + wait)
        return OffloadedPipeline(limit, wait, planned)

    def _cpu_path(self, rows: int, context: int) -> float:
        """The seconds the pool's workers take for `rows` rows of `context` tokens in all at every layer, the rows
        spread evenly over the workers, one layer after another."""
        model = self.state.latency_model
        if not rows or model is None:
            return 0.0
        workers = min(self.cpu_workers, rows)
        return self.state.num_layers * model.cpu_attention_time(context / workers, math.ceil(rows / workers))


def _time_with_rows(batch: IterationBudget):
    """The iteration's predicted time (model units) with at least `limit` offloaded rows at every layer: layers of
    equal rows cost the same, so it is summed per row count, not per layer."""
    shape, model = batch.shape, batch.model
    layer_rows = collections.Counter(shape.extra_rows)
    layer_rows[0] += batch.num_layers - len(shape.extra_rows)
    base = model.iteration_time(replace(shape, extra_rows=()))
    bare = model.dense_time(shape.num_rows)

    def time_at(limit: int) -> float:
        return base + sum(count * (model.dense_time(shape.num_rows + max(limit, rows)) - bare)
                          for rows, count in layer_rows.items())

    return time_at
