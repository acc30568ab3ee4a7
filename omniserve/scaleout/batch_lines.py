"""Batch lines behind the router: the router keeps the batches (its own BatchService and store: one durable place,
whatever happens to an instance) and runs each line on an engine instance, which runs it as it runs its own batch
lines (ServingLineRunner) and answers on BATCH_LINE_PATH in JSON lines, as the line goes:

    {"started": true}                   the line's first output came (the router's feeding counts it as started)
    {"status": 200, "body": {...}}      the line's answer: the status and body its route gives
    {"not_run": true}                   it could not run there now (draining, engine stopped): it stays pending
    (an empty line every HEARTBEAT_S while nothing else comes, so that the router tells a waiting line from a lost
    instance)

A line whose instance is lost (connection refused or cut, no heartbeat) stays pending and runs again on another one:
only an answer is written, once, so a line lost half-way is never answered twice.

The route runs lines for the router only: an instance that `serve --instances` started takes them with the key the
router got at its start (ROUTER_KEY_HEADER); an instance started on its own takes them only if it has no API keys.
A line runs with its batch's owner, so it shares cached prompt prefixes with that key's requests only, as on one
server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from omniserve.batch.service import LineNotRun
from omniserve.entrypoints.openai.batch_routes import REQUEST_TYPES, check_line_request
from omniserve.errors import error_body, error_response
from omniserve.sampling.params import ServiceClass

if TYPE_CHECKING:  # ServingLineRunner is the instance's side only: the router loads this module without the engine
    from omniserve.entrypoints.openai.serving_batch import ServingLineRunner
    from omniserve.scaleout.router import Router

logger = logging.getLogger(__name__)

BATCH_LINE_PATH = "/internal/batch_line"
ROUTER_KEY_HEADER = "x-omniserve-router-key"
HEARTBEAT_S = 5.0
_TICK_S = 0.25  # how soon a line in flight notices that its instance drains
_LOST_AFTER_S = 6 * HEARTBEAT_S  # no byte for this long: the instance is taken for lost


# ------------------------------------------------------------------------------------------ on each instance
def add_batch_line_route(app: FastAPI, runner: ServingLineRunner, router_key: str | None, keyed: bool) -> None:
    """The route that runs the router's lines on this instance (`keyed`: the server has API keys)."""

    @app.post(BATCH_LINE_PATH, include_in_schema=False)
    async def batch_line(request: Request) -> Response:
        given = request.headers.get(ROUTER_KEY_HEADER, "")
        allowed = hmac.compare_digest(given.encode(), router_key.encode()) if router_key else not keyed
        if not allowed:
            return error_response(403, "this route runs batch lines for the router that started this server",
                                  code="not_the_router")
        job = await request.json()
        if job.get("endpoint") not in REQUEST_TYPES or not isinstance(job.get("body"), dict):
            return error_response(400, "a batch line needs an endpoint and a body", param="endpoint")
        return StreamingResponse(_run_line(runner, job), media_type="application/x-ndjson")


async def _run_line(runner: ServingLineRunner, job: dict):
    """The line's events (see the module docstring); the line is aborted if the router goes away."""
    events: asyncio.Queue[dict] = asyncio.Queue()
    started = False

    def on_started() -> None:
        nonlocal started
        if not started:
            started = True
            events.put_nowait({"started": True})

    async def run() -> None:
        try:
            status, body = await runner.run(job["endpoint"], job["body"], str(job.get("request_id")), on_started,
                                            job.get("owner"))
            events.put_nowait({"status": status, "body": body})
        except LineNotRun:
            events.put_nowait({"not_run": True})
        except Exception:  # what the router's batch service would write for a line that failed on it
            logger.exception("batch line %s failed", job.get("request_id"))
            events.put_nowait({"status": 500, "body": json.loads(error_body(
                500, "internal error while running this line"))})

    task = asyncio.ensure_future(run())
    quiet_since = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _TICK_S)
            except asyncio.TimeoutError:
                if not runner.accepting:  # draining: the line goes back to the router, pending, at once
                    yield json.dumps({"not_run": True}).encode() + b"\n"
                    return
                if time.monotonic() - quiet_since >= HEARTBEAT_S:
                    quiet_since = time.monotonic()
                    yield b"\n"
                continue
            quiet_since = time.monotonic()
            yield json.dumps(event).encode() + b"\n"
            if "started" not in event:
                return
    finally:
        task.cancel()  # the router left (or the answer is sent): the line's engine requests end with the task


# -------------------------------------------------------------------------------------------- on the router
class RemoteLineRunner:
    """The router's LineRunner (omniserve.batch.service): each line to the instance with the most spare capacity
    for best-effort work, as a best-effort request would go."""

    def __init__(self, router: Router, router_key: str | None) -> None:
        self.router = router
        self.headers = {ROUTER_KEY_HEADER: router_key} if router_key else {}

    @property
    def accepting(self) -> bool:
        return not self.router.draining and any(i.alive for i in self.router.instances)

    def check(self, endpoint: str, body: dict) -> tuple[str, str] | None:
        """What the router can know of a line before it runs: a request the route takes, not streamed, for a model
        the instances serve (the rest, a prompt beyond the context say, the instance answers when it runs)."""
        request, refusal = check_line_request(endpoint, body)
        if refusal is not None:
            return refusal
        names = self.router.model_classes()
        if request.model is not None and names and request.model not in names:
            return "model_not_found", (f"The model `{request.model}` does not exist; this server has: "
                                       f"{', '.join(names)}")
        return None

    async def run(self, endpoint: str, body: dict, request_id: str, on_started: Callable[[], None],
                  owner: str | None = None) -> tuple[int, dict]:
        instance = self.router.pick(ServiceClass.BE)
        if instance is None:
            raise LineNotRun()
        self.router.charge(instance, ServiceClass.BE, body)
        job = {"endpoint": endpoint, "body": body, "request_id": request_id, "owner": owner}
        timeout = httpx.Timeout(_LOST_AFTER_S, connect=5.0)
        try:
            async with self.router.client.stream("POST", instance.url + BATCH_LINE_PATH, json=job,
                                                 headers=self.headers, timeout=timeout) as response:
                if response.status_code == 503:  # it stops: until a poll says otherwise, lines go elsewhere
                    self.router.take_out(instance, "it answered a batch line with 503")
                    raise LineNotRun()
                if response.status_code != 200:
                    raise RuntimeError(f"engine instance {instance.url} refused a batch line: "
                                       f"{response.status_code} {(await response.aread())[:300]!r}")
                async for text in response.aiter_lines():
                    event = json.loads(text) if text.strip() else {}
                    if event.get("started"):
                        on_started()
                    elif event.get("not_run"):
                        self.router.take_out(instance, "it cannot run batch lines now")
                        raise LineNotRun()
                    elif "status" in event:
                        return event["status"], event["body"]
        except httpx.HTTPError as exc:
            self.router.take_out(instance, f"lost while running a batch line: {exc!r}")
            raise LineNotRun() from None
        self.router.take_out(instance, "a batch line's answer was cut short")
        raise LineNotRun()
