"""What travels between the engine and the CPU attention workers. Tensors go through shared memory
(torch.multiprocessing), everything else is plain data."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoadKV:
    """Swap-out: a request's KV for every layer, [num_layers, num_tokens, num_kv_heads, head_dim]."""

    request_id: str
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class AttendBatch:
    """One iteration's offloaded rows for this worker: append k, v to (request, layer), attend with q."""

    keys: list[tuple[str, int]]
    """(request id, layer) per row."""
    q: torch.Tensor  # [rows, num_heads, head_dim]
    k: torch.Tensor  # [rows, num_kv_heads, head_dim]
    v: torch.Tensor  # [rows, num_kv_heads, head_dim]


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
    out: torch.Tensor  # [rows, num_heads, head_dim]
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
