"""What completions and chat completions share: the limits on what one request may ask for, a request's service
and SamplingParams, its prompts as token ids, the engine requests behind one HTTP request (started, run to the end,
or streamed), logprobs and usage, and SSE responses.

Both answer a request with the same steps (OpenAIServing.create); a handler supplies only what differs: its prompts
(a chat template, or the prompts as sent), its choices in a whole answer, and each choice's fields in a chunk.

An HTTP request is answered only once its engine requests have produced their first output, so that bad input
(400) and an LS request the scheduler rejects (429, 503 while draining) get a status code even when streaming, and
no stream ever starts with an empty chunk.

Text is tokenized here, in a worker thread, never on the event loop (it would stall every stream) nor on the engine
thread (it would stall every generation): a long prompt takes seconds to tokenize. The tokenizer releases the GIL,
so the other threads run meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from omniserve.engine.async_engine import AsyncEngine, EngineDeadError
from omniserve.engine.llm_engine import LLMEngine
from omniserve.engine.outputs import CompletionOutput, RequestOutput
from omniserve.entrypoints.openai.protocol import PromptTokensDetails, SamplingRequest, UsageInfo, now
from omniserve.entrypoints.openai.http_context import RequestLimits
from omniserve.entrypoints.openai.served_models import Resolved, ServedModels
from omniserve.errors import APIError, error_body
from omniserve.sampling.params import InvalidRequestError, SampledToken, SamplingParams, ServiceClass

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (its engine requests end with the HTTP request)."""


@dataclass
class ServerState:
    """What every handler shares."""

    engine: LLMEngine
    models: ServedModels
    drain_grace_s: float = 30.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    async_engine: AsyncEngine | None = None
    """Started with the app (its lifespan), stopped with it."""
    draining: bool = False
    """Set on SIGTERM: new generation requests get 503 while those in flight finish."""
    in_flight: set[Generation] = field(default_factory=set)
    """The generations of HTTP requests not yet answered in full."""
    max_prompt_chars: int | None = field(init=False)
    """A text longer than this cannot fit in the context, so it is refused without being tokenized (None: no
    tokenizer). A token never stands for more characters than the longest string in the vocabulary (byte-level
    vocabularies spell each byte as one character, so they overcount), so a prompt of more than max_model_len times
    that many characters has more than max_model_len tokens. (A word-level tokenizer that maps any unknown word to
    one token is the exception; no LLM tokenizer works that way.)"""
    longest_token_chars: int | None = field(init=False)
    """The most characters one token stands for (None: no tokenizer)."""

    def __post_init__(self) -> None:
        tokenizer = self.engine.tokenizer
        self.max_prompt_chars = self.longest_token_chars = None
        if tokenizer is not None:
            self.longest_token_chars = max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
            self.max_prompt_chars = self.models.max_model_len * self.longest_token_chars

    def engine_or_503(self) -> AsyncEngine:
        if self.async_engine is None or not self.async_engine.alive:
            raise APIError(503, "the engine is not running", code="engine_dead")
        return self.async_engine

    def end_in_flight(self) -> None:
        """The drain's grace period is over: every generation still running ends now, with an error its client
        sees (a stream's last event before [DONE], or the status of a whole answer), and frees its memory."""
        error = APIError(503, "the server shut down before this request finished", code="draining")
        for generation in list(self.in_flight):
            generation.end(error)


ChoiceDelta = Callable[[int, int, RequestOutput, CompletionOutput, list[SampledToken] | None], dict | None]
"""A streamed choice's own fields in a chunk, from (choice index, prompt index, the prompt's latest output, the
choice's output, its logprobs not sent yet or None); None when it has nothing to say yet (never at its end)."""


@dataclass
class Call:
    """One call of a generation endpoint: an HTTP request, or a batch line (omniserve.batch)."""

    request_id: str
    service_classes: frozenset[ServiceClass] | None
    """The classes the caller's API key may use; None: every class."""
    generations: list[Generation] = field(default_factory=list)
    """What the call runs in the engine; whoever made the call closes them when it ends, however it ends."""
    guard: Callable[[Awaitable[T]], Awaitable[T]] = lambda work: work
    """Runs each wait of the call: an HTTP request's ends when its client disconnects."""
    best_effort: bool = False
    """Served by the best-effort service of the model the request names (a batch line)."""
    drained: bool = True
    """A drain waits for the call to finish (a batch line is not waited for: it resumes after a restart)."""
    on_started: Callable[[], None] | None = None
    """Called once the engine has produced the call's first outputs."""
    owner: str | None = None
    """Who the caller's API key stands for (None: the server has no keys): its requests share cached prompt
    prefixes with this owner's only."""

    @classmethod
    def of(cls, raw_request: Request) -> Call:
        state = raw_request.state
        return cls(state.request_id, state.service_classes, state.generations,
                   lambda work: until_disconnected(raw_request, work), owner=state.owner)

    def cache_salt(self, request_salt: str | None) -> str | None:
        """The prefix cache's salt of the call's requests: its owner's and the request's own."""
        if self.owner is None and request_salt is None:
            return None
        return f"{self.owner or ''}\0{request_salt or ''}"


class OpenAIServing:
    """A generation endpoint: the steps every request takes, and the hooks a handler fills in."""

    id_prefix: str
    """The response id is `{id_prefix}-{request id}`."""
    chunk_object: str
    """The `object` of a streamed chunk."""
    response_type: type[BaseModel]
    """The body of a whole answer: id, created, model, choices, service_tier, usage."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.tokenizer = state.engine.tokenizer
        self._token_texts: dict[int, str] = {}

    async def create(self, request: SamplingRequest, raw_request: Request) -> Response:
        """Checks the request, tokenizes its prompts, starts their engine requests, and answers: a stream of
        chunks, or the whole answer once every completion is done."""
        call = Call.of(raw_request)
        if request.stream:
            generation, header = await self._begin(request, call)
            return EventStreamResponse(self._stream(request, generation, header))
        body = await self.complete(request, call)
        return Response(body.model_dump_json(), media_type="application/json")

    async def complete(self, request: SamplingRequest, call: Call) -> BaseModel:
        """The whole answer to a request that does not stream (a batch line runs this too)."""
        generation, header = await self._begin(request, call)
        finals = await call.guard(generation.finals())
        self.check_finished_well(finals)
        return self.response_type(id=header["response_id"], created=header["created"], model=header["model"],
                                  choices=self.choices(request, finals), service_tier=header["service_tier"],
                                  usage=self.usage(finals))

    async def _begin(self, request: SamplingRequest, call: Call) -> tuple[Generation, dict]:
        """Checks the request, tokenizes its prompts and starts their engine requests; returns them with the fields
        every answer and chunk carries."""
        resolved = self.resolve(request, call.service_classes, call.best_effort)
        params = replace(self.sampling_params(request, resolved), cache_salt=call.cache_salt(request.cache_salt))
        if params.structured_outputs is not None:  # checked off the event loop and the engine thread (then cached)
            try:
                await run_in_threadpool(self.state.engine.grammars.compile, params.structured_outputs)
            except InvalidRequestError as exc:  # named by the field the request used (else its tools made it)
                raise APIError(400, str(exc), param=(request.structured_fields or ["tools"])[0]) from None
        self._check_prompt_chars(request)
        prompts = await self.prompts(request)
        total = sum(len(p) for p in prompts)
        if total > self.state.limits.max_prompt_tokens:
            raise APIError(400, f"a request may carry at most {self.state.limits.max_prompt_tokens} prompt tokens, all "
                           f"its prompts together; this one has {total}", param="prompt")
        response_id = f"{self.id_prefix}-{call.request_id}"
        ids = [response_id] if len(prompts) == 1 else [f"{response_id}-{i}" for i in range(len(prompts))]
        generation = await self.start(call, ids, prompts, params, resolved)
        header = dict(response_id=response_id, created=now(), model=resolved.model.name,
                      service_tier=resolved.service_tier)
        return generation, header

    # ------------------------------------------------------------------------------------------ what handlers give
    async def prompts(self, request: SamplingRequest) -> list[list[int]]:
        """The request's prompts as token ids, one engine request each."""
        raise NotImplementedError

    def choices(self, request: SamplingRequest, finals: list[RequestOutput]) -> list[BaseModel]:
        """The choices of a whole answer, from each prompt's final output."""
        raise NotImplementedError

    def choice_deltas(self, request: SamplingRequest) -> ChoiceDelta:
        """The fields of a streamed choice, for one stream (it may keep what it has sent so far)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- request -> params
    def resolve(self, request: SamplingRequest, allowed: frozenset[ServiceClass] | None,
                best_effort: bool = False) -> Resolved:
        """The request's model and service (with best_effort: the best-effort service of the model it names); 404
        for an unknown model, 403 for a class its API key may not use."""
        if best_effort:
            resolved = self.state.models.resolve_best_effort(request.model)
        else:
            resolved = self.state.models.resolve(request.model, request.service_tier, request.priority)
        if allowed is not None and resolved.service_class not in allowed:
            raise APIError(403, f"this API key may not use {resolved.service_class.value.upper()} service "
                           f"(`{resolved.model.name}`); send service_tier 'flex' or use a best-effort model name",
                           param="service_tier", code="service_class_not_allowed")
        return resolved

    def sampling_params(self, request: SamplingRequest, resolved: Resolved) -> SamplingParams:
        problem = request.unsupported()
        if problem is not None:
            raise APIError(400, problem[1], param=problem[0])
        limits = self.state.limits
        if request.n > limits.max_n:
            raise APIError(400, f"n must be at most {limits.max_n}, got {request.n}", param="n")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"at most {limits.max_stop} stop sequences are allowed, got {len(stop)}", param="stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise APIError(400, f"a stop sequence may have at most {limits.max_stop_chars} characters, got "
                           f"{max(len(s) for s in stop)}", param="stop")
        num_prompts = len(request.prompts)
        if num_prompts > limits.max_prompts:
            raise APIError(400, f"at most {limits.max_prompts} prompts are allowed in one request, got {num_prompts}",
                           param="prompt")
        if request.n * num_prompts > limits.max_prompts:
            raise APIError(400, f"n x prompts must be at most {limits.max_prompts}, got {request.n} x {num_prompts}",
                           param="n")
        try:
            return SamplingParams(
                structured_outputs=request.structured(),
                n=request.n,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=0 if request.top_k is None else request.top_k,
                min_p=0.0 if request.min_p is None else request.min_p,
                presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0,
                repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
                seed=request.seed,
                max_tokens=request.max_new_tokens,
                min_tokens=request.min_tokens,
                stop=stop,
                stop_token_ids=list(request.stop_token_ids or []),
                ignore_eos=request.ignore_eos,
                logprobs=request.num_logprobs,
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

    # ------------------------------------------------------------------------------------------------- prompts
    def _check_prompt_chars(self, request: SamplingRequest) -> None:
        """Text prompts too long together for max_prompt_tokens are refused before any is tokenized (a token never
        stands for more characters than the vocabulary's longest string: see ServerState.max_prompt_chars)."""
        if self.state.longest_token_chars is None:
            return
        chars = sum(len(p) for p in request.prompts if isinstance(p, str))
        limit = self.state.limits.max_prompt_tokens
        if chars > limit * self.state.longest_token_chars:
            raise APIError(400, f"a request may carry at most {limit} prompt tokens, all its prompts together, and "
                           f"{chars} characters of prompts are more than that", param="prompt")

    async def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """A prompt as token ids. Text is tokenized in a worker thread (see the module docstring), and only when it
        can fit in the context; ids that cannot fit are refused here too, before the engine thread checks them."""
        limit = self.state.models.max_model_len
        if not isinstance(prompt, str):
            if len(prompt) > limit:
                raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                               f"{len(prompt)} tokens", param="prompt")
            return prompt
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (random weights): pass token ids", param="prompt")
        if len(prompt) > self.state.max_prompt_chars:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, and a prompt of "
                           f"{len(prompt)} characters is longer than that", param="prompt")
        return await run_in_threadpool(self._encode, prompt, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    # ----------------------------------------------------------------------------------------------- generation
    async def start(self, call: Call, request_ids: list[str], prompts: list[list[int]],
                    params: SamplingParams, resolved: Resolved) -> "Generation":
        """Submits one engine request per prompt and waits for their first outputs (see Generation.start).
        A request that reaches this point during a drain gets 503: it is not in flight yet."""
        if self.state.draining:
            raise APIError(503, "the server is shutting down", code="draining",
                           headers={"Retry-After": self.retry_after(resolved)})
        generation = Generation(self.state, request_ids, prompts, params, drained=call.drained)
        call.generations.append(generation)  # whoever made the call ends it when the call ends
        await call.guard(generation.start())
        if generation.rejected:
            headers = {"Retry-After": self.retry_after(resolved)}
            if self.state.draining:
                raise APIError(503, "the server is shutting down and cannot take this latency-sensitive request",
                               code="draining", headers=headers)
            raise APIError(429, "the server cannot meet this latency-sensitive request's time-to-first-token SLO now; "
                           "retry later, or ask for best effort (service_tier 'flex')", code="slo_rejected",
                           headers=headers)
        if call.on_started is not None:
            call.on_started()
        return generation

    async def _stream(self, request: SamplingRequest, generation: Generation, header: dict) -> AsyncIterator[str]:
        """The chunks of a streamed answer: choice p * n + i of prompt p, each with what is new since its last
        chunk, and its finish reason once; the usage when asked for; an error in the stream once it has started;
        then [DONE]."""
        options = request.stream_options
        with_usage = options is not None and options.include_usage
        continuous = with_usage and options.continuous_usage_stats
        with_logprobs = request.num_logprobs is not None
        choice_fields = self.choice_deltas(request)
        latest: dict[int, RequestOutput] = {}  # prompt -> its latest output
        sent_logprobs: dict[int, int] = {}  # choice -> logprobs sent so far
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
                    new_logprobs = None
                    if with_logprobs and c.logprobs and len(c.logprobs) > sent_logprobs.get(index, 0):
                        new_logprobs = c.logprobs[sent_logprobs.get(index, 0):]
                        sent_logprobs[index] = len(c.logprobs)
                    fields = choice_fields(index, p, out, c, new_logprobs)
                    if fields is None:  # nothing to say yet: text may be held back for a possible stop string
                        continue
                    if c.finish_reason is not None:
                        finished.add(index)
                    choices.append({"index": index, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                    **fields})  # the handler's fields may restate the finish reason
                if choices:
                    usage = self.usage(list(latest.values())) if continuous else None
                    yield chunk(self.chunk_object, choices=choices, usage=usage, with_usage=with_usage, **header)
            if with_usage:
                yield chunk(self.chunk_object, choices=[], usage=self.usage(list(latest.values())),
                            with_usage=True, **header)
        except Exception as exc:  # the stream has started: the error goes in it
            yield sse_error(exc)
        yield SSE_DONE

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
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def check_finished_well(self, outputs: list[RequestOutput]) -> None:
        """A completion the engine failed (a failed iteration) is a 500, not a short answer."""
        if any(c.finish_reason == "error" for o in outputs for c in o.outputs):
            raise APIError(500, "the engine failed while running this request", code="engine_error")


class Generation:
    """The engine requests of one HTTP request: one per prompt, each with its n completions.

    Their outputs come through one queue, fed by a task per engine request, so that the reader sees them in the
    order they came and a drain can end the generation by putting its error in the same queue. The HTTP middleware
    calls `close()` when the HTTP request ends, however it ends, so nothing outlives it: not the engine requests,
    not the generation's place in the server's in-flight set."""

    def __init__(self, state: ServerState, request_ids: list[str], prompts: list[list[int]],
                 params: SamplingParams, drained: bool = True) -> None:
        self._state = state
        self._engine = state.engine_or_503()
        self.request_ids = request_ids
        self.firsts: list[RequestOutput] = []
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._read_ahead: list[tuple[int, RequestOutput]] = []  # what start() read, for outputs() to yield first
        self._unfinished = set(range(len(request_ids)))  # as the reader has seen them
        self._running = set(range(len(request_ids)))  # engine requests that may still hold memory
        # One engine turn queues them all, admitted or rejected as one (a request of many prompts that the SLO
        # scheduler turns away is turned away before any of its prompts runs).
        streams = self._engine.generate_all(list(zip(request_ids, prompts)), params)
        self._feeders = [asyncio.ensure_future(self._feed(i, stream)) for i, stream in enumerate(streams)]
        if drained:
            state.in_flight.add(self)

    async def _feed(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
        except Exception as exc:  # refused by the engine, or the engine gone
            self._queue.put_nowait((index, exc))
        self._running.discard(index)

    @property
    def rejected(self) -> bool:
        return any(c.finish_reason == "rejected" for out in self.firsts for c in out.outputs)

    async def start(self) -> None:
        """Waits until every engine request has produced its first output (its first tokens, or its end).
        Input the engine refuses raises APIError 400."""
        firsts: dict[int, RequestOutput] = {}
        while len(firsts) < len(self.request_ids):
            index, out = await self._next()
            self._read_ahead.append((index, out))
            firsts.setdefault(index, out)
        self.firsts = [firsts[i] for i in range(len(self.request_ids))]

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, from the first outputs on, until every one is done."""
        while self._read_ahead:
            yield self._read_ahead.pop(0)
        while self._unfinished:
            yield await self._next()

    async def finals(self) -> list[RequestOutput]:
        """Runs every engine request to its end; its last output holds its whole text, tokens and logprobs."""
        last: dict[int, RequestOutput] = {}
        async for index, out in self.outputs():
            last[index] = out
        return [last[i] for i in range(len(self.request_ids))]

    async def _next(self) -> tuple[int, RequestOutput]:
        index, item = await self._queue.get()
        if isinstance(item, InvalidRequestError):
            raise APIError(400, str(item), param=item.param)
        if isinstance(item, EngineDeadError):
            raise APIError(503, str(item), code="engine_dead")
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(index)
        return index, item

    def end(self, error: APIError) -> None:
        """Ends the generation from outside (a drain): its engine requests stop, and its reader gets `error`."""
        self.close()
        self._queue.put_nowait((-1, error))

    def close(self) -> None:
        """Ends whatever is still running (a client gone, an error, a drain) and frees its memory now; idempotent."""
        self._state.in_flight.discard(self)
        for feeder in self._feeders:
            feeder.cancel()
        for index in self._running:  # only requests the engine took: an id it refused may be another request's
            self._engine.abort(self.request_ids[index])
        self._running.clear()


def finite(logprob: float | None) -> float | None:
    """-inf (a token masked out) as a very small number: JSON has no infinity."""
    return None if logprob is None else max(logprob, -9999.0)


async def until_disconnected(raw_request: Request, work: Awaitable[T]) -> T:
    """Runs `work`; if the client disconnects first, cancels it and raises ClientDisconnected (the middleware then
    ends the request's generation)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(raw_request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
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
    """Server-sent events. The stream's generator is closed however the response ends (done, or the client gone,
    when Starlette cancels it); its engine requests end with the HTTP request (see Generation)."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
