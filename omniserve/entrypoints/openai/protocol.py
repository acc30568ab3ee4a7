"""The OpenAI API's request and response bodies (with vLLM's extra sampling fields), as pydantic models.

A request with a field it does not know is refused (400, "Unrecognized request argument supplied: NAME", as
OpenAI's API answers), never half-served: a vLLM client's `guided_whitespace_pattern` ignored would be a silently
wrong answer.
A few OpenAI fields that change nothing here (`user`, `metadata`, `store`, ...) are accepted and ignored. Sampling
values are range-checked once, by SamplingParams, whose errors name the field. Streamed chunks have the
fields of the matching response (`choices[].delta` in place of `message` for chat) and are written as plain dicts
(serving.chunk), as they are the hot path.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from omniserve.sampling.params import InvalidRequestError
from omniserve.sampling.structured import StructuredOutputs


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _whole(value: Any) -> Any:
    # JSON Schema's integer is any number without a fraction: 16.0 is one (JSON has one number type), true is not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_whole)]
"""An integer field of a request body (strict, as the models are, but taking 16.0 as 16)."""


class RequestModel(BaseModel):
    """A request body: unknown fields are an error (see the module docstring), and so is a value of another JSON
    type than its field's (strict: `true` is no integer, `1` no boolean, `"2"` no number), as the document says."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------------------------------------- errors
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------------------- requests
class StreamOptions(RequestModel):
    include_usage: bool = False
    """Send one last chunk, with no choices, that carries the usage of the whole request."""
    continuous_usage_stats: bool = False
    """vLLM: put the usage so far on every chunk."""


ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]


class SamplingRequest(RequestModel):
    """The fields that completions and chat completions share."""

    model: str | None = None
    """A name from /v1/models; None: the served model with the class chosen per request."""
    n: Integer = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: Integer | None = None
    min_p: float | None = None
    seed: Integer | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Integer] | None = None
    ignore_eos: bool = False
    min_tokens: Integer = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    service_tier: ServiceTier | None = None
    """OpenAI's: "flex" asks for best-effort service; anything else is latency-sensitive."""
    priority: Integer = 0
    """vLLM's: above 0 (a lower priority) asks for best-effort service."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # OpenAI's fields that change nothing here: accepted, ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    cache_salt: str | None = None
    """vLLM's: requests share cached prompt prefixes only with requests of the same salt (and API key)."""
    # Structured outputs: OpenAI's response_format, and vLLM's fields (the older guided_* and the newer object).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    """vLLM's: which grammar engine; accepted and ignored (this server has one)."""

    @property
    def structured_fields(self) -> list[str]:
        """The structured-output fields the request set (a text response_format is no constraint)."""
        fields = [name for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                                    "guided_choice", "guided_grammar") if getattr(self, name) is not None]
        text = isinstance(self.response_format, dict) and self.response_format.get("type", "text") == "text"
        return [name for name in fields if not (name == "response_format" and text)]

    def structured(self) -> StructuredOutputs | None:
        """What the completion must match, from whichever field the request used (at most one); raises
        InvalidRequestError (400) naming the field if it is malformed."""
        given = self.structured_fields
        if len(given) > 1:
            raise InvalidRequestError(f"give at most one of {', '.join(given)}", param=given[1])
        if not given:
            return None
        name = given[0]
        value = getattr(self, name)
        try:
            if name == "response_format":
                return _response_format(value)
            if name == "structured_outputs":
                if not isinstance(value, dict):
                    raise InvalidRequestError("structured_outputs must be an object")
                known = {k: v for k, v in value.items() if k in ("json", "regex", "choice", "grammar", "json_object")
                         and v not in (None, False)}
                return StructuredOutputs(**known)
            return StructuredOutputs(**{name.removeprefix("guided_"): value})
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param=name) from None

    @property
    def prompts(self) -> list:
        """The request's prompts, as sent: one engine request each (a chat request has one, its messages)."""
        raise NotImplementedError

    @property
    def max_new_tokens(self) -> int | None:
        """The most tokens to generate for each completion; None: up to the context limit."""
        raise NotImplementedError

    @property
    def num_logprobs(self) -> int | None:
        """How many most likely alternatives to return with each token's logprob; None: no logprobs."""
        raise NotImplementedError

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something this server cannot do, or that another field rules
        out; None if all is well."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None


class CompletionRequest(SamplingRequest):
    prompt: str | list[Integer] | list[str] | list[list[Integer]]
    max_tokens: Integer | None = 16
    logprobs: Integer | None = None
    """How many most likely alternatives to return with each token (0: just the token's own logprob)."""
    echo: bool = False
    best_of: Integer | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch (text or token ids each): one prompt, or the several the request gave."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported (only best_of == n)"
        if self.echo and self.logprobs is not None:
            return "echo", "echo with logprobs would need the prompt's logprobs, which this server does not compute"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


ChatRole = Literal["system", "user", "assistant", "tool", "developer"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_calls, ...: handed to the template as they are
    role: ChatRole
    content: str | list[ContentPart] | None = None


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema; None: no arguments."""
    strict: bool | None = None
    """Accepted: a call that must match the schema always does here (required and named calls are constrained)."""


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Integer | None = None
    """Deprecated by OpenAI in favour of max_completion_tokens; either works. None: up to the context limit."""
    max_completion_tokens: Integer | None = None
    logprobs: bool = False
    top_logprobs: Integer | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """None: auto when there are tools (see tool_calls.py)."""
    parallel_tool_calls: bool | None = None

    @property
    def prompts(self) -> list[list[ChatMessage]]:
        return [self.messages]

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()


def _response_format(value: Any) -> StructuredOutputs | None:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
    "strict"}}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format json_schema needs json_schema.schema, an object",
                                      param="response_format")
        return StructuredOutputs(json=schema)
    raise InvalidRequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                              param="response_format")


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Integer]


# ------------------------------------------------------------------------------------------------------ responses
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose KV was found in the prefix cache."""


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    service_tier: str | None = None
    usage: UsageInfo | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(OpenAIBaseModel):
    name: str
    arguments: str


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    service_tier: str | None = None
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "omniserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    service: str | None = None
    """The named service this model name stands for; None: the class is chosen per request."""
    service_class: str | None = None
    """`ls` or `be` for a named service."""
    ttft_slo: float | None = None
    tpot_slo: float | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
