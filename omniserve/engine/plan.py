"""What crosses the scheduler/runner boundary: plain data only, no tensors, no live objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from omniserve.sampling.params import SamplingParams
from omniserve.sampling.sampler import SampledToken


@dataclass(frozen=True)
class ScheduledChunk:
    """Some consecutive tokens of one request to run through the model this iteration."""

    request_id: str
    token_ids: list[int]
    start_position: int
    """Position of token_ids[0] in the request."""
    page_ids: list[int]
    """The request's KV pages, covering start_position + len(token_ids) tokens."""
    sample: bool
    """The chunk reaches the request's last token, so a new token is sampled from its last row."""
    params: SamplingParams
    num_generated: int
    """Tokens the request has generated so far."""


@dataclass(frozen=True)
class IterationPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    """The new token of every chunk that sampled, by request id."""
