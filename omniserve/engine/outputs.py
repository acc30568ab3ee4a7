"""What the engine hands back to callers, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field

from omniserve.sampling.params import SampledToken


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n completions this is."""
    text: str = ""
    """All text generated so far, stop strings cut off."""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """`stop`, `length`, `abort`, `error` or `rejected` (an LS request whose TTFT SLO could not be met, turned away
    before it ran) once finished."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it."""
    logprobs: list[SampledToken] | None = None
    delta_text: str = ""
    """Text that is new since the previous output for this request (for streaming)."""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """When things happened to a request (time.monotonic seconds), as vLLM's RequestOutput.metrics."""

    arrival_time: float
    first_scheduled_time: float | None
    """When it was first given device time (None: still queued)."""
    first_token_time: float | None
    last_token_time: float | None
    service: str | None
    service_class: str
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    num_preemptions: int = 0
    num_swap_outs: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV was found in the prefix cache, not computed (None: not started yet)."""
