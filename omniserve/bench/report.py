"""What benchmark reports share: figures over repeats (median [min-max], percentiles), tables as plain text or
markdown, the lines that say how a run was made (command, machine, revision) and the engine's integrity check."""

from __future__ import annotations

import math
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


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
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "omniserve"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def engine_integrity(engine, tag: str = "") -> str:
    """The engine's integrity check (every page, host KV byte and offloaded row accounted for) as text for the
    report: "ok", or "FAILED: ..." with a warning on stderr."""
    try:
        engine.check_integrity()
    except AssertionError as error:
        print(f"warning: {tag + ': ' if tag else ''}engine integrity check failed: {error}", file=sys.stderr)
        return f"FAILED: {error}"
    return "ok"
