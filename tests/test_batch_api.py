"""The Batch API: the official openai client end to end, cancel, ownership, bad files and lines, limits, metrics,
a restart after kill -9 and after a drain, `omniserve run-batch`, and live LS requests beside a large batch.

Waits are on events (a batch's status, its counts), with deadlines far beyond what any machine needs."""

from __future__ import annotations

import io
import json
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
from test_server import (  # noqa: F401
    MESSAGES, PROMPT, metric_samples, server, serving, slow_engine, tiny_chat_model,
)

from omniserve.batch.service import BatchLimits
from omniserve.entrypoints.openai.auth import APIKeys
from omniserve.sampling.params import ServiceClass

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "cancelled", "expired")
DEADLINE_S = 120


def chat_line(custom_id: str, max_tokens: int = 4, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, **body}}


def jsonl(lines: list) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def submit(client: openai.OpenAI, lines: list, endpoint: str = CHAT, **kwargs):
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **kwargs)


def wait_for(client: openai.OpenAI, batch_id: str, done=lambda b: b.status in TERMINAL):
    deadline = time.monotonic() + DEADLINE_S
    while not done(batch := client.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.05)
    return batch


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def client(server) -> openai.OpenAI:
    yield server.client()
    server.wait_idle()


# ------------------------------------------------------------------------------------------------ end to end
def test_openai_client_end_to_end_matches_the_chat_route(client):
    lines = [chat_line(f"q{i}", max_tokens=3 + i % 4, ignore_eos=True) for i in range(12)]
    batch = submit(client, lines, metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 12, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(12)]  # input order, each once
    for line, out in zip(lines, output):
        body = dict(line["body"])
        extra = {"ignore_eos": body.pop("ignore_eos")}
        direct = client.chat.completions.create(**body, extra_body=extra)
        answer = out["response"]["body"]
        assert out["response"]["status_code"] == 200 and out["error"] is None
        assert answer["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert answer["usage"] == direct.usage.model_dump(exclude_none=True)
        assert answer["service_tier"] == "flex" and answer["model"] == "tiny"  # served as best effort
    assert batch.id in [b.id for b in client.batches.list()]
    assert batch.output_file_id in [f.id for f in client.files.list(purpose="batch_output")]


def test_completions_endpoint_and_a_named_best_effort_model(client):
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny-batch", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}}
             for i in range(3)]
    batch = wait_for(client, submit(client, lines, endpoint="/v1/completions").id)
    output = read_jsonl(client, batch.output_file_id)
    direct = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert [o["response"]["body"]["choices"][0]["text"] for o in output] == [direct.choices[0].text] * 3


def test_files_can_be_listed_read_and_deleted(client):
    uploaded = client.files.create(file=("mine.jsonl", io.BytesIO(jsonl([chat_line("a")]))), purpose="batch")
    assert client.files.retrieve(uploaded.id).filename == "mine.jsonl"
    assert client.files.content(uploaded.id).content == jsonl([chat_line("a")])
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


# ------------------------------------------------------------------------------------------------------ cancel
def test_cancel_mid_batch_keeps_what_finished_and_frees_everything(server, client):
    lines = [chat_line(f"q{i}", max_tokens=5 + 10 * i, ignore_eos=True) for i in range(30)]  # they end in turn
    with slow_engine(server, 0.01):
        batch = submit(client, lines)
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        batch = wait_for(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts.total == 30 and 2 <= counts.completed < 30 and counts.failed == 0
    output = read_jsonl(client, batch.output_file_id)
    assert len(output) == counts.completed and len({o["custom_id"] for o in output}) == counts.completed
    for out in output:  # whole answers only
        assert out["response"]["body"]["usage"]["completion_tokens"] == 5 + 10 * int(out["custom_id"][1:])
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait_for(client, submit(client, [chat_line("x")]).id).id)  # completed: too late


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_lines_go_to_the_error_file_with_their_custom_id(client):
    long_prompt = " ".join(["hello"] * 1000)  # beyond the tiny model's context (512)
    lines = [chat_line("good"), b"{not json", b"[1, 2]", {"method": "POST", "url": CHAT, "body": {}},
             chat_line("good"), chat_line("other-model", model="nope"), {**chat_line("url"), "url": "/v1/embeddings"},
             chat_line("field", bogus=1), chat_line("stream", stream=True),
             {"custom_id": "long", "method": "POST", "url": CHAT,
              "body": {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}]}},
             chat_line("good-2")]
    batch = wait_for(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (11, 2, 9)
    assert [o["custom_id"] for o in read_jsonl(client, batch.output_file_id)] == ["good", "good-2"]
    errors = {(e["custom_id"], (e["error"] or {}).get("code")) for e in read_jsonl(client, batch.error_file_id)}
    assert errors == {(None, "invalid_json_line"), (None, "missing_custom_id"), ("good", "duplicate_custom_id"),
                      ("other-model", "model_not_found"), ("url", "mismatched_url"), ("field", "invalid_request"),
                      ("stream", "invalid_request"), ("long", None)}
    long = next(e for e in read_jsonl(client, batch.error_file_id) if e["custom_id"] == "long")
    assert long["response"]["status_code"] == 400 and "context" in long["response"]["body"]["error"]["message"]


@pytest.mark.parametrize("content, purpose, message", [
    (b"custom_id,body\nq1,hello\n", "batch", "first line is not JSON"),
    (b'[{"custom_id": "q1"}]\n', "batch", "not a JSON object"),
    (b"\xff\xfe\x00binary", "batch", "not UTF-8"),
    (b"", "batch", "empty"),
    (jsonl([chat_line("a")]), "fine-tune", "purpose must be 'batch'"),
])
def test_a_file_that_is_not_a_batch_file_is_refused(client, content, purpose, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose=purpose)


def test_bad_batch_requests_get_openai_errors(client):
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("a")]))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint must be one of"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="soon")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_size_limits_are_flags(tiny_chat_model):
    limits = BatchLimits(max_file_bytes=4096, max_lines=3)
    with serving(tiny_chat_model, batch_limits=limits) as running:
        client = running.client()
        with pytest.raises(openai.APIStatusError) as info:
            client.files.create(file=("big.jsonl", io.BytesIO(jsonl([chat_line(f"q{i}") for i in range(40)]))),
                                purpose="batch")
        assert info.value.status_code == 413
        batch = wait_for(client, submit(client, [chat_line(f"q{i}") for i in range(4)]).id)
        assert batch.status == "failed" and batch.errors.data[0].code == "too_many_lines"
        assert wait_for(client, submit(client, [chat_line(f"q{i}") for i in range(3)]).id).status == "completed"


# ------------------------------------------------------------------------------------------------ ownership
def test_a_key_sees_and_cancels_only_its_own_files_and_batches(tiny_chat_model):
    keys = APIKeys({"sk-a": frozenset(ServiceClass), "sk-be": frozenset({ServiceClass.BE}),
                    "sk-ls": frozenset({ServiceClass.LS})})
    with serving(tiny_chat_model, api_keys=keys) as running:
        owner, other = running.client("sk-a"), running.client("sk-be")
        with slow_engine(running, 0.01):
            batch = submit(owner, [chat_line(f"q{i}", max_tokens=30, ignore_eos=True) for i in range(20)])
            for call in (lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                         lambda: other.files.retrieve(batch.input_file_id),
                         lambda: other.files.content(batch.input_file_id),
                         lambda: other.files.delete(batch.input_file_id)):
                with pytest.raises(openai.NotFoundError):
                    call()
            assert other.batches.list().data == [] and other.files.list().data == []
            owner.batches.cancel(batch.id)
        assert wait_for(owner, batch.id).status == "cancelled"
        assert wait_for(other, submit(other, [chat_line("be-only")]).id).status == "completed"  # a BE-only key
        with pytest.raises(openai.PermissionDeniedError):
            submit(running.client("sk-ls"), [chat_line("ls-only")])
        running.wait_idle()


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_count_batches_and_lines(server, client):
    batch = wait_for(client, submit(client, [chat_line("m1"), chat_line("m2"), b"{bad"]).id)
    samples = metric_samples(server)
    assert samples[("omniserve:batches", (("status", "completed"),))] >= 1
    assert samples[("omniserve:batch_lines_total", (("outcome", "done"),))] >= 2
    assert batch.request_counts.failed == 1
