"""The CPU attention pool: worker processes on their own cores, each with an inbox (a queue: putting never blocks the
engine) and an outbox (a pipe the engine polls, or waits on when it has nothing else to do).

The engine never blocks on it: `submit` and `load` only enqueue, `poll` takes whatever results are ready. Each
offloaded request lives on one worker (its host KV is there) and has at most one row in flight, since its token
advances one layer at a time, so in-flight rows never exceed the number of offloaded requests.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready

import torch
import torch.multiprocessing as mp

from omniserve.config import ConfigError
from omniserve.cpu_attention.messages import (
    AttendBatch, AttendResult, Export, Exported, Free, LoadKV, Ping, Status,
)
from omniserve.cpu_attention.worker import WorkerSettings, worker_main

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    num_workers: int = 1
    """Worker processes (--cpu-attention-workers)."""
    threads_per_worker: int = 1
    """torch threads in each worker (--cpu-attention-threads)."""
    worker_cores: tuple[tuple[int, ...], ...] | None = None
    """Cores to pin each worker to (one tuple per worker), or None to leave placement to the OS."""
    simulated_delay_s: float = 0.0
    """Extra seconds per attention batch in every worker: fault injection for tests; 0 in production."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.threads_per_worker < 1:
            raise ConfigError("the CPU attention pool needs at least one worker with at least one thread")


@dataclass
class _Worker:
    process: mp.Process
    inbox: mp.Queue
    outbox: Connection
    host_kv_bytes: int = 0
    requests: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class AttentionResult:
    request_id: str
    layer: int
    out: torch.Tensor  # [num_heads, head_dim]


class CPUAttentionPool:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._context = mp.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * config.num_workers  # started on first use
        self._owner: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}  # request -> the layer whose result it waits for
        self._exported: list[Exported] = []
        self._stashed: list[AttentionResult] = []  # results read while waiting for a Status

    # ------------------------------------------------------------------------------------------------ workers
    def _worker(self, index: int) -> _Worker:
        worker = self._workers[index]
        if worker is None:
            cores = self.config.worker_cores[index] if self.config.worker_cores else None
            settings = WorkerSettings(self.config.threads_per_worker, cores, self.config.simulated_delay_s)
            inbox = self._context.Queue()
            outbox, worker_end = self._context.Pipe(duplex=False)
            process = self._context.Process(
                target=worker_main, args=(settings, inbox, worker_end), daemon=True, name=f"omniserve-cpu-attn-{index}"
            )
            process.start()
            worker_end.close()  # the worker holds the writing end; a dead worker then reads as EOF here
            if cores:  # pin at once, so that even the worker's start-up (importing torch) stays off the engine's cores
                os.sched_setaffinity(process.pid, cores)
            worker = self._workers[index] = _Worker(process, inbox, outbox)
        return worker

    def check_workers(self) -> list[str]:
        """Finds dead workers, forgets their requests (their host KV died with them) and returns those ids. The
        worker is restarted on next use."""
        lost = []
        for index, worker in enumerate(self._workers):
            if worker is None or worker.process.is_alive():
                continue
            logger.error("CPU attention worker %d died (exit code %s); %d requests will be rebuilt",
                         index, worker.process.exitcode, len(worker.requests))
            lost.extend(worker.requests)
            for request_id in worker.requests:
                self._owner.pop(request_id, None)
                self._in_flight.pop(request_id, None)
            self._exported = [e for e in self._exported if e.request_id not in worker.requests]
            self._workers[index] = None
        return lost

    def shutdown(self) -> None:
        for worker in self._workers:
            if worker is not None and worker.process.is_alive():
                worker.inbox.put(None)
                worker.process.join(timeout=5)
                if worker.process.is_alive():
                    worker.process.kill()
        self._workers = [None] * self.config.num_workers

    def worker_pids(self) -> list[int | None]:
        return [None if w is None else w.process.pid for w in self._workers]

    # ------------------------------------------------------------------------------------------------- traffic
    def load(self, request_id: str, k: torch.Tensor, v: torch.Tensor) -> None:
        """Installs an offloaded request's KV ([num_layers, num_tokens, num_kv_heads, head_dim]) on the least
        loaded worker."""
        load = Counter({index: 0 for index in range(len(self._workers))})
        load.update(self._owner.values())
        index = min(load, key=lambda i: (load[i], i))
        worker = self._worker(index)
        worker.inbox.put(LoadKV(request_id, k, v))
        worker.requests.add(request_id)
        self._owner[request_id] = index

    def submit(self, keys: list[tuple[str, int]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queues one iteration's offloaded rows (q [rows, heads, dim], k and v [rows, kv_heads, dim], on any device):
        one message per worker."""
        rows_of: dict[int, list[int]] = {}
        for row, (request_id, layer) in enumerate(keys):
            rows_of.setdefault(self._owner[request_id], []).append(row)
            self._in_flight[request_id] = layer
        q, k, v = (_wire_format(t) for t in (q, k, v))
        for index, rows in rows_of.items():
            picked = torch.tensor(rows)
            self._worker(index).inbox.put(AttendBatch(
                [keys[r] for r in rows], *(t.index_select(0, picked).numpy() for t in (q, k, v))
            ))

    def poll(self) -> list[AttentionResult]:
        """Every result that is ready now, without waiting. Rows of requests freed meanwhile are dropped."""
        results, self._stashed = self._stashed, []
        for worker in self._workers:
            if worker is None:
                continue
            try:
                while worker.outbox.poll():
                    self._handle(worker, worker.outbox.recv(), results)
            except (OSError, EOFError):  # the worker died; check_workers will rebuild its requests
                continue
        return results

    def wait(self, timeout_s: float) -> None:
        """Blocks until some worker has something to say, or timeout_s passes: for an engine with nothing else to do."""
        outboxes = [w.outbox for w in self._workers if w is not None]
        if outboxes:
            wait_for_ready(outboxes, timeout_s)
        else:
            time.sleep(timeout_s)

    def _handle(self, worker: _Worker, message, results: list[AttentionResult]) -> None:
        if isinstance(message, AttendResult):
            for row, (request_id, layer) in enumerate(message.keys):
                if self._in_flight.get(request_id) == layer:
                    del self._in_flight[request_id]
                    results.append(AttentionResult(request_id, layer, torch.from_numpy(message.out[row])))
        elif isinstance(message, Exported):
            self._exported.append(message)
        worker.host_kv_bytes = message.host_kv_bytes

    def free(self, request_ids: list[str]) -> None:
        """Forgets requests: their host KV is dropped and any row still in flight is discarded on return."""
        by_worker: dict[int, list[str]] = {}
        for request_id in request_ids:
            index = self._owner.pop(request_id, None)
            self._in_flight.pop(request_id, None)
            if index is not None:
                by_worker.setdefault(index, []).append(request_id)
                self._workers[index].requests.discard(request_id)
        for index, ids in by_worker.items():
            self._workers[index].inbox.put(Free(ids))

    def request_export(self, request_id: str) -> None:
        """Swap-in, step one: ask for the request's KV back (it arrives through `take_exported`)."""
        self._workers[self._owner[request_id]].inbox.put(Export(request_id))

    def take_exported(self) -> list[Exported]:
        """KV that came back for swap-in; those requests no longer belong to the pool."""
        done, self._exported = self._exported, []
        for exported in done:
            index = self._owner.pop(exported.request_id, None)
            if index is not None:
                self._workers[index].requests.discard(exported.request_id)
        return done

    # ------------------------------------------------------------------------------------------------ accounting
    @property
    def num_requests(self) -> int:
        return len(self._owner)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def host_kv_bytes(self, wait_s: float = 10.0) -> int:
        """Host KV held by all workers, asked for now: blocks until each has done all it was sent (up to wait_s).
        For tests and diagnostics; results that arrive meanwhile are kept for the next `poll`."""
        total = 0
        for worker in self._workers:
            if worker is None or not worker.process.is_alive():
                continue
            worker.inbox.put(Ping())
            while True:
                if not worker.outbox.poll(wait_s):
                    raise TimeoutError(f"CPU attention worker did not answer within {wait_s} s")
                message = worker.outbox.recv()
                self._handle(worker, message, self._stashed)
                if isinstance(message, Status):
                    total += message.host_kv_bytes
                    break
        return total


def _wire_format(t: torch.Tensor) -> torch.Tensor:
    """On the host, in a dtype numpy has (half precision goes as fp32, which the host KV uses anyway)."""
    t = t.cpu()
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
