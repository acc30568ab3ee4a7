"""Fitting measurements: piecewise-linear knots by bisection, monotone smoothing, and the held-out accuracy every
latency model is checked with."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence

from omniserve.engine.scheduler.latency_model import LinearModel, PiecewiseLinear

_HELD_OUT_FRACTION = 0.25


# ------------------------------------------------------------------------------------------------------ bisection
def bisect_piecewise(
    measure: Callable[[int], float],
    lo: int,
    hi: int,
    rel_threshold: float = 0.05,
    min_gap: int = 1,
    max_gap: int | None = None,
    measurements: dict[int, float] | None = None,
) -> PiecewiseLinear:
    """Knots of a piecewise-linear fit of measure() on the integers [lo, hi], by recursive bisection.

    A segment is kept as a straight line when its midpoint's measurement lies within rel_threshold of the line through
    its ends; otherwise it is split at the midpoint and both halves are examined. A linear function therefore costs
    three measurements, and each step (a GPU adding a wave of thread blocks) costs O(log(range)) of them to locate.
    Segments no longer than min_gap are not split. Segments longer than max_gap (None: no limit) are split whatever
    their midpoint says: a regular staircase with several steps in one segment can look straight at the midpoint (its
    corners on the chord, as steps at multiples of 128 are on the dyadic grid), so max_gap is the resolution below
    which steps are assumed to come one at a time.

    Each x is measured once; `measurements`, if given, receives every (x, value) taken (its length is the number of
    measurements).
    """
    if hi < lo:
        raise ValueError(f"empty range [{lo}, {hi}]")
    memo = {} if measurements is None else measurements

    def at(x: int) -> float:
        if x not in memo:
            memo[x] = float(measure(x))
        return memo[x]

    knots = {lo, hi}
    pending = [(lo, hi)] if hi > lo else []  # segments still to examine
    while pending:
        a, b = pending.pop()
        if b - a <= max(1, min_gap):
            continue
        mid = (a + b) // 2
        line = at(a) + (at(b) - at(a)) * (mid - a) / (b - a)
        short = max_gap is None or b - a <= max_gap
        if short and abs(at(mid) - line) <= rel_threshold * abs(at(mid)):
            continue
        knots.add(mid)
        pending += [(mid, b), (a, mid)]
    xs = sorted(knots)
    return PiecewiseLinear(tuple(float(x) for x in xs), tuple(at(x) for x in xs))


def nondecreasing(values: Sequence[float]) -> tuple[float, ...]:
    """The closest nondecreasing sequence in least squares (isotonic regression, pool adjacent violators): a dip
    is averaged with what it breaks, rather than one noisy spike lifting everything after it."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                          blocks[-1][1] + count]
    return tuple(mean for mean, count in blocks for _ in range(count))


# ---------------------------------------------------------------------------------------------------- accuracy
def relative_errors(predicted: list[float], measured: list[float]) -> list[float]:
    return [abs(p - m) / m for p, m in zip(predicted, measured) if m > 0]


def accuracy_summary(predicted: list[float], measured: list[float]) -> dict[str, float]:
    errors = sorted(relative_errors(predicted, measured))
    if not errors:
        return {"median_rel_error": float("nan"), "p90_rel_error": float("nan"), "points": 0}
    p90 = errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)]
    return {"median_rel_error": statistics.median(errors), "p90_rel_error": p90, "points": len(errors)}


def fit_with_held_out(
    name: str, points: list[tuple[tuple[float, ...], float]], rng: random.Random, accuracy: dict
) -> LinearModel:
    """Fits on most points and records the error on the rest (the last quarter of a shuffled list)."""
    points = list(points)
    rng.shuffle(points)
    held = max(2, round(len(points) * _HELD_OUT_FRACTION)) if len(points) >= 6 else 0
    fit_points, held_out = points[held:], points[:held]
    model = LinearModel.fit([f for f, _ in fit_points], [s for _, s in fit_points], nonnegative=True, relative=True)
    accuracy[name] = accuracy_summary([model(*f) for f, _ in held_out], [s for _, s in held_out])
    return model
