"""The load generator: sends each stream's requests to an OpenAI-compatible server at their arrival times (or keeps a
fixed number in flight), streams the answers and stamps every chunk.

Nothing the server does may hang or crash a run: an HTTP error status, a stream that ends before `[DONE]`, a chunk
that is not JSON or an error chunk makes the request `failed` (with the reason); a 429 makes it `rejected` (the SLO
admission of an LS request); a read that waits longer than the request timeout fails it; and whatever is still open
when the run ends is cancelled and counted as `cancelled`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import httpx

from omniserve.bench.metrics import Record
from omniserve.bench.workload import Request


@dataclass(frozen=True)
class Target:
    """Where and how one stream's requests go."""

    base_url: str
    model: str
    endpoint: str = "completions"  # completions | chat
    service_tier: str | None = None  # "flex" asks for best effort
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)


def request_body(target: Target, request: Request, tokenizer=None) -> dict:
    """The JSON body: greedy, exactly `output_len` tokens (ignore_eos), streamed with a final usage chunk."""
    body = {"model": target.model, "max_tokens": request.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if target.endpoint == "chat":
        prompt = request.prompt
        if not isinstance(prompt, str):  # random token ids: chat needs text
            prompt = tokenizer.decode(prompt) if tokenizer is not None else " ".join(map(str, prompt))
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = request.prompt
    if target.service_tier:
        body["service_tier"] = target.service_tier
    return {**body, **target.extra_body}


def _error_message(response_text: str) -> str:
    try:
        return str(json.loads(response_text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return response_text[:200]


ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
"""--endpoint -> the route a request goes to."""


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The API key as the OpenAI client sends it (none: no header)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def send(client: httpx.AsyncClient, target: Target, body: dict, record: Record, clock: Callable[[], float]
               ) -> None:
    """Sends one request and fills its record; never raises except to be cancelled (then it says `cancelled`)."""
    url = target.base_url.rstrip("/") + ENDPOINTS[target.endpoint]
    headers = auth_headers(target.api_key)
    record.sent = clock()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.status = "rejected" if response.status_code == 429 else "failed"
                record.error = f"HTTP {response.status_code}: {_error_message(text)}"
                return
            read = await _read_events(response, record, clock)
            if read is None:
                return
            done, usage_tokens, chunks_with_text = read
        record.end = clock()
        if not done:
            record.status, record.error = "failed", "the stream ended before [DONE]"
            return
        record.status = "ok"
        record.output_tokens = usage_tokens if usage_tokens is not None else chunks_with_text
    except asyncio.CancelledError:
        record.status, record.error, record.end = "cancelled", "still open when the run ended", clock()
        raise
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or JSON of the wrong shape
        record.status, record.error, record.end = "failed", f"malformed chunk: {exc}"[:200], clock()
    except httpx.HTTPError as exc:
        record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"[:200]
        record.end = clock()


async def _read_events(response: httpx.Response, record: Record, clock: Callable[[], float]
                       ) -> tuple[bool, int | None, int] | None:
    """Reads the answer's server-sent events into the record (each chunk with text stamps a token); returns whether
    [DONE] came, the completion tokens of the usage chunk (None without one) and the chunks with text, or None after
    an error chunk (the record then says so). Raises ValueError for a chunk that is not a JSON object."""
    chunks_with_text, usage_tokens = 0, None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return True, usage_tokens, chunks_with_text
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError(f"a chunk is {type(chunk).__name__}, not an object")
        if "error" in chunk:
            record.status, record.error = "failed", f"error chunk: {_error_message(data)}"
            return None
        now = clock()
        for choice in chunk.get("choices") or ():
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                record.token_times.append(now)
                if record.text is not None:
                    record.text += text
                chunks_with_text += 1
                break
        if chunk.get("usage"):
            usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
    return False, usage_tokens, chunks_with_text


def http_client(request_timeout: float) -> httpx.AsyncClient:
    """No limit on connections (an open-loop load must not queue in the client); `request_timeout` bounds each
    wait for the server (connecting, or the next chunk)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=min(10.0, request_timeout)),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


@dataclass
class Stream:
    """One class's requests, its target and (closed loop) how many to keep in flight."""

    service_class: str
    target: Target
    requests: list[Request]
    concurrency: int = 0


async def run_streams(streams: list[Stream], duration: float, drain_timeout: float, request_timeout: float,
                      tokenizer=None, on_done: Callable[[Record], None] | None = None, keep_text: bool = False
                      ) -> tuple[list[Record], float]:
    """Runs the streams together; returns every request's record and the run's length in seconds.

    Requests arrive during [0, duration); then the run drains (_drain). With keep_text each record keeps its
    answer's text."""
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    records: list[Record] = []
    tasks: dict[str, list[asyncio.Task]] = {}

    async def timed(client: httpx.AsyncClient, stream: Stream, request: Request, record: Record) -> None:
        await asyncio.sleep(max(0.0, request.arrival - clock()))
        try:
            await send(client, stream.target, request_body(stream.target, request, tokenizer), record, clock)
        finally:
            if on_done is not None and record.status != "cancelled":
                on_done(record)

    async def closed_loop(client: httpx.AsyncClient, stream: Stream, source: Iterator[Request]) -> None:
        while clock() < duration:
            request = next(source)
            record = Record(stream.service_class, clock(), request.input_len, request.output_len,
                            text="" if keep_text else None)
            records.append(record)
            await send(client, stream.target, request_body(stream.target, request, tokenizer), record, clock)
            if on_done is not None and record.status != "cancelled":
                on_done(record)

    async with http_client(request_timeout) as client:
        for stream in streams:
            own = tasks.setdefault(stream.service_class, [])
            if stream.concurrency > 0:
                source = itertools.cycle(stream.requests)  # shared: each slot sends the next; the pool repeats
                own += [asyncio.create_task(closed_loop(client, stream, source)) for _ in range(stream.concurrency)]
                continue
            for request in stream.requests:
                record = Record(stream.service_class, request.arrival, request.input_len, request.output_len,
                                text="" if keep_text else None)
                records.append(record)
                own.append(asyncio.create_task(timed(client, stream, request, record)))
        await _drain(tasks, duration, drain_timeout, clock)
    for record in records:
        if record.status == "pending":  # a closed-loop slot cancelled before it sent, or an arrival never reached
            record.status, record.error = "cancelled", "never sent"
    return records, clock()


async def _drain(tasks: dict[str, list[asyncio.Task]], duration: float, drain_timeout: float,
                 clock: Callable[[], float]) -> None:
    """Waits out the arrival window, then for the LS requests still open (or for all, without an LS stream) at most
    `drain_timeout` seconds, and cancels what is still open then."""
    await asyncio.sleep(max(0.0, duration - clock()))
    awaited = tasks.get("ls") or [t for own in tasks.values() for t in own]
    if awaited:
        await asyncio.wait(awaited, timeout=max(0.0, duration + drain_timeout - clock()))
    leftover = [t for own in tasks.values() for t in own if not t.done()]
    for task in leftover:
        task.cancel()
    await asyncio.gather(*leftover, return_exceptions=True)
