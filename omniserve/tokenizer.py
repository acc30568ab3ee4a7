"""Tokenizer, chat template and incremental detokenisation, all through transformers / tokenizers."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers.decoders import DecodeStream

# How many prompt tokens prime a request's decode stream, so that the first generated token is decoded in context
# (a leading space, a character whose bytes began in the prompt).
_DECODE_CONTEXT_TOKENS = 6
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

logger = logging.getLogger(__name__)


def load_tokenizer(kind: str, path: Path | None):
    """A transformers tokenizer for a HF folder or a GGUF file; None for presets and folders without one."""
    if kind == "preset":
        return None
    from transformers import AutoTokenizer

    if kind == "gguf":  # converted once, then read back from the cache
        from omniserve.models.gguf_cache import load_tokenizer as load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: prompts must be token ids and outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(str(path))


_BUILTIN_TEMPLATES = Path(__file__).parent / "chat_templates"


def set_chat_template(tokenizer, template: str) -> None:
    """Replaces the tokenizer's chat template with `template`: the name of a built-in one (chat_templates/), a file,
    or the template's text. A template that cannot render a plain conversation is a ConfigError at start-up, not a
    400 on every chat request."""
    from omniserve.config import ConfigError

    if tokenizer is None:
        raise ConfigError("--chat-template needs a model with a tokenizer")
    builtin = _BUILTIN_TEMPLATES / f"{template}.jinja"
    if builtin.is_file():
        text = builtin.read_text()
    elif "{" in template:  # the template itself (a path has no braces)
        text = template
    elif Path(template).is_file():
        text = Path(template).read_text()
    else:
        names = ", ".join(sorted(p.stem for p in _BUILTIN_TEMPLATES.glob("*.jinja")))
        raise ConfigError(f"--chat-template {template!r} is neither a file nor a template (built-in: {names})")
    tokenizer.chat_template = text
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - any Jinja error: the template is unusable
        raise ConfigError(f"the chat template cannot render a conversation: {exc}") from None
    logger.info("chat template: %s", template if builtin.is_file() or "{" not in template else "given inline")


class IncrementalDetokenizer:
    """Turns a request's tokens into text as they arrive, never splitting a multi-byte character, and applies stop
    strings so that they never reach the output (text that might start a stop string is held back)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=prompt_token_ids[-_DECODE_CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        """All text decoded so far (may include a held-back tail)."""
        self._emitted = 0
        self.stopped_by: str | None = None
        """The stop string that ended the request, if one did."""

    def add_tokens(self, token_ids: list[int]) -> None:
        for token_id in token_ids:
            if self.stopped_by is not None:
                return
            chunk = self._stream.step(self._backend, token_id)
            if not chunk:
                continue
            search_from = max(0, len(self.text) - self._hold)
            self.text += chunk
            for stop in self._stop:
                at = self.text.find(stop, search_from)
                if at != -1:  # truncating keeps only earlier matches possible for the next stop strings
                    self.text = self.text[:at]
                    self.stopped_by = stop

    def take_delta(self, finished: bool) -> str:
        """New text that is safe to show: all of it once finished, else all but a possible stop-string prefix."""
        end = len(self.text) if finished or self.stopped_by else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
