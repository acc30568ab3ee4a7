"""The Files and Batches routes (OpenAI's shapes, so the official client's `files` and `batches` work unmodified),
the batch metrics on /metrics, and what a line's request must be. The work is the BatchService's
(omniserve.batch.service). Light (no engine): a router serves these routes too."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Query, Request
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse, Response

from omniserve.batch.protocol import (
    Batch, BatchCreateRequest, BatchList, BatchStatus, FileDeleted, FileList, FileObject,
)
from omniserve.batch.service import BatchService
from omniserve.entrypoints.openai.errors import validation_message
from omniserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from omniserve.errors import APIError

REQUEST_TYPES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def check_line_request(endpoint: str, body: dict) -> tuple[CompletionRequest | ChatCompletionRequest | None,
                                                           tuple[str, str] | None]:
    """A line's body as the endpoint's route reads it, or the (code, message) of why it cannot run there: not a
    request the route takes, or streamed."""
    try:
        request = REQUEST_TYPES[endpoint].model_validate(body)
    except ValidationError as exc:
        return None, ("invalid_request", validation_message(exc.errors())[0])
    if request.stream:
        return None, ("invalid_request", "a batch line cannot stream (stream: true)")
    return request, None


class UploadTooLarge(Exception):
    """A chunked upload passed the size limit while it was read (the middleware's counting receive raises it)."""


def add_batch_routes(app: FastAPI, service: BatchService) -> None:
    _add_file_routes(app, service)
    _add_batches_routes(app, service)


def _errors(*codes: int) -> dict[int, dict]:
    return {code: {"model": ErrorResponse} for code in codes}


def _json(body) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _owner(request: Request) -> str | None:
    return request.state.owner


def _add_file_routes(app: FastAPI, service: BatchService) -> None:
    @app.post("/v1/files", responses={200: {"model": FileObject}, **_errors(400, 401, 413)})
    async def create_file(request: Request) -> Response:
        """Upload a batch file (multipart: `file`, `purpose`=batch); it is streamed to disk, never held whole."""
        try:
            form = await request.form(max_files=1, max_fields=8)
        except UploadTooLarge:
            raise APIError(413, f"the file is larger than this server's limit of {service.limits.max_file_bytes} "
                           "bytes", param="file", code="file_too_large") from None
        try:
            unknown = sorted(set(form.keys()) - {"file", "purpose"})
            if unknown:  # as the JSON routes do: a field this server does not know is refused, never ignored
                raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "the form needs a `file` part (multipart/form-data)", param="file")
            if not isinstance(purpose, str):
                raise APIError(400, "the form needs a `purpose` field ('batch')", param="purpose")
            body = await service.upload(_owner(request), upload.filename or "upload.jsonl", purpose, upload.file)
        finally:
            await form.close()
        return _json(body)

    @app.get("/v1/files", responses={200: {"model": FileList}, **_errors(401)})
    async def list_files(request: Request, purpose: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                         after: str | None = None, order: Literal["asc", "desc"] = "desc") -> Response:
        return _json(service.list_files(_owner(request), purpose, limit, after, order))

    @app.get("/v1/files/{file_id}", responses={200: {"model": FileObject}, **_errors(401, 404)})
    async def retrieve_file(request: Request, file_id: str) -> Response:
        return _json(service.file_object(_owner(request), file_id))

    @app.get("/v1/files/{file_id}/content", response_class=FileResponse, responses=_errors(401, 404))
    async def file_content(request: Request, file_id: str) -> Response:
        """The file's bytes, streamed from disk."""
        return FileResponse(service.file_path(_owner(request), file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", responses={200: {"model": FileDeleted}, **_errors(401, 404)})
    async def delete_file(request: Request, file_id: str) -> Response:
        return _json(await service.delete_file(_owner(request), file_id))


def _add_batches_routes(app: FastAPI, service: BatchService) -> None:
    @app.post("/v1/batches", responses={200: {"model": Batch}, **_errors(400, 401, 403, 404)})
    async def create_batch(body: BatchCreateRequest, request: Request) -> Response:
        return _json(service.create(_owner(request), request.state.service_classes, body))

    @app.get("/v1/batches", responses={200: {"model": BatchList}, **_errors(401)})
    async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None
                           ) -> Response:
        return _json(service.list(_owner(request), limit, after))

    @app.get("/v1/batches/{batch_id}", responses={200: {"model": Batch}, **_errors(401, 404)})
    async def retrieve_batch(request: Request, batch_id: str) -> Response:
        return _json(service.get(_owner(request), batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", responses={200: {"model": Batch}, **_errors(401, 404, 409)})
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        return _json(service.cancel(_owner(request), batch_id))


class BatchCollector:
    """Batches by status (from the store), lines answered by outcome and lines/s per batch in progress, read when
    /metrics is scraped."""

    def __init__(self, service: BatchService, registry: CollectorRegistry) -> None:
        self.service = service
        registry.register(self)

    def collect(self):
        batches = GaugeMetricFamily("omniserve:batches", "Batches by status", labels=["status"])
        counts = self.service.status_counts()
        for status in BatchStatus.__args__:
            batches.add_metric([status], counts.get(status, 0))
        lines = CounterMetricFamily("omniserve:batch_lines", "Batch lines answered by this process, by outcome "
                                    "(done: in the output file; failed: in the error file; cancelled)",
                                    labels=["outcome"])
        for outcome in ("done", "failed", "cancelled"):
            lines.add_metric([outcome], self.service.lines_answered[outcome])
        rate = GaugeMetricFamily("omniserve:batch_lines_per_second", "Lines answered per second by this process, "
                                 "per batch in progress, since its first line was fed", labels=["batch_id"])
        for batch_id, per_second in self.service.lines_per_second().items():
            rate.add_metric([batch_id], per_second)
        return [batches, lines, rate]
