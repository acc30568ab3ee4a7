"""PNG plots of a run: latency CDFs per class, and a timeline of LS TPOT and output throughput."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from omniserve.bench.metrics import Record, Slo  # noqa: E402

CLASS_NAMES = {"ls": "latency-sensitive", "be": "best-effort"}
COLORS = {"ls": "tab:blue", "be": "tab:orange"}


def latency_cdfs(records: list[Record], slos: dict[str, Slo], path: str | Path, title: str = "") -> None:
    """TTFT, TPOT and E2E CDFs, one line per class, the LS SLOs as dashed lines."""
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, metric in zip(axes, ("ttft", "tpot", "e2e")):
        for c in sorted({r.service_class for r in records}):
            values = np.sort([v for r in records if r.service_class == c and (v := getattr(r, metric)) is not None])
            if len(values):
                axis.step(values, np.arange(1, len(values) + 1) / len(values), where="post", color=COLORS.get(c),
                          label=CLASS_NAMES.get(c, c))
        for c, slo in slos.items():
            limit = getattr(slo, metric, None)
            if limit is not None:
                axis.axvline(limit, color=COLORS.get(c), linestyle="--", linewidth=1, label=f"{c.upper()} SLO")
        axis.set_xlabel(f"{metric.upper()} (s)")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share of completed requests")
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle(title or "latency CDFs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def timeline_plot(timeline: dict[str, list], slos: dict[str, Slo], path: str | Path, title: str = "") -> None:
    """Top: mean LS TPOT of the requests finishing in each bin, with the SLO. Bottom: output tokens/s per class."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    starts = timeline["start"]
    tpot = [np.nan if v is None else v for v in timeline.get("ls_tpot", [])]
    if tpot:
        top.plot(starts, tpot, marker=".", color=COLORS["ls"], label="LS TPOT (mean of requests ending)")
    if slos.get("ls") and slos["ls"].tpot is not None:
        top.axhline(slos["ls"].tpot, color="tab:red", linestyle="--", linewidth=1, label="TPOT SLO")
    top.set_ylabel("TPOT (s)")
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    for c in ("ls", "be"):
        if f"{c}_tokens_per_s" in timeline:
            bottom.step(starts, timeline[f"{c}_tokens_per_s"], where="post", color=COLORS[c],
                        label=f"{CLASS_NAMES[c]} tokens/s")
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel("time (s)")
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    figure.suptitle(title or "timeline")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def gain_heatmaps(panels: dict[str, list[tuple[float, float, float | None, str]]], path: str | Path, title: str = "",
                  xlabel: str = "", ylabel: str = "") -> None:
    """One heatmap per panel of (x, y, gain, note) cells on a grid of their distinct x and y values: colour on a log
    scale from 0.25x (red) through 1x to 4x (green), each cell annotated with its gain and note."""
    columns = max((len({c[0] for c in cells}) for cells in panels.values()), default=1)
    figure, axes = plt.subplots(1, len(panels), figsize=(max(3.0, 1.4 * columns) * len(panels) + 1, 4.6),
                                squeeze=False, layout="constrained")
    image = None
    for axis, (name, cells) in zip(axes[0], panels.items()):
        xs, ys = sorted({c[0] for c in cells}), sorted({c[1] for c in cells})
        grid = np.full((len(ys), len(xs)), np.nan)
        for x, y, gain, note in cells:
            row, column = ys.index(y), xs.index(x)
            if gain:
                grid[row, column] = np.log2(gain)
            axis.text(column, row, f"{gain:.2f}x\n{note}" if gain else f"-\n{note}", ha="center", va="center",
                      fontsize=7)
        image = axis.imshow(grid, cmap="RdYlGn", vmin=-2, vmax=2, origin="lower", aspect="auto")
        axis.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        axis.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        axis.set_xlabel(xlabel)
        axis.set_title(name, fontsize=9)
    axes[0][0].set_ylabel(ylabel)
    if image is not None:
        bar = figure.colorbar(image, ax=axes[0].tolist(), ticks=[-2, -1, 0, 1, 2])
        bar.ax.set_yticklabels(["0.25x", "0.5x", "1x", "2x", "4x"])
    figure.suptitle(title or "gain", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)
