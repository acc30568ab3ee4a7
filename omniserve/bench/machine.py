"""The machine a benchmark runs on: CPU accounting from /proc (others use this machine: every benchmark reports how
much of it they took, and some wait for it to go quiet), and the read bandwidth that weight and KV reads are set
against. Linux only."""

from __future__ import annotations

import os
import time
from typing import Callable


def _busy_seconds(fields: list[str]) -> float:
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds used on this machine so far by everything (steal time included); Linux only."""
    with open("/proc/stat") as f:
        return _busy_seconds(f.readline().split()[1:])


def core_busy_seconds() -> dict[int, float]:
    """CPU seconds each core has been busy so far, by everything (steal time included); Linux only."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                busy[int(name[3:])] = _busy_seconds(values)
    return busy


def own_cpu_seconds() -> float:
    """user + system CPU seconds of this process."""
    times = os.times()
    return times.user + times.system


class OtherLoad:
    """What other processes took of the machine's CPU since this was made: every core's busy time minus this
    process's and `ours()`'s (CPU seconds of processes the benchmark started: workers, a server)."""

    def __init__(self, ours: Callable[[], float] = lambda: 0.0) -> None:
        self.ours = ours
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), machine_busy_seconds(), own_cpu_seconds() + self.ours()

    def wall(self) -> float:
        return time.perf_counter() - self.start[0]

    def cores(self) -> float:
        """Their load in cores (the counters' granularity can make it dip below 0: it is clamped)."""
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, self._sample()
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-9)

    def share(self) -> float:
        """Their share of all the machine's cores."""
        return self.cores() / os.cpu_count()


def wait_for_quiet(limit_s: float, threshold: float = 0.1, ours: Callable[[], float] = lambda: 0.0
                   ) -> tuple[float, float]:
    """Waits (up to limit_s) until other processes use less than `threshold` of a core over 2 s, so that a run starts
    on a quiet machine (others edit and test on it). Returns (seconds waited, their load in cores)."""
    start = time.perf_counter()
    while True:
        others = OtherLoad(ours)
        time.sleep(2.0)
        load, waited = others.cores(), time.perf_counter() - start
        if load < threshold or waited >= limit_s:
            return waited, load


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """user + system CPU seconds of a process (all its threads) or of one of its threads; 0 if it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side_thread_cpu_seconds() -> float:
    """CPU seconds of this process's threads other than the main one (queue feeder threads pickle what goes to the
    pool, on the engine's core)."""
    pid = os.getpid()
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    except OSError:
        return 0.0
    return sum(proc_cpu_seconds(pid, tid) for tid in tids)


class CpuMeter:
    """Load that other processes put on the engine's core and on the pool's core: each core's busy time minus what
    this process (pinned to the engine core) and the pool workers (pinned to the pool core) used there."""

    def __init__(self, engine_core: int, pool_core: int, worker_pids: list[int]) -> None:
        self.cores, self.pids = (engine_core, pool_core), worker_pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, dict[int, float], float, float]:
        workers = sum(proc_cpu_seconds(pid) for pid in self.pids)
        return time.perf_counter(), core_busy_seconds(), proc_cpu_seconds(os.getpid()), workers

    def shares(self) -> tuple[float, float, float]:
        """Shares of the time since the start: other processes on the engine core, other processes on the pool core,
        the pool workers."""
        (t0, busy0, own0, workers0), (t1, busy1, own1, workers1) = self.start, self._sample()
        engine_core, pool_core = self.cores
        wall = max(t1 - t0, 1e-9)
        engine = (busy1[engine_core] - busy0[engine_core]) - (own1 - own0)
        pool = (busy1[pool_core] - busy0[pool_core]) - (workers1 - workers0)
        return max(0.0, engine) / wall, max(0.0, pool) / wall, (workers1 - workers0) / wall


def read_bandwidth(gib: float, repeats: int) -> list[float]:
    """Read GB/s of `x.sum()` over a `gib` GiB fp32 tensor with torch's present thread count (one warm-up, then
    `repeats` timed sums): the limit that weight and KV reads are set against."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    rates = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        x.sum().item()
        if i:
            rates.append(x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return rates
