"""What travels between the engine and the CPU attention workers.

Per-iteration rows (AttendBatch, AttendResult) are small: they travel as numpy arrays, pickled by value through the
pipe, which costs far less than handing over a shared-memory segment per tensor (file-descriptor passing).

A swap-out's KV (LoadKV) goes to a local worker by value too, though large: a torch tensor sent through a pipe goes
as a shared-memory segment whose descriptor the sender keeps until the receiver fetches it, and a worker killed before
reading its message never does, so the engine held the segment for good (BENCHMARKS.md, soak). By value it costs the
sender the same (one copy, 24 ms for 23 MB here) and the receiver one copy more. A swap-in's KV (Exported) comes back
as torch tensors through shared memory: the engine reads every reply, and a dead engine takes its worker with it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LoadKV:
    """Swap-out: a request's KV for every layer, [num_layers, num_tokens, num_kv_heads, head_dim], after its prefix
    in the prefix cache's host tier, if it has one there (prefix_pages: those host pages, in order; a local worker
    reads them in place)."""

    request_id: str
    k: torch.Tensor | np.ndarray  # numpy (fp32 for half precision) on the way to a local worker
    v: torch.Tensor | np.ndarray
    prefix_pages: tuple[int, ...] = ()


@dataclass
class AttendBatch:
    """One iteration's offloaded rows for this worker: append k, v to (request, layer), attend with q."""

    keys: list[tuple[str, int]]
    """(request id, layer) per row."""
    q: np.ndarray  # [rows, num_heads, head_dim]
    k: np.ndarray  # [rows, num_kv_heads, head_dim]
    v: np.ndarray  # [rows, num_kv_heads, head_dim]


@dataclass
class Free:
    request_ids: list[str]


@dataclass
class Export:
    """Swap-in: send the request's KV back, then forget it."""

    request_id: str


@dataclass
class AttendResult:
    keys: list[tuple[str, int]]
    out: np.ndarray  # [rows, num_heads, head_dim]
    host_kv_bytes: int
    """The worker's host KV footprint after this batch."""


@dataclass
class Exported:
    request_id: str
    k: torch.Tensor  # [num_layers, num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    host_kv_bytes: int


@dataclass
class Ping:
    """Asks for a Status once everything sent before it is done."""


@dataclass
class Status:
    host_kv_bytes: int
    num_requests: int
