"""The iteration being planned, against its budgets: tokens (max_num_batched_tokens) and, with a latency model, time
(a share of the tightest LS TPOT SLO). Also the TTFT a waiting LS request would get, for admission."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from omniserve.engine.scheduler.correction import TimeCorrection
from omniserve.engine.scheduler.latency_model import BatchShape, LatencyModel, prefill_interactions
from omniserve.engine.scheduler.request import Request


def largest_fitting(fits: Callable[[int], bool], high: int) -> int:
    """The largest count in [0, high] for which fits(count) holds, given that it holds for 0 and that time grows
    with the count (a bisection: plans call this thousands of times)."""
    if high <= 0 or fits(high):
        return max(high, 0)
    low = 0  # fits(low) holds, fits(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


class IterationBudget:
    """The iteration being planned: its token count and, with a latency model, its shape and predicted time."""

    def __init__(self, model: LatencyModel | None, num_layers: int, time_budget: float | None, token_budget: int,
                 correction: TimeCorrection | None = None):
        self.model = model
        self.correction = correction
        """Measured / predicted iteration time lately (None: 1): scales the model's predictions (and so the budget's
        use), by the shape of the iteration predicted."""
        self.num_layers = num_layers
        self.time_budget = time_budget if model is not None else None
        self.tokens_left = token_budget
        self.shape = BatchShape()
        self.swap_seconds = 0.0
        """What this iteration's swap-outs cost the engine (gathering and handing over KV)."""

    @staticmethod
    def with_chunk(shape: BatchShape, start: int, count: int, sample: bool) -> BatchShape:
        # Built directly, not with dataclasses.replace: this runs thousands of times per plan (chunk bisection).
        decode = count == 1
        return BatchShape(
            num_rows=shape.num_rows + count,
            prefill_interactions=shape.prefill_interactions + (0 if decode else prefill_interactions(start, count)),
            decode_context=shape.decode_context + (start + 1 if decode else 0),
            num_decodes=shape.num_decodes + decode,
            num_sampled=shape.num_sampled + sample,
            extra_rows=shape.extra_rows,
            prefill_tokens=shape.prefill_tokens + (0 if decode else count))

    def factor(self, shape: BatchShape | None = None) -> float:
        """The correction for an iteration of `shape` (default: this one as planned so far)."""
        return 1.0 if self.correction is None else self.correction.factor(self.shape if shape is None else shape)

    def time(self) -> float | None:
        if self.model is None:
            return None
        return self.factor() * (self.model.iteration_time(self.shape) + self.swap_seconds)

    def fits(self, shape: BatchShape, reserve_rows: int = 0, extra_seconds: float = 0.0) -> bool:
        if self.time_budget is None:
            return True
        if reserve_rows:
            shape = replace(shape, extra_rows=(reserve_rows,) * self.num_layers)
        predicted = self.model.iteration_time(shape) + self.swap_seconds + extra_seconds
        return self.factor(shape) * predicted <= self.time_budget

    def largest_chunk(self, request: Request, reserve_rows: int = 0) -> int:
        """The most of the request's uncomputed tokens that fit the token and time budgets (0: none)."""
        start, remaining = request.num_computed_tokens, request.num_tokens - request.num_computed_tokens
        count = largest_fitting(
            lambda n: self.fits(self.with_chunk(self.shape, start, n, n == remaining), reserve_rows),
            min(remaining, self.tokens_left))
        # An iteration with nothing else to run takes at least one token, even under an SLO tighter than that takes:
        # running nothing would not help any LS request, and the request would never progress. (A swap-out is
        # something to run: the token then waits for the next iteration rather than push this one over budget.)
        alone = self.shape.num_rows == 0 and not self.swap_seconds
        return 1 if count == 0 and alone and remaining > 0 and self.tokens_left > 0 else count

    def add(self, request: Request, count: int) -> None:
        start = request.num_computed_tokens
        self.shape = self.with_chunk(self.shape, start, count, start + count == request.num_tokens)
        self.tokens_left -= count

    def predicted_ttft(self, request: Request, tokens_ahead: int, uncached: int, max_chunk: int, now: float) -> float:
        """Seconds from arrival to the request's first token if it were admitted now behind `tokens_ahead` LS
        prefill tokens, computing `uncached` tokens of its own (those its prefix cache hit leaves), with each
        iteration taking the largest chunk (at most max_chunk) the time budget allows."""
        if request.num_output_tokens or self.model is None or request.ttft_slo is None:
            return 0.0  # preempted requests already have their first token; without a model there is no estimate
        # The iterations ahead keep this one's decode rows, not its prefill chunks (their tokens are `tokens_ahead`).
        shape = self.shape
        base = replace(shape, num_rows=shape.num_rows - shape.prefill_tokens, prefill_interactions=0, prefill_tokens=0)
        remaining = tokens_ahead + uncached
        chunk = largest_fitting(lambda n: self.fits(self.with_chunk(base, 0, n, False)), min(remaining, max_chunk))
        if chunk == 0:
            return math.inf
        iteration = self.with_chunk(base, 0, chunk, True)
        per_iteration_s = self.factor(iteration) * self.model.iteration_time(iteration)
        return now - request.arrival_time + math.ceil(remaining / chunk) * per_iteration_s
