"""Simulated workloads: arrival times (the benchmark's own generators and trace readers) with prompt and output
lengths drawn from real data where the project has it.

Length sources:
- `sharegpt`: LS chat. Prompt lengths of the ShareGPT first turns in shared/data (tokenized with the built-in
  tokenizer); output lengths of the Azure conversation trace (real chat answers; ShareGPT's replies are not shipped).
- `azure-code`, `azure-conv`, `mooncake`: the trace's own input and output lengths (drawn at random; replayed in
  the trace's order, each arrival with its own lengths and Mooncake's prompt blocks, when the class's arrivals are the
  same trace).
- `longbench`, `cnn`: the OmniServe paper's long-input BE sets, which are not shipped: gamma-distributed lengths
  with the means the paper publishes (its LongBench-v2 set 8,952 in / 136 out, far shorter than LongBench v2's own
  contexts; CNN/DailyMail 1,964 in / 397 out).
- `longbench-v2`: LongBench v2's own contexts (median 54k words, mean 104k, 8k to 2M), log-normal: most are longer
  than a model's window, so `max_input` (the served window) truncates them, as LongBench's harness does.
- `reasoning`: batch generation of reasoning traces, decode-heavy: about 1,000 tokens in, 4,000 out.
- `fixed:IN:OUT`: every request the same.

`SYNTHETIC` holds the synthetic sources' numbers and where each comes from; `length_sources()` lists every name.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from omniserve.bench import workload as bench_workload
from omniserve.bench.workload import WorkloadError
from omniserve.sampling.params import ServiceClass
from omniserve.simulator.sim import SimRequest

_SHAPE = 4.0  # gamma shape of the synthetic lengths: coefficient of variation 0.5
TOKENS_PER_WORD = 4 / 3
"""English text in a Llama-3-class tokenizer: about 100 tokens per 75 words (the usual rule of thumb), to turn a data
set's word counts into tokens."""


@dataclass(frozen=True)
class SyntheticLengths:
    """A length source made from a data set's published statistics (the data itself is not shipped). Outputs are
    gamma-distributed around `mean_output`; inputs too around `mean_input`, unless `median_input` is given: then
    they are log-normal with that median and mean (a heavy tail, as long-document sets have), clamped to the set's
    [min_input, max_input]."""

    mean_input: float
    mean_output: float
    median_input: float | None = None
    min_input: int = 1
    max_input: int = 1 << 40
    source: str = ""
    """Where the numbers come from."""

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if self.median_input is None:
            input_len = rng.gammavariate(_SHAPE, self.mean_input / _SHAPE)
        else:  # log-normal: median e^mu, mean e^(mu + sigma^2 / 2)
            sigma = math.sqrt(2 * math.log(self.mean_input / self.median_input))
            input_len = min(max(rng.lognormvariate(math.log(self.median_input), sigma), self.min_input),
                            self.max_input)
        return round(input_len), round(rng.gammavariate(_SHAPE, self.mean_output / _SHAPE))


SYNTHETIC = {
    "longbench": SyntheticLengths(8952, 136, source="the OmniServe paper's LongBench-v2 BE set: its means"),
    "cnn": SyntheticLengths(1964, 397, source="the OmniServe paper's CNN/DailyMail BE set: means"),
    # LongBench v2 (Bai et al., arXiv 2412.15204, section 1 and Table 1): 503 questions whose contexts run from 8k
    # to 2M words (shorter documents are rejected at 8,192 words), median 54k words, mean 104k. Outputs: the
    # OmniServe paper's mean on this set (136 tokens; LongBench v2's harness allows 128 new tokens for a direct
    # answer, 1,024 with chain of thought).
    "longbench-v2": SyntheticLengths(
        104_000 * TOKENS_PER_WORD, 136, median_input=54_000 * TOKENS_PER_WORD, min_input=round(8_192 * TOKENS_PER_WORD),
        max_input=round(2_000_000 * TOKENS_PER_WORD),
        source="LongBench v2's published context lengths in words (arXiv 2412.15204) x 4/3 tokens per word"),
    # Not a data set: an assumed shape for batch generation of reasoning traces (a problem with its instructions
    # in, a chain of thought out, as R1-style reasoning models write thousands of tokens per problem).
    "reasoning": SyntheticLengths(1000, 4000, source="assumed: reasoning-trace generation, ~1,000 in / 4,000 out"),
}


def length_sources() -> list[str]:
    """Every length source's name (`fixed:IN:OUT` stands for any fixed pair)."""
    return ["sharegpt", *bench_workload.TRACES, *SYNTHETIC, "fixed:IN:OUT"]


def sharegpt_lengths_cache_path() -> Path:
    """Where the ShareGPT prompts' token counts are cached: named by the prompts file's size and time, so that a new
    file is counted again."""
    from omniserve.config import cache_dir

    source = bench_workload.SHAREGPT
    try:
        stat = source.stat()
    except OSError as exc:
        raise WorkloadError(f"no ShareGPT prompts at {source}: {exc}") from exc
    return cache_dir() / f"sharegpt-lengths-{stat.st_size}-{int(stat.st_mtime)}.json"


@functools.lru_cache(maxsize=1)
def sharegpt_prompt_lengths() -> tuple[int, ...]:
    """Token counts of the ShareGPT prompts (built-in tokenizer), cached beside the latency profiles: loading the
    tokenizer takes seconds, and a simulation should not. Computing them needs torch (the model's tokenizer comes
    from its GGUF file); reading them back does not."""
    source, cached = bench_workload.SHAREGPT, sharegpt_lengths_cache_path()
    if cached.is_file():
        return tuple(json.loads(cached.read_text()))
    try:
        from omniserve.models.loader import resolve_model
        from omniserve.tokenizer import load_tokenizer
    except ImportError as exc:
        raise WorkloadError(f"the ShareGPT prompt lengths are not cached ({cached}) and counting them needs the "
                            f"built-in tokenizer, which needs torch ({exc}): run once where torch is installed, or "
                            "choose other lengths (fixed:IN:OUT, a trace's)") from exc

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
    elif source in SYNTHETIC:
        input_len, output_len = SYNTHETIC[source].draw(rng)
    else:
        input_len, output_len = _fixed_lengths(source)
    return min(max(1, input_len), max_input), min(max(1, output_len), max_output)


def _fixed_lengths(source: str) -> tuple[int, int]:
    """(IN, OUT) of `fixed:IN:OUT`; any other unknown source is an error that lists the known ones."""
    if not source.startswith("fixed:"):
        raise WorkloadError(f"unknown length source {source!r}: {', '.join(length_sources())}")
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
        if self.lengths not in {"sharegpt", *bench_workload.TRACES, *SYNTHETIC}:
            _fixed_lengths(self.lengths)


def arrivals(load: ClassLoad, duration: float, rng: random.Random) -> list[float]:
    if load.trace:
        return [t for t, _, _ in trace_rows(load, duration)]
    if load.rate_steps:
        return bench_workload.rate_step_arrivals(rng, *load.rate_steps, duration, load.burstiness)
    if load.rate > 0:
        return bench_workload.gamma_arrivals(rng, load.rate, duration, load.burstiness)
    return []


def trace_rows(load: ClassLoad, duration: float) -> list[tuple[float, int, int]]:
    """(arrival, the trace's request index, pass) of a trace's requests in the window. A trace shorter than the
    experiment repeats, shifted by its own length (pass 1, 2, ...)."""
    trace = _trace(load.trace)
    scale = load.time_scale
    if load.rate > 0:  # a mean rate asked of the trace: stretch it to that
        span = trace.times[-1] or 1.0
        scale = len(trace.times) / span / load.rate
    span = (trace.times[-1] + (trace.times[-1] / max(1, len(trace.times) - 1))) * scale
    rows, offset, repeat = [], 0.0, 0
    while offset < duration and span > 0:
        rows += [(offset + t * scale, i, repeat) for i, t in enumerate(trace.times) if offset + t * scale < duration]
        offset += span
        repeat += 1
    return rows


def build_workload(loads: dict[ServiceClass, ClassLoad], duration: float, seed: int) -> list[SimRequest]:
    """Both classes' requests, sorted by arrival; each class draws from its own seeded generator. A class whose
    lengths are its arrival trace's replays the trace's requests as they are: each arrival's own lengths, and its
    prompt blocks where the trace has them (Mooncake's: the prefix cache finds what they share; a repeat of the
    trace shares nothing with the pass before)."""
    requests = []
    for service_class, load in loads.items():
        service_class = ServiceClass(service_class)
        if load.trace and load.lengths == load.trace:
            requests += _replay(load, service_class, duration)
            continue
        rng = random.Random(f"{seed}-{service_class.value}")
        for t in arrivals(load, duration, rng):
            input_len, output_len = draw_lengths(load.lengths, rng, load.max_input, load.max_output)
            requests.append(SimRequest(t, service_class, input_len, output_len))
    return sorted(requests, key=lambda r: r.arrival)


def _replay(load: ClassLoad, service_class: ServiceClass, duration: float) -> list[SimRequest]:
    trace = _trace(load.trace)
    requests = []
    for t, i, repeat in trace_rows(load, duration):
        blocks = () if trace.blocks is None else tuple((repeat << 40) + block for block in trace.blocks[i])
        requests.append(SimRequest(t, service_class, min(max(1, trace.input_lens[i]), load.max_input),
                                   min(max(1, trace.output_lens[i]), load.max_output), blocks))
    return requests
