"""A batch file's lines in and out, in OpenAI's (and vLLM's run-batch) format.

    in:   {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...a request...}}
    out:  {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": ..., "body": {...}},
           "error": null}

A line the server answered with an error (a prompt beyond the context, say) has that status and OpenAI's error body
as its response, and goes to the batch's error file; a line that could not be read as a request (not JSON, no
custom_id, a duplicate custom_id, another endpoint, an unknown model or field) has no response and an `error` of
{code, message}, and goes there too. Either way the line's custom_id is kept, so nothing is lost without a trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

BodyCheck = Callable[[str, dict], "tuple[str, str] | None"]
"""(endpoint, body) -> None if the body is a request the endpoint can run, else (error code, message)."""


@dataclass(frozen=True)
class ReadLine:
    """One input line: its request (a JSON text) or, when it cannot run, its error line."""

    custom_id: str | None
    request: str | None
    error: str | None


def line_id(batch_id: str, idx: int) -> str:
    """The same id for a line however often it runs (a restart reruns a line that had not finished)."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{idx}"


def error_line(request_id: str, custom_id: str | None, code: str, message: str) -> str:
    return json.dumps({"id": request_id, "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}}, ensure_ascii=False)


def response_line(request_id: str, custom_id: str | None, status: int, body: dict) -> str:
    return json.dumps({"id": request_id, "custom_id": custom_id, "error": None,
                       "response": {"status_code": status, "request_id": request_id, "body": body}},
                      ensure_ascii=False)


def read_line(raw: bytes, number: int, request_id: str, endpoint: str, seen: set[str], max_bytes: int,
              check: BodyCheck) -> ReadLine:
    """Line `number` (1-based) of a batch for `endpoint`; `seen` holds the custom_ids of the lines before it."""

    def failed(custom_id: str | None, code: str, message: str) -> ReadLine:
        return ReadLine(custom_id, None, error_line(request_id, custom_id, code, f"line {number}: {message}"))

    if len(raw) > max_bytes:
        return failed(None, "line_too_large", f"the line has {len(raw)} bytes; a request may have at most {max_bytes}")
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return failed(None, "invalid_json_line", f"not a JSON object: {exc}")
    if not isinstance(line, dict):
        return failed(None, "invalid_json_line", "not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return failed(None, "missing_custom_id", "custom_id must be a non-empty string")
    if custom_id in seen:
        return failed(custom_id, "duplicate_custom_id", f"custom_id {custom_id!r} is on an earlier line too")
    seen.add(custom_id)
    if line.get("method", "POST") != "POST":
        return failed(custom_id, "invalid_method", f"method must be POST, got {line.get('method')!r}")
    if line.get("url") != endpoint:
        return failed(custom_id, "mismatched_url", f"url {line.get('url')!r} is not the batch's endpoint {endpoint}")
    body = line.get("body")
    if not isinstance(body, dict):
        return failed(custom_id, "invalid_body", "body must be a JSON object (the request)")
    problem = check(endpoint, body)
    if problem is not None:
        return failed(custom_id, *problem)
    return ReadLine(custom_id, json.dumps(body, ensure_ascii=False), None)
