"""HTTP errors with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from starlette.responses import Response

from omniserve.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

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
    info = ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump_json()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message, param, code), status_code=status, headers=headers,
                    media_type="application/json")


def validation_message(errors: list[dict], skip: int = 0) -> tuple[str, str | None]:
    """pydantic's errors as one message naming each field, and the first field (the error's `param`); `skip` drops
    that many leading parts of each location."""
    parts, param = [], None
    for error in errors:
        field = ".".join(str(p) for p in error.get("loc", ())[skip:])
        param = param or field or None
        if error.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
            parts.append(f"Unrecognized request argument supplied: {field}")
        else:
            parts.append(f"{field}: {error.get('msg')}" if field else str(error.get("msg")))
    return "; ".join(parts) or "invalid request", param
