"""Per-request sampling parameters, with vLLM's names and meanings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniserve.sampling.structured import StructuredOutputs


class InvalidRequestError(ValueError):
    """A request is malformed (bad sampling value, empty or too-long prompt). Maps onto HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ServiceClass(str, enum.Enum):
    LS = "ls"
    """Latency-sensitive: held to TTFT/TPOT SLOs; its attention always runs on the device."""
    BE = "be"
    """Best-effort: throughput; its decode attention may be offloaded to the CPU pool."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Completions to return for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) keeps all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one."""
    seed: int | None = None
    """Makes this request's sampling reproducible, whatever it is batched with."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's length limit."""
    min_tokens: int = 0
    """Tokens to generate before EOS or stop token ids may end the request."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are not included in the output."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end generation, in addition to the model's EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of this many most likely alternatives."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    service_class: ServiceClass = ServiceClass.LS
    """`ls` or `be` (the request's service class, carried here so the offline API and the server can set it)."""
    service: str | None = None
    """A named service (see omniserve.engine.services); it decides the class and the SLOs. None: the first
    service of `service_class`."""
    cache_salt: str | None = None
    """Requests reuse each other's cached prompt prefixes only when their salts are equal (the server salts each
    request with its API key and the request's own `cache_salt`)."""
    structured_outputs: StructuredOutputs | None = None
    """What the completion must match (a JSON schema, a regex, a choice, a grammar): vLLM's parameter."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the completion has already used (OpenAI's, in [-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once for every time the completion has used it (OpenAI's, in [-2, 2])."""
    repetition_penalty: float = 1.0
    """Divides the positive logits (multiplies the negative ones) of the tokens in the prompt or the completion
    (vLLM's, > 0; 1: none)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        object.__setattr__(self, "stop", list(self.stop))
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        try:
            object.__setattr__(self, "service_class", ServiceClass(self.service_class))
        except ValueError:
            raise InvalidRequestError(
                f"service_class must be 'ls' or 'be', got {self.service_class!r}", param="service_class"
            ) from None
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1, 0 (disabled) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be positive"),
            (all(isinstance(s, str) for s in self.stop), "stop", "must be strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InvalidRequestError(f"{name} {message}, got {getattr(self, name)!r}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Its sampling depends on the tokens it has seen (a presence, frequency or repetition penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    """Log-probability of token_id under the model (before temperature and truncation), if logprobs were asked for."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The most likely tokens and their log-probabilities, most likely first."""
