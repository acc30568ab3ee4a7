"""The OpenAI-compatible HTTP server: FastAPI routes in front of an AsyncEngine, run by uvicorn.

    app = build_app(engine, served_model_names, api_keys)   # tests run this in-process
    run_server(app, host, port)                              # `omniserve serve`: until SIGTERM, then drain, exit 0

The engine steps on its own thread (AsyncEngine); the event loop only parses requests and writes chunks (chat
templates and tokenizers run in worker threads), and every request reads its own output queue, so one slow client
never stalls the others. A body over the size limit is refused before it is read.

SIGTERM (or Ctrl-C) drains: the listening socket closes, new generation requests on open connections get 503 with
Retry-After, and requests in flight run to their end. Those still running when the grace period is over (or at a
second signal) end at once, properly: a stream with an error event (code `draining`) and `[DONE]`, a whole answer
with 503; the engine aborts them and frees their memory. Then uvicorn closes the connections, the engine stops and
the process exits with status 0.

If the engine itself fails, the requests in flight get 503 (`engine_dead`), the server stops, and the process exits
with status 1, so that a supervisor (systemd, Kubernetes) restarts it instead of leaving a server that answers 503.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response

import omniserve
from omniserve.batch.service import BatchLimits, BatchService
from omniserve.batch.store import BatchStore
from omniserve.engine.async_engine import AsyncEngine, EngineDeadError
from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.openai.auth import APIKeys
from omniserve.entrypoints.openai.batch_routes import BatchCollector, add_batch_routes
from omniserve.entrypoints.openai.http_context import (
    MULTIPART_SLACK_BYTES, STATUS_CLIENT_GONE, RequestContextMiddleware, add_error_handlers,
)
from omniserve.entrypoints.openai.metrics import ServerMetrics
from omniserve.entrypoints.openai.openapi import server_document
from omniserve.entrypoints.openai.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
)
from omniserve.entrypoints.openai.served_models import ServedModels
from omniserve.entrypoints.openai.serving import ClientDisconnected, RequestLimits, ServerState
from omniserve.entrypoints.openai.serving_batch import ServingLineRunner
from omniserve.entrypoints.openai.serving_chat import ChatServing
from omniserve.entrypoints.openai.serving_completions import CompletionServing
from omniserve.errors import APIError, error_response
from omniserve.scaleout.batch_lines import add_batch_line_route

logger = logging.getLogger(__name__)

_LOAD_REPORT_PERIOD_S = 0.05  # how fresh /load is while the engine runs
# After a drain, how long uvicorn waits for connections to finish their last writes (the streams it ended write an
# error event and [DONE] at once; only a client that stopped reading takes longer) before it cancels them.
_CLOSE_TIMEOUT_S = 5


def build_app(engine: LLMEngine, served_model_names: list[str], api_keys: APIKeys | None = None,
              drain_grace_s: float = 30.0, limits: RequestLimits | None = None,
              batch_db: str | Path | BatchStore | None = None, batch_limits: BatchLimits | None = None,
              router_key: str | None = None) -> FastAPI:
    """The app for one engine; the engine thread and the batch service start and stop with the app (its lifespan).
    Batches are kept in the SQLite database `batch_db` (a path, or a store opened already; None: a temporary one,
    gone with the app). `router_key`: the key of the router that started this server, which runs its batch lines
    here (omniserve.scaleout.batch_lines)."""
    models = ServedModels(served_model_names, engine.services, str(engine.args.model or served_model_names[0]),
                          engine.scheduler_config.max_model_len)
    state = ServerState(engine, models, drain_grace_s, limits or RequestLimits())
    if engine.tokenizer is not None:
        engine.grammars.prepare()
    metrics = ServerMetrics(served_model_names[0])
    load = _LoadReport(engine)

    def on_iteration(engine: LLMEngine, outputs) -> None:  # on the engine thread
        metrics.on_iteration(engine, outputs)
        if load.update(engine):
            metrics.on_load_report(load.report)

    completions, chat = CompletionServing(state), ChatServing(state)
    batch_limits = batch_limits or BatchLimits(max_line_bytes=state.limits.max_body_bytes)
    temporary = tempfile.mkdtemp(prefix="omniserve-batches-") if batch_db is None else None
    if isinstance(batch_db, BatchStore):
        store = batch_db
    else:
        store = BatchStore(batch_db if temporary is None else Path(temporary) / "batches.db")
    line_runner = ServingLineRunner(state, completions, chat)
    batches = BatchService(store, line_runner, batch_limits)
    BatchCollector(batches, metrics.registry)
    app = _OpenAIApp(title="omniserve", summary="OpenAI-compatible LLM server with LS/BE service classes",
                     lifespan=_lifespan(state, on_iteration, batches, temporary))
    app.state.server = state
    app.state.batches = batches
    app.add_middleware(RequestContextMiddleware, state=state, api_keys=api_keys,
                       upload_limit=batch_limits.max_file_bytes + MULTIPART_SLACK_BYTES)
    add_error_handlers(app)
    app.add_exception_handler(EngineDeadError, _engine_dead)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    _add_status_routes(app, state, metrics, load)
    _add_model_routes(app, models)
    _add_generation_routes(app, completions, chat)
    _add_tokenizer_routes(app, engine, models, completions, chat)
    add_batch_routes(app, batches)
    add_batch_line_route(app, line_runner, router_key, keyed=api_keys is not None)
    return app


class _LoadReport:
    """The engine's load, as of its latest iteration: made on the engine thread, read by /load."""

    def __init__(self, engine: LLMEngine) -> None:
        self.report: dict = engine.load_report()
        self._at = 0.0

    def update(self, engine: LLMEngine) -> bool:
        """At most every _LOAD_REPORT_PERIOD_S while the engine runs (the report is O(requests) to make), and at
        every iteration that leaves it idle, so that /load never shows an idle engine with its last busy load;
        whether it made a new report."""
        now = time.monotonic()
        if now - self._at >= _LOAD_REPORT_PERIOD_S or not engine.has_unfinished_requests():
            self.report, self._at = engine.load_report(), now
            return True
        return False


def _lifespan(state: ServerState, on_iteration: Callable[[LLMEngine, list], None], batches: BatchService,
              temporary: str | None):
    """The app's lifespan: the engine thread and the batch service run from the app's start to its end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.async_engine = AsyncEngine(state.engine, on_iteration=on_iteration)
        try:
            await batches.start()
            yield
        finally:
            await batches.stop()  # lines in flight end now, and stay pending for the next start
            state.async_engine.shutdown()
            batches.store.close()
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)

    return lifespan


# ------------------------------------------------------------------------------------------------------- routes
def _add_status_routes(app: FastAPI, state: ServerState, metrics: ServerMetrics, load: _LoadReport) -> None:
    """Health, Prometheus metrics and load: open without a key, for probes, scrapers and routers."""

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The server takes requests (an empty body)"}, **_errors(503)})
    async def health() -> Response:
        if state.draining:
            return error_response(503, "the server is shutting down", code="draining")
        if state.async_engine is None or not state.async_engine.alive:
            return error_response(503, "the engine is not running", code="engine_dead")
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format"}})
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/load")
    async def load_report() -> dict:
        """This instance's load, for a router in front of several (omniserve.scaleout.router): the engine's report
        and the class each served model name stands for (null: chosen per request)."""
        classes = {name: None if m.service is None else m.service.service_class.value
                   for name, m in state.models.by_name.items()}
        return {**load.report, "models": classes, "draining": state.draining}


def _add_model_routes(app: FastAPI, models: ServedModels) -> None:
    @app.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401)})
    async def list_models() -> Response:
        return _json(models.cards())

    @app.get("/v1/models/{name:path}", responses={200: {"model": ModelCard}, **_errors(401, 404)})
    async def retrieve_model(name: str) -> Response:
        card = next((c for c in models.cards().data if c.id == name), None)
        if card is None:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return _json(card)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": omniserve.__version__}


def _add_generation_routes(app: FastAPI, completions: CompletionServing, chat: ChatServing) -> None:
    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse))
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create(request, raw_request)

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(request, raw_request)


def _add_tokenizer_routes(app: FastAPI, engine: LLMEngine, models: ServedModels, completions: CompletionServing,
                          chat: ChatServing) -> None:
    """Text to token ids as the generation routes make them (chat template included), and back."""

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}, **_errors(400, 401, 404, 413)})
    async def tokenize(request: TokenizeRequest) -> Response:
        models.resolve(request.model)
        if request.messages is not None:
            tokens = await chat.render(request.messages, request.add_generation_prompt, tools=request.tools)
        elif request.prompt is not None:
            tokens = await completions.prompt_ids(request.prompt, request.add_special_tokens)
        else:
            raise APIError(400, "give a prompt or messages", param="prompt")
        return _json(TokenizeResponse(count=len(tokens), max_model_len=models.max_model_len, tokens=tokens))

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **_errors(400, 401, 404, 413)})
    async def detokenize(request: DetokenizeRequest) -> Response:
        models.resolve(request.model)
        tokenizer = _tokenizer(engine)
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return _json(DetokenizeResponse(prompt=await run_in_threadpool(tokenizer.decode, request.tokens)))


class _OpenAIApp(FastAPI):
    def openapi(self) -> dict:
        """FastAPI's schema, stating what this server answers and enforces (see openapi.py)."""
        if self.openapi_schema is None:
            self.openapi_schema = server_document(super().openapi(), self.state.server)
        return self.openapi_schema


_ERROR_DESCRIPTIONS = {
    400: "Malformed JSON, an unknown, wrong or unsupported field, or a prompt beyond the context",
    401: "No API key, or a wrong one (when the server has keys)",
    403: "The API key may not use this service class",
    404: "Unknown model",
    413: "The body is larger than the server's limit",
    429: "The scheduler cannot meet this latency-sensitive request's TTFT SLO now (with Retry-After)",
    500: "The engine failed while running the request",
    503: "The server is shutting down (with Retry-After), or its engine is not running",
}


def _errors(*codes: int) -> dict[int, dict]:
    """OpenAPI responses for these error codes, each with OpenAI's error body."""
    return {code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


def _generation_responses(model: type) -> dict[int, dict]:
    """OpenAPI responses of a completions route: the answer (JSON, or server-sent events) or an error."""
    events = {"type": "object", "required": ["data"], "description": "with `stream: true`, each server-sent event",
              "properties": {"data": {"type": "string", "description": "a chunk (JSON), an error (JSON), or [DONE]"}}}
    return {200: {"model": model, "content": {"text/event-stream": {"schema": events}}},
            **_errors(400, 401, 403, 404, 413, 429, 500, 503)}


def _json(body) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _tokenizer(engine: LLMEngine):
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer (random weights or no tokenizer files)")
    return engine.tokenizer


async def _engine_dead(_: Request, exc: EngineDeadError) -> Response:
    return error_response(503, str(exc), code="engine_dead")


async def _client_gone(_: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=STATUS_CLIENT_GONE)


# ------------------------------------------------------------------------------------------------------ running
class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM/SIGINT drains first (see the module docstring), that the process then
    exits normally (status 0) instead of re-raising the signal, and that it stops when the engine dies."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state
        self._signals = 0
        self._drain_ends_at: float | None = None
        self.engine_failed = False

    def handle_exit(self, sig: int, frame) -> None:
        """A signal handler (or a test, from another thread): new generation requests get 503 from now on; the
        rest of the drain happens on the event loop (on_tick)."""
        self._state.draining = True
        self._signals += 1

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: the drain's next step; and a server whose engine died on its own stops, so that its
        supervisor can restart it (the process then exits with status 1)."""
        if self._signals and not self.should_exit:
            self._drain()
        engine = self._state.async_engine
        if engine is not None and not engine.alive and not self._state.draining and not self.engine_failed:
            logger.critical("the engine stopped; the server exits so that it can be restarted")
            self.engine_failed = True
            self.should_exit = True
        return await super().on_tick(counter)

    def _drain(self) -> None:
        state = self._state
        now = time.monotonic()
        if self._drain_ends_at is None:
            self._drain_ends_at = now + state.drain_grace_s
            for server in self.servers:
                server.close()  # no new connections; those open stay open, and get 503 for new requests
            logger.warning("draining: %d requests in flight, grace period %.0f s", len(state.in_flight),
                           state.drain_grace_s)
        if state.in_flight and (now >= self._drain_ends_at or self._signals > 1):
            logger.warning("draining: ending the %d requests still in flight", len(state.in_flight))
            state.end_in_flight()
        if not state.in_flight:
            self.should_exit = True  # uvicorn closes the connections (letting the last writes finish) and the app


def make_server(app: FastAPI, log_level: str = "info") -> DrainingServer:
    """The uvicorn server for an app of build_app; run it on a socket of listen_socket."""
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=_CLOSE_TIMEOUT_S)
    return DrainingServer(config, app.state.server)


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket (port 0: a free one), listening at once, so that connections wait in the backlog while
    the app starts instead of being refused.

    It is made with proto IPPROTO_TCP on purpose: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    connections whose socket says so, and a socket made with proto 0 (as uvicorn's `bind_socket` makes them) leaves
    it on, which holds every small write after the first (a response body after its headers, an SSE chunk) until
    the client's delayed ACK: 40 ms a response on Linux."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections on Linux too
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves until SIGTERM or SIGINT, then drains (see the module docstring). Prints one line once it listens:
    `omniserve: serving MODEL NAMES on http://HOST:PORT` (port 0 picks a free one)."""
    state: ServerState = app.state.server
    server = make_server(app, log_level)
    sock = listen_socket(host, port, server.config.backlog)
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"omniserve: serving {', '.join(state.models.by_name)} on http://{bound_host}:{bound_port}",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if server.engine_failed:
        sys.exit("omniserve: the engine failed (see the log above)")
