"""Tool calling as vLLM serves it: what a request's `tools` and `tool_choice` make of its completions.

- `none` (or no tools): plain text; the tools are still shown to the chat template.
- `required`: the completion is constrained (structured outputs) to a JSON array of calls, `[{"name": ...,
  "parameters": {...}}, ...]`, one of the tools' names each with arguments of that tool's schema (one call at most
  with `parallel_tool_calls: false`), so every call is valid.
- a named function: the completion is constrained to that function's parameter schema, and is its one call's
  arguments.
- `auto`: the model decides, in its own format, which a tool-call parser reads (`--tool-call-parser`, with
  `--enable-auto-tool-choice`): `hermes` (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, text around it
  is content) or `llama3_json` (the whole answer one or more `{"name": ..., "parameters": ...}` objects, `;` between).

A stream sends each call whole, in one `tool_calls` delta, as soon as its text is complete (a named function's
arguments as they come); the text of a call is never sent as content, so whatever may be the start of one is held
back until it is known to be a call or not.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from omniserve.errors import APIError
from omniserve.sampling.structured import StructuredOutputs

@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str
    """JSON text, as OpenAI's API gives it."""


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call_of(obj) -> FunctionCall | None:
    """A call from a parsed JSON object with a name and arguments (or parameters), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        return FunctionCall(obj["name"], arguments)
    return FunctionCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass
class Parsed:
    """A completion's text so far, split: the content (text that is no call, safe to show) and the calls."""

    content: str = ""
    calls: list[FunctionCall] = field(default_factory=list)


_DECODER = json.JSONDecoder()


def _json_objects(text: str, pos: int, separators: str, final: bool, parsed: Parsed) -> int:
    """Reads calls, JSON objects with `separators` (and whitespace) between them, from `pos` into `parsed`; returns
    where the text stops being calls. Before the end, an object not yet complete stops the reading (it may be
    complete later); at the end, the rest is content."""
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return pos
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        call = _call_of(obj)
        if call is None:
            break
        parsed.calls.append(call)
        pos = end
    if final:
        parsed.content += text[pos:]
    return pos


class ToolParser:
    """Reads the calls in a completion's text, in a model family's format. `parse` is called on the whole text so
    far at every step of a stream: the content it returns only ever grows as the text does (a stream sends the new
    part), and a call, once returned, stays."""

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, with content around them."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        parsed, pos = Parsed(), 0
        while True:
            start = text.find(self.OPEN, pos)
            if start == -1:
                tail = text[pos:]
                if not final:  # a tail that may be the start of "<tool_call>" waits for the next tokens
                    tail = tail[:len(tail) - _partial_suffix(tail, self.OPEN)]
                parsed.content += tail
                return parsed
            parsed.content += text[pos:start]
            end = text.find(self.CLOSE, start)
            if end == -1:  # a call still being written; never closed: it was text after all
                if final:
                    parsed.content += text[start:]
                return parsed
            try:
                call = _call_of(json.loads(text[start + len(self.OPEN):end]))
            except json.JSONDecodeError:
                call = None
            if call is None:
                parsed.content += text[start:end + len(self.CLOSE)]
            else:
                parsed.calls.append(call)
            pos = end + len(self.CLOSE)


class Llama3JsonParser(ToolParser):
    """Llama 3's JSON tool calls: an answer that begins with `{` (or `<|python_tag|>`, when special tokens are
    shown) is one or more `{"name": ..., "parameters": {...}}` objects with `;` between them; any other answer is
    content. What follows the last object that is a call is content."""

    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        body = text.lstrip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):]
        elif not body.startswith("{"):
            if not final and self.TAG.startswith(body):  # empty, or the tag's start
                return Parsed()
            return Parsed(content=text)
        parsed = Parsed()
        _json_objects(body, 0, ";", final, parsed)
        if final and not parsed.calls:
            parsed.content = text  # JSON, but no call: the answer as the model wrote it
        return parsed


class RequiredCallsParser(ToolParser):
    """The constrained answer of `tool_choice: required`: `[{"name": ..., "parameters": {...}}, ...]`."""

    def parse(self, text: str, final: bool) -> Parsed:
        parsed = Parsed()
        start = text.find("[")
        if start == -1:
            if final:
                parsed.content = text
            return parsed
        pos = _json_objects(text, start + 1, ",", False, parsed)
        rest = text[pos:].strip()
        if final and rest != "]":  # cut short (max_tokens): the unfinished rest is shown, not lost
            parsed.content = text[pos:] if parsed.calls else text
        return parsed


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools make of its completions (see the module docstring)."""

    mode: str
    """none, auto, required or named."""
    constraint: StructuredOutputs | None = None
    """What the completion must match (required and named)."""
    function: str | None = None
    """The named function."""
    parser: str | None = None
    """The tool-call parser of auto."""

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"

    def parse(self, text: str, final: bool) -> Parsed:
        """The completion's text so far as content and calls."""
        if self.mode == "named":
            return Parsed(calls=[FunctionCall(self.function, text)] if final else [])
        parser = RequiredCallsParser() if self.mode == "required" else PARSERS[self.parser]()
        return parser.parse(text, final)

    def finish_reason(self, reason: str | None, parsed: Parsed) -> str | None:
        """OpenAI's: `tool_calls` when the model chose to call (auto, required), `stop` for a named function."""
        if reason == "stop" and parsed.calls and self.mode != "named":
            return "tool_calls"
        return reason


def plan_tools(tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool | None,
               auto_parser: str | None) -> ToolPlan:
    """The plan of a chat request (its tools as dicts, each {"type": "function", "function": {...}}), or an
    APIError 400 naming the field that cannot be served. `auto_parser`: the server's tool-call parser, None when
    the server does not choose tools on its own (no --enable-auto-tool-choice)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
        return ToolPlan("none")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if len(functions) < len(tools):
        raise APIError(400, "tool names must be unique", param="tools")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        if auto_parser is None:
            raise APIError(400, '"auto" tool choice needs a server started with --enable-auto-tool-choice and '
                           "--tool-call-parser; ask for \"required\" or a named function instead", param="tool_choice")
        return ToolPlan("auto", parser=auto_parser)
    if choice == "required":
        calls = {"type": "array", "minItems": 1,
                 "items": {"anyOf": [_call_schema(name, f) for name, f in functions.items()]}}
        if parallel_tool_calls is False:
            calls["maxItems"] = 1
        return ToolPlan("required", StructuredOutputs(json=calls))
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                           param="tool_choice")
        return ToolPlan("named", StructuredOutputs(json=_parameters(functions[name])), function=name)
    raise APIError(400, f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                   param="tool_choice")


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _call_schema(name: str, function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "parameters": _parameters(function)},
            "required": ["name", "parameters"], "additionalProperties": False}


class ToolCallStream:
    """One streamed choice of a request with tools: each step's new text in, the delta's content and tool calls
    out (see the module docstring)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._content_sent = 0
        self._calls_sent = 0
        self._named_id: str | None = None
        self.parsed = Parsed()

    def feed(self, delta_text: str, final: bool) -> tuple[str, list[dict]]:
        """(content delta, tool_calls deltas) for the text that came since the last step."""
        self.text += delta_text
        if self.plan.mode == "named":  # the arguments stream as they come
            self.parsed = self.plan.parse(self.text, final)
            if not delta_text and self._named_id is not None:
                return "", []
            call = {"index": 0, "function": {"arguments": delta_text}}
            if self._named_id is None:
                self._named_id = tool_call_id()
                call.update(id=self._named_id, type="function")
                call["function"]["name"] = self.plan.function
            return "", [call]
        self.parsed = parsed = self.plan.parse(self.text, final)
        content = parsed.content
        # Whitespace is held until text follows it: around calls it is dropped, not sent as content.
        end = len(content) if final and not parsed.calls else len(content.rstrip())
        content_delta = content[self._content_sent:end] if end > self._content_sent else ""
        self._content_sent = max(self._content_sent, end)
        calls = [{"index": i, "id": tool_call_id(), "type": "function",
                  "function": {"name": call.name, "arguments": call.arguments}}
                 for i, call in enumerate(parsed.calls[self._calls_sent:], start=self._calls_sent)]
        self._calls_sent = len(parsed.calls)
        return content_delta, calls


def message_content(parsed: Parsed) -> str | None:
    """A whole answer's content: without calls, the text as it is; with calls, what is left of it, or None."""
    return parsed.content if not parsed.calls else parsed.content.rstrip() or None
