"""A request's state as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omniserve.sampling.params import SampledToken, SamplingParams, ServiceClass

if TYPE_CHECKING:
    from omniserve.sampling.structured import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    REJECTED = "rejected"
    """An LS request whose TTFT SLO could not be met, turned away before it ran (HTTP 429)."""

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(frozen=True)
class OffloadedTokenTiming:
    """How one offloaded token went through the layers: from the iteration it entered layer 0 to the one that sampled
    it (both counted)."""

    service_class: str
    iterations: int
    seconds: float
    layers_per_iteration: float


class Placement(enum.Enum):
    """Where a running request's KV lives."""

    DEVICE = "device"
    SWAPPING_OUT = "swapping_out"
    """Its KV is being copied to the host; its device pages are still held."""
    HOST = "host"
    """Offloaded: KV in the CPU pool, decode attention on CPU cores, dense work piggybacked on the device batch."""
    SWAPPING_IN = "swapping_in"
    """Its KV is being copied back into freshly allocated device pages."""


@dataclass(eq=False)
class RequestGroup:
    """The engine requests of one API request (its prompts, each with its n completions), which admission takes or
    rejects as one: a request turned away for lateness is turned away before any of its prompts runs, and once one
    has started, none of the others is turned away."""

    members: list[Request] = field(default_factory=list)
    started: bool = False


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """params.max_tokens, resolved against the model length."""
    arrival_time: float = field(default_factory=time.monotonic)
    ttft_slo: float | None = None
    """Seconds; from the request's service (LS only)."""
    tpot_slo: float | None = None
    service: str | None = None
    """The name of the service it belongs to."""
    siblings: str | None = None
    """One of a request's n completions: the caller's request id, which its siblings (same prompt) share."""
    group: RequestGroup | None = None
    """The API request it is one of, when that made several engine requests."""
    grammar: RequestGrammar | None = None
    """Its structured-output constraint's state (sampling/structured.py), fed every token it accepts."""
    token_ids: list[int] = field(init=False)
    """Prompt followed by every generated token."""
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache."""
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV it found in the prefix cache when it first started (None: not started yet)."""
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request."""
    logprobs: list[SampledToken] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    last_token_iteration: int | None = None
    """The scheduler iteration that gave it its latest token."""
    placement: Placement = Placement.DEVICE
    token_in_flight: bool = False
    """Offloaded only: its newest token is on its way through the layers."""
    offload_layer: int = 0
    """Offloaded, token in flight: the layer whose attention is out on the CPU (or has come back)."""
    result_ready_since: int | None = None
    """Offloaded, token in flight: the iteration in which that layer's CPU result came back (None: not back yet)."""
    token_started: tuple[int, float] | None = None
    """Offloaded, token in flight: the iteration and clock() at which it entered layer 0."""
    num_swap_outs: int = 0
    num_swap_ins: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def seen_token_ids(self) -> list[int] | None:
        """What its penalties look at, for the sampler: its tokens so far (None: it has no penalties)."""
        return self.token_ids if self.params.penalized else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_best_effort(self) -> bool:
        return self.params.service_class is ServiceClass.BE

    @property
    def is_decoding(self) -> bool:
        """Past its prompt, with only its newest (sampled) token left to compute."""
        return self.num_tokens - self.num_computed_tokens == 1 and self.num_output_tokens > 0

    @property
    def at_token_boundary(self) -> bool:
        """Decoding, with every token but the newest (sampled, not yet fed back) in the KV cache."""
        return self.num_output_tokens >= 1 and self.num_computed_tokens == self.num_tokens - 1

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
