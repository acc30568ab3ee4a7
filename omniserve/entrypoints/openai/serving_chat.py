"""POST /v1/chat/completions: the model's chat template turns the messages (and the tools) into one prompt, with n
completions; with tools, each completion's text is read as content and tool calls (tool_calls.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool

from omniserve.engine.outputs import CompletionOutput, RequestOutput
from omniserve.entrypoints.openai.protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, ChatTool, FunctionCallOut, TokenLogprob, ToolCall, TopLogprob,
)
from omniserve.entrypoints.openai.served_models import Resolved
from omniserve.entrypoints.openai.serving import ChoiceDelta, OpenAIServing, finite
from omniserve.entrypoints.openai.tool_calls import ToolCallStream, ToolPlan, message_content, plan_tools, tool_call_id
from omniserve.errors import APIError
from omniserve.sampling.params import SampledToken, SamplingParams

# Keywords of apply_chat_template that decide what it returns: chat_template_kwargs may not change them.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "return_dict", "return_tensors", "add_generation_prompt",
                             "continue_final_message", "padding", "truncation", "max_length"}


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    response_type = ChatCompletionResponse

    async def prompts(self, request: ChatCompletionRequest) -> list[list[int]]:
        return [await self.render(request.messages, request.add_generation_prompt, request.continue_final_message,
                                  request.chat_template_kwargs, request.tools)]

    def tool_plan(self, request: ChatCompletionRequest) -> ToolPlan:
        """What the request's tools make of its completions (400 if the server cannot do what it asks)."""
        args = self.state.engine.args
        return plan_tools([t.model_dump() for t in request.tools or []], _dumped(request.tool_choice),
                          request.parallel_tool_calls, args.tool_call_parser if args.enable_auto_tool_choice else None)

    def sampling_params(self, request: ChatCompletionRequest, resolved: Resolved) -> SamplingParams:
        params = super().sampling_params(request, resolved)
        plan = self.tool_plan(request)
        if plan.constraint is None:
            return params
        if params.structured_outputs is not None:
            raise APIError(400, f"{request.structured_fields[0]} cannot be combined with tool_choice {plan.mode}: "
                           "the completion is the tool call", param=request.structured_fields[0])
        return replace(params, structured_outputs=plan.constraint)

    def choices(self, request: ChatCompletionRequest, finals: list[RequestOutput]) -> list[ChatCompletionChoice]:
        num_logprobs = request.num_logprobs
        plan = self.tool_plan(request)
        choices = []
        for c in finals[0].outputs:
            message, finish_reason = ChatResponseMessage(content=c.text), c.finish_reason
            if plan.calls_tools:
                parsed = plan.parse(c.text, final=True)
                calls = [ToolCall(id=tool_call_id(), function=FunctionCallOut(name=f.name, arguments=f.arguments))
                         for f in parsed.calls]
                message = ChatResponseMessage(content=message_content(parsed), tool_calls=calls)
                finish_reason = plan.finish_reason(finish_reason, parsed)
            choices.append(ChatCompletionChoice(
                index=c.index, message=message,
                logprobs=self._logprobs(c.logprobs or [], num_logprobs) if num_logprobs is not None else None,
                finish_reason=finish_reason, stop_reason=c.stop_reason,
            ))
        return choices

    def choice_deltas(self, request: ChatCompletionRequest) -> ChoiceDelta:
        num_top = request.top_logprobs or 0
        plan = self.tool_plan(request)
        started: set[int] = set()  # choices whose first chunk (with the role) is out
        tool_streams: dict[int, ToolCallStream] = {}

        def fields(index: int, _prompt: int, _out: RequestOutput, c: CompletionOutput,
                   new_logprobs: list[SampledToken] | None) -> dict | None:
            logprobs = None if new_logprobs is None else self._logprobs(new_logprobs, num_top).model_dump()
            content, calls, finish_reason = c.delta_text, [], c.finish_reason
            if plan.calls_tools:
                stream = tool_streams.setdefault(index, ToolCallStream(plan))
                content, calls = stream.feed(c.delta_text, final=c.finish_reason is not None)
                finish_reason = plan.finish_reason(finish_reason, stream.parsed)
            if not content and not calls and logprobs is None and finish_reason is None:
                return None  # no empty chunk
            delta: dict[str, Any] = {}
            if index not in started:
                started.add(index)
                delta["role"] = "assistant"
            if content or ("role" in delta and not calls):
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
            return {"delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

        return fields

    async def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                     continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                     tools: list[ChatTool] | None = None) -> list[int]:
        """The conversation (and the tools the model may call) through the model's chat template, as token ids (the
        template adds the special tokens). Rendered and tokenized in worker threads (see serving.py), as
        apply_chat_template(tokenize=True) does it."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        conversation = [_message(m) for m in messages]
        extra = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        if tools:
            extra["tools"] = [t.model_dump(exclude_none=True) for t in tools]
        try:
            text = await run_in_threadpool(
                self.tokenizer.apply_chat_template, conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **extra,
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None
        return await self.prompt_ids(text, add_special_tokens=False)

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
    for call in as_dict.get("tool_calls") or []:
        # Templates write the arguments as JSON themselves (`| tojson`): they get an object, not the API's text.
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass  # not JSON: the template gets the text as it is
    return as_dict


def _dumped(tool_choice) -> str | dict | None:
    return tool_choice.model_dump() if hasattr(tool_choice, "model_dump") else tool_choice
