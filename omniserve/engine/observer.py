"""Watching the engine's iterations from outside (benchmarks, tools): `LLMEngine.add_iteration_observer(callback)`
calls back after every step with an IterationRecord, what the step's iteration ran and where its time went.

While nobody observes, none of this runs: the runner keeps no timings and calls its CPU pool directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from omniserve.engine.scheduler.plan import IterationPlan, RunnerOutput


@dataclass
class RunnerTimings:
    """Where the runner's time went during one engine step (kept only while iterations are observed)."""

    swap_out_s: float = 0.0
    """Copying swapped-out KV to the host (the device-side gather and the pool's load), in iterations that swap out."""
    offload_s: float = 0.0
    """The offloaded rows' bookkeeping: sending rows to the pool, taking results and choosing the rows that join a
    layer; the pool's calls and the waits for results included."""
    pool_s: dict[str, float] = field(default_factory=dict)
    """Seconds in each CPU attention pool method the runner called, by name; the calls made while the device waited
    for results (RunnerOutput.cpu_wait_s) apart, as `<name> while waiting`."""
    waiting: bool = False
    """The runner is waiting for CPU results."""


class TimedPool:
    """The runner's CPU attention pool while iterations are observed: every method call adds its seconds to the
    runner's current timings."""

    def __init__(self, pool, runner) -> None:
        self.pool = pool
        self._runner = runner

    def __getattr__(self, name: str):
        attribute = getattr(self.pool, name)
        if not callable(attribute):
            return attribute

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                timings = self._runner.timings
                if timings is not None:
                    key = f"{name} while waiting" if timings.waiting else name
                    timings.pool_s[key] = timings.pool_s.get(key, 0.0) + time.perf_counter() - started

        return timed


@dataclass(frozen=True)
class IterationRecord:
    """One engine step: the iteration it planned and ran, what the runner did, and its timings."""

    plan: IterationPlan
    """What the scheduler planned (chunks, offloaded rows, swaps, predicted time and budget)."""
    output: RunnerOutput
    """What the runner did (tokens sampled, swaps completed, offloaded rows per layer, seconds waited for CPU results);
    empty when the iteration failed."""
    seconds: float
    """The runner's execution of the plan (what the scheduler's correction is given)."""
    step_seconds: float
    """The whole step on the engine: scheduling, execution, bookkeeping, its plain per-completion updates, and the idle
    wait on the pool if there was one (text and RequestOutputs are the output processor's, after)."""
    failed: bool = False
    """The iteration raised: its requests failed."""
    idle_wait: bool = False
    """Nothing ran and the engine waited for CPU attention results instead."""
    swap_out_seconds: float = 0.0
    """See RunnerTimings.swap_out_s."""
    offload_seconds: float = 0.0
    """See RunnerTimings.offload_s."""
    pool_seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """See RunnerTimings.pool_s."""

    @property
    def predicted_time(self) -> float | None:
        return self.plan.predicted_time

    @property
    def cpu_wait_seconds(self) -> float:
        return self.output.cpu_wait_s

    @property
    def num_rows(self) -> int:
        """Device rows: the tokens of the plan's chunks."""
        return self.plan.num_tokens

    @property
    def num_chunks(self) -> int:
        return len(self.plan.chunks)

    @property
    def ran_offloaded(self) -> bool:
        """Offloaded rows ran: admitted ones, or (multi-layer) rows going on beyond them."""
        return bool(self.plan.offloaded_starts or self.plan.returning) or any(self.output.offloaded_rows or ())

    @property
    def num_offloaded_rows(self) -> int:
        """Offloaded rows in the layers' dense work, summed over the layers (as planned when the runner did not say)."""
        return sum(self.output.offloaded_rows or ()) or len(self.plan.returning) + len(self.plan.offloaded_starts)


IterationObserver = Callable[[IterationRecord], None]
