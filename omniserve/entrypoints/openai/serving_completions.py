"""POST /v1/completions: one engine request per prompt, each with its n completions; choice i of prompt p is
choice p * n + i of the response."""

from __future__ import annotations

from omniserve.engine.outputs import CompletionOutput, RequestOutput
from omniserve.entrypoints.openai.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
)
from omniserve.entrypoints.openai.serving import ChoiceDelta, OpenAIServing, finite
from omniserve.sampling.params import SampledToken


class CompletionServing(OpenAIServing):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    response_type = CompletionResponse

    async def prompts(self, request: CompletionRequest) -> list[list[int]]:
        return [await self.prompt_ids(p) for p in request.prompts]

    def choices(self, request: CompletionRequest, finals: list[RequestOutput]) -> list[CompletionChoice]:
        prompts, choices = request.prompts, []
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
        return choices

    def choice_deltas(self, request: CompletionRequest) -> ChoiceDelta:
        prompts = request.prompts
        offsets: dict[int, int] = {}  # choice -> text offset of its next token

        def fields(index: int, p: int, out: RequestOutput, c: CompletionOutput,
                   new_logprobs: list[SampledToken] | None) -> dict | None:
            text = c.delta_text
            if request.echo and index not in offsets:
                text = self._prompt_text(prompts[p], out) + text
                offsets[index] = 0
            logprobs = None
            if new_logprobs is not None:
                lp, offsets[index] = self._logprobs(new_logprobs, offsets.get(index, 0))
                logprobs = lp.model_dump()
            if not text and logprobs is None and c.finish_reason is None:
                return None
            return {"text": text, "logprobs": logprobs}

        return fields

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
