"""POST /v1/chat/completions: the model's chat template turns the messages into one prompt, with n completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from omniserve.entrypoints.openai.errors import APIError
from omniserve.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    TokenLogprob,
    TopLogprob,
    now,
)
from omniserve.entrypoints.openai.serving import (
    SSE_DONE,
    EventStreamResponse,
    Generation,
    OpenAIServing,
    chunk,
    finite,
    sse_error,
    until_disconnected,
)
from omniserve.sampling.params import SampledToken

# Keywords of apply_chat_template that decide what it returns: chat_template_kwargs may not change them.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "return_dict", "return_tensors", "add_generation_prompt",
                             "continue_final_message", "padding", "truncation", "max_length"}


class ChatServing(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        resolved = self.resolve(request, raw_request.state.service_classes)
        if request.tools and request.tool_choice != "none":
            raise APIError(400, "tool calling is not supported", param="tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, resolved, max_tokens, logprobs)
        prompt = await self.render(request.messages, request.add_generation_prompt, request.continue_final_message,
                                   request.chat_template_kwargs)
        response_id = f"chatcmpl-{raw_request.state.request_id}"
        generation = await self.start(raw_request, [response_id], [prompt], params, resolved)
        header = dict(response_id=response_id, created=now(), model=resolved.model.name,
                      service_tier=resolved.service_tier)
        if request.stream:
            return EventStreamResponse(self._stream(request, generation, header))
        finals = await until_disconnected(raw_request, generation.finals())
        self.check_finished_well(finals)
        choices = [
            ChatCompletionChoice(
                index=c.index, message=ChatResponseMessage(content=c.text),
                logprobs=self._logprobs(c.logprobs or [], logprobs) if logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            )
            for c in finals[0].outputs
        ]
        body = ChatCompletionResponse(id=response_id, created=header["created"], model=header["model"],
                                      choices=choices, service_tier=header["service_tier"], usage=self.usage(finals))
        return Response(body.model_dump_json(), media_type="application/json")

    async def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                     continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None
                     ) -> list[int]:
        """The conversation through the model's chat template, as token ids (the template adds the special tokens).
        Rendered and tokenized in worker threads (see serving.py), as apply_chat_template(tokenize=True) does it."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        conversation = [_message(m) for m in messages]
        extra = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        try:
            text = await run_in_threadpool(
                self.tokenizer.apply_chat_template, conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **extra,
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None
        return await self.prompt_ids(text, add_special_tokens=False)

    async def _stream(self, request: ChatCompletionRequest, generation: Generation, header: dict
                      ) -> AsyncIterator[str]:
        options = request.stream_options
        with_usage = options is not None and options.include_usage
        continuous = with_usage and options.continuous_usage_stats
        num_top = request.top_logprobs or 0
        latest = None
        started: set[int] = set()  # choices whose first chunk (with the role) is out
        finished: set[int] = set()
        sent_logprobs: dict[int, int] = {}
        try:
            async for _, out in generation.outputs():
                latest = out
                choices = []
                for c in out.outputs:
                    if c.index in finished:
                        continue
                    if c.finish_reason == "error":
                        raise APIError(500, "the engine failed while running this request", code="engine_error")
                    logprobs = None
                    if request.logprobs and c.logprobs and len(c.logprobs) > sent_logprobs.get(c.index, 0):
                        logprobs = self._logprobs(c.logprobs[sent_logprobs.get(c.index, 0):], num_top).model_dump()
                        sent_logprobs[c.index] = len(c.logprobs)
                    if not c.delta_text and logprobs is None and c.finish_reason is None:
                        continue  # no empty chunk: text may be held back for a possible stop string
                    delta: dict[str, str] = {}
                    if c.index not in started:
                        started.add(c.index)
                        delta["role"] = "assistant"
                    if c.delta_text or "role" in delta:
                        delta["content"] = c.delta_text
                    if c.finish_reason is not None:
                        finished.add(c.index)
                    choices.append({"index": c.index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if choices:
                    usage = self.usage([latest]) if continuous else None
                    yield chunk("chat.completion.chunk", choices=choices, usage=usage, with_usage=with_usage,
                                **header)
            if with_usage and latest is not None:
                yield chunk("chat.completion.chunk", choices=[], usage=self.usage([latest]), with_usage=True,
                            **header)
        except Exception as exc:  # the stream has started: the error goes in it
            yield sse_error(exc)
        yield SSE_DONE

    def _logprobs(self, tokens: list[SampledToken], num_top: int) -> ChatLogprobs:
        content = []
        for token in tokens:
            text = self.token_text(token.token_id)
            top = [TopLogprob(token=t, logprob=finite(lp), bytes=list(t.encode())) for t, lp in
                   self.top_logprobs(token)[:num_top]]
            content.append(TokenLogprob(token=text, logprob=finite(token.logprob), bytes=list(text.encode()),
                                        top_logprobs=top))
        return ChatLogprobs(content=content)


def _message(message: ChatMessage) -> dict[str, Any]:
    """A message as the chat template sees it: content is text (parts joined), other fields as the client sent."""
    as_dict = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"only text content is supported, got a {part.type!r} part", param="messages")
            texts.append(part.text)
        as_dict["content"] = "\n".join(texts)
    elif content is None:
        as_dict["content"] = ""
    return as_dict
