"""How far the machine has drifted from its profile: the ratio of measured to predicted iteration time lately, which
scales every prediction the scheduler makes, prefill tokens and the other rows each by their own."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import replace
from typing import Callable

from omniserve.engine.scheduler.latency_model import BatchShape, LatencyModel, batch_shape_of_chunks
from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput

_WINDOW = 16  # the correction is the median measured/predicted ratio of this many latest iterations
_LIMITS = (1e-3, 1e3)  # a ratio beyond these is a broken clock or profile, not a drift to follow
_FRESH_S = 30.0  # measurements older than this may no longer describe the machine (other tenants come, go)
REFRESH_AFTER_S = 20.0
"""An idle engine measures its device again once its latest measurement is this old: before it goes stale
(_FRESH_S), so that a request coming after a pause finds fresh measurements (LLMEngine.refresh_measurements)."""


class TimeCorrection:
    """The latency model was profiled once; the machine drifts (other tenants, clocks, caches), so plans follow the
    median ratio of measured to predicted time over the latest iterations: one odd iteration (a GC pause) moves it
    nothing, a lasting change within a few iterations, however far the profile was off. After a pause longer than
    _FRESH_S the first new measurements replace the old ones.

    Prefill-heavy iterations (prefill tokens at least half the rows) and the others are also followed apart: a
    profile taken on a busy machine was 28x off for a lone prefill and about 3x for decodes, and one median, made of
    the decodes that most iterations are, would predict every prefill 9x too slow. An iteration's factor weighs the
    two by its rows (`factor`)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.value = 1.0
        """Measured / predicted iteration time lately: scales every prediction."""
        self.ratios: deque[float] = deque(maxlen=_WINDOW)
        self._by_kind: dict[bool, deque[float]] = {True: deque(maxlen=_WINDOW), False: deque(maxlen=_WINDOW)}
        """Ratios of prefill-heavy iterations (True) and of the others."""
        self._kind_value: dict[bool, float | None] = {True: None, False: None}
        self.last_observed: float | None = None
        """clock() of the latest measured iteration."""

    def observe(self, model: LatencyModel | None, plan: IterationPlan, seconds: float,
                output: RunnerOutput | None = None) -> None:
        """How long a planned iteration really took. With the runner's `output`, the device's own speed is judged:
        on the offloaded rows it ran, without the time it waited for the CPU."""
        if not plan.predicted_time or not plan.chunks:
            # Offloaded rows alone say little about the device: a few rows a layer cost mostly per-layer overhead
            # that the dense model, fitted on device batches, does not describe; following them pulled the
            # correction to 0.2-0.5 on this machine, and the next LS prefill, so planned, ran 2-4x over.
            return
        shape = plan.shape if plan.shape is not None else batch_shape_of_chunks(plan.chunks)
        predicted = plan.predicted_time / self.factor(shape)  # uncorrected
        if output is not None and output.offloaded_rows is not None and plan.shape is not None:
            ran = replace(plan.shape, extra_rows=output.offloaded_rows)
            predicted = model.iteration_time(ran) + plan.swap_seconds
            seconds = max(0.0, seconds - output.cpu_wait_s)
        if predicted <= 0:
            return
        if not self.is_fresh():  # old measurements describe the machine as it was: the new ones alone decide
            self.forget()
        ratio = min(max(seconds / predicted, _LIMITS[0]), _LIMITS[1])
        self.ratios.append(ratio)
        self.value = statistics.median(self.ratios)
        kind = 2 * shape.prefill_tokens >= max(1, shape.num_rows)
        self._by_kind[kind].append(ratio)
        self._kind_value[kind] = statistics.median(self._by_kind[kind])
        self.last_observed = self.clock()

    def forget(self) -> None:
        """Drops the measurements so far: the next ones alone decide (`value` stands until then)."""
        for ratios in (self.ratios, *self._by_kind.values()):
            ratios.clear()
        self._kind_value = {True: None, False: None}

    def factor(self, shape: BatchShape) -> float:
        """What scales the prediction for an iteration of `shape`: its prefill tokens' share of the rows weighs the
        prefill-heavy iterations' ratio, the rest the others' (a kind not measured lately takes `value`)."""
        prefill, other = self._kind_value[True], self._kind_value[False]  # (runs thousands of times per plan)
        if prefill is None:
            prefill = self.value
        if other is None:
            other = self.value
        if prefill == other or not shape.num_rows:
            return other
        share = shape.prefill_tokens / shape.num_rows
        return share * prefill + (1.0 - share) * other

    def age(self) -> float:
        """Seconds since the latest measurement (infinite before the first)."""
        return math.inf if self.last_observed is None else self.clock() - self.last_observed

    def is_fresh(self) -> bool:
        """Whether the latest measurement is recent enough to describe the machine as it is."""
        return self.age() <= _FRESH_S
