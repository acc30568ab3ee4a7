"""Simulated workloads: arrival times (the benchmark's own generators and trace readers) with prompt and output
lengths drawn from real data where the project has it.

Length sources:
- `sharegpt`: LS chat. Prompt lengths of the ShareGPT first turns in shared/data (tokenized with the built-in
  tokenizer); output lengths of the Azure conversation trace (real chat answers; ShareGPT's replies are not shipped).
- `azure-code`, `azure-conv`, `mooncake`: the trace's own input and output lengths.
- `longbench`, `cnn`: the OmniServe paper's long-input BE sets, which are not shipped: gamma-distributed lengths
  with their published means (LongBench-v2 8,952 in / 136 out; CNN/DailyMail 1,964 in / 397 out).
- `fixed:IN:OUT`: every request the same.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

from omniserve.bench import workload as bench_workload
from omniserve.bench.workload import WorkloadError
from omniserve.simulator.sim import SimRequest

PUBLISHED_MEANS = {"longbench": (8952, 136), "cnn": (1964, 397)}
_SHAPE = 4.0  # gamma shape of the synthetic lengths: coefficient of variation 0.5


@functools.lru_cache(maxsize=1)
def sharegpt_prompt_lengths() -> tuple[int, ...]:
    """Token counts of the ShareGPT prompts (built-in tokenizer), cached beside the latency profiles: loading the
    tokenizer takes seconds, and a simulation should not."""
    from omniserve.profiler.profiler import cache_dir

    source = bench_workload.SHAREGPT
    try:
        stat = source.stat()
    except OSError as exc:
        raise WorkloadError(f"no ShareGPT prompts at {source}: {exc}") from exc
    cached = cache_dir() / f"sharegpt-lengths-{stat.st_size}-{int(stat.st_mtime)}.json"
    if cached.is_file():
        return tuple(json.loads(cached.read_text()))
    from omniserve.models.loader import resolve_model
    from omniserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(*resolve_model(None, "auto"))
    texts = bench_workload.sharegpt_texts(source)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(lengths))
    return tuple(lengths)


@functools.lru_cache(maxsize=4)
def _trace(name: str) -> bench_workload.Trace:
    return bench_workload.load_trace(name)


def draw_lengths(source: str, rng: random.Random, max_input: int, max_output: int) -> tuple[int, int]:
    """One (input, output) length pair from the source, capped."""
    if source == "sharegpt":
        input_len = rng.choice(sharegpt_prompt_lengths())
        output_len = rng.choice(_trace("azure-conv").output_lens)
    elif source in bench_workload.TRACES:
        trace = _trace(source)
        i = rng.randrange(len(trace.times))
        input_len, output_len = trace.input_lens[i], trace.output_lens[i]
    elif source in PUBLISHED_MEANS:
        mean_in, mean_out = PUBLISHED_MEANS[source]
        input_len = round(rng.gammavariate(_SHAPE, mean_in / _SHAPE))
        output_len = round(rng.gammavariate(_SHAPE, mean_out / _SHAPE))
    else:
        input_len, output_len = _fixed_lengths(source)
    return min(max(1, input_len), max_input), min(max(1, output_len), max_output)


def _fixed_lengths(source: str) -> tuple[int, int]:
    """(IN, OUT) of `fixed:IN:OUT`; any other unknown source is an error that lists the known ones."""
    if not source.startswith("fixed:"):
        raise WorkloadError(f"unknown length source {source!r}: sharegpt, azure-code, azure-conv, mooncake, "
                            "longbench, cnn or fixed:IN:OUT")
    try:
        input_len, output_len = (int(x) for x in source.split(":")[1:])
    except ValueError:
        raise WorkloadError(f"fixed lengths are fixed:IN:OUT, not {source!r}") from None
    return input_len, output_len


@dataclass(frozen=True)
class ClassLoad:
    """One class's arrivals and lengths: a rate (gamma, `burstiness` shape; Poisson at 1), rate steps
    (low, high, period), or a trace's arrivals (time-scaled; `rate` then rescales the trace to that mean rate)."""

    rate: float = 0.0
    burstiness: float = 1.0
    rate_steps: tuple[float, float, float] | None = None
    trace: str | None = None
    time_scale: float = 1.0
    lengths: str = "sharegpt"
    max_input: int = 1 << 30
    max_output: int = 1 << 30

    def __post_init__(self) -> None:  # a bad source fails here, not after the arrivals of a long run are drawn
        if self.lengths not in {"sharegpt", *bench_workload.TRACES, *PUBLISHED_MEANS}:
            _fixed_lengths(self.lengths)


def arrivals(load: ClassLoad, duration: float, rng: random.Random) -> list[float]:
    if load.trace:
        trace = _trace(load.trace)
        scale = load.time_scale
        if load.rate > 0:  # a mean rate asked of the trace: stretch it to that
            span = trace.times[-1] or 1.0
            scale = len(trace.times) / span / load.rate
        # A trace shorter than the experiment repeats, shifted by its own length.
        span = (trace.times[-1] + (trace.times[-1] / max(1, len(trace.times) - 1))) * scale
        times, offset = [], 0.0
        while offset < duration and span > 0:
            times += [offset + t * scale for t in trace.times if offset + t * scale < duration]
            offset += span
        return times
    if load.rate_steps:
        return bench_workload.rate_step_arrivals(rng, *load.rate_steps, duration, load.burstiness)
    if load.rate > 0:
        return bench_workload.gamma_arrivals(rng, load.rate, duration, load.burstiness)
    return []


def build_workload(loads: dict[str, ClassLoad], duration: float, seed: int) -> list[SimRequest]:
    """Both classes' requests, sorted by arrival; each class draws from its own seeded generator."""
    requests = []
    for service_class, load in loads.items():
        rng = random.Random(f"{seed}-{service_class}")
        for t in arrivals(load, duration, rng):
            input_len, output_len = draw_lengths(load.lengths, rng, load.max_input, load.max_output)
            requests.append(SimRequest(t, service_class, input_len, output_len))
    return sorted(requests, key=lambda r: r.arrival)
