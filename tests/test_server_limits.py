"""What one request may make the server do: nothing is left in flight after a refusal. The server and its tiny
model come from test_server."""

from __future__ import annotations

import time

import httpx
import pytest
from test_server import server, tiny_chat_model  # noqa: F401


def assert_error(response: httpx.Response, status: int, param: str | None, message: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["param"] == param, error
    return error


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------- nothing in flight
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body, message", [
    ({"prompt": "the " * 600}, "maximum context length is 512"),  # tokenized, then refused by the engine
    ({"prompt": [5] * 500, "max_tokens": 100}, "maximum context length is 512"),
    ({"prompt": [5, 1000]}, "token ids must be in [0, 1000)"),
    ({"prompt": []}, "empty"),
    ({"prompt": [[5, 6], []]}, "empty"),  # two prompts: one refused, the other aborted
], ids=["too-long-text", "too-long-ids", "out-of-vocabulary", "empty", "one-of-two-empty"])
def test_refused_requests_leave_nothing_in_flight(server, body, message, stream):
    response = server.post("/v1/completions", {"model": "tiny", "stream": stream, **body})
    assert_error(response, 400, "prompt" if "max_tokens" not in body else "max_tokens", message)
    wait_until(lambda: not server.state.in_flight, "refused requests are still in flight")
    server.wait_idle()
