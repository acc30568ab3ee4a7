"""What one request may make the server do: bounded bodies, prompts and sampling fields, refused fields, no prompt
tokenized where it stalls others, nothing left in flight after a refusal, and an OpenAPI spec that says what the
server answers. The server and its tiny model are conftest.py's fixtures (served by servers.py)."""

from __future__ import annotations

import json
import queue
import threading
import time

import httpx
import pytest
from servers import MESSAGES, PROMPT, assert_serves, serving, slow_engine

from omniserve.config import ConfigError
from omniserve.entrypoints.openai.serving import RequestLimits


def stream_times(server, max_tokens: int = 500) -> tuple[queue.Queue, threading.Thread]:
    """Streams a completion on a thread: the arrival time of each SSE line goes to the queue, then None."""
    times: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            }) as response:
                for line in response.iter_lines():
                    if line:
                        times.put(time.perf_counter())
        finally:
            times.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return times, thread


def longest_gap(times: queue.Queue) -> float:
    """The longest wait between two lines of a stream that is now over."""
    arrivals = []
    while (at := times.get(timeout=60)) is not None:
        arrivals.append(at)
    assert len(arrivals) > 100
    return max(b - a for a, b in zip(arrivals, arrivals[1:]))


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


# -------------------------------------------------------------------------------------------- huge requests
def test_a_huge_prompt_is_refused_at_once_and_stalls_no_stream(server):
    huge = "the " * 1_000_000  # 4 MB, a million tokens
    started = time.perf_counter()
    server.engine.tokenizer.encode(huge)
    tokenize_s = time.perf_counter() - started  # what tokenizing it would stall, were it done in the wrong place
    with slow_engine(server, 0.01):  # the stream lasts 5 s at least
        times, _ = stream_times(server)
        times.put(times.get(timeout=60))  # the stream has started
        response = server.post("/v1/completions", {"model": "tiny", "prompt": huge, "max_tokens": 4})
        assert_error(response, 400, "prompt", "maximum context length is 512 tokens")
        gap = longest_gap(times)
    assert gap < tokenize_s / 3, (gap, tokenize_s)
    server.wait_idle()


def test_a_request_of_many_prompts_is_refused_before_any_runs(server):
    """50,000 prompts in one request: a 400 before any is tokenized or started, and a running stream never waits on
    them (it once waited seconds at a time while they ran)."""
    with slow_engine(server, 0.01):
        times, _ = stream_times(server)
        times.put(times.get(timeout=60))  # the stream has started
        response = server.post("/v1/completions", {"model": "tiny", "prompt": ["the capital"] * 50_000,
                                                   "max_tokens": 4})
        assert_error(response, 400, "prompt", "at most 2048 prompts are allowed in one request, got 50000")
        assert len(server.engine.scheduler.state.requests) <= 1  # the stream's own, nothing of the refused one
        gap = longest_gap(times)
    assert gap < 2.0, gap  # generous: the refusal takes no engine time at all (before, 50,000 prompts ran)
    server.wait_idle()


def test_prompts_are_tokenized_off_the_event_loop_and_the_engine_thread(server, monkeypatch):
    tokenizer = server.engine.tokenizer
    encode, threads = tokenizer.encode, []

    def slow_encode(*args, **kwargs):
        threads.append(threading.current_thread())
        time.sleep(2.0)  # a long prompt's tokenizing, which releases the GIL as the real tokenizer does
        return encode(*args, **kwargs)

    with slow_engine(server, 0.01):
        times, _ = stream_times(server)
        times.put(times.get(timeout=60))
        monkeypatch.setattr(tokenizer, "encode", slow_encode)
        for path, body in [("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}),
                           ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 2})]:
            assert server.post(path, body).status_code == 200
        gap = longest_gap(times)
    assert len(threads) == 2
    assert all(t.name != "omniserve-engine" and t is not server.thread for t in threads), threads
    assert gap < 1.0  # the stream never waited for the 2 s of tokenizing
    server.wait_idle()


def test_echo_gives_back_the_prompt_as_sent(server):
    """Prompts reach the engine as token ids now; echo still returns the text the client sent."""
    body = {"model": "tiny", "prompt": "hello  world", "max_tokens": 2, "echo": True, "ignore_eos": True}
    whole = server.post("/v1/completions", body).json()["choices"][0]["text"]
    assert whole.startswith("hello  world") and len(whole) > len("hello  world")
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"].startswith("hello  world")


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(tiny_chat_model):
    assert RequestLimits().max_body_bytes == 26_214_400  # OpenAI's limit
    body = ('{"model": "tiny", "max_tokens": 2, "prompt": "' + "the " * 300_000 + '"}').encode()  # 1.2 MB
    with serving(tiny_chat_model, limits=RequestLimits(max_body_bytes=1_000_000)) as running:
        chunked = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: read, then refused
        for content in (body, chunked):
            response = httpx.post(running.url + "/v1/completions", content=content, timeout=60,
                                  headers={"content-type": "application/json"})
            error = assert_error(response, 413, None, "limit of 1000000 bytes")
            assert error["code"] == "request_too_large"
        small = httpx.post(running.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 2}, headers={"transfer-encoding": "chunked"})
        assert small.status_code == 200, small.text
        assert_serves(running)


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


# ----------------------------------------------------------------------------------------- refused fields
@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/chat/completions", {"messages": [{"role": "banana", "content": "hi"}]}, "messages.0.role",
     "'system', 'user', 'assistant', 'tool' or 'developer'"),
    ("/v1/completions", {"prompt": PROMPT, "n": 129}, "n", "n must be at most 128"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [f"s{i}" for i in range(17)]}, "stop", "at most 16 stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["x" * 1025]}, "stop", "at most 1024 characters, got 1025"),
    ("/v1/completions", {"prompt": [PROMPT] * 2049}, "prompt", "at most 2048 prompts"),
    ("/v1/completions", {"prompt": [PROMPT] * 20, "n": 128}, "n", "n x prompts must be at most 2048, got 128 x 20"),
    ("/v1/completions", {"prompt": PROMPT, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern",
     "Unrecognized request argument supplied: guided_whitespace_pattern"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True,
                                                                                       "colour": "red"}},
     "stream_options.colour", "Unrecognized request argument supplied: stream_options.colour"),
    ("/tokenize", {"prompt": PROMPT, "truncate": 3}, "truncate", "Unrecognized request argument supplied"),
], ids=["unknown-role", "n-too-large", "too-many-stops", "stop-too-long", "too-many-prompts", "n-x-prompts",
        "unknown-field", "unknown-nested-field", "tokenize"])
def test_inputs_beyond_the_api_or_the_limits_are_refused(server, path, body, param, message):
    assert_error(server.post(path, {"model": "tiny", **body}), 400, param, message)
    assert_serves(server)


def test_limits_are_flags_and_fields_that_change_nothing_are_accepted(tiny_chat_model):
    with pytest.raises(ConfigError, match="max_n"):
        RequestLimits(max_n=0)
    with serving(tiny_chat_model, limits=RequestLimits(max_n=2, max_stop=1, max_prompt_tokens=40)) as running:
        base = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
        assert_error(running.post("/v1/completions", {**base, "n": 3}), 400, "n", "at most 2")
        assert_error(running.post("/v1/completions", {**base, "stop": ["a", "b"]}), 400, "stop", "at most 1")
        assert_error(running.post("/v1/completions", {**base, "prompt": [[5] * 25, [6] * 16]}), 400, "prompt",
                     "at most 40 prompt tokens, all its prompts together; this one has 41")
        assert_error(running.post("/v1/completions", {**base, "prompt": ["the " * 200]}), 400, "prompt",
                     "800 characters of prompts are more than that")  # refused before it is tokenized
        done = running.post("/v1/completions", {**base, "n": 2, "stop": ["a"], "user": "u1", "store": False,
                                                "metadata": {"k": "v"}, "safety_identifier": "s"})
        assert done.status_code == 200 and len(done.json()["choices"]) == 2
        roles = [{"role": role, "content": "hello"} for role in ("developer", "system", "user", "assistant")]
        chat = running.post("/v1/chat/completions", {"model": "tiny", "messages": roles, "max_tokens": 2,
                                                     "parallel_tool_calls": False})
        assert chat.status_code == 200, chat.text


# --------------------------------------------------------------------------------------------- the OpenAPI spec
def test_openapi_spec_declares_the_answers_the_server_gives(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    generation = {"200", "400", "401", "403", "404", "413", "429", "500", "503"}
    expected = {
        ("/v1/completions", "post"): generation, ("/v1/chat/completions", "post"): generation,
        ("/v1/models", "get"): {"200", "401"}, ("/v1/models/{name}", "get"): {"200", "401", "404"},
        ("/tokenize", "post"): {"200", "400", "401", "404", "413"},
        ("/detokenize", "post"): {"200", "400", "401", "404", "413"},
        ("/health", "get"): {"200", "503"}, ("/metrics", "get"): {"200"},
        ("/v1/files", "post"): {"200", "400", "401", "413"}, ("/v1/files/{file_id}", "delete"): {"200", "401", "404"},
        ("/v1/batches", "post"): {"200", "400", "401", "403", "404"},
        ("/v1/batches/{batch_id}/cancel", "post"): {"200", "401", "404", "409"},
    }
    for (path, method), codes in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == codes, (path, set(responses))
        for code in codes - {"200"}:
            assert responses[code]["content"] == {"application/json": {"schema": {
                "$ref": "#/components/schemas/ErrorResponse"}}}, (path, code)
    for path in spec["paths"].values():
        for operation in path.values():
            assert "422" not in operation["responses"]  # validation errors are 400 here
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = spec["components"]["schemas"]["ErrorInfo"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}

    completion = spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(completion) == {"application/json", "text/event-stream"}
    assert completion["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    health = spec["paths"]["/health"]["get"]["responses"]["200"]
    assert "content" not in health
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}

    # and what the server really answers
    answer = httpx.get(server.url + "/health")
    assert answer.status_code == 200 and not answer.content and "content-type" not in answer.headers
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_the_spec_states_the_limits_of_the_running_server(tiny_chat_model):
    """The bounds in the document are the configured ones, and each is where the server's own check is: the bound
    is served, one past it is refused."""
    limits = RequestLimits(max_n=3, max_stop=2, max_stop_chars=5, max_prompts=4)
    with serving(tiny_chat_model, limits=limits) as running:
        schemas = httpx.get(running.url + "/openapi.json").json()["components"]["schemas"]
        completion = schemas["CompletionRequest"]["properties"]
        assert (completion["n"]["minimum"], completion["n"]["maximum"]) == (1, 3)
        stop_forms = {form["type"]: form for form in completion["stop"]["anyOf"]}
        assert stop_forms["string"]["maxLength"] == 5 and stop_forms["array"]["maxItems"] == 2
        assert completion["max_tokens"]["maximum"] == 511  # max_model_len 512, less the prompt's one token at least
        ids = next(f for f in completion["prompt"]["anyOf"] if f["type"] == "array" and f["items"]["type"] == "integer")
        assert ids["items"]["maximum"] == 999 and ids["minItems"] == 1
        assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == 999
        base = {"model": "tiny", "prompt": [5], "max_tokens": 1}
        for field, inside, outside in [("n", 3, 4), ("stop", ["a", "b"], ["a", "b", "c"]), ("stop", "abcde", "abcdef"),
                                       ("max_tokens", 511, 512), ("prompt", [999], [1000]), ("prompt", [[5]] * 4,
                                                                                           [[5]] * 5)]:
            assert running.post("/v1/completions", {**base, field: inside}).status_code == 200, (field, inside)
            assert running.post("/v1/completions", {**base, field: outside}).status_code == 400, (field, outside)
        running.wait_idle()


@pytest.mark.parametrize("field, inside, outside", [
    ("temperature", 0, -0.5), ("top_p", 1, 0), ("top_k", -1, -2), ("min_p", 1, 1.5), ("min_tokens", 0, -1),
    ("presence_penalty", 2, 2.5), ("frequency_penalty", -2, -2.5), ("repetition_penalty", 0.5, 0),
    ("logprobs", 20, 21), ("stop_token_ids", [0], [-1]), ("logit_bias", {}, {"5": 1}), ("suffix", "", "x"),
    ("guided_choice", None, []),
])
def test_each_declared_bound_is_the_one_the_server_enforces(server, field, inside, outside):
    keywords = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["CompletionRequest"][
        "properties"][field]
    assert set(keywords) & {"minimum", "maximum", "exclusiveMinimum", "items", "maxProperties", "maxLength",
                            "minItems"}, keywords
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1}
    assert server.post("/v1/completions", {**body, field: inside}).status_code == 200
    assert_error(server.post("/v1/completions", {**body, field: outside}), 400, field, "")


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": [5, False]}, "tokens.1"),
    ("/v1/completions", {"prompt": PROMPT, "n": True}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 0}, "logprobs"),
])
def test_values_of_another_json_type_are_refused(server, path, body, param):
    """`true` is no integer, `1` no boolean, `"0.5"` no number: what the document says (pydantic's lax mode took
    them); a whole number written 16.0 is a JSON Schema integer, and is taken."""
    assert_error(server.post(path, {"model": "tiny", **body}), 400, param, "")
    whole = server.post("/v1/completions", {"model": "tiny", "prompt": [5, 6.0], "max_tokens": 2.0})
    assert whole.status_code == 200, whole.text


def test_a_method_a_path_lacks_gets_405_naming_every_method_it_has(server):
    for path, allowed in [("/v1/files", "GET, POST"), ("/v1/files/file-x", "DELETE, GET"), ("/tokenize", "POST")]:
        response = httpx.request("PUT", server.url + path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (path, response.headers)
        assert response.json()["error"]["message"] == "Method Not Allowed"


def test_the_spec_declares_the_upload_form_and_the_400s_of_list_queries(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    form = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "purpose"] and form["additionalProperties"] is False
    assert "400" in paths["/v1/files"]["get"]["responses"] and "400" in paths["/v1/batches"]["get"]["responses"]
    assert_error(httpx.get(server.url + "/v1/batches", params={"limit": 0}), 400, "limit", "")
    line = b'{"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n'
    extra = httpx.post(server.url + "/v1/files", files={"file": ("b.jsonl", line)},
                       data={"purpose": "batch", "colour": "red"})
    assert_error(extra, 400, "colour", "Unrecognized request argument supplied: colour")


def test_structured_outputs_a_tokenizer_cannot_serve_are_a_400(server):
    """The tiny word-level tokenizer is one llguidance cannot read: a constrained request is refused (it was a
    500), naming the field the request used."""
    response = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "guided_choice": ["a", "b"]})
    assert_error(response, 400, "guided_choice", "structured outputs are unavailable")
    assert_serves(server)
