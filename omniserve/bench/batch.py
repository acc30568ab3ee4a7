"""The BE stream as one OpenAI batch (`omniserve bench --be-batch`): its requests written as JSONL lines, uploaded
with POST /v1/files, one batch created when the run starts, polled until it ends or the run's drain timeout ends
(then cancelled), and its output file read for each line's answer and usage.

A line's body is what the HTTP path sends for the same request (client.request_body), less `stream` and
`stream_options`: a batch line cannot stream. Arrival times do not apply: the whole stream is one batch.

The batch's wall time runs from the request that creates it to the poll that finds it ended (or to the cancel);
lines/s and output tokens/s are the completed lines and their usage over that time. Polls are --poll-s apart, so the
wall time is late by at most one poll (0.25 s by default: 0.25% of a 100 s batch).

As with the HTTP client, nothing the server does may hang or crash a run: an upload or a creation the server refuses
ends the batch as `not_created` with the reason; a poll that fails is retried until the deadline.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from omniserve.batch.protocol import TERMINAL
from omniserve.bench.client import ENDPOINTS, Stream, Target, auth_headers, http_client, request_body, run_streams
from omniserve.bench.metrics import Record
from omniserve.bench.workload import Request

CANCEL_WAIT_S = 60.0  # how long a cancelled batch may take to end (its lines in flight are aborted at once)


class BatchError(RuntimeError):
    """The server refused a Files or Batches call; the message has its status and error."""


@dataclass(frozen=True)
class BatchJob:
    """The BE stream to send as one batch."""

    target: Target
    requests: list[Request]
    poll_s: float = 0.25


@dataclass
class LineOutcome:
    """What the batch's files say of one line."""

    status: str  # completed | failed | not_run (cancelled, or never answered)
    output_tokens: int = 0
    text: str | None = None
    error: str = ""


@dataclass
class BatchOutcome:
    """The batch's end, as the client saw it; times are seconds from the start of the run."""

    batch_id: str | None = None
    status: str = "not_created"  # the batch's last status, or not_created
    error: str = ""
    created: float | None = None
    ended: float | None = None
    lines: dict[str, LineOutcome] = field(default_factory=dict)  # custom_id -> outcome, in input order

    @classmethod
    def pending(cls, num_lines: int) -> BatchOutcome:
        """A batch of this many lines, none of them run yet."""
        return cls(lines={custom_id(n): LineOutcome("not_run") for n in range(num_lines)})

    def summary(self) -> dict:
        """The BE figures of a run in batch mode (see the module docstring)."""
        counts = collections.Counter(line.status for line in self.lines.values())
        errors = collections.Counter(line.error for line in self.lines.values() if line.error)
        if self.error:
            errors[self.error] += 1
        wall = (self.ended - self.created) if self.created is not None and self.ended is not None else None
        tokens = sum(line.output_tokens for line in self.lines.values() if line.status == "completed")
        per_second = (lambda n: n / wall) if wall else (lambda n: 0.0)
        return {"mode": "batch", "batch_id": self.batch_id, "status": self.status, "lines": len(self.lines),
                "completed": counts["completed"], "failed": counts["failed"], "not_run": counts["not_run"],
                "wall_seconds": wall, "lines_per_second": per_second(counts["completed"]),
                "output_tokens": tokens, "output_throughput": per_second(tokens),
                "errors": dict(errors.most_common(5))}


def custom_id(index: int) -> str:
    return f"be-{index}"


def line_body(target: Target, request: Request, tokenizer=None) -> dict:
    """The HTTP path's body for the request, not streamed."""
    body = request_body(target, request, tokenizer)
    body.pop("stream", None)
    body.pop("stream_options", None)
    return body


def batch_file(target: Target, requests: list[Request], tokenizer=None) -> bytes:
    """The batch's input file: one line per request, custom_id `be-<index>`."""
    url = ENDPOINTS[target.endpoint]
    return b"".join(json.dumps({"custom_id": custom_id(n), "method": "POST", "url": url,
                                "body": line_body(target, request, tokenizer)}).encode() + b"\n"
                    for n, request in enumerate(requests))


class BatchClient:
    """The Files and Batches calls a run makes, over one httpx client."""

    def __init__(self, client: httpx.AsyncClient, target: Target) -> None:
        self.client = client
        self.base = target.base_url.rstrip("/") + "/v1"
        self.headers = auth_headers(target.api_key)

    async def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = await self.client.request(method, self.base + path, headers=self.headers, **kwargs)
        if response.status_code != 200:
            raise BatchError(f"{method} /v1{path}: HTTP {response.status_code}: {response.text[:200]}")
        return response

    async def upload(self, content: bytes, filename: str = "bench-be.jsonl") -> str:
        files = {"file": (filename, content, "application/jsonl")}
        return (await self._call("POST", "/files", files=files, data={"purpose": "batch"})).json()["id"]

    async def create(self, file_id: str, endpoint: str) -> dict:
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        return (await self._call("POST", "/batches", json=body)).json()

    async def retrieve(self, batch_id: str) -> dict:
        return (await self._call("GET", f"/batches/{batch_id}")).json()

    async def cancel(self, batch_id: str) -> dict:
        return (await self._call("POST", f"/batches/{batch_id}/cancel")).json()

    async def content(self, file_id: str) -> bytes:
        return (await self._call("GET", f"/files/{file_id}/content")).content


def _answer(body: dict) -> tuple[str | None, int]:
    """The first choice's text and the usage's completion tokens of a completion or chat answer."""
    choices = body.get("choices") or [{}]
    choice = choices[0]
    text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
    return text, int((body.get("usage") or {}).get("completion_tokens") or 0)


def read_results(outcome: BatchOutcome, output: bytes, errors: bytes) -> None:
    """Each line's outcome from the batch's output and error files (lines in neither were not run)."""
    for raw in (output + b"\n" + errors).splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        cid, response = line.get("custom_id"), line.get("response") or {}
        if cid not in outcome.lines:
            continue
        if response.get("status_code") == 200:
            text, tokens = _answer(response.get("body") or {})
            outcome.lines[cid] = LineOutcome("completed", tokens, text)
            continue
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        status = f"HTTP {response['status_code']}: " if response.get("status_code") else ""
        outcome.lines[cid] = LineOutcome("failed", error=(status + str(error.get("message", error)))[:200])


async def _poll(batches: BatchClient, batch: dict, deadline: float, clock: Callable[[], float], poll_s: float,
                on_progress: Callable[[int], None] | None) -> dict:
    """Polls until the batch ends or the deadline passes; returns its last object (a failed poll keeps the one
    before)."""
    while batch["status"] not in TERMINAL and clock() < deadline:
        await asyncio.sleep(min(poll_s, max(0.0, deadline - clock())))
        try:
            batch = await batches.retrieve(batch["id"])
        except (BatchError, httpx.HTTPError):
            continue  # a poll the server did not answer: the next one may
        if on_progress is not None:
            counts = batch.get("request_counts") or {}
            on_progress(int(counts.get("completed", 0)) + int(counts.get("failed", 0)))
    return batch


async def _finish(batches: BatchClient, batch: dict, outcome: BatchOutcome, clock: Callable[[], float]) -> None:
    """Cancels the batch if it is still running (its wall time ends there), waits for it to end, reads its files. A
    cancel the server refuses (409: the batch is already finishing) leaves the batch to end on its own."""
    outcome.ended = clock()
    if batch["status"] not in TERMINAL:
        if batch["status"] != "cancelling":
            try:
                batch = await batches.cancel(batch["id"])
            except (BatchError, httpx.HTTPError):
                pass  # polled below: the batch may end on its own
        batch = await _poll(batches, batch, clock() + CANCEL_WAIT_S, clock, 0.1, None)
    outcome.status = batch["status"]
    output = await batches.content(batch["output_file_id"]) if batch.get("output_file_id") else b""
    errors = await batches.content(batch["error_file_id"]) if batch.get("error_file_id") else b""
    read_results(outcome, output, errors)


async def run_batch(batches: BatchClient, file_id: str, job: BatchJob, deadline: float, clock: Callable[[], float],
                    on_progress: Callable[[int], None] | None = None) -> BatchOutcome:
    """Creates the batch of the uploaded file, polls it until it ends or the deadline passes (then cancels it), and
    reads its results. Never raises for what the server answers: the outcome says it."""
    outcome = BatchOutcome.pending(len(job.requests))
    outcome.created = clock()
    try:
        batch = await batches.create(file_id, ENDPOINTS[job.target.endpoint])
        outcome.batch_id, outcome.status = batch["id"], batch["status"]
        batch = await _poll(batches, batch, deadline, clock, job.poll_s, on_progress)
        await _finish(batches, batch, outcome, clock)
    except (BatchError, httpx.HTTPError, ValueError, KeyError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
        outcome.ended = outcome.ended if outcome.ended is not None else clock()
    return outcome


async def run_beside(streams: list[Stream], job: BatchJob, duration: float, drain_timeout: float,
                     request_timeout: float, tokenizer=None, on_done: Callable[[Record], None] | None = None,
                     on_lines: Callable[[int], None] | None = None
                     ) -> tuple[list[Record], float, BatchOutcome]:
    """The HTTP streams (run_streams) and the batch at once: the file is uploaded first, then the streams start and
    the batch is created together. The batch may run until `duration + drain_timeout`, whatever the streams do;
    returns the streams' records, the run's length (both done) and the batch's outcome."""
    async with http_client(request_timeout) as client:
        batches = BatchClient(client, job.target)
        try:
            file_id = await batches.upload(batch_file(job.target, job.requests, tokenizer))
        except (BatchError, httpx.HTTPError) as exc:
            records, seconds = await run_streams(streams, duration, drain_timeout, request_timeout, tokenizer,
                                                 on_done)
            outcome = BatchOutcome.pending(len(job.requests))
            outcome.error = f"upload: {exc}"[:200]
            return records, seconds, outcome
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        (records, _), outcome = await asyncio.gather(
            run_streams(streams, duration, drain_timeout, request_timeout, tokenizer, on_done),
            run_batch(batches, file_id, job, duration + drain_timeout, clock, on_lines))
        return records, clock(), outcome
