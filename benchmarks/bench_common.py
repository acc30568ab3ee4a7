"""What the benchmark scripts share: prompts from the ShareGPT data, figures over repeats, the checkout's revision,
and CPU accounting from /proc (others use this machine: every script reports how much of it they took)."""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------- CPU time
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
