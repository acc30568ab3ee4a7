"""A CPU attention worker process: owns the host KV of the requests routed to it and computes their decode
attention, one message at a time."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from omniserve.cpu_attention.host_kv import HostKV
from omniserve.cpu_attention.kernel import compiled_kernel
from omniserve.cpu_attention.messages import (
    AttendBatch, AttendResult, Export, Exported, Free, LoadKV, Ping, Status, receive_message,
)
from omniserve.kv_cache.page_pool import PagePool
from omniserve.malloc import map_large_allocations, trim_heap


@dataclass(frozen=True)
class WorkerSettings:
    threads: int
    """torch threads inside the worker."""
    cores: tuple[int, ...] | None
    """CPU cores the worker is pinned to, or None for any."""
    simulated_delay_s: float = 0.0
    """Extra seconds per attention batch: fault injection for tests of a slow pool; 0 in production."""
    host_tier: PagePool | None = None
    """The prefix cache's host tier, in shared memory: prefixes offloaded requests read in place (or None)."""


_TRIM_EVERY_BYTES = 64 << 20  # host KV freed between two trims of the heap (see AttentionStore._trim_heap_if_due)
OWN_MAPPING_BYTES = 256 << 10
"""Host KV buffers this large or larger are mapped apart and unmapped when freed (a layer's KV of a few hundred
tokens and up): the worker's RSS then follows the host KV it holds (see omniserve.malloc)."""


class AttentionStore:
    """The host KV of the requests placed on one worker, and the decode attention over it: the worker's whole job,
    shared by the local worker processes and the remote host actors (remote.py)."""

    def __init__(self, simulated_delay_s: float = 0.0, host_tier: PagePool | None = None) -> None:
        self.kv: dict[str, HostKV] = {}
        self.simulated_delay_s = simulated_delay_s
        self.host_tier = host_tier
        self.freed_bytes = 0
        """Host KV dropped since the heap was last trimmed."""
        compiled_kernel()  # build (or load the cached build) before the first request needs it

    def footprint(self) -> int:
        return sum(kv.nbytes for kv in self.kv.values())

    def _forget(self, request_id: str) -> HostKV | None:
        kv = self.kv.pop(request_id, None)
        if kv is not None:
            self.freed_bytes += kv.nbytes
        return kv

    def _trim_heap_if_due(self) -> None:
        """Gives the heap's free pages back to the OS once enough host KV was freed, or none is left. glibc keeps
        freed memory for reuse, and host KV buffers of every size and lifetime leave it in fragments that it never
        hands back: a worker stayed at 0.8 GB with no request left after a soak run (BENCHMARKS.md)."""
        if self.freed_bytes >= _TRIM_EVERY_BYTES or (self.freed_bytes and not self.kv):
            trim_heap()
            self.freed_bytes = 0

    @torch.inference_mode()
    def handle(self, message) -> AttendResult | Exported | Status | None:
        """Runs one message; returns the reply to send back, if it has one."""
        self._trim_heap_if_due()  # KV exported by the previous message is gone now
        if isinstance(message, LoadKV):
            if message.prefix_pages and self.host_tier is None:
                raise RuntimeError("KV with a prefix in the host tier sent to a worker that cannot read it")
            k, v = torch.as_tensor(message.k), torch.as_tensor(message.v)  # numpy, as receive_message read them
            self.kv[message.request_id] = HostKV(k, v, self.host_tier, message.prefix_pages)
        elif isinstance(message, AttendBatch):
            q, k_new, v_new = (torch.from_numpy(a) for a in (message.q, message.k, message.v))
            done, outs = [], []
            for row, (request_id, layer) in enumerate(message.keys):
                kv = self.kv.get(request_id)
                if kv is None:  # freed while this row was queued
                    continue
                k, v = kv.append(layer, k_new[row], v_new[row])
                outs.append(kv.attend(layer, q[row], k, v))
                done.append((request_id, layer))
            if self.simulated_delay_s:
                time.sleep(self.simulated_delay_s)
            out = torch.stack(outs) if outs else q[:0]
            return AttendResult(done, out.numpy(), self.footprint())
        elif isinstance(message, Free):
            for request_id in message.request_ids:
                self._forget(request_id)
            self._trim_heap_if_due()
        elif isinstance(message, Export):
            kv = self._forget(message.request_id)
            if kv is not None:
                k, v = kv.export()
                return Exported(message.request_id, k, v, self.footprint())
        elif isinstance(message, Ping):
            return Status(self.footprint(), len(self.kv))
        return None


def worker_main(settings: WorkerSettings, inbox: Connection, outbox: Connection) -> None:
    """Runs messages from the engine (inbox) until it sends None or is gone; replies go to the outbox."""
    torch.set_num_threads(settings.threads)
    map_large_allocations(OWN_MAPPING_BYTES)
    if settings.cores:
        os.sched_setaffinity(0, settings.cores)
    store = AttentionStore(settings.simulated_delay_s, settings.host_tier)
    while True:
        try:
            message = receive_message(inbox)
        except EOFError:  # the engine is gone
            return
        if message is None:
            return
        reply = store.handle(message)
        if reply is not None:
            outbox.send(reply)
        message = reply = None  # an exported KV (now in shared memory) must not live on until the next message
