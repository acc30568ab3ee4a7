"""Profiled latency models: how long one iteration takes, from the shape of what it runs.

The scheduler predicts an iteration's time before it runs it, so every model here is a cheap closed form of a few
numbers that the profiler measured on the real model and device (omniserve/profiler/):

    iteration = head(num_sampled) + sum over layers l of [ dense(num_rows + extra_rows[l])
                                                 + prefill_attention(interactions) + decode_attention(context, k) ]

- dense: one layer's pre_attention + post_attention (norms, QKV/O GEMMs, RoPE, MLP) on n rows. Piecewise linear,
  because a GPU's GEMM time rises in steps (one more wave of thread blocks) rather than smoothly.
- prefill_attention: one layer's causal attention of the prefill chunks, linear in their token interactions.
- decode_attention: one layer's attention of the single-token rows, linear in their summed context and their number.
- head: what runs once per iteration: the fixed overhead (building the batch metadata, embedding, RoPE angles, Python)
  plus the LM head and sampling of the rows that sample.
- cpu_attention: one layer's batch of offloaded rows in one CPU-pool worker, round trip included.

All times are in seconds.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class PiecewiseLinear:
    xs: tuple[float, ...]
    """Knots, strictly increasing."""
    ys: tuple[float, ...]
    """Values at the knots."""

    def __post_init__(self) -> None:
        if len(self.xs) != len(self.ys) or not self.xs:
            raise ValueError("a piecewise-linear function needs as many values as knots, and at least one")
        if any(b <= a for a, b in zip(self.xs, self.xs[1:])):
            raise ValueError("knots must be strictly increasing")

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return max(0.0, ys[0])
        # The segment that holds x; beyond either end, the first or last segment is extended.
        i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class LinearModel:
    intercept: float
    slopes: tuple[float, ...]

    def __call__(self, *features: float) -> float:
        if len(features) != len(self.slopes):
            raise ValueError(f"expected {len(self.slopes)} features, got {len(features)}")
        return max(0.0, self.intercept + sum(s * f for s, f in zip(self.slopes, features)))

    @classmethod
    def fit(
        cls,
        features: Sequence[tuple[float, ...]],
        seconds: Sequence[float],
        nonnegative: bool = False,
        relative: bool = False,
    ) -> "LinearModel":
        """Least squares with an intercept.

        nonnegative: keep every coefficient (the intercept too) >= 0. A time never falls with more work, so a
        negative slope is noise, and a negative intercept would predict 0 for small batches.
        relative: minimise squared relative errors (each point weighted by 1 / its time) rather than absolute ones,
        so that a few long measurements do not decide the fit at the small batches that decode runs.
        """
        if not features or len(features) != len(seconds):
            raise ValueError("fit needs one time per feature tuple, and at least one")
        x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        y = np.asarray(seconds, dtype=np.float64)
        design = np.hstack([np.ones((len(x), 1)), x])
        if relative:
            if (y <= 0).any():
                raise ValueError("a relative fit needs positive times")
            design, y = design / y[:, None], np.ones_like(y)
        coef = _least_squares(design, y, range(design.shape[1]))
        if nonnegative and (coef < 0).any():
            # Exact non-negative least squares for a handful of columns: the best fit over every subset of columns
            # whose coefficients all come out >= 0 (the empty subset, all zeros, always qualifies).
            best = np.zeros(design.shape[1])
            for size in range(1, design.shape[1] + 1):
                for columns in itertools.combinations(range(design.shape[1]), size):
                    candidate = _least_squares(design, y, columns)
                    if (candidate >= 0).all() and _sse(design, y, candidate) < _sse(design, y, best):
                        best = candidate
            coef = best
        return cls(float(coef[0]), tuple(float(c) for c in coef[1:]))


def _least_squares(design: np.ndarray, y: np.ndarray, columns) -> np.ndarray:
    """Coefficients of a least-squares fit on the given columns (the others 0)."""
    columns = list(columns)
    coef = np.zeros(design.shape[1])
    coef[columns] = np.linalg.lstsq(design[:, columns], y, rcond=None)[0]
    return coef


def _sse(design: np.ndarray, y: np.ndarray, coef: np.ndarray) -> float:
    return float(((design @ coef - y) ** 2).sum())


@dataclass(frozen=True)
class BatchShape:
    """What one iteration runs, as the latency model sees it."""

    num_rows: int = 0
    """Device rows (tokens) that go through every layer."""
    prefill_interactions: int = 0
    """Sum over prefill chunks (chunks of >= 2 tokens) of prefill_interactions(start, count)."""
    decode_context: int = 0
    """Sum over single-token device rows of their context length (position + 1)."""
    num_decodes: int = 0
    """Single-token device rows."""
    num_sampled: int = 0
    """Rows through the LM head and sampler."""
    extra_rows: tuple[int, ...] = ()
    """Per layer l (missing entries = 0): offloaded (CPU-attention) rows that join layer l's dense work."""
    prefill_tokens: int = 0
    """Tokens of the prefill chunks (a chunk's attention also has a cost per query token, beyond its interactions)."""


def prefill_interactions(start: int, count: int) -> int:
    """Pairwise token interactions of a prefill chunk of `count` tokens starting at position `start`: sum of (p + 1)
    for p in the chunk (each token attends to itself and every token before it)."""
    return count * start + count * (count + 1) // 2


def _extra(shape: BatchShape, layer: int) -> int:
    return shape.extra_rows[layer] if layer < len(shape.extra_rows) else 0


def batch_shape_of_chunks(chunks, extra_rows: tuple[int, ...] = ()) -> BatchShape:
    """The shape of a plan's device chunks (anything with token_ids, start_position and sample, e.g. ScheduledChunk):
    a chunk of one token is a decode row with context start_position + 1; a longer one is a prefill chunk."""
    num_rows = interactions = context = decodes = sampled = prefill_tokens = 0
    for chunk in chunks:
        count = len(chunk.token_ids)
        num_rows += count
        sampled += bool(chunk.sample)
        if count == 1:
            decodes += 1
            context += chunk.start_position + 1
        else:
            interactions += prefill_interactions(chunk.start_position, count)
            prefill_tokens += count
    return BatchShape(num_rows, interactions, context, decodes, sampled, tuple(extra_rows), prefill_tokens)


@dataclass(frozen=True)
class LatencyModel:
    num_layers: int
    dense: PiecewiseLinear
    """Seconds: ONE layer's pre_attention + post_attention on n rows."""
    prefill_attention: LinearModel
    """Seconds, one layer: f(interactions, prefill tokens)."""
    decode_attention: LinearModel
    """Seconds, one layer: f(total_context, num_requests)."""
    head: LinearModel
    """Seconds per iteration: fixed overhead (metadata, embedding, RoPE, Python) + LM head and sampling:
    f(num_sampled)."""
    cpu_attention: LinearModel
    """Seconds: one layer's batch in ONE CPU-pool worker, round trip included: f(total_context, num_rows)."""
    swap_out: LinearModel = LinearModel(0.0, (0.0,))
    """Seconds of the engine's own time one swap-out costs: f(tokens). Zero where the copy is asynchronous (CUDA)."""
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per model name: {"median_rel_error", "p90_rel_error", "points"} on held-out measurements."""
    metadata: dict[str, str] = field(default_factory=dict)
    """model, device, dtype, threads, torch version, created, ..."""

    def dense_time(self, num_rows: int) -> float:
        return self.dense(num_rows) if num_rows > 0 else 0.0

    def prefill_attention_time(self, interactions: int, tokens: int = 0) -> float:
        return self.prefill_attention(interactions, tokens) if interactions > 0 else 0.0

    def decode_attention_time(self, total_context: int, num_requests: int) -> float:
        return self.decode_attention(total_context, num_requests) if num_requests > 0 else 0.0

    def head_time(self, num_sampled: int) -> float:
        return self.head(num_sampled)

    def swap_out_time(self, num_tokens: int) -> float:
        return self.swap_out(num_tokens) if num_tokens > 0 else 0.0

    def recompute_time(self, start: int, count: int) -> float:
        """Seconds the device takes to compute the KV of `count` prompt tokens from position `start`: their dense
        work and attention in every layer, as a chunk of its own (what copying their KV back must beat)."""
        interactions = prefill_interactions(start, count)
        return self.num_layers * (self.dense_time(count) + self.prefill_attention_time(interactions, count))

    def cpu_attention_time(self, total_context: int, num_rows: int) -> float:
        return self.cpu_attention(total_context, num_rows) if num_rows > 0 else 0.0

    def layer_time(self, shape: BatchShape, layer: int) -> float:
        return self.dense_time(shape.num_rows + _extra(shape, layer)) + self.attention_time(shape)

    def iteration_time(self, shape: BatchShape) -> float:
        if any(shape.extra_rows):  # layers with the same extra rows cost the same: one evaluation per distinct count
            extras = collections.Counter(shape.extra_rows[: self.num_layers])
            extras[0] += self.num_layers - min(len(shape.extra_rows), self.num_layers)
            dense = sum(count * self.dense_time(shape.num_rows + extra) for extra, count in extras.items())
        else:  # every layer runs the same rows: one layer's dense time, num_layers times
            dense = self.num_layers * self.dense_time(shape.num_rows)
        return self.head_time(shape.num_sampled) + dense + self.num_layers * self.attention_time(shape)

    def attention_time(self, shape: BatchShape) -> float:
        """One layer's device attention; the same at every layer (offloaded rows attend on the CPU)."""
        prefill = self.prefill_attention_time(shape.prefill_interactions, shape.prefill_tokens)
        return prefill + self.decode_attention_time(shape.decode_context, shape.num_decodes)

    # ------------------------------------------------------------------------------------------------ storage
    def to_json(self) -> str:
        # Floats go through json's repr, which round-trips every float exactly.
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LatencyModel":
        data = json.loads(text)

        def linear(d: dict) -> LinearModel:
            return LinearModel(float(d["intercept"]), tuple(float(s) for s in d["slopes"]))

        return cls(
            num_layers=int(data["num_layers"]),
            dense=PiecewiseLinear(tuple(float(x) for x in data["dense"]["xs"]),
                                  tuple(float(y) for y in data["dense"]["ys"])),
            prefill_attention=linear(data["prefill_attention"]),
            decode_attention=linear(data["decode_attention"]),
            head=linear(data["head"]),
            cpu_attention=linear(data["cpu_attention"]),
            swap_out=linear(data["swap_out"]) if "swap_out" in data else LinearModel(0.0, (0.0,)),
            accuracy={name: dict(summary) for name, summary in data.get("accuracy", {}).items()},
            metadata={str(k): str(v) for k, v in data.get("metadata", {}).items()},
        )
