"""CPU attention on other hosts: one Ray actor per host, owning the host KV of the requests placed on it.

The actor runs the same AttentionStore as a local worker process. The engine side (`RemoteHost`) never blocks on it:
every message is an actor call whose reply (an ObjectRef) is collected later with a zero-timeout `ray.wait`, and an
actor handles its calls in the order they were made, so an attend always sees the KV loaded before it. Per iteration
the pool sends each host one AttendBatch; a request's KV crosses the network once, at swap-out (and back at swap-in).

Hosts come from `--cpu-attention-hosts`: a number of actors spread over the cluster, or `auto`, one actor on every
node that offers the `omniserve_cpu_host` resource, checked again every few seconds, so that hosts joined to a running
cluster are put to use. A host whose actor dies is dropped; the pool reports its requests as lost and the scheduler
rebuilds them from their tokens.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import torch

from omniserve.cpu_attention.messages import AttendBatch, AttendResult, Exported, LoadKV
from omniserve.cpu_attention.worker import OWN_MAPPING_BYTES, AttentionStore
from omniserve.malloc import map_large_allocations

logger = logging.getLogger(__name__)

HOST_RESOURCE = "omniserve_cpu_host"
"""The Ray resource a node declares (`ray start --resources '{"omniserve_cpu_host": 1}'`) to host CPU attention."""
_DISCOVERY_PERIOD_S = 5.0


def import_ray():
    try:
        import ray
    except ImportError as exc:  # ray is an optional dependency: only scale-out needs it
        raise ImportError("scale-out needs Ray: pip install 'omniserve[ray]'") from exc
    return ray


def connect_ray(address: str | None):
    """Joins the Ray cluster at `address` (or starts a local instance) unless this process is connected already."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return ray


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class AttentionHost:
    """The actor (wrapped by ray.remote in `start_host`): a host's share of the CPU attention pool."""

    def __init__(self, threads: int, memory_bytes: int | None) -> None:
        torch.set_num_threads(threads)
        map_large_allocations(OWN_MAPPING_BYTES)  # its own process, as a local worker's
        self.store = AttentionStore()
        # Host KV may take this much; by default most of what the host has free when the actor starts.
        self.memory_bytes = memory_bytes if memory_bytes is not None else int(0.8 * available_memory_bytes())

    def describe(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "memory_bytes": self.memory_bytes}

    def handle(self, message):
        return self.store.handle(message)


@dataclass(frozen=True)
class RemoteHostsConfig:
    count: int | str = 0
    """Actors to start (spread over the cluster's nodes), or "auto": one per node offering HOST_RESOURCE."""
    threads: int = 1
    """torch threads (and Ray CPUs) per actor."""
    memory_bytes: int | None = None
    """Host KV each actor may hold; None: 80% of its host's available memory."""


class RemoteHost:
    """The engine's side of one host actor: sends messages, collects the replies that are ready, counts traffic."""

    def __init__(self, ray, actor, name: str, memory_bytes: int, node_id: str | None = None) -> None:
        self.ray, self.actor, self.name, self.memory_bytes, self.node_id = ray, actor, name, memory_bytes, node_id
        self.requests: set[str] = set()
        self.host_kv_bytes = 0
        self.dead = False
        self._pending: list = []  # ObjectRefs of calls whose replies are not collected yet
        self.messages_sent = self.bytes_sent = self.bytes_received = 0

    def alive(self) -> bool:
        return not self.dead

    def send(self, message) -> None:
        if self.dead:
            return
        self.messages_sent += 1
        if isinstance(message, AttendBatch):
            self.bytes_sent += message.q.nbytes + message.k.nbytes + message.v.nbytes
        elif isinstance(message, LoadKV):
            self.bytes_sent += message.k.nbytes + message.v.nbytes
        self._pending.append(self.actor.handle.remote(message))

    def receive(self, timeout_s: float = 0.0) -> list:
        """Replies ready now (or within timeout_s). A failed call means the actor is gone: the host is marked dead."""
        if not self._pending or self.dead:
            return []
        ready, self._pending = self.ray.wait(self._pending, num_returns=len(self._pending), timeout=timeout_s)
        replies = []
        for ref in ready:
            try:
                reply = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                logger.error("CPU attention host %s failed: %s", self.name, exc)
                self.kill()  # an actor that is still up (the call failed, not the host) must not keep the KV
                self._pending = []
                break
            if reply is None:
                continue
            if isinstance(reply, AttendResult):
                self.bytes_received += reply.out.nbytes
                reply.out = reply.out.copy()  # Ray hands out read-only views of its object store
            elif isinstance(reply, Exported):
                self.bytes_received += reply.k.nbytes + reply.v.nbytes
            replies.append(reply)
        return replies

    @property
    def pending(self) -> list:
        return self._pending

    def kill(self) -> None:
        if not self.dead:
            _kill(self.ray, self.actor)
        self.dead = True


class RemoteHosts:
    """Starts the host actors and, in `auto` mode, starts one on every node that joins later."""

    def __init__(self, config: RemoteHostsConfig) -> None:
        self.config = config
        self.ray = import_ray()
        if not self.ray.is_initialized():
            raise RuntimeError("remote CPU attention hosts need a Ray cluster: connect first (--ray-address)")
        self._actor_class = self.ray.remote(num_cpus=config.threads)(AttentionHost)
        self._starting: list[tuple[object, object, str | None]] = []  # (actor, describe() ref, node id)
        self._next_discovery = 0.0
        self.hosts: list[RemoteHost] = []
        if config.count == "auto":
            self.poll()  # starts an actor on every host node there is now
        else:
            for _ in range(int(config.count)):
                self._start(None)
        self.wait_started()

    def _start(self, node_id: str | None) -> None:
        options = {"scheduling_strategy": "SPREAD"}
        if node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
        actor = self._actor_class.options(**options).remote(self.config.threads, self.config.memory_bytes)
        self._starting.append((actor, actor.describe.remote(), node_id))

    def wait_started(self, timeout_s: float = 120.0) -> None:
        """Blocks until the actors being started answer (at start-up, so that the first offload finds them)."""
        refs = [ref for _, ref, _ in self._starting]
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        self.poll()

    def poll(self) -> list[RemoteHost]:
        """Hosts that became ready since the last call (and, in auto mode, starts actors on new nodes)."""
        if self.config.count == "auto" and time.monotonic() >= self._next_discovery:
            self._next_discovery = time.monotonic() + _DISCOVERY_PERIOD_S
            known = {h.node_id for h in self.hosts if h.alive()} | {node for _, _, node in self._starting}
            for node in self.ray.nodes():
                if node.get("Alive") and node.get("Resources", {}).get(HOST_RESOURCE) and node["NodeID"] not in known:
                    self._start(node["NodeID"])
        new, still = [], []
        for actor, ref, node_id in self._starting:
            ready, _ = self.ray.wait([ref], timeout=0)
            if not ready:
                still.append((actor, ref, node_id))
                continue
            try:
                info = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                logger.error("a CPU attention host failed to start: %s", exc)
                continue
            host = RemoteHost(self.ray, actor, f"{info['host']}:{info['pid']}", info["memory_bytes"], node_id)
            logger.info("CPU attention host %s ready (%.1f GiB for host KV)", host.name, host.memory_bytes / 2**30)
            self.hosts.append(host)
            new.append(host)
        self._starting = still
        return new

    def shutdown(self) -> None:
        for host in self.hosts:
            host.kill()
        for actor, _, _ in self._starting:
            _kill(self.ray, actor)
        self.hosts, self._starting = [], []


def _kill(ray, actor) -> None:
    """Ends an actor. Once this process has left Ray (at exit, say) there is nothing to do: actors end with the job
    that owns them, and calling Ray then would only start a new session."""
    if not ray.is_initialized():
        return
    try:
        ray.kill(actor)
    except ray.exceptions.RayError:
        pass
