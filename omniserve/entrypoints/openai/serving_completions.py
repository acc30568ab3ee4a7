"""POST /v1/completions: one engine request per prompt, each with its n completions; choice i of prompt p is
choice p * n + i of the response."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from omniserve.engine.outputs import RequestOutput
from omniserve.entrypoints.openai.errors import APIError
from omniserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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


class CompletionServing(OpenAIServing):
    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        resolved = self.resolve(request, raw_request.state.service_classes)
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
        if request.echo and request.logprobs is not None:
            raise APIError(400, "echo with logprobs would need the prompt's logprobs, which this server does not "
                           "compute", param="echo")
        prompts = _prompts(request.prompt)
        params = self.sampling_params(request, resolved, request.max_tokens, request.logprobs)
        prompt_ids = [await self.prompt_ids(p) for p in prompts]
        response_id = f"cmpl-{raw_request.state.request_id}"
        ids = [response_id] if len(prompts) == 1 else [f"{response_id}-{i}" for i in range(len(prompts))]
        generation = await self.start(raw_request, ids, prompt_ids, params, resolved)
        header = dict(response_id=response_id, created=now(), model=resolved.model.name,
                      service_tier=resolved.service_tier)
        if request.stream:
            return EventStreamResponse(self._stream(request, prompts, generation, header))
        finals = await until_disconnected(raw_request, generation.finals())
        self.check_finished_well(finals)
        choices = []
        for p, out in enumerate(finals):
            prompt_text = self._prompt_text(prompts[p], out) if request.echo else ""
            for c in out.outputs:
                logprobs = None
                if request.logprobs is not None:
                    logprobs, _ = self._logprobs(c.logprobs or [], len(prompt_text))
                choices.append(CompletionChoice(
                    index=p * request.n + c.index, text=prompt_text + c.text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                ))
        body = CompletionResponse(id=response_id, created=header["created"], model=header["model"], choices=choices,
                                  service_tier=header["service_tier"], usage=self.usage(finals))
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, request: CompletionRequest, prompts: list[str | list[int]], generation: Generation,
                      header: dict) -> AsyncIterator[str]:
        options = request.stream_options
        with_usage = options is not None and options.include_usage
        continuous = with_usage and options.continuous_usage_stats
        latest: dict[int, RequestOutput] = {}
        sent_logprobs: dict[int, int] = {}  # choice -> logprobs sent so far
        offsets: dict[int, int] = {}  # choice -> text offset of its next token
        finished: set[int] = set()
        try:
            async for p, out in generation.outputs():
                latest[p] = out
                choices = []
                for c in out.outputs:
                    index = p * request.n + c.index
                    if index in finished:
                        continue
                    if c.finish_reason == "error":
                        raise APIError(500, "the engine failed while running this request", code="engine_error")
                    text = c.delta_text
                    if request.echo and index not in offsets:
                        text = self._prompt_text(prompts[p], out) + text
                        offsets[index] = 0
                    logprobs = None
                    if request.logprobs is not None and c.logprobs and len(c.logprobs) > sent_logprobs.get(index, 0):
                        new = c.logprobs[sent_logprobs.get(index, 0):]
                        sent_logprobs[index] = len(c.logprobs)
                        lp, offsets[index] = self._logprobs(new, offsets.get(index, 0))
                        logprobs = lp.model_dump()
                    if not text and logprobs is None and c.finish_reason is None:
                        continue  # nothing to say yet (text held back for a possible stop string)
                    if c.finish_reason is not None:
                        finished.add(index)
                    choices.append({"index": index, "text": text, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if choices:
                    usage = self.usage(list(latest.values())) if continuous else None
                    yield chunk("text_completion", choices=choices, usage=usage, with_usage=with_usage, **header)
            if with_usage:
                yield chunk("text_completion", choices=[], usage=self.usage(list(latest.values())), with_usage=True,
                            **header)
        except Exception as exc:  # the stream has started: the error goes in it
            yield sse_error(exc)
        yield SSE_DONE

    def _prompt_text(self, prompt: str | list[int], out: RequestOutput) -> str:
        if isinstance(prompt, str):
            return prompt
        return "" if self.tokenizer is None else self.tokenizer.decode(out.prompt_token_ids)

    def _logprobs(self, tokens: list[SampledToken], offset: int) -> tuple[CompletionLogprobs, int]:
        """The legacy completions format; returns it and the text offset after its last token."""
        result = CompletionLogprobs()
        for token in tokens:
            text = self.token_text(token.token_id)
            top = dict(self.top_logprobs(token))
            top.setdefault(text, finite(token.logprob))
            result.tokens.append(text)
            result.token_logprobs.append(finite(token.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(text)
        return result, offset


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """One prompt (text or token ids) or a batch of them."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)
