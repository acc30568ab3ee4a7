"""The OpenAI-compatible server, through the official `openai` client and raw HTTP, on a free port chosen by the OS.

The tiny random model gets a tiny word-level tokenizer with a chat template, so that text prompts and chat work;
its words are meaningless, but the text goes through the same detokenizer, stop strings and templates as a real
model's (tests/servers.py). A test that needs a request to last makes the engine slower (`slow_engine`), never the
client wait longer.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from servers import MESSAGES, PROMPT, RunningServer, assert_serves, metric_samples, serving, slow_engine

from omniserve.engine.llm_engine import LLMEngine
from omniserve.entrypoints.openai.api_server import build_app
from omniserve.entrypoints.openai.auth import APIKeys

# The server, its tiny model and slo_server are conftest.py's fixtures; servers.py serves them.


@pytest.fixture
def client(server) -> openai.OpenAI:
    yield server.client()
    server.wait_idle()  # every test leaves the engine empty


# ------------------------------------------------------------------------------------------- completions, chat
def test_models_list_the_model_and_its_best_effort_service(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "tiny-batch"}
    assert models["tiny-batch"].model_extra["service_class"] == "be"
    assert models["tiny"].model_extra["max_model_len"] == 512
    assert client.models.retrieve("tiny-batch").id == "tiny-batch"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny-nope")


def test_completion_with_usage_and_stop(client, server):
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = done.choices[0].text
    prompt_tokens = server.post("/tokenize", {"prompt": PROMPT}).json()["count"]
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        prompt_tokens, 6, prompt_tokens + 6)
    stop = " " + text.split()[3]
    stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop


def test_chat_uses_the_model_chat_template(client, server):
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=4,
                                          extra_body={"ignore_eos": True})
    templated = server.post("/tokenize", {"messages": MESSAGES}).json()
    expected = server.engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"]
    assert templated["tokens"] == list(expected)
    assert done.usage.prompt_tokens == templated["count"] and done.usage.completion_tokens == 4
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    text = server.post("/detokenize", {"tokens": templated["tokens"][1:3]}).json()["prompt"]
    assert text == "system you"


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_and_usage_equal_the_non_streamed_answer(client, kind):
    common = dict(model="tiny", n=2, seed=7, temperature=1.0, frequency_penalty=0.5, presence_penalty=0.1,
                  extra_body={"ignore_eos": True, "top_k": 50, "repetition_penalty": 1.1})
    if kind == "completions":
        create, args, text_of = client.completions.create, dict(prompt=PROMPT, max_tokens=8), lambda c: c.text
    else:
        create, args = client.chat.completions.create, dict(messages=MESSAGES, max_completion_tokens=8)
        text_of = lambda c: c.message.content  # noqa: E731
    whole = create(**common, **args)
    chunks = list(create(**common, **args, stream=True, stream_options={"include_usage": True}))
    streamed, first_seen = {0: "", 1: ""}, set()
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) >= 1
        for choice in chunk.choices:
            delta = choice.text if kind == "completions" else choice.delta.content
            if choice.index not in first_seen:  # no empty chunk before a choice's first token
                first_seen.add(choice.index)
                assert delta
                assert kind == "completions" or choice.delta.role == "assistant"
            streamed[choice.index] += delta or ""
    assert streamed == {c.index: text_of(c) for c in whole.choices}
    assert streamed[0] != streamed[1]  # the n completions sample on their own
    last = chunks[-1]
    assert last.choices == [] and last.usage == whole.usage
    assert whole.usage.completion_tokens == 16
    assert {chunk.service_tier for chunk in chunks} == {"default"}


def test_seed_reproduces_and_n_gives_n_choices(client):
    def sample(seed):
        done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=seed,
                                         extra_body={"ignore_eos": True})
        assert [c.index for c in done.choices] == [0, 1, 2] and done.usage.completion_tokens == 18
        return [c.text for c in done.choices]

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first


def test_several_prompts_in_one_request(client):
    done = client.completions.create(model="tiny", prompt=[PROMPT, "hello world"], max_tokens=3, n=2, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    alone = client.completions.create(model="tiny", prompt="hello world", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert done.choices[2].text == alone.choices[0].text
    streamed = list(client.completions.create(model="tiny", prompt=[PROMPT, "hello world"], max_tokens=3,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == 1) == alone.choices[0].text


def test_logprobs(client):
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=2, temperature=0,
                                     extra_body={"ignore_eos": True})
    logprobs = done.choices[0].logprobs
    assert logprobs.tokens == done.choices[0].text.split()  # word-level tokens decode without their space
    assert len(logprobs.token_logprobs) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert token in top and top[token] == lp and 2 <= len(top) <= 3
        assert max(top.values()) == lp  # greedy: the sampled token is the most likely
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert [t.token for t in content] == chat.choices[0].message.content.split()
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True,
                                              stream=True, extra_body={"ignore_eos": True})
    assert sum(len(c.choices[0].logprobs.content) for c in streamed if c.choices[0].logprobs) == 3


@pytest.mark.parametrize("how, tier", [
    (dict(model="tiny"), "default"),
    (dict(model="tiny", extra_body={"service_tier": "flex", "ignore_eos": True}), "flex"),
    (dict(model="tiny", extra_body={"priority": 1, "ignore_eos": True}), "flex"),
    (dict(model="tiny-batch"), "flex"),
], ids=["default", "service-tier-flex", "priority", "batch-model"])
def test_service_classes(client, server, how, tier):
    before = metric_samples(server)
    how = {"extra_body": {"ignore_eos": True}, **how}
    done = client.completions.create(prompt=PROMPT, max_tokens=2, **how)
    assert done.service_tier == tier and done.model == how["model"]
    service_class = "be" if tier == "flex" else "ls"
    key = ("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "tiny"),
                                          ("service_class", service_class)))
    deadline = time.monotonic() + 30  # recorded on the engine thread just after the answer went out
    while metric_samples(server).get(key, 0) != before.get(key, 0) + 1:
        assert time.monotonic() < deadline, "the request was not counted in its class"
        time.sleep(0.01)


def test_metrics_parse_and_count(client, server):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
    key = ("vllm:generation_tokens_total", (("model_name", "tiny"), ("service_class", "ls")))
    before = metric_samples(server)[key]
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 30
    while metric_samples(server)[key] != before + 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    samples = metric_samples(server)
    assert samples[("vllm:time_to_first_token_seconds_count", key[1])] >= 2
    assert ("vllm:kv_cache_usage_perc", (("model_name", "tiny"),)) in samples


def test_offloaded_tokens_are_timed_per_class_and_their_host_kv_shows(tiny_chat_model):
    """Every BE decode token after the first goes through the CPU pool: each is one observation of each histogram.
    The host KV an offloaded request counts on, and what its worker allocates for it, show in /load and /metrics
    while it runs, and are given back."""
    with serving(tiny_chat_model, be_decode_placement="cpu") as running:
        running.client().completions.create(model="tiny-batch", prompt=PROMPT, max_tokens=6,
                                            extra_body={"ignore_eos": True})
        be = (("model_name", "tiny"), ("service_class", "be"))
        names = [f"omniserve:offloaded_token_{n}" for n in ("iterations", "seconds", "layers_per_iteration")]
        deadline = time.monotonic() + 30  # recorded on the engine thread just after the answer went out
        while (samples := metric_samples(running)).get((names[0] + "_count", be), 0) < 5:
            assert time.monotonic() < deadline, "the offloaded tokens were not timed"
            time.sleep(0.01)
        running.wait_idle()

        def host_kv() -> dict:
            return httpx.get(running.url + "/load").json()["host_kv"]["local"]

        with slow_engine(running, 0.05):  # a request's host KV is counted on while it decodes, and shows
            stream = running.client().completions.create(model="tiny-batch", prompt=PROMPT, max_tokens=40,
                                                         stream=True, extra_body={"ignore_eos": True})
            deadline = time.monotonic() + 30
            while (memory := host_kv())["free_bytes"] == memory["budget_bytes"] or not memory["allocated_bytes"]:
                assert time.monotonic() < deadline, "the offloaded request's host KV never showed in /load"
                time.sleep(0.02)
            assert memory["allocated_bytes"] <= memory["budget_bytes"]
            local = (("host", "local"), ("model_name", "tiny"))
            now = metric_samples(running)
            assert now[("omniserve:host_kv_used_bytes", local)] > 0
            assert now[("omniserve:host_kv_allocated_bytes", local)] > 0
            list(stream)
        running.wait_idle()
        assert host_kv()["free_bytes"] == host_kv()["budget_bytes"]  # given back at its end
        assert host_kv()["allocated_bytes"] == 0  # and freed by the worker
        assert metric_samples(running)[("omniserve:host_kv_allocated_bytes", local)] == 0
    for name in names:
        assert samples[(name + "_count", be)] == 5
    assert samples[(names[0] + "_sum", be)] >= 5  # at least an iteration each
    assert 0 < samples[(names[2] + "_sum", be)] / 5 <= running.engine.scheduler.state.num_layers


def test_request_id_is_honoured_and_logged(server, caplog):
    caplog.set_level("INFO", logger="omniserve.entrypoints.openai.http_context")
    response = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2},
                           headers={"x-request-id": "trace-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "cmpl-trace-42"
    assert any("trace-42" in r.getMessage() and "/v1/completions" in r.getMessage() for r in caplog.records)
    generated = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    assert generated.headers["x-request-id"] and generated.json()["id"] == "cmpl-" + generated.headers["x-request-id"]


# ------------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("path, body, status, param, message", [
    ("/v1/completions", '{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "temperature": -1}, 400, "temperature", "non-negative"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "Field required"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "logit_bias": {"5": 1}}, 400, "logit_bias", "not supp"),
    ("/v1/completions", {"model": "nope", "prompt": PROMPT}, 404, "model", "does not exist"),
    ("/v1/completions", {"model": "tiny", "prompt": "the " * 600}, 400, "prompt", "maximum context length is 512"),
    ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 600}, 400, "max_tokens", "is 512 tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [], "stream": True}, 400, "prompt", "empty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "hi"}]}, 400, "messages.0.role", "required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs",
     "logprobs: true"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
], ids=["malformed-json", "wrong-type", "bad-value", "bad-penalty", "missing-field", "unsupported", "unknown-model", "prompt-too-long",
        "output-too-long", "empty-prompt-streamed", "no-messages", "message-without-role", "top-logprobs-alone",
        "unknown-path"])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, path, body, status, param, message):
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"]
    assert_serves(server)


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the " * 600}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)


def test_disconnect_mid_stream_aborts_and_frees_memory(server):
    with slow_engine(server, 0.1):  # 400 tokens: 40 s
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                                "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert server.engine.has_unfinished_requests()
        server.wait_idle(timeout_s=20)  # long before its 400 tokens would have been done
    assert server.engine.allocator.num_used == 0
    assert_serves(server)


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    with slow_engine(server, 0.1):  # 400 tokens: 40 s
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 400,
                                            "ignore_eos": True}, timeout=0.5)
        server.wait_idle(timeout_s=20)
    assert_serves(server)


def test_a_client_that_does_not_read_stalls_nobody(server, client):
    with slow_engine(server, 0.002):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True,
                                "stream": True}):
            started = time.monotonic()
            for _ in range(3):  # while the stream above is neither read nor closed
                done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                                 extra_body={"ignore_eos": True})
                assert done.usage.completion_tokens == 4
            assert time.monotonic() - started < 5
    server.wait_idle()


def test_draining_server_answers_503_with_retry_after(server):
    server.state.draining = True
    try:
        response = server.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "draining"
        assert httpx.get(server.url + "/health").status_code == 503
        assert httpx.get(server.url + "/v1/models").status_code == 200
    finally:
        server.state.draining = False
    assert httpx.get(server.url + "/health").status_code == 200
    assert_serves(server)


@contextmanager
def logged_errors():
    """The log records of errors and tracebacks while the block runs, from every logger, uvicorn's included (its
    loggers do not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record) if record.levelno >= logging.ERROR or record.exc_info else None
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def stream_lines(url: str, lines: queue.Queue, max_tokens: int = 500) -> None:
    """Streams a completion on a thread of its own: each SSE line goes to `lines`, then None (or the error)."""
    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            }) as response:
                for line in response.iter_lines():
                    if line:
                        lines.put(line)
        except httpx.HTTPError as exc:
            lines.put(exc)
        lines.put(None)

    threading.Thread(target=run, daemon=True).start()


def rest_of(lines: queue.Queue) -> list[str]:
    rest = []
    while (line := lines.get(timeout=60)) is not None:
        assert isinstance(line, str), line  # the stream ended in an orderly way, not a cut connection
        rest.append(line)
    return rest


def assert_ended_by_the_drain(stream: list[str]) -> None:
    """The stream's last event is OpenAI's error (which the openai client raises), then [DONE]."""
    assert stream[-1] == "data: [DONE]"
    error = json.loads(stream[-2].removeprefix("data: "))["error"]
    assert error["code"] == "draining" and error["type"] == "service_unavailable_error" and error["message"]


def test_drain_answers_503_on_open_connections_and_a_second_signal_ends_streams_properly(tiny_chat_model):
    with logged_errors() as errors, serving(tiny_chat_model, grace_s=60) as running:
        engine, lines = running.engine, queue.Queue()
        with slow_engine(running, 0.02), httpx.Client(base_url=running.url, timeout=60) as keep_alive:
            stream_lines(running.url, lines)  # 500 tokens: 10 s at least
            assert lines.get(timeout=60).startswith("data: ")
            assert keep_alive.get("/health").status_code == 200  # a connection that stays open
            running.drain()
            refused = keep_alive.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
            assert refused.json()["error"]["code"] == "draining"
            assert keep_alive.get("/health").status_code == 503
            assert len(running.state.in_flight) == 1  # the stream runs on: the grace period is long
            running.drain()  # a second SIGTERM: what is left ends now
            assert_ended_by_the_drain(rest_of(lines))
            running.thread.join(60)
            assert not running.thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(running.url + "/health")
        assert not engine.has_unfinished_requests() and engine.allocator.num_used == 0
    assert not errors, [r.getMessage() for r in errors]


def test_grace_period_over_ends_streams_properly(tiny_chat_model):
    with logged_errors() as errors, serving(tiny_chat_model, grace_s=1) as running:
        engine, lines = running.engine, queue.Queue()
        with slow_engine(running, 0.02):  # 500 tokens: 10 s at least
            stream_lines(running.url, lines)
            first = lines.get(timeout=60)
            assert first.startswith("data: ")
            running.drain()
            stream = [first, *rest_of(lines)]
            assert_ended_by_the_drain(stream)
            assert len(stream) < 500  # cut short
            running.thread.join(60)
            assert not running.thread.is_alive()
        assert not engine.has_unfinished_requests() and engine.allocator.num_used == 0
    assert not errors, [r.getMessage() for r in errors]


# ------------------------------------------------------------------------------------- service classes, keys
def test_named_services_are_model_names(slo_server):
    cards = {m.id: m.model_extra for m in slo_server.client().models.list().data}
    assert set(cards) == {"tiny", "tiny-chat", "tiny-batch"}
    assert (cards["tiny-chat"]["service_class"], cards["tiny-chat"]["ttft_slo"]) == ("ls", 1e-05)


@pytest.mark.parametrize("stream", [False, True])
def test_rejected_ls_request_gets_429_with_retry_after(slo_server, stream):
    client = slo_server.client()
    with pytest.raises(openai.RateLimitError) as info:
        result = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3, stream=stream)
        list(result) if stream else None
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "slo_rejected"
    done = client.chat.completions.create(model="tiny-batch", messages=MESSAGES, max_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert done.service_tier == "flex" and done.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="latency-sensitive"):
        client.completions.create(model="tiny-chat", prompt=PROMPT, extra_body={"service_tier": "flex"})
    slo_server.wait_idle()
    metrics = httpx.get(slo_server.url + "/metrics").text  # an operator sees that admission turns everything away
    rejected_in_a_row = next(line for line in metrics.splitlines() if line.startswith("omniserve:ls_rejected_in_a_row"))
    assert float(rejected_in_a_row.split()[-1]) >= 1
    correction = next(line for line in metrics.splitlines() if line.startswith("omniserve:latency_model_correction"))
    assert 0 < float(correction.split()[-1]) < 0.1  # the 10 s-per-layer profile, measured against the device


def test_a_request_of_many_prompts_is_rejected_as_one(slo_server):
    """Its prompts reach the scheduler together and are judged as one (tests/test_slo_scheduler.py has the rule):
    one rejection, every prompt turned away, none run."""
    scheduler = slo_server.engine.scheduler
    rejected, in_a_row = scheduler.stats.num_rejected, scheduler.admission.ls_rejected_in_a_row
    prompt_tokens = scheduler.stats.prefix_cache_queries
    response = slo_server.post("/v1/completions", {"model": "tiny-chat", "prompt": [PROMPT] * 40, "n": 2,
                                                   "max_tokens": 3})
    assert response.status_code == 429 and response.json()["error"]["code"] == "slo_rejected"
    slo_server.wait_idle()
    assert scheduler.stats.num_rejected - rejected == 80
    assert scheduler.admission.ls_rejected_in_a_row - in_a_row == 1
    assert scheduler.stats.prefix_cache_queries == prompt_tokens  # no prompt started


def test_api_keys(tiny_chat_model, tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('[keys]\n"sk-batch-only" = ["be"]\n')
    with serving(tiny_chat_model, api_keys=APIKeys.build(["sk-all"], str(keys_file))) as running:
        for key in ("none", "sk-wrong"):
            with pytest.raises(openai.AuthenticationError):
                running.client(key).completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert httpx.get(running.url + "/v1/models").status_code == 401
        assert running.client("sk-all").completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices
        batch = running.client("sk-batch-only")
        with pytest.raises(openai.PermissionDeniedError, match="may not use LS"):
            batch.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert batch.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                             service_tier="flex").service_tier == "flex"
        assert batch.completions.create(model="tiny-batch", prompt=PROMPT, max_tokens=2).service_tier == "flex"
        assert httpx.get(running.url + "/health").status_code == 200  # probes and scrapers need no key
        assert httpx.get(running.url + "/metrics").status_code == 200


# ---------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_in_flight_requests_and_exits_cleanly(tiny_chat_model, tmp_path):
    grace_s = 120  # far longer than the request needs, even on a loaded machine
    process = subprocess.Popen(
        [sys.executable, "-m", "omniserve", "serve", tiny_chat_model, "--port", "0", "--block-size", "4",
         "--served-model-name", "tiny", "--shutdown-timeout", str(grace_s), "--be-decode-placement", "device",
         "--batch-db", str(tmp_path / "batches.db")],
        stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stderr), lines.put(None)], daemon=True).start()
    try:
        url, log = None, []
        deadline = time.monotonic() + 120
        while url is None:
            log.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            assert log[-1] is not None, "the server exited: " + "".join(log[:-1])
            if log[-1].startswith("omniserve: serving"):
                url = log[-1].split(" on ")[-1].strip()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=400, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [next(stream)]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        chunks += list(stream)  # the request in flight runs to its end
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 400
        assert process.wait(timeout=grace_s) == 0
        assert time.monotonic() - started < grace_s
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        while (line := lines.get(timeout=60)) is not None:
            log.append(line)
        assert not [line for line in log if "Traceback" in line or "ERROR" in line], "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------- the default model
def test_default_model_chat_through_the_server(default_llm):
    """The real model, chat template and byte-level tokenizer: the answer is right, and a sampled stream's deltas add
    up to the same text as the whole answer."""
    app = build_app(default_llm.engine, ["smollm2"])
    running = RunningServer(app)
    try:
        client = running.client()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        done = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16)
        assert "Paris" in done.choices[0].message.content
        sampled = dict(model="smollm2", messages=[{"role": "user", "content": "Say hello in French and Japanese."}],
                       temperature=0.8, seed=3, max_tokens=24)
        whole = client.chat.completions.create(**sampled).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**sampled,
                                                                                                   stream=True))
        assert streamed == whole
    finally:
        running.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's own error
def test_a_failed_engine_stops_the_server_with_status_1(tiny_chat_model, capsys):
    """The engine thread breaks: the request gets 503, and `run_server` stops and exits with status 1."""
    from omniserve.entrypoints.openai.api_server import run_server

    engine = LLMEngine(model=tiny_chat_model, block_size=4, be_decode_placement="device")

    def broken_step():
        raise RuntimeError("device lost")

    engine.run_iteration = broken_step
    app = build_app(engine, ["tiny"])
    exit_status = []

    def serve() -> None:
        try:
            run_server(app, "127.0.0.1", 0, log_level="warning")
        except SystemExit as exc:
            exit_status.append(exc.code)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "on http://" not in (err := capsys.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.05)
    url = err.split(" on ")[-1].strip()
    while app.state.server.async_engine is None:
        assert time.monotonic() < deadline, "the server never started its engine"
        time.sleep(0.01)
    response = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4},
                          timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    thread.join(30)
    assert not thread.is_alive() and exit_status and exit_status[0] not in (0, None)
