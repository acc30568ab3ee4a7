"""What the server itself says about a run's offloaded tokens (decode attention in the CPU pool): the
`omniserve:offloaded_token_*` histograms of its /metrics, scraped before and after the run. Their difference is the
run's share; its mean is exact, its median estimated from the buckets as Prometheus' histogram_quantile does.

A server without these histograms (another engine, an older omniserve) or whose /metrics cannot be read gives
nothing, with one warning per run: the client-side figures do not depend on it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from omniserve.bench.client import auth_headers

logger = logging.getLogger(__name__)

FIGURES = {  # result key -> histogram name
    "iterations": "omniserve:offloaded_token_iterations",
    "seconds": "omniserve:offloaded_token_seconds",
    "layers_per_iteration": "omniserve:offloaded_token_layers_per_iteration",
}


@dataclass
class Histogram:
    """One histogram of one service class, summed over its other labels (the served model names)."""

    buckets: dict[float, float] = field(default_factory=dict)  # upper bound (le, +inf included) -> cumulative count
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.buckets.get(math.inf, 0.0)

    def since(self, before: Histogram | None) -> Histogram:
        """The observations made after `before` was taken."""
        if before is None or before.count > self.count:  # none then, or the server restarted: all of it is new
            return self
        return Histogram({le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()}, self.sum - before.sum)


Snapshot = dict[str, dict[str, Histogram]]  # figure -> service class -> histogram


def parse(text: str) -> Snapshot | None:
    """The three histograms of a Prometheus text exposition (nothing else is kept); None if any is missing."""
    figure_of = {name: figure for figure, name in FIGURES.items()}
    snapshot: Snapshot = {}
    for family in text_string_to_metric_families(text):
        figure = figure_of.get(family.name)
        if figure is None:
            continue
        per_class = snapshot.setdefault(figure, {})
        for sample in family.samples:
            histogram = per_class.setdefault(sample.labels.get("service_class", ""), Histogram())
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                histogram.buckets[le] = histogram.buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                histogram.sum += sample.value
    return snapshot if len(snapshot) == len(FIGURES) else None


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0 < q <= 1) of cumulative bucket counts, as Prometheus' histogram_quantile estimates it:
    linear inside the bucket that holds the rank (the first bucket starting at 0); a rank in the +Inf bucket gives
    the highest finite bound. None without observations."""
    bounds = sorted(buckets.items())
    if len(bounds) < 2 or bounds[-1][0] != math.inf or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    index = next(i for i, (_, count) in enumerate(bounds) if count >= rank)
    if index == len(bounds) - 1:
        return bounds[-2][0]
    upper, count = bounds[index]
    if index == 0 and upper <= 0:
        return upper
    lower, below = bounds[index - 1] if index else (0.0, 0.0)
    return lower + (upper - lower) * (rank - below) / (count - below)


def offloaded_tokens(before: Snapshot | None, after: Snapshot | None) -> dict[str, dict]:
    """{service class: {"count": tokens offloaded in the run, figure: {"mean", "p50"}, ...}} for each class the
    server has timed offloaded tokens of; {} when either scrape gave nothing."""
    if before is None or after is None:
        return {}
    out = {}
    for service_class in sorted(after["iterations"], key=lambda c: (c != "ls", c)):  # LS first, as the summary
        runs = {figure: after[figure].get(service_class, Histogram()).since(before[figure].get(service_class))
                for figure in FIGURES}
        out[service_class] = {"count": round(runs["iterations"].count), **{
            figure: {"mean": run.sum / run.count if run.count > 0 else None, "p50": bucket_quantile(0.5, run.buckets)}
            for figure, run in runs.items()}}
    return out


class Scraper:
    """Reads the histograms from one server's /metrics; warns the first time that gives nothing."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
        self.url = f"{base_url.rstrip('/')}/metrics"
        self.headers = auth_headers(api_key)
        self.timeout = timeout
        self.warned = False

    def snapshot(self) -> Snapshot | None:
        try:
            response = httpx.get(self.url, headers=self.headers, timeout=self.timeout)
            response.raise_for_status()
            snapshot = parse(response.text)
            reason = "it has no omniserve:offloaded_token_* histograms"
        except Exception as exc:  # whatever the server answers (or not), the run goes on without these figures
            snapshot, reason = None, f"{type(exc).__name__}: {exc}"[:200]
        if snapshot is None and not self.warned:
            logger.warning("no offloaded-token figures from %s: %s", self.url, reason)
            self.warned = True
        return snapshot
