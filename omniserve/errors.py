"""Errors that cross from one part of omniserve to another: the HTTP server, the Batch API and the router all answer
with OpenAI's error body, {"error": {"message", "type", "param", "code"}}. This module depends on none of them, so
that each can raise and answer these without importing the others."""

from __future__ import annotations

import json

from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raised anywhere in request handling; the app turns it into an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> str:
    """OpenAI's error body as compact JSON (the server's ErrorResponse model declares the same fields)."""
    info = {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return json.dumps({"error": info}, ensure_ascii=False, separators=(",", ":"))


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, param, code), status_code=status, headers=headers,
                    media_type="application/json")
