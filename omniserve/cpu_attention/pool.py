"""The CPU attention pool: local worker processes on their own cores, each with an inbox (putting never blocks the
engine: a thread writes to the worker's pipe) and an outbox (a pipe the engine polls, or waits on when it has
nothing else to do), and optionally remote hosts (Ray actors, remote.py) that take the requests the local pool has
no memory for.

The engine never blocks on it: `submit` and `load` only enqueue, `poll` takes whatever results are ready. Each
offloaded request lives on one worker or host (its host KV is there) and has at most one row in flight, since its
token's next layer needs this layer's result, so in-flight rows never exceed the number of offloaded requests.

Placement, at swap-out, follows placement.py (the simulator follows it too): room is kept for the KV the request
reaches when done, on the host (local or remote) with the largest share of its budget left; the local host among
equals, then the fewest requests; on the local host, the least loaded worker.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready

import torch
import torch.multiprocessing as mp

from omniserve.config import ConfigError
from omniserve.cpu_attention.host_kv import HostKV
from omniserve.cpu_attention.messages import (
    AttendBatch, AttendResult, Export, Exported, Free, LoadKV, Ping, Status, send_message, wire_format,
)
from omniserve.cpu_attention.placement import LOCAL, HostRoom, choose_host, least_loaded
from omniserve.cpu_attention.remote import RemoteHost, RemoteHosts, available_memory_bytes
from omniserve.cpu_attention.worker import WorkerSettings, worker_main
from omniserve.kv_cache.page_pool import PagePool

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
    local_memory_bytes: int | None = None
    """Host KV the local workers may hold before requests go to remote hosts; None: half the memory available at
    start-up. With the remote hosts' memory, it is also what the scheduler offloads up to (host_capacity_bytes):
    requests counted at the size they reach when done. The prefix cache's host tier, if any, shares it and gives
    way."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.threads_per_worker < 1:
            raise ConfigError("the CPU attention pool needs at least one worker with at least one thread")


_CLOSE = object()  # tells an inbox's thread to stop


@dataclass(frozen=True)
class _AfterCopy:
    """A message to build once a device-to-host copy has completed (`copied`, a CUDA event)."""

    copied: object
    build: Callable[[], object]


class _Inbox:
    """Messages to one worker, in order. `put` never blocks the engine: a thread of its own writes them to the pipe
    that the worker reads. The engine holds only the writing end, so once the worker is gone the next write fails
    at once, and the thread ends with whatever was left. (A multiprocessing.Queue keeps a reading end in the
    sending process too: after a worker was killed, its feeder thread stayed blocked for good on the full pipe,
    holding that pipe's two descriptors, the rows and the swapped-out KV it had yet to send; one leak per death.)"""

    def __init__(self, connection: Connection, name: str) -> None:
        self._connection = connection
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_all, name=f"{name}-inbox", daemon=True)
        self._thread.start()

    def put(self, message) -> None:
        self._pending.put(message)

    def close(self) -> None:
        """Stops the thread once it has sent what was put before (or at once, if the worker is gone)."""
        self._pending.put(_CLOSE)

    def _send_all(self) -> None:
        try:
            while (message := self._pending.get()) is not _CLOSE:
                if isinstance(message, _AfterCopy):  # rows on their way from the GPU: wait here, not in the engine
                    message.copied.synchronize()
                    message = message.build()
                send_message(self._connection, message)
        except OSError:  # the worker is gone (EPIPE): nothing left can reach it
            pass
        finally:
            self._connection.close()


@dataclass
class _Worker:
    process: mp.Process
    inbox: _Inbox
    outbox: Connection
    host_kv_bytes: int = 0
    requests: set[str] = field(default_factory=set)

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message) -> None:
        self.inbox.put(message)

    def receive(self, timeout_s: float = 0.0) -> list:
        """Replies ready now (or within timeout_s); none from a dead worker (check_workers rebuilds its requests)."""
        replies = []
        try:
            while self.outbox.poll(timeout_s if not replies else 0.0):
                replies.append(self.outbox.recv())
        except (OSError, EOFError):
            pass
        return replies

    def release(self) -> None:
        """Closes the channels of a worker that has ended (its inbox's thread then ends too) and reaps its process."""
        self.inbox.close()
        self.outbox.close()
        self.process.join(timeout=5)
        if not self.process.is_alive():
            self.process.close()


_Target = _Worker | RemoteHost  # where an offloaded request's host KV lives


@dataclass(frozen=True)
class AttentionResult:
    request_id: str
    layer: int
    out: torch.Tensor  # [num_heads, head_dim]


class CPUAttentionPool:
    def __init__(self, config: PoolConfig, remote: RemoteHosts | None = None, host_tier: PagePool | None = None,
                 host_tier_bytes: Callable[[], int] | None = None) -> None:
        """host_tier: the prefix cache's host tier, in shared memory, which local workers read prefixes from in
        place (`load`'s prefix_pages); None: every request's whole KV is sent. host_tier_bytes: what the tier holds
        now of the local budget, which it shares with the offloaded KV (and gives way to: the engine shrinks it)."""
        self.config = config
        self.host_tier = host_tier
        self._host_tier_bytes = host_tier_bytes or (lambda: 0)
        self._context = mp.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * config.num_workers  # started on first use
        self._remote = remote
        self._local_budget = (config.local_memory_bytes if config.local_memory_bytes is not None
                              else available_memory_bytes() // 2)
        self._owner: dict[str, _Target] = {}
        self._reserved: dict[str, int] = {}  # request -> host KV bytes its placement counted on
        self._in_flight: dict[str, int] = {}  # request -> the layer whose result it waits for
        self._exported: list[Exported] = []
        self._stashed: list[AttentionResult] = []  # results read while waiting for a Status

    # ------------------------------------------------------------------------------------------------ workers
    def _worker(self, index: int) -> _Worker:
        worker = self._workers[index]
        if worker is None:
            cores = self.config.worker_cores[index] if self.config.worker_cores else None
            settings = WorkerSettings(self.config.threads_per_worker, cores, self.config.simulated_delay_s,
                                      self.host_tier)
            name = f"omniserve-cpu-attn-{index}"
            worker_inbox, inbox = self._context.Pipe(duplex=False)
            outbox, worker_outbox = self._context.Pipe(duplex=False)
            process = self._context.Process(
                target=worker_main, args=(settings, worker_inbox, worker_outbox), daemon=True, name=name)
            process.start()
            # Each side keeps only its own ends: a dead worker then reads as EOF here, and writing to it fails at once
            # (and a worker whose engine died reads EOF and exits).
            worker_inbox.close()
            worker_outbox.close()
            if cores:  # pin at once, so that even the worker's start-up (importing torch) stays off the engine's cores
                os.sched_setaffinity(process.pid, cores)
            worker = self._workers[index] = _Worker(process, _Inbox(inbox, name), outbox)
        return worker

    @property
    def remote_hosts(self) -> list[RemoteHost]:
        return [h for h in self._remote.hosts if h.alive()] if self._remote is not None else []

    def _targets(self) -> list[_Target]:
        return [w for w in self._workers if w is not None] + self.remote_hosts

    def check_workers(self) -> list[str]:
        """Finds dead workers and hosts, forgets their requests (their host KV died with them) and returns those ids.
        A local worker is restarted on next use; a remote host is dropped. New remote hosts are taken in."""
        lost = []
        for index, worker in enumerate(self._workers):
            if worker is None or worker.alive():
                continue
            logger.error("CPU attention worker %d died (exit code %s); %d requests will be rebuilt",
                         index, worker.process.exitcode, len(worker.requests))
            lost.extend(self._forget_target(worker))
            worker.release()
            self._workers[index] = None
        if self._remote is not None:
            for host in self._remote.hosts:
                if host.dead:  # found by `poll`: a failed call is how a dead actor shows
                    logger.error("CPU attention host %s is gone; %d requests will be rebuilt", host.name,
                                 len(host.requests))
                    lost.extend(self._forget_target(host))
            self._remote.hosts = [h for h in self._remote.hosts if not h.dead]
            self._remote.poll()
        return lost

    def _forget_target(self, target: _Target) -> list[str]:
        gone = list(target.requests)
        for request_id in gone:
            self._owner.pop(request_id, None)
            self._reserved.pop(request_id, None)
            self._in_flight.pop(request_id, None)
        self._exported = [e for e in self._exported if e.request_id not in target.requests]
        target.requests = set()
        return gone

    def shutdown(self) -> None:
        for worker in self._workers:
            if worker is None:
                continue
            if worker.process.is_alive():
                worker.inbox.put(None)
                worker.process.join(timeout=5)
                if worker.process.is_alive():
                    worker.process.kill()
            worker.release()
        self._workers = [None] * self.config.num_workers
        if self._remote is not None:
            self._remote.shutdown()

    def worker_pids(self) -> list[int | None]:
        return [None if w is None else w.process.pid for w in self._workers]

    # ------------------------------------------------------------------------------------------------- traffic
    def _rooms(self) -> tuple[HostRoom, list[RemoteHost], list[HostRoom]]:
        """The local host's room (its workers' placements and the host tier against the local budget), and the live
        remote hosts with theirs, in bytes."""
        used = Counter()  # host KV bytes counted on, per target
        for request_id, target in self._owner.items():
            used[id(target)] += self._reserved[request_id]
        local_used = sum(used[id(w)] for w in self._workers if w is not None) + self._host_tier_bytes()
        local = HostRoom(self._local_budget - local_used, self._local_budget,
                         sum(len(w.requests) for w in self._workers if w is not None))
        hosts = self.remote_hosts
        return local, hosts, [HostRoom(h.memory_bytes - used[id(h)], h.memory_bytes, len(h.requests)) for h in hosts]

    def host_memory(self) -> dict[str, HostRoom]:
        """Per host ("local", or a remote host's name): its host KV budget and what is not counted on yet (the host
        tier's pages count on the local budget)."""
        local, hosts, rooms = self._rooms()
        return {"local": local, **{h.name: room for h, room in zip(hosts, rooms)}}

    def allocated_host_kv(self) -> dict[str, int]:
        """Per host (as host_memory): the host KV bytes its workers last said they hold (tensors allocated, room to
        grow included), which is what their memory really holds, where host_memory counts what requests may grow to.
        Refreshed by every reply (each attend, every iteration a request is offloaded); never waits for one. A worker
        left with no request counts 0: all it holds is its requests' KV, and their Free is on its way."""

        def held(target: _Target) -> int:
            return target.host_kv_bytes if target.requests and target.alive() else 0

        local = sum(held(w) for w in self._workers if w is not None)
        return {"local": local, **{h.name: held(h) for h in self.remote_hosts}}

    def _place(self, nbytes: int) -> _Target:
        """Where a request of `nbytes` host KV goes: the rule of placement.py."""
        local, hosts, rooms = self._rooms()
        host = choose_host(local, rooms, nbytes)
        if host != LOCAL:
            return hosts[host]
        return self._worker(least_loaded([0 if w is None else len(w.requests) for w in self._workers]))

    def load(self, request_id: str, k: torch.Tensor, v: torch.Tensor, final_tokens: int = 0,
             prefix_pages: tuple[int, ...] = ()) -> None:
        """Installs an offloaded request's KV ([num_layers, num_tokens, num_kv_heads, head_dim]) where placement says:
        the one time its KV moves to a host (swap-out). Room is kept for `final_tokens` (the KV it holds when done,
        as the scheduler counts it) or for the tokens given, if more. prefix_pages: host-tier pages that hold the
        request's first tokens (k and v are the tokens after them, and `final_tokens` does not count them); a local
        worker reads them in place, a remote host is sent them with the rest."""
        # Host KV is fp32 and keeps room to double (host_kv.py): count that, so placement does not overcommit a host.
        tokens = max(k.shape[1], final_tokens)
        nbytes = self.host_bytes_per_token(k.shape[0], k.shape[2], k.shape[3]) * tokens
        target = self._place(nbytes)
        if prefix_pages and not isinstance(target, _Worker):
            k, v = HostKV.with_prefix(k, v, self.host_tier, prefix_pages)
            nbytes += self.host_bytes_per_token(k.shape[0], k.shape[2], k.shape[3]) * (
                len(prefix_pages) * self.host_tier.page_size)
            prefix_pages = ()
        target.send(LoadKV(request_id, k, v, tuple(prefix_pages)))
        target.requests.add(request_id)
        self._owner[request_id] = target
        self._reserved[request_id] = nbytes

    def submit(self, keys: list[tuple[str, int]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queues offloaded rows (q [rows, heads, dim], k and v [rows, kv_heads, dim], on any device): one message
        per worker or host. Never waits for the device: rows on a GPU are copied to pinned memory on its stream, and
        each local worker's inbox thread waits for the copy before sending (a remote host's call waits here)."""
        rows_of: dict[int, list[int]] = {}
        targets: dict[int, _Target] = {}
        for row, (request_id, layer) in enumerate(keys):
            target = self._owner[request_id]
            targets[id(target)] = target
            rows_of.setdefault(id(target), []).append(row)
            self._in_flight[request_id] = layer
        copied = None
        if q.device.type == "cuda":
            q, k, v = (_pinned_copy(t) for t in (q, k, v))
            copied = torch.cuda.Event()
            copied.record()
        else:
            q, k, v = (wire_format(t) for t in (q, k, v))
        for key, rows in rows_of.items():
            picked = None if len(rows_of) == 1 else torch.tensor(rows)  # one target (one worker): all rows, no copy
            build = functools.partial(_attend_batch, [keys[r] for r in rows], picked, q, k, v)
            if copied is not None and isinstance(targets[key], _Worker):
                targets[key].send(_AfterCopy(copied, build))
            else:
                if copied is not None:
                    copied.synchronize()
                targets[key].send(build())

    def all_alive(self) -> bool:
        """Whether every started worker and every remote host still runs (results from a dead one never come)."""
        return all(w.alive() for w in self._workers if w is not None) and not any(
            h.dead for h in (self._remote.hosts if self._remote is not None else []))

    def poll(self) -> list[AttentionResult]:
        """Every result that is ready now, without waiting. Rows of requests freed meanwhile are dropped."""
        results, self._stashed = self._stashed, []
        for target in self._targets():
            for message in target.receive():
                self._handle(target, message, results)
        return results

    def wait(self, timeout_s: float) -> None:
        """Blocks until some worker or host has something to say, or timeout_s passes: for an engine with nothing
        else to do."""
        outboxes = [w.outbox for w in self._workers if w is not None]
        pending = [ref for host in self.remote_hosts for ref in host.pending]
        if not pending:
            if outboxes:
                wait_for_ready(outboxes, timeout_s)
            else:
                time.sleep(timeout_s)
            return
        ray, deadline = self._remote.ray, time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # two kinds of channel: look at each in short turns
            if outboxes and wait_for_ready(outboxes, 0.001):
                return
            if ray.wait(pending, num_returns=1, timeout=0.001)[0]:
                return

    def _handle(self, target: _Target, message, results: list[AttentionResult]) -> None:
        if isinstance(message, AttendResult):
            out = torch.from_numpy(message.out)
            for row, (request_id, layer) in enumerate(message.keys):
                if self._in_flight.get(request_id) == layer:
                    del self._in_flight[request_id]
                    results.append(AttentionResult(request_id, layer, out[row]))
        elif isinstance(message, Exported):
            self._exported.append(message)
        target.host_kv_bytes = message.host_kv_bytes

    def free(self, request_ids: list[str]) -> None:
        """Forgets requests: their host KV is dropped and any row still in flight is discarded on return."""
        by_target: dict[int, tuple[_Target, list[str]]] = {}
        for request_id in request_ids:
            target = self._owner.pop(request_id, None)
            self._reserved.pop(request_id, None)
            self._in_flight.pop(request_id, None)
            if target is not None:
                by_target.setdefault(id(target), (target, []))[1].append(request_id)
                target.requests.discard(request_id)
        for target, ids in by_target.values():
            target.send(Free(ids))

    def request_export(self, request_id: str) -> None:
        """Swap-in, step one: ask for the request's KV back (it arrives through `take_exported`)."""
        self._owner[request_id].send(Export(request_id))

    def take_exported(self) -> list[Exported]:
        """KV that came back for swap-in; those requests no longer belong to the pool."""
        done, self._exported = self._exported, []
        for exported in done:
            target = self._owner.pop(exported.request_id, None)
            self._reserved.pop(exported.request_id, None)
            if target is not None:
                target.requests.discard(exported.request_id)
        return done

    # ------------------------------------------------------------------------------------------------ accounting
    @property
    def num_requests(self) -> int:
        return len(self._owner)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def placement(self) -> dict[str, str]:
        """Where each offloaded request's host KV is: "local" or the remote host's name."""
        return {r: "local" if isinstance(t, _Worker) else t.name for r, t in self._owner.items()}

    def host_capacity_bytes(self) -> int:
        """Host KV memory in all: the local budget and every live remote host's."""
        return self._local_budget + sum(h.memory_bytes for h in self.remote_hosts)

    def free_host_bytes(self) -> int:
        """Host KV memory not yet counted on by a placement nor held by the host tier: the local budget's and every
        live remote host's."""
        return max(0, self.host_capacity_bytes() - sum(self._reserved.values()) - self._host_tier_bytes())

    def local_bytes_left(self) -> int:
        """The local budget less the placements counted on it (the host tier may fill the rest)."""
        local = {id(w) for w in self._workers if w is not None}
        return self._local_budget - sum(n for r, n in self._reserved.items() if id(self._owner[r]) in local)

    @staticmethod
    def host_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """What placement counts a token of host KV as (fp32 k and v, with room to double: see `load`)."""
        return 2 * 4 * 2 * num_layers * num_kv_heads * head_dim

    def remote_traffic(self) -> dict[str, int]:
        """Messages and bytes exchanged with remote hosts so far (live hosts)."""
        hosts = self.remote_hosts
        return {"messages": sum(h.messages_sent for h in hosts), "bytes_sent": sum(h.bytes_sent for h in hosts),
                "bytes_received": sum(h.bytes_received for h in hosts)}

    def host_kv_bytes(self, wait_s: float = 10.0) -> int:
        """Host KV held by all workers and hosts, asked for now: blocks until each has done all it was sent (up to
        wait_s). For tests and diagnostics; results that arrive meanwhile are kept for the next `poll`."""
        total = 0
        for target in self._targets():
            if not target.alive():
                continue
            target.send(Ping())
            deadline = time.monotonic() + wait_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not target.alive():
                    raise TimeoutError(f"CPU attention worker did not answer within {wait_s} s")
                replies = target.receive(min(left, 0.05))
                for message in replies:
                    self._handle(target, message, self._stashed)
                status = next((m for m in replies if isinstance(m, Status)), None)
                if status is not None:
                    total += status.host_kv_bytes
                    break
        return total


def _attend_batch(keys: list[tuple[str, int]], rows: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> AttendBatch:
    return AttendBatch(keys, *((t if rows is None else t.index_select(0, rows)).numpy() for t in (q, k, v)))


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of a GPU tensor into pinned host memory, in the wire's dtype (valid once an event recorded
    after it has completed)."""
    t = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

