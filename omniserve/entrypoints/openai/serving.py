"""What completions and chat completions share: a request's service and SamplingParams, the engine requests behind
one HTTP request (started, run to the end, or streamed), logprobs and usage, and an SSE response that ends its engine
requests however it ends.

An HTTP request is answered only once its engine requests have produced their first output, so that bad input
(400) and an LS request the scheduler rejects (429, 503 while draining) get a status code even when streaming, and
no stream ever starts with an empty chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from omniserve.engine.async_engine import AsyncEngine, EngineDeadError
from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.outputs import RequestOutput
from omniserve.entrypoints.openai.errors import APIError, error_body
from omniserve.entrypoints.openai.protocol import SamplingRequest, UsageInfo
from omniserve.entrypoints.openai.served_models import Resolved, ServedModels
from omniserve.sampling.params import InvalidRequestError, SamplingParams, ServiceClass
from omniserve.sampling.sampler import SampledToken

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its engine requests were aborted."""


@dataclass
class ServerState:
    """What every handler shares."""

    engine: LLMEngine
    models: ServedModels
    drain_grace_s: float = 30.0
    async_engine: AsyncEngine | None = None
    """Started with the app (its lifespan), stopped with it."""
    draining: bool = False
    """Set on SIGTERM: new generation requests get 503 while those in flight finish."""
    in_flight: set[str] = field(default_factory=set)
    """Engine request ids of HTTP requests not yet answered in full."""

    def engine_or_503(self) -> AsyncEngine:
        if self.async_engine is None or not self.async_engine.alive:
            raise APIError(503, "the engine is not running", code="engine_dead")
        return self.async_engine


class OpenAIServing:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.tokenizer = state.engine.tokenizer
        self._token_texts: dict[int, str] = {}

    # -------------------------------------------------------------------------------------------- request -> params
    def resolve(self, request: SamplingRequest, allowed: frozenset[ServiceClass] | None) -> Resolved:
        """The request's model and service; 404 for an unknown model, 403 for a class its API key may not use."""
        resolved = self.state.models.resolve(request.model, request.wants_best_effort)
        if allowed is not None and resolved.service_class not in allowed:
            raise APIError(403, f"this API key may not use {resolved.service_class.value.upper()} service "
                           f"(`{resolved.model.name}`); send service_tier 'flex' or use a best-effort model name",
                           param="service_tier", code="service_class_not_allowed")
        return resolved

    @staticmethod
    def sampling_params(request: SamplingRequest, resolved: Resolved, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        problem = request.unsupported()
        if problem is not None:
            raise APIError(400, problem[1], param=problem[0])
        try:
            return SamplingParams(
                n=request.n,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=0 if request.top_k is None else request.top_k,
                min_p=0.0 if request.min_p is None else request.min_p,
                seed=request.seed,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
                stop_token_ids=list(request.stop_token_ids or []),
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=request.skip_special_tokens,
                service_class=resolved.service_class,
                service=resolved.service.name,
            )
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def retry_after(self, resolved: Resolved) -> str:
        """Seconds a rejected client should wait: the service's TTFT SLO (work queued now is done by then), at least
        one; the grace period when draining (by then this server is gone: try another)."""
        if self.state.draining:
            return str(max(1, math.ceil(self.state.drain_grace_s)))
        return str(max(1, math.ceil(resolved.service.ttft_slo or 1.0)))

    # ----------------------------------------------------------------------------------------------- generation
    async def start(self, raw_request: Request, request_ids: list[str], prompts: list[str | list[int]],
                    params: SamplingParams, resolved: Resolved) -> "Generation":
        """Submits one engine request per prompt and waits for their first outputs (see Generation.start)."""
        generation = Generation(self.state, request_ids, prompts, params)
        await until_disconnected(raw_request, generation.start(), generation)
        if generation.rejected:
            await generation.aclose()
            headers = {"Retry-After": self.retry_after(resolved)}
            if self.state.draining:
                raise APIError(503, "the server is shutting down and cannot take this latency-sensitive request",
                               code="draining", headers=headers)
            raise APIError(429, "the server cannot meet this latency-sensitive request's time-to-first-token SLO now; "
                           "retry later, or ask for best effort (service_tier 'flex')", code="slo_rejected",
                           headers=headers)
        return generation

    # ----------------------------------------------------------------------------------------- logprobs and usage
    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"  # vLLM's spelling when tokens are returned as ids
            else:
                text = self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text

    def top_logprobs(self, token: SampledToken) -> list[tuple[str, float]]:
        return [(self.token_text(t), finite(lp)) for t, lp in token.top_logprobs]

    @staticmethod
    def usage(outputs: list[RequestOutput]) -> UsageInfo:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def check_finished_well(self, outputs: list[RequestOutput]) -> None:
        """A completion the engine failed (a failed iteration) is a 500, not a short answer."""
        if any(c.finish_reason == "error" for o in outputs for c in o.outputs):
            raise APIError(500, "the engine failed while running this request", code="engine_error")


class Generation:
    """The engine requests of one HTTP request: one per prompt, each with its n completions."""

    def __init__(self, state: ServerState, request_ids: list[str], prompts: list[str | list[int]],
                 params: SamplingParams) -> None:
        self._state = state
        self._engine = state.engine_or_503()
        self.request_ids = request_ids
        self._streams = [self._engine.generate(r, p, params) for r, p in zip(request_ids, prompts)]
        self.firsts: list[RequestOutput] = []
        self._done = False
        state.in_flight.update(request_ids)

    @property
    def rejected(self) -> bool:
        return any(c.finish_reason == "rejected" for out in self.firsts for c in out.outputs)

    async def start(self) -> None:
        """Waits until every engine request has produced its first output (its first tokens, or its end).
        Input the engine refuses raises APIError 400; nothing is left running."""
        if len(self._streams) == 1:
            results = [await _first(self._streams[0])]
        else:
            results = await asyncio.gather(*(_first(s) for s in self._streams), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        self.firsts = list(results)

    async def finals(self) -> list[RequestOutput]:
        """Runs every engine request to its end; its last output holds its whole text, tokens and logprobs."""
        async def last(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
            out = first
            if not out.finished:
                async for out in stream:
                    pass
            return out

        try:
            if len(self._streams) == 1:
                finals = [await last(self.firsts[0], self._streams[0])]
            else:
                finals = list(await asyncio.gather(*(last(f, s) for f, s in zip(self.firsts, self._streams))))
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None
        self._finish()
        return finals

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, starting with the first outputs."""
        if len(self._streams) == 1:
            yield 0, self.firsts[0]
            if not self.firsts[0].finished:
                async for out in self._streams[0]:
                    yield 0, out
            self._finish()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                queue.put_nowait((index, self.firsts[index]))
                if not self.firsts[index].finished:
                    async for out in self._streams[index]:
                        queue.put_nowait((index, out))
                queue.put_nowait((index, None))
            except Exception as exc:
                queue.put_nowait((index, exc))

        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(self._streams))]
        try:
            remaining = len(pumps)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
            self._finish()
        finally:
            for task in pumps:
                task.cancel()

    def _finish(self) -> None:
        self._done = True
        self._state.in_flight.difference_update(self.request_ids)

    async def aclose(self) -> None:
        """Ends whatever is still running (a client gone, an error, a shutdown) and frees its memory now."""
        if self._done:
            return
        self._finish()
        for stream in self._streams:
            try:
                await stream.aclose()  # aborts the request if it had not finished
            except RuntimeError:  # it is running in a task being cancelled: that one aborts it
                pass
        for request_id in self.request_ids:
            self._engine.abort(request_id)  # no-op for finished ids


def finite(logprob: float | None) -> float | None:
    """-inf (a token masked out) as a very small number: JSON has no infinity."""
    return None if logprob is None else max(logprob, -9999.0)


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(stream)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_dead") from None


async def until_disconnected(raw_request: Request, work: Awaitable[T], generation: Generation) -> T:
    """Runs `work`; if the client disconnects first, aborts the generation and raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(raw_request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            await generation.aclose()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def chunk(obj: str, response_id: str, created: int, model: str, service_tier: str, choices: list[dict],
          usage: UsageInfo | None = None, with_usage: bool = False) -> str:
    """One streamed chunk as an SSE event; `usage` is a key only when the client asked for usage."""
    body = {"id": response_id, "object": obj, "created": created, "model": model, "service_tier": service_tier,
            "choices": choices}
    if with_usage:
        body["usage"] = None if usage is None else usage.model_dump()
    return sse(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: the OpenAI client raises it as an APIError."""
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    if isinstance(exc, EngineDeadError):
        return sse(error_body(503, str(exc), code="engine_dead"))
    logger.exception("stream failed", exc_info=exc)
    return sse(error_body(500, "internal error while streaming"))


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose engine requests end with the response, whichever way it ends: done, client gone
    (Starlette cancels the stream), or the server's grace period over."""

    def __init__(self, content: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._generation.aclose()
