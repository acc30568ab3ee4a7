"""Per-class figures of a run, with vLLM's definitions: TTFT, TPOT = (e2e - ttft) / (output tokens - 1), ITL (the
gaps between chunks), E2E; mean, median, p90, p99 of each. SLO attainment is the share of the class's requests that
completed within both the TTFT and the TPOT SLO (a one-token answer has no TPOT); rejected, failed and cancelled
requests count as misses. Goodput is the requests per second that met the SLOs. Output tokens/s counts the tokens
received during the arrival window (the same window for every policy of a comparison, however long the drain)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

STATUSES = ("ok", "rejected", "failed", "cancelled")


@dataclass
class Record:
    """What happened to one request; times are seconds from the start of the run. `arrival` is when it was due
    (the open-loop schedule; latencies count from there, so a client that falls behind cannot hide the wait)."""

    service_class: str
    arrival: float
    input_len: int
    output_len: int
    status: str = "pending"  # ok | rejected | failed | cancelled
    error: str = ""
    sent: float | None = None
    token_times: list[float] = field(default_factory=list)  # each chunk that carried text
    output_tokens: int = 0  # usage.completion_tokens when the server reports it, else the chunks with text
    end: float | None = None
    text: str | None = None  # the answer's text, kept only when the run asks for it (run_streams' keep_text)

    @property
    def ttft(self) -> float | None:
        if self.status != "ok":
            return None
        return (self.token_times[0] if self.token_times else self.end) - self.arrival

    @property
    def e2e(self) -> float | None:
        return self.end - self.arrival if self.status == "ok" else None

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output tokens - 1), vLLM's definition; None below two tokens."""
        if self.status != "ok" or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass(frozen=True)
class Slo:
    ttft: float | None = None  # seconds
    tpot: float | None = None

    @property
    def defined(self) -> bool:
        return self.ttft is not None or self.tpot is not None

    def met(self, record: Record) -> bool:
        if record.status != "ok":
            return False
        tpot = record.tpot
        return ((self.ttft is None or record.ttft <= self.ttft)
                and (self.tpot is None or tpot is None or tpot <= self.tpot))


def stats(values: list[float]) -> dict[str, float | int | None]:
    """mean, median, p90, p99 (numpy's linear interpolation) and the count; None for no values."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None}
    array = np.asarray(values, dtype=float)
    return {"count": len(values), "mean": float(array.mean()), "median": float(np.median(array)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99))}


def token_times(record: Record) -> tuple[list[float], float]:
    """The record's chunk times and the tokens each stands for: usage / chunks for a completed request (a chunk may
    carry several tokens), one each otherwise."""
    if not record.token_times:
        return [], 0.0
    if record.status == "ok" and record.output_tokens:
        return record.token_times, record.output_tokens / len(record.token_times)
    return record.token_times, 1.0


def tokens_in(records: list[Record], begin: float, end: float) -> float:
    total = 0.0
    for record in records:
        times, weight = token_times(record)
        total += weight * sum(begin <= t < end for t in times)
    return float(total)


def summarize_class(records: list[Record], duration: float, run_seconds: float, slo: Slo) -> dict:
    ok = [r for r in records if r.status == "ok"]
    counts = collections.Counter(r.status for r in records)
    errors = collections.Counter(r.error for r in records if r.status in ("failed", "cancelled"))
    met = sum(slo.met(r) for r in records)
    summary = {
        "requests": len(records),
        **{status: counts.get(status, 0) for status in STATUSES},
        "errors": dict(errors.most_common(5)),
        "ttft": stats([r.ttft for r in ok]),
        "tpot": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl": stats([gap for r in ok for gap in r.itls]),
        "e2e": stats([r.e2e for r in ok]),
        "input_tokens": sum(r.input_len for r in ok),
        "output_tokens": round(sum(weight * len(times) for times, weight in map(token_times, records))),
        "output_throughput": tokens_in(records, 0.0, duration) / duration,
        "request_throughput": len(ok) / run_seconds if run_seconds else 0.0,
    }
    if slo.defined:
        summary["slo_attainment"] = met / len(records) if records else None
        summary["ttft_attainment"] = (sum(r.status == "ok" and (slo.ttft is None or r.ttft <= slo.ttft)
                                          for r in records) / len(records)) if records else None
        summary["goodput"] = met / duration
    return summary


def summarize(records: list[Record], duration: float, run_seconds: float, slos: dict[str, Slo]) -> dict[str, dict]:
    """{class: figures} for each class that sent anything (see the module docstring)."""
    classes = sorted({r.service_class for r in records}, key=lambda c: (c != "ls", c))  # LS first
    return {c: summarize_class([r for r in records if r.service_class == c], duration, run_seconds,
                               slos.get(c, Slo())) for c in classes}


def timeline(records: list[Record], run_seconds: float, bin_s: float) -> dict[str, list]:
    """Per bin of `bin_s` seconds: the mean TPOT of LS requests that finished in it, the LS requests that arrived in
    it, and each class's output tokens/s."""
    edges = [i * bin_s for i in range(int(run_seconds // bin_s) + 2)]  # the last bin holds the run's end
    out: dict[str, list] = {"start": edges[:-1]}
    ls_done = [(r.end, r.tpot) for r in records if r.service_class == "ls" and r.tpot is not None]
    out["ls_tpot"] = [float(np.mean(v)) if (v := [tpot for end, tpot in ls_done if a <= end < b]) else None
                      for a, b in zip(edges, edges[1:])]
    out["ls_arrivals"] = [sum(a <= r.arrival < b for r in records if r.service_class == "ls")
                          for a, b in zip(edges, edges[1:])]
    for c in sorted({r.service_class for r in records}):
        mine = [r for r in records if r.service_class == c]
        out[f"{c}_tokens_per_s"] = [tokens_in(mine, a, b) / bin_s for a, b in zip(edges, edges[1:])]
    return out
