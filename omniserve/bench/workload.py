"""What a benchmark sends: arrival times and prompt/output lengths for each stream (LS or BE), fixed by a seed.

Arrivals are one of: Poisson or gamma (burstiness = gamma shape; 1 is Poisson, < 1 burstier) at a rate; rate steps
(a new rate drawn uniformly every period); fixed concurrency (closed loop: no times, the client keeps N in flight);
or the timestamps of a real trace (Azure LLM inference 2023 CSV, Mooncake JSONL), scaled in time.

Lengths come from the trace, from the ShareGPT prompt pool (real text: the first human turn, cut to a maximum), or
are synthetic (random token ids of the given length, as vLLM's `random` dataset). The output length is enforced
with `max_tokens` and `ignore_eos`, so it is what the workload says, whatever the model would have written.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# The project's shared workload data: `shared/data` beside the checkout, unless $OMNISERVE_DATA_DIR says elsewhere.
DATA_DIR = Path(os.environ.get("OMNISERVE_DATA_DIR") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
SHAREGPT = DATA_DIR / "sharegpt" / "prompts_2978.json"
SHAREGPT_500 = DATA_DIR / "sharegpt" / "prompts_500.json"
TRACES = {
    "azure-code": DATA_DIR / "azure-llm-2023" / "code.csv",
    "azure-conv": DATA_DIR / "azure-llm-2023" / "conv.csv",
    "mooncake": DATA_DIR / "mooncake" / "conversation_trace.jsonl",
}


class WorkloadError(ValueError):
    """The workload cannot be built as asked; the message says why."""


@dataclass(frozen=True)
class Request:
    """One request of a stream: when it is sent (None: as soon as a concurrency slot frees) and what it asks."""

    arrival: float | None
    prompt: str | list[int]
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Trace:
    """A trace's arrivals (seconds from its first request) with each request's input and output lengths."""

    times: list[float]
    input_lens: list[int]
    output_lens: list[int]
    blocks: list[tuple[int, ...]] | None = None
    """Per request, the hashes of its prompt's blocks of BLOCK_TOKENS tokens (equal hashes: equal text, and every
    block before them equal too), where the trace has them (Mooncake's `hash_ids`)."""


BLOCK_TOKENS = 512
"""Tokens per hashed prompt block in a trace that has them (Mooncake's)."""


# ------------------------------------------------------------------------------------------------------ arrivals
def gamma_arrivals(rng: random.Random, rate: float, duration: float, burstiness: float = 1.0,
                   start: float = 0.0) -> list[float]:
    """Arrival times in [start, start + duration): gaps drawn from a gamma distribution of mean 1/rate and shape
    `burstiness` (coefficient of variation 1/sqrt(burstiness); shape 1 is the exponential, i.e. Poisson)."""
    if rate <= 0 or burstiness <= 0:
        raise WorkloadError(f"rate and burstiness must be positive (got {rate}, {burstiness})")
    times, t = [], start
    while True:
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        if t >= start + duration:
            return times
        times.append(t)


def rate_step_arrivals(rng: random.Random, low: float, high: float, period: float, duration: float,
                       burstiness: float = 1.0) -> list[float]:
    """Every `period` seconds a new rate is drawn uniformly in [low, high]; arrivals within a period are gamma."""
    if not 0 < low <= high or period <= 0:
        raise WorkloadError(f"rate steps need 0 < low <= high and a positive period (got {low}, {high}, {period})")
    times, start = [], 0.0
    while start < duration:
        span = min(period, duration - start)
        times += gamma_arrivals(rng, rng.uniform(low, high), span, burstiness, start)
        start += period
    return times


def load_trace(path: str | Path) -> Trace:
    """An Azure LLM inference 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens) or a Mooncake JSONL (timestamp in
    ms, input_length, output_length, hash_ids), by suffix; also a name of TRACES (`azure-code`, `azure-conv`,
    `mooncake`)."""
    path = TRACES.get(str(path), Path(path))
    try:
        with open(path) as f:
            if path.suffix == ".csv":
                rows = [(datetime.fromisoformat(r["TIMESTAMP"]).timestamp(), int(r["ContextTokens"]),
                         int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
            else:
                rows = [(r["timestamp"] / 1000.0, int(r["input_length"]), int(r["output_length"]),
                         tuple(map(int, r["hash_ids"])) if "hash_ids" in r else None)
                        for r in map(json.loads, filter(str.strip, f))]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise WorkloadError(f"cannot read the trace {path}: {exc}") from exc
    if not rows:
        raise WorkloadError(f"the trace {path} has no requests")
    rows.sort(key=lambda row: row[:3])
    first = rows[0][0]
    blocks = [row[3] for row in rows] if all(len(row) > 3 and row[3] is not None for row in rows) else None
    return Trace([row[0] - first for row in rows], [row[1] for row in rows], [row[2] for row in rows], blocks)


def trace_arrivals(trace: Trace, duration: float, time_scale: float = 1.0, offset: float = 0.0) -> list[int]:
    """Indices of the trace's requests that arrive in the window, once the trace's clock starts at `offset` seconds
    and runs `time_scale` times slower (2: half the rate); their times are `(times[i] - offset) * time_scale`."""
    if time_scale <= 0:
        raise WorkloadError(f"the time scale must be positive (got {time_scale})")
    return [i for i, t in enumerate(trace.times) if offset <= t and (t - offset) * time_scale < duration]


# ------------------------------------------------------------------------------------------------------- lengths
def sharegpt_texts(path: str | Path = SHAREGPT) -> list[str]:
    """The first human turn of each ShareGPT conversation in the file."""
    try:
        conversations = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"cannot read the ShareGPT prompts {path}: {exc}") from exc
    return [turns[0]["value"] for c in conversations if (turns := c.get("conversations")) and turns[0]["value"]]


class PromptMaker:
    """Prompts of a given length in tokens of the served model's tokenizer: ShareGPT text, or random token ids
    (special tokens left out, so that no random prompt holds an EOS or a chat-template marker)."""

    def __init__(self, tokenizer, rng: random.Random) -> None:
        self.tokenizer, self.rng = tokenizer, rng
        special = set(tokenizer.all_special_ids)
        self.ordinary_ids = [i for i in range(len(tokenizer)) if i not in special]
        self._texts: list[list[int]] | None = None

    def random(self, length: int) -> list[int]:
        return [self.rng.choice(self.ordinary_ids) for _ in range(max(1, length))]

    def sharegpt(self, max_len: int) -> tuple[str, int]:
        """A ShareGPT prompt (drawn at random), cut to at most `max_len` tokens; its text and length."""
        if self._texts is None:
            self._texts = [self.tokenizer.encode(t, add_special_tokens=False) for t in sharegpt_texts()]
        ids = self.rng.choice(self._texts)[:max_len]
        return self.tokenizer.decode(ids), len(ids)


def parse_range(text: str) -> tuple[int, int]:
    """`128` or `64:256` (uniform in between, both included)."""
    try:
        low, _, high = str(text).partition(":")
        low, high = int(low), int(high or low)
    except ValueError:
        raise WorkloadError(f"a length is N or LOW:HIGH, not {text!r}") from None
    if not 0 < low <= high:
        raise WorkloadError(f"a length range needs 0 < LOW <= HIGH, not {text!r}")
    return low, high


def parse_rate_steps(text: str) -> tuple[float, float, float]:
    """`LOW:HIGH:PERIOD` (req/s, req/s, seconds), e.g. `1:8:5`; rate_step_arrivals checks the values."""
    try:
        low, high, period = (float(x) for x in str(text).split(":"))
    except ValueError:
        raise WorkloadError(f"rate steps are LOW:HIGH:PERIOD, e.g. 1:8:5, not {text!r}") from None
    return low, high, period


# -------------------------------------------------------------------------------------------------------- stream
@dataclass(frozen=True)
class StreamSpec:
    """How one class's requests arrive and how long they are (see the module docstring); `rate` 0 with no other
    arrival source turns the stream off."""

    rate: float = 0.0
    burstiness: float = 1.0
    rate_steps: tuple[float, float, float] | None = None  # (low, high, period)
    concurrency: int = 0
    trace: str | None = None
    time_scale: float = 1.0
    trace_offset: float = 0.0
    dataset: str | None = None  # sharegpt | random | trace; default: trace with a trace, else sharegpt
    input_len: str = "512"
    output_len: str = "128"
    max_input_len: int | None = None
    max_output_len: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.rate > 0 or self.rate_steps or self.concurrency > 0 or self.trace)


def build_stream(spec: StreamSpec, duration: float, maker: PromptMaker, rng: random.Random,
                 max_requests: int | None = None) -> list[Request]:
    """The stream's requests in arrival order (closed loop: a pool of `max_requests`, default 1000, that the client
    cycles through)."""
    if not spec.enabled:
        return []
    trace = load_trace(spec.trace) if spec.trace else None
    indices: list[int] | None = None
    if trace is not None:
        indices = trace_arrivals(trace, duration, spec.time_scale, spec.trace_offset)
        times = [(trace.times[i] - spec.trace_offset) * spec.time_scale for i in indices]
    elif spec.rate_steps:
        times = rate_step_arrivals(rng, *spec.rate_steps, duration, spec.burstiness)
    elif spec.rate > 0:
        times = gamma_arrivals(rng, spec.rate, duration, spec.burstiness)
    else:
        times = [None] * (max_requests or 1000)
    dataset = spec.dataset or ("trace" if trace is not None else "sharegpt")
    if dataset == "trace" and trace is None:
        raise WorkloadError("lengths from a trace need a trace (--*-trace)")
    input_range, output_range = parse_range(spec.input_len), parse_range(spec.output_len)
    max_input = spec.max_input_len or 1 << 30
    max_output = spec.max_output_len or 1 << 30
    requests = []
    for n, arrival in enumerate(times):
        if dataset == "trace":
            input_len, output_len = trace.input_lens[indices[n]], trace.output_lens[indices[n]]
        else:
            input_len, output_len = rng.randint(*input_range), rng.randint(*output_range)
        input_len, output_len = min(max(input_len, 1), max_input), min(max(output_len, 1), max_output)
        if dataset == "sharegpt":
            prompt, input_len = maker.sharegpt(max_input)  # the real prompt's own length
        elif dataset in ("random", "trace"):
            prompt = maker.random(input_len)
        else:
            raise WorkloadError(f"unknown dataset {dataset!r}: sharegpt, random or trace")
        requests.append(Request(arrival, prompt, input_len, output_len))
    return requests


# ------------------------------------------------------------------------------- prompts of the offline benchmarks
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
