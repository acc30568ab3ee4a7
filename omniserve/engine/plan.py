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
class OffloadedToken:
    """An offloaded request's newest token, entering layer 0 this iteration; it then advances about one layer per
    iteration as its CPU attention results come back."""

    request_id: str
    token_id: int
    position: int
    params: SamplingParams
    num_generated: int


@dataclass(frozen=True)
class KVTransfer:
    """Moves a request's KV for positions [0, num_tokens) between device pages and the host (swap-out or swap-in)."""

    request_id: str
    page_ids: list[int]
    num_tokens: int


@dataclass(frozen=True)
class IterationPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    """Device rows: prefill chunks and decode tokens whose attention runs on the device."""
    offloaded_starts: list[OffloadedToken] = field(default_factory=list)
    swap_outs: list[KVTransfer] = field(default_factory=list)
    """Copy these requests' KV to the host pool; their pages are freed once the runner reports the copy done."""
    swap_ins: list[KVTransfer] = field(default_factory=list)
    """Bring these requests' KV back from the host into the given (freshly allocated) pages."""
    max_returning_per_layer: int | None = None
    """Piggyback admission: at most this many CPU results re-enter the batch per layer (None: all that are ready)."""
    max_returning: int | None = None
    """... and at most this many in all, lowest layers first (None: no limit)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def request_ids(self) -> list[str]:
        """Every request this iteration runs rows of (device chunks, then offloaded tokens starting)."""
        return [c.request_id for c in self.chunks] + [t.request_id for t in self.offloaded_starts]

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.offloaded_starts or self.swap_outs or self.swap_ins)


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    """The new token of every chunk that sampled and of every offloaded token that finished the last layer."""
    swapped_out: list[str] = field(default_factory=list)
    """Swap-outs whose copy is complete: their device pages may be freed."""
    swapped_in: list[str] = field(default_factory=list)
    """Swap-ins whose KV is now in their device pages."""
    lost: list[str] = field(default_factory=list)
    """Offloaded requests whose host KV was lost with a dead worker: rebuild them from their tokens."""
    num_returned: int = 0
    """Offloaded rows whose CPU result re-entered the batch (they advanced a layer)."""
