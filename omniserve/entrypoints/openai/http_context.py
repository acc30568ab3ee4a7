"""What every HTTP request goes through, on a server and on the router in front of several: its id, its API key (and
so the classes it may use and the owner of its files and batches), the body size limit, the 503 while draining, and
errors in OpenAI's error body. Light on purpose (no torch, no engine): the router loads it."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omniserve.config import ConfigError
from omniserve.entrypoints.openai.auth import APIKeys
from omniserve.entrypoints.openai.batch_routes import UploadTooLarge
from omniserve.entrypoints.openai.errors import validation_message
from omniserve.errors import APIError, error_response

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
STATUS_CLIENT_GONE = 499  # nginx's code for "the client closed the connection": logged, never received
_KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize")  # /health and /metrics stay open, for probes and scrapers
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_UPLOAD_PATH = "/v1/files"
MULTIPART_SLACK_BYTES = 1 << 16  # an upload's form fields and part headers, beyond the file itself


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on the work one request can make the server do (`omniserve serve` flags)."""

    max_body_bytes: int = 26_214_400
    """The largest request body: OpenAI's own limit (25 MiB). A larger one gets 413 before it is read."""
    max_n: int = 128
    """The most completions one request may ask for (`n`): OpenAI's limit."""
    max_stop: int = 16
    """The most stop strings one request may give. OpenAI allows 4, vLLM any number; code benchmarks send 5 to 7 to
    vLLM servers. Every one is searched for at every generated token."""
    max_stop_chars: int = 1024
    """The longest stop string: a stream holds back text that may begin one, so a longer one would hold back that
    much of the stream (a 100,000-character one turned a stream into one chunk at the end)."""
    max_prompts: int = 2048
    """The most completions one request may run: its prompts times n (OpenAI's limit on prompts in one request).
    Each is an engine request; 50,000 of them would stall every stream while they start."""
    max_prompt_tokens: int = 1 << 20
    """The most prompt tokens one request may carry, all its prompts together."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_n", "max_stop", "max_stop_chars", "max_prompts", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


class ServingState(Protocol):
    """What the middleware reads of the server (ServerState) or of the router (Router)."""

    draining: bool
    drain_grace_s: float
    limits: RequestLimits


# ------------------------------------------------------------------------------------------------------- errors
def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's error body: APIError as raised, validation errors as 400s naming the field, Starlette's
    own (404, 405) with their headers, and anything else as a logged 500."""
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        """Malformed JSON or fields of the wrong type: 400 (FastAPI's default is 422), naming the field."""
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error_response(400, f"the body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
        message, param = validation_message(errors, skip=1)  # loc[0] is "body"
        return error_response(400, message, param=param)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names the methods of the first route on the path only
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request))}
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("%s: internal error", getattr(request.state, "request_id", "?"), exc_info=exc)
        return error_response(500, "internal server error")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves on the request's path (each method has a route of its own)."""
    methods = {method for route in app.router.routes if isinstance(route, Route)
               and route.matches(request.scope)[0] is not Match.NONE for method in route.methods or ()}
    return sorted(methods)


# --------------------------------------------------------------------------------------------------- middleware
class RequestContextMiddleware:
    """Per HTTP request: its id (the client's x-request-id when it is sane, else a new one) on the response and in
    the log line; the API key and the classes it may use; 503 for new generation requests while draining; 413 for a
    body over the size limit; and, when it ends however it ends, the end of the engine requests it started."""

    def __init__(self, app: ASGIApp, state: ServingState, api_keys: APIKeys | None, upload_limit: int) -> None:
        self.app = app
        self.state = state
        self.api_keys = api_keys
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, authorization, content_length = _request_headers(scope)
        context = scope.setdefault("state", {})
        context["request_id"] = request_id
        context["service_classes"] = None  # no keys: every class
        context["owner"] = None  # no keys: every file and batch is everyone's
        context["generations"] = []  # what this request runs in the engine (OpenAIServing.start adds to it)
        started = time.perf_counter()
        status = STATUS_CLIENT_GONE
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", raw_id)]}
            await send(message)

        path = scope["path"]
        try:
            refusal = self._refusal(path, authorization, context)
            if refusal is None:
                upload = path == _UPLOAD_PATH and scope["method"] == "POST"
                limit = self.upload_limit if upload else self.state.limits.max_body_bytes
                limited_receive = await self._within_body_limit(receive, content_length, limit, upload)
                if limited_receive is None:
                    refusal = error_response(413, f"the request body is larger than this server's limit of {limit} "
                                             "bytes", code="request_too_large")
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            await self.app(scope, limited_receive, send_with_id)
        finally:
            for generation in context["generations"]:
                generation.close()
            logger.info('%s "%s %s" %d %.1f ms', request_id, scope["method"], path, status,
                        (time.perf_counter() - started) * 1e3)

    def _refusal(self, path: str, authorization: str | None, context: dict) -> Response | None:
        """The answer to a request refused before it reaches the app (401: no valid API key; 503: draining), or None;
        a valid key's classes and owner go into the request's `context`."""
        if self.api_keys is not None and path.startswith(_KEYED_PATHS):
            classes = self.api_keys.classes_for(authorization)
            if classes is None:
                return error_response(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                      code="invalid_api_key")
            context["service_classes"] = classes
            context["owner"] = key_owner(authorization)
        if self.state.draining and path in GENERATION_PATHS:
            retry = str(max(1, math.ceil(self.state.drain_grace_s)))
            return error_response(503, "the server is shutting down", code="draining", headers={"Retry-After": retry})
        return None

    @staticmethod
    async def _within_body_limit(receive: Receive, content_length: int | None, limit: int,
                                 upload: bool) -> Receive | None:
        """`receive` for a body within the size limit; None for one beyond it, before it is parsed (or, with a
        Content-Length, read at all). A body of unknown length (chunked) is read here, up to the limit, and replayed
        to the app; an upload's instead is counted as the app reads it (it may be 200 MiB), and UploadTooLarge
        raised in the app past the limit."""
        if content_length is not None:
            return receive if content_length <= limit else None
        if upload:
            return _counting(receive, limit)
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left
                break
            size += len(message.get("body", b""))
            if size > limit:
                return None
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay


def _request_headers(scope: Scope) -> tuple[str, str | None, int | None]:
    """The request's id (the client's x-request-id when it is sane, else a new one), its Authorization header and
    its Content-Length (None when absent or not a number)."""
    request_id = authorization = content_length = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            request_id = value.decode("latin-1")
        elif name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"content-length":
            content_length = int(value) if value.isdigit() else None
    if request_id is None or not _REQUEST_ID.fullmatch(request_id):
        request_id = uuid.uuid4().hex
    return request_id, authorization, content_length


def _counting(receive: Receive, limit: int) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise UploadTooLarge()
        return message

    return counted


def key_owner(authorization: str) -> str:
    """Who owns the files and batches made with this key: a digest of the key, so the store never holds keys."""
    token = authorization.partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()[:32]
