"""Structured outputs: a request's completion constrained to a JSON schema, a regex, a choice of strings or a grammar.

The grammar engine is llguidance (the `guidance` backend of vLLM and SGLang): a Rust library with no Python
dependencies beyond itself, whose matcher computes a token mask from the tokenizer's byte-level trie in tens of
microseconds and builds its lexer and parser lazily (a 300-property schema is checked and parsed in about 0.1 s, off
the engine thread, with the GIL released). xgrammar was the alternative; it depends on triton, a large package this
CPU setup does not otherwise need.

A request with structured outputs carries a matcher (GrammarCompiler.matcher): the scheduler's booking feeds it every
token the request accepts, and the sampler masks the logits of its row, whatever the row is (LS or BE, on the device
or offloaded: they all sample in the runner) with the matcher's next-token mask. Once the grammar is complete the
only token allowed is EOS, and booking ends the request there.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omniserve.sampling.params import InvalidRequestError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_GRAMMAR_CACHE_SIZE = 256  # grammars kept, by spec: schemas repeat (one per endpoint or tool set)
# The whitespace JSON may have between its tokens: a line break or two and an indent, or a few spaces; bounded, as
# llguidance's default (any amount) lets a small model write whitespace until max_tokens, which no client can parse.
# A schema's own "x-guidance" options override it.
_JSON_WHITESPACE = r"(?:\r?\n){1,2}[\x20\x09]{0,24}|[\x20\x09]{1,24}"


@dataclass(frozen=True)
class StructuredOutputs:
    """What a completion must match: exactly one of these (vLLM's `structured_outputs` fields)."""

    json: str | None = None
    """A JSON schema, as JSON text."""
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    """One of these strings, exactly."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect), or a GBNF one (`::=` rules), converted."""
    json_object: bool = False
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):
            object.__setattr__(self, "json", json.dumps(self.json))
        for name in ("json", "regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be a string" + (" or an object" if name == "json" else ""),
                                          param=name)
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise InvalidRequestError("choice must be a non-empty list of strings", param="choice")
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured outputs take exactly one of json, regex, choice, grammar, json_object; got "
                f"{', '.join(given) or 'none'}", param="structured_outputs")

    def to_grammar(self) -> str:
        """The constraint as an llguidance grammar."""
        from llguidance import LLMatcher

        if self.json is not None or self.json_object:
            return LLMatcher.grammar_from_json_schema(self.json or '{"type": "object"}',
                                                      defaults={"whitespace_pattern": _JSON_WHITESPACE})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # JSON string literals are Lark string literals
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        grammar = self.grammar
        if "::=" in grammar:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = gbnf_to_lark(grammar)
        return LLMatcher.grammar_from_lark(grammar)


class GrammarCompiler:
    """The engine's grammars: one llguidance tokenizer (built on first use, from the engine's tokenizer), and each
    constraint checked and parsed once into a matcher that requests copy (cached by constraint). Thread-safe: the
    server does the checking and parsing off the event loop, so the engine thread only copies."""

    def __init__(self, tokenizer) -> None:
        if tokenizer is None:
            raise InvalidRequestError("structured outputs need a tokenizer, and this model has none",
                                      param="structured_outputs")
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._matchers: OrderedDict[StructuredOutputs, object] = OrderedDict()
        """Per constraint: a matcher at its start, which each request's is copied from."""
        self._unreadable: str | None = None
        """Why llguidance cannot read the tokenizer, once it failed to (it will not read it later either)."""

    @functools.cached_property
    def ll_tokenizer(self):
        """llguidance's view of the tokenizer: built once (about 0.6 s for a 49k vocabulary, in Python, holding the
        GIL: a server builds it before it serves, see `prepare`)."""
        from llguidance.hf import from_tokenizer

        with self._lock:  # built once, even when two threads ask at once
            built = self.__dict__.get("ll_tokenizer")
            return built if built is not None else from_tokenizer(self._tokenizer)

    def prepare(self) -> None:
        """Builds the llguidance tokenizer now, so that the first constrained request does not stall the streams
        running beside it; a tokenizer it cannot read is logged, and constrained requests then fail with a 400."""
        started = time.perf_counter()
        try:
            self._readable_tokenizer()
        except InvalidRequestError as exc:
            logger.warning("%s", exc)
            return
        logger.info("structured outputs: grammar tokenizer built in %.2f s", time.perf_counter() - started)

    def _readable_tokenizer(self):
        """ll_tokenizer, or an InvalidRequestError (400) when llguidance cannot read the tokenizer: that is this
        model's limit, not a failure of the server."""
        if self._unreadable is None:
            try:
                return self.ll_tokenizer
            except Exception as exc:  # noqa: BLE001 - any failure: structured outputs unavailable, the server runs
                self._unreadable = str(exc)
        raise InvalidRequestError("structured outputs are unavailable: llguidance cannot read this model's tokenizer "
                                  f"({self._unreadable})", param="structured_outputs")

    def compile(self, spec: StructuredOutputs):
        """The constraint's matcher at its start, checked and cached; an InvalidRequestError (400) naming what is
        wrong if the constraint is not valid."""
        with self._lock:
            matcher = self._matchers.get(spec)
            if matcher is not None:
                self._matchers.move_to_end(spec)
                return matcher
        from llguidance import LLMatcher

        grammar = spec.to_grammar()
        error = LLMatcher.validate_grammar(grammar, self._readable_tokenizer())
        if error:
            param = "structured_outputs" if spec.grammar is None else "grammar"
            raise InvalidRequestError(f"invalid structured output constraint: {error.strip()}", param=param)
        matcher = LLMatcher(self.ll_tokenizer, grammar)
        with self._lock:
            self._matchers[spec] = matcher
            while len(self._matchers) > _GRAMMAR_CACHE_SIZE:
                self._matchers.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutputs) -> RequestGrammar:
        """A matcher for one request (its state is that request's): a copy of the constraint's."""
        return RequestGrammar(self.compile(spec).deep_copy(), self.ll_tokenizer.vocab_size)


class RequestGrammar:
    """One request's place in its grammar: the tokens it allows next, and the tokens the request accepted."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        """The tokenizer's: logits past it (a model's padded vocabulary) are never allowed."""

    def accept(self, token_id: int) -> bool:
        """Feeds a token the request accepted; False if the grammar does not allow it (then nothing more is)."""
        return bool(self.matcher.consume_token(token_id))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


def apply_grammar_masks(logits: torch.Tensor, grammars: list[RequestGrammar | None]) -> torch.Tensor:
    """The logits ([rows, vocab], any device) with each row that has a grammar masked to the tokens it allows next
    (and never a token past the tokenizer's vocabulary, in a model's padded one). The masks are computed on the
    host into one bitmask for the batch (32 tokens a word), copied once, and unpacked with plain tensor operations.
    (llguidance.torch is not used: importing it imports torch's compiler, seconds on the engine thread, and its
    helper compiles on first use.)"""
    import torch

    rows = [i for i, g in enumerate(grammars) if g is not None]
    vocab = grammars[rows[0]].vocab_size
    bitmask = torch.full((len(grammars), (vocab + 31) // 32), -1, dtype=torch.int32)  # -1: all allowed
    row_bytes = bitmask.shape[1] * 4
    for i in rows:
        grammars[i].matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + i * row_bytes, row_bytes)
    words = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
    masked = logits.clone()
    masked[:, :vocab].masked_fill_(~allowed, float("-inf"))
    if logits.shape[1] > vocab:
        masked[torch.tensor(rows, device=logits.device), vocab:] = float("-inf")
    return masked
