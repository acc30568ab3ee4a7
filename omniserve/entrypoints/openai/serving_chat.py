"""POST /v1/chat/completions: the model's chat template turns the messages into one prompt, with n completions."""

from __future__ import annotations

from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool

from omniserve.engine.outputs import CompletionOutput, RequestOutput
from omniserve.entrypoints.openai.protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, TokenLogprob, TopLogprob,
)
from omniserve.entrypoints.openai.serving import ChoiceDelta, OpenAIServing, finite
from omniserve.errors import APIError
from omniserve.sampling.params import SampledToken

# Keywords of apply_chat_template that decide what it returns: chat_template_kwargs may not change them.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "return_dict", "return_tensors", "add_generation_prompt",
                             "continue_final_message", "padding", "truncation", "max_length"}


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    response_type = ChatCompletionResponse

    async def prompts(self, request: ChatCompletionRequest) -> list[list[int]]:
        return [await self.render(request.messages, request.add_generation_prompt, request.continue_final_message,
                                  request.chat_template_kwargs)]

    def choices(self, request: ChatCompletionRequest, finals: list[RequestOutput]) -> list[ChatCompletionChoice]:
        num_logprobs = request.num_logprobs
        return [
            ChatCompletionChoice(
                index=c.index, message=ChatResponseMessage(content=c.text),
                logprobs=self._logprobs(c.logprobs or [], num_logprobs) if num_logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            )
            for c in finals[0].outputs
        ]

    def choice_deltas(self, request: ChatCompletionRequest) -> ChoiceDelta:
        num_top = request.top_logprobs or 0
        started: set[int] = set()  # choices whose first chunk (with the role) is out

        def fields(index: int, _prompt: int, _out: RequestOutput, c: CompletionOutput,
                   new_logprobs: list[SampledToken] | None) -> dict | None:
            logprobs = None if new_logprobs is None else self._logprobs(new_logprobs, num_top).model_dump()
            if not c.delta_text and logprobs is None and c.finish_reason is None:
                return None  # no empty chunk
            delta: dict[str, str] = {}
            if index not in started:
                started.add(index)
                delta["role"] = "assistant"
            if c.delta_text or "role" in delta:
                delta["content"] = c.delta_text
            return {"delta": delta, "logprobs": logprobs}

        return fields

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
