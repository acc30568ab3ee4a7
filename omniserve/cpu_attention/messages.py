"""What travels between the engine and the CPU attention workers.

Per-iteration rows (AttendBatch, AttendResult) are small: they travel as numpy arrays, pickled by value through the
pipe, which costs far less than handing over a shared-memory segment per tensor (file-descriptor passing).

A swap-out's KV (LoadKV) goes to a local worker as raw bytes after its message (send_message, receive_message): the
engine's sending thread writes the tensors from where they are (half precision as an fp32 copy), and the worker reads
them into arrays of its own. Not as torch tensors: those go through a pipe as shared-memory segments whose descriptors
the sender keeps until the receiver fetches them, and a worker killed before reading its message never does, so the
engine held the segment for good (BENCHMARKS.md, soak). Nor pickled: that copies the KV into a buffer of the engine's heap, tens of MB each swap-out. A swap-in's KV
(Exported) comes back as torch tensors through shared memory: the engine reads every reply, and a dead engine takes
its worker with it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import torch


@dataclass(frozen=True)
class RawArray:
    """Stands in a sent message for an array that follows it on the pipe as raw bytes."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class LoadKV:
    """Swap-out: a request's KV for every layer, [num_layers, num_tokens, num_kv_heads, head_dim], after its prefix
    in the prefix cache's host tier, if it has one there (prefix_pages: those host pages, in order; a local worker
    reads them in place)."""

    request_id: str
    k: torch.Tensor | np.ndarray  # numpy in a local worker, as receive_message reads it (fp32 for half precision)
    v: torch.Tensor | np.ndarray
    prefix_pages: tuple[int, ...] = ()


def wire_format(t: torch.Tensor) -> torch.Tensor:
    """On the host, in a dtype numpy has (half precision goes as fp32, which the host KV uses anyway)."""
    t = t.cpu()
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def send_message(connection: Connection, message) -> None:
    """Sends a message; a LoadKV's KV follows it as raw bytes, written from the tensors themselves (in a dtype numpy
    has: the one copy, for half precision, is made here, on the sending thread rather than the engine's)."""
    if isinstance(message, LoadKV):
        arrays = [np.ascontiguousarray(wire_format(t).numpy()) for t in (message.k, message.v)]
        connection.send(dataclasses.replace(message, k=RawArray(arrays[0].shape, arrays[0].dtype.str),
                                            v=RawArray(arrays[1].shape, arrays[1].dtype.str)))
        for array in arrays:
            connection.send_bytes(array)
        return
    connection.send(message)


def receive_message(connection: Connection):
    """The next message, with the arrays that follow it (send_message) read into arrays of the receiver's."""
    message = connection.recv()
    if isinstance(message, LoadKV) and isinstance(message.k, RawArray):
        k, v = (np.empty(raw.shape, np.dtype(raw.dtype)) for raw in (message.k, message.v))
        for array in (k, v):
            connection.recv_bytes_into(array.reshape(-1))
        message = dataclasses.replace(message, k=k, v=v)
    return message


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
