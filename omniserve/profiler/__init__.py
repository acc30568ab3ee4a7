"""Latency models of the device and the CPU attention pool, and the profiler that measures them."""

from omniserve.profiler.latency_model import (
    BatchShape, LatencyModel, LinearModel, PiecewiseLinear, batch_shape_of_chunks, prefill_interactions,
)

__all__ = [
    "BatchShape", "LatencyModel", "LinearModel", "PiecewiseLinear", "batch_shape_of_chunks", "prefill_interactions",
]
