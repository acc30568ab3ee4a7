"""What crosses the scheduler/runner boundary: plain data only, no tensors, no live objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omniserve.engine.scheduler.latency_model import BatchShape
from omniserve.sampling.params import SampledToken, SamplingParams

if TYPE_CHECKING:
    from omniserve.sampling.structured import RequestGrammar


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
    grammar: RequestGrammar | None = None
    """The request's structured-output state: its sampled row is masked to what it allows."""
    seen_token_ids: list[int] | None = None
    """A request with penalties: its prompt and generated tokens so far (the request's own list, not a copy)."""


@dataclass(frozen=True)
class OffloadedToken:
    """An offloaded request's newest token, entering layer 0 this iteration; it then advances a layer each time its
    CPU attention result comes back in time for that layer's output projection (see OffloadedPipeline)."""

    request_id: str
    token_id: int
    position: int
    params: SamplingParams
    num_generated: int
    grammar: RequestGrammar | None = None
    seen_token_ids: list[int] | None = None


@dataclass(frozen=True)
class KVTransfer:
    """Moves a request's KV for positions [0, num_tokens) between device pages and the host (swap-out or swap-in)."""

    request_id: str
    page_ids: list[int]
    num_tokens: int
    final_tokens: int = 0
    """Swap-out: the tokens of KV the request holds once it has generated all it may, which the host is asked to
    keep room for (the scheduler counts host capacity the same way), less its host prefix's."""
    cached_tokens: int = 0
    """Swap-in: the first tokens whose pages were found in the prefix cache (taken, not written again)."""
    host_prefix_pages: tuple[int, ...] = ()
    """Swap-out: host-tier pages holding the request's first tokens, which its host KV reads in place: only the
    tokens after them are copied (PageTable.hold_host_prefix)."""

    def host_tokens(self, page_size: int) -> int:
        """Swap-out: the tokens of host KV placement keeps room for: the request's own after its host prefix now, or
        when done, whichever is more (CPUAttentionPool.load counts the same)."""
        return max(self.num_tokens - len(self.host_prefix_pages) * page_size, self.final_tokens)


@dataclass(frozen=True)
class OffloadedPipeline:
    """How far offloaded rows may go in one iteration beyond the rows the plan admits (`returning`,
    `offloaded_starts`): at layer l, any offloaded row whose CPU result for layer l is back (sent at layer l earlier in
    this iteration, or in an earlier one) joins layer l's output projection and goes on to layer l + 1, while at most
    `row_limit` offloaded rows run a layer's dense work. The device may wait for results, `wait_s` in all."""

    row_limit: int | None = None
    """Most offloaded rows in one layer's dense work (None: no limit). 0: only the admitted rows join, one layer per
    iteration (the OmniServe paper's pipeline)."""
    wait_s: float = 0.0
    """Seconds the device may spend, over the whole iteration, waiting at a layer for the CPU results of the rows
    sent at that layer; spent greedily, layer by layer, until it is used up (NEO's synchronous pipeline: enough for
    every row at every layer)."""
    planned_s: float | None = None
    """The iteration's predicted seconds with `row_limit` rows at every layer and the whole wait spent, corrected
    as the time budget is (None: no latency model): what the plan was checked against its budget with."""


ONE_LAYER = OffloadedPipeline(row_limit=0)


@dataclass(frozen=True)
class IterationPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    """Device rows: prefill chunks and decode tokens whose attention runs on the device."""
    offloaded_starts: list[OffloadedToken] = field(default_factory=list)
    returning: list[tuple[str, int]] = field(default_factory=list)
    """Piggyback admission: (request id, layer) of the CPU attention results that re-enter the batch at that layer
    this iteration (each was reported ready before the plan was made)."""
    swap_outs: list[KVTransfer] = field(default_factory=list)
    """Copy these requests' KV to the host pool; their pages are freed once the runner reports the copy done."""
    swap_ins: list[KVTransfer] = field(default_factory=list)
    """Bring these requests' KV back from the host into the given (freshly allocated) pages."""
    rejected: list[str] = field(default_factory=list)
    """LS requests rejected at admission this iteration (their predicted TTFT missed the SLO)."""
    predicted_time: float | None = None
    """Seconds the latency model predicts for the iteration (None: no latency model)."""
    time_budget: float | None = None
    """Seconds the iteration was planned to fit in (None: no time budget)."""
    pipeline: OffloadedPipeline = ONE_LAYER
    shape: BatchShape | None = None
    """What predicted_time was predicted from, the admitted offloaded rows included (with a latency model)."""
    swap_seconds: float = 0.0
    """Of predicted_time, the swap-outs' own cost to the engine (uncorrected)."""
    prefix_saves: list[tuple[int, int]] = field(default_factory=list)
    """(device page, host page): cached pages this plan evicted, copied to the prefix cache's host tier before
    anything else runs (their device pages may be written by this iteration)."""
    prefix_loads: list[tuple[int, int]] = field(default_factory=list)
    """(host page, device page): cached pages found in the host tier, copied to the device after the saves and
    before the forward."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def request_ids(self) -> list[str]:
        """Every request this iteration runs rows of (device chunks, offloaded tokens starting, returning rows)."""
        return (
            [c.request_id for c in self.chunks] + [t.request_id for t in self.offloaded_starts]
            + [request_id for request_id, _ in self.returning]
        )

    @property
    def touched_request_ids(self) -> list[str]:
        """request_ids plus the requests whose KV this iteration moves (swap-outs, swap-ins); no duplicates."""
        moved = [t.request_id for t in self.swap_outs + self.swap_ins]
        return list(dict.fromkeys(self.request_ids + moved))

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.offloaded_starts or self.returning or self.swap_outs or self.swap_ins
                    or self.prefix_saves or self.prefix_loads)

    def summary(self) -> str:
        """The scheduler's decisions in one line (logged at debug level every iteration)."""
        decodes = sum(len(c.token_ids) == 1 for c in self.chunks)
        predicted = "-" if self.predicted_time is None else f"{self.predicted_time * 1e3:.1f} ms"
        budget = "-" if self.time_budget is None else f"{self.time_budget * 1e3:.1f} ms"
        return (
            f"{self.num_tokens} tokens ({decodes} decode, {len(self.chunks) - decodes} prefill chunks), "
            f"offloaded {len(self.offloaded_starts)} start + {len(self.returning)} return, "
            f"swap out {len(self.swap_outs)} in {len(self.swap_ins)}, rejected {len(self.rejected)}, "
            f"predicted {predicted} of {budget}"
        )


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
    offload_layers: dict[str, int] = field(default_factory=dict)
    """Offloaded tokens that ran this iteration and were not sampled: the layer whose CPU attention each now waits
    for."""
    offloaded_rows: tuple[int, ...] | None = None
    """Offloaded rows in each layer's dense work as run (None: as planned)."""
    cpu_wait_s: float = 0.0
    """Seconds the device spent waiting for CPU results."""
