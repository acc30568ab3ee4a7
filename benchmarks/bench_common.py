"""What the benchmark scripts share: prompts from the ShareGPT data, figures over repeats, report tables and the lines
around them, the checkout's revision, read bandwidth, and CPU accounting from /proc (others use this machine: every
script reports how much of it they took, and some wait for it to go quiet)."""

from __future__ import annotations

import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from omniserve.bench.workload import DATA_DIR, sharegpt_texts

SHAREGPT_500 = DATA_DIR / "sharegpt" / "prompts_500.json"
SHAREGPT_2978 = DATA_DIR / "sharegpt" / "prompts_2978.json"


# ----------------------------------------------------------------------------------------------------- prompts
def shuffled_texts(path: Path, seed: int) -> list[str] | None:
    """The file's ShareGPT first human turns in a seeded order; None if the file is missing."""
    if not path.is_file():
        return None
    texts = [t for t in sharegpt_texts(path) if t.strip()]
    random.Random(seed).shuffle(texts)
    return texts


def load_prompts(tokenizer, count: int, length: int, vocab: int, seed: int, path: Path = SHAREGPT_500
                 ) -> list[list[int]]:
    """`count` prompts of exactly `length` ids: ShareGPT first human turns, truncated (or repeated to length when
    short); random ids if the data set or the tokenizer is missing."""
    texts = shuffled_texts(path, seed) if tokenizer is not None else None
    if texts is None:
        print(f"note: {path} or tokenizer missing, using random token ids", file=sys.stderr)
        rng = random.Random(seed)
        return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(count)]
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids:
            prompts.append((ids * (length // len(ids) + 1))[:length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"{path} has fewer than {count} usable prompts")


# ----------------------------------------------------------------------------------------------------- figures
def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Median with the min-max range when there are several values: `1.23 [1.10-1.40]`; `-` for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    median = fmt.format(statistics.median(values))
    return median if len(values) == 1 else f"{median} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def table(columns: dict[str, str], rows: list[dict], sep: str = "  ", edge: str = "") -> list[str]:
    """The rows (dicts keyed like `columns`) as lines of cells padded to their column, under the column titles and a
    rule: plain text by default, markdown with sep=" | " and edge="| "."""
    widths = {k: max(len(title), *(len(str(r[k])) for r in rows)) for k, title in columns.items()}
    cells = [list(columns.values()), ["-" * widths[k] for k in columns]]
    cells += [[str(r[k]) for k in columns] for r in rows]
    return [(edge + sep.join(c.ljust(widths[k]) for k, c in zip(columns, line)) + edge[::-1]).rstrip()
            for line in cells]


def tables_text(tables: list[tuple[dict[str, str], list[dict]]], markdown: bool = False) -> list[str]:
    """(columns, rows) tables one after the other, each after a blank line."""
    lines = []
    for columns, rows in tables:
        lines += ["", *(table(columns, rows, " | ", "| ") if markdown else table(columns, rows))]
    return lines


def print_report(info: list[str], tables: list[tuple[dict[str, str], list[dict]]]) -> None:
    """The report's lines (command, machine, workload, ...) and its tables, on stdout."""
    print("\n" + "\n".join(info) + "\n" + "\n".join(tables_text(tables)))


def write_markdown(path: Path | None, title: str, info: list[str], tables: list[tuple[dict[str, str], list[dict]]],
                   extra: list[str] = ()) -> None:
    """The report as a section for BENCHMARKS.md (nothing without a path): its lines as bullets, then the tables."""
    if path is None:
        return
    section = [f"## {title}", "", *(f"- {line}" for line in info), *tables_text(tables, markdown=True), *extra]
    path.write_text("\n".join(section) + "\n")
    print(f"\nwrote {path}")


def command_line() -> str:
    """How this script was started, for the command line of a report."""
    return shlex.join(["python", *sys.argv])


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a report."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def git_revision() -> str:
    """The checkout's commit, with `+dirty` when omniserve/ has uncommitted changes (the engine is being edited)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "omniserve"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


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


# ----------------------------------------------------------------------------------------------------- CPU time
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


def engine_integrity(engine, tag: str = "") -> str:
    """The engine's integrity check (every page, host KV byte and offloaded row accounted for) as text for the
    report: "ok", or "FAILED: ..." with a warning on stderr."""
    try:
        engine.check_integrity()
    except AssertionError as error:
        print(f"warning: {tag + ': ' if tag else ''}engine integrity check failed: {error}", file=sys.stderr)
        return f"FAILED: {error}"
    return "ok"
