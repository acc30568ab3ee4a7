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
from servers import MESSAGES, PROMPT, metric_samples, serving, slow_engine

from omniserve.batch.protocol import TERMINAL
from omniserve.batch.service import BatchLimits
from omniserve.entrypoints.openai.auth import APIKeys
from omniserve.sampling.params import ServiceClass

CHAT = "/v1/chat/completions"
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
    assert batch.usage.output_tokens == sum(3 + i % 4 for i in range(12)) and batch.usage.input_tokens > 0
    output = read_jsonl(client, batch.output_file_id)
    assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(12)]  # input order, each once
    for line, out in zip(lines, output):
        body = dict(line["body"])
        extra = {"ignore_eos": body.pop("ignore_eos")}
        direct = client.chat.completions.create(**body, extra_body=extra)
        answer = out["response"]["body"]
        assert out["response"]["status_code"] == 200 and out["error"] is None
        assert answer["choices"][0]["message"]["content"] == direct.choices[0].message.content
        usage = direct.usage.model_dump(exclude_none=True)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):  # the cached tokens differ: the line ran
            assert answer["usage"][name] == usage[name]                       # first and left its prompt cached
        assert answer["service_tier"] == "flex" and answer["model"] == "tiny"  # served as best effort
    assert batch.id in [b.id for b in client.batches.list()]
    assert batch.output_file_id in [f.id for f in client.files.list(purpose="batch_output")]
    # The prompt is cached now: a second batch's usage adds up the prompt tokens its lines found cached.
    again = wait_for(client, submit(client, lines[:2]).id)
    cached = [o["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for o in read_jsonl(client, again.output_file_id)]
    assert again.usage.input_tokens_details.cached_tokens == sum(cached) > 0


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


def test_an_upload_without_its_form_fields_is_a_clear_error(server, client):
    no_purpose = httpx.post(server.url + "/v1/files", files={"file": ("in.jsonl", jsonl([chat_line("a")]))})
    not_a_form = httpx.post(server.url + "/v1/files", json={"file": "in.jsonl", "purpose": "batch"})
    assert (no_purpose.status_code, no_purpose.json()["error"]["param"]) == (400, "purpose")
    assert (not_a_form.status_code, not_a_form.json()["error"]["param"]) == (400, "file")


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
    limits = BatchLimits(max_file_bytes=4096, max_lines=3, max_line_bytes=400)
    with serving(tiny_chat_model, batch_limits=limits) as running:
        client = running.client()
        with pytest.raises(openai.APIStatusError) as info:
            client.files.create(file=("big.jsonl", io.BytesIO(jsonl([chat_line(f"q{i}") for i in range(40)]))),
                                purpose="batch")
        assert info.value.status_code == 413
        batch = wait_for(client, submit(client, [chat_line(f"q{i}") for i in range(4)]).id)
        assert batch.status == "failed" and batch.errors.data[0].code == "too_many_lines"
        batch = wait_for(client, submit(client, [chat_line("q0"), chat_line("long", stop=["x" * 300])]).id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 1)
        assert read_jsonl(client, batch.error_file_id)[0]["error"]["code"] == "line_too_large"


def test_a_chunked_upload_is_counted_as_it_is_read(tiny_chat_model):
    """No Content-Length: the server counts the bytes as it reads them instead of holding the body to measure it."""
    def multipart(content: bytes):
        yield (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\n'
               b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
               b"Content-Type: application/jsonl\r\n\r\n")
        for start in range(0, len(content), 1000):
            yield content[start:start + 1000]
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    with serving(tiny_chat_model, batch_limits=BatchLimits(max_file_bytes=20_000)) as running:
        small, big = jsonl([chat_line("a")]), jsonl([chat_line(f"q{i}") for i in range(400)])
        for content, status in ((small, 200), (big, 413)):
            response = httpx.post(running.url + "/v1/files", content=multipart(content), headers=headers)
            assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == "file_too_large"
        assert [f.bytes for f in running.client().files.list()] == [len(small)]


# ------------------------------------------------------------------------------------------------ ownership
def test_a_key_sees_and_cancels_only_its_own_files_and_batches(tiny_chat_model):
    keys = APIKeys({"sk-a": frozenset(ServiceClass), "sk-be": frozenset({ServiceClass.BE}),
                    "sk-ls": frozenset({ServiceClass.LS})})
    with serving(tiny_chat_model, api_keys=keys) as running:
        owner, other = running.client("sk-a"), running.client("sk-be")
        with slow_engine(running, 0.01):
            # 300 tokens at 10 ms an iteration at least: running still when the owner cancels, however slow the
            # calls before
            batch = submit(owner, [chat_line(f"q{i}", max_tokens=300, ignore_eos=True) for i in range(20)])
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


# --------------------------------------------------------------------------------------------------- restarts
@contextmanager
def server_process(model: str, db: str):
    """`omniserve serve` in a subprocess on a free port, one request running at a time, so a batch takes a while."""
    process = subprocess.Popen(
        [sys.executable, "-m", "omniserve", "serve", model, "--port", "0", "--block-size", "4",
         "--served-model-name", "tiny", "--batch-db", db, "--max-num-seqs", "1", "--be-decode-placement", "device"],
        stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stderr), lines.put(None)], daemon=True).start()
    try:
        log, url, deadline = [], None, time.monotonic() + DEADLINE_S
        while url is None:
            log.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            assert log[-1] is not None, "the server exited: " + "".join(log[:-1])
            if log[-1].startswith("omniserve: serving"):
                url = log[-1].split(" on ")[-1].strip()
        yield process, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_kill_9_mid_batch_then_restart_answers_every_line_once(tiny_chat_model, tmp_path):
    db = str(tmp_path / "batches.db")
    lines = [chat_line(f"q{i}", max_tokens=60, ignore_eos=True) for i in range(40)]
    with server_process(tiny_chat_model, db) as (process, client, _):
        batch = submit(client, lines)
        before = wait_for(client, batch.id, lambda b: b.request_counts.completed >= 3).request_counts.completed
        process.send_signal(signal.SIGKILL)
        process.wait()
    with server_process(tiny_chat_model, db) as (process, client, url):
        batch = wait_for(client, batch.id)
        done_here = next(s.value for f in _metrics(url) if f.name == "omniserve:batch_lines" for s in f.samples
                         if s.labels.get("outcome") == "done" and s.name.endswith("_total"))
        output = read_jsonl(client, batch.output_file_id)
    assert batch.status == "completed" and batch.request_counts.completed == 40
    assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(40)]  # every line, once, in order
    assert 40 - done_here >= before  # what was answered before the kill did not run again


def test_a_second_server_on_a_database_in_use_stops_before_loading_its_model(tmp_path):
    from omniserve.batch.store import BatchStore

    held = BatchStore(tmp_path / "batches.db")
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "omniserve", "serve", "--model", str(tmp_path / "no-model-here"), "--batch-db",
             str(tmp_path / "batches.db")], capture_output=True, text=True, timeout=DEADLINE_S)
    finally:
        held.close()
    assert finished.returncode != 0 and "in use by another server" in finished.stderr, finished.stderr[-2000:]


def _metrics(url: str):
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(httpx.get(url + "/metrics").text))


def test_a_drained_server_leaves_its_batch_to_the_next_start(tiny_chat_model, tmp_path):
    db = tmp_path / "batches.db"
    lines = [chat_line(f"q{i}", max_tokens=5 + 5 * i, ignore_eos=True) for i in range(20)]
    with serving(tiny_chat_model, batch_db=db) as running, slow_engine(running, 0.01):
        client = running.client()
        batch = submit(client, lines)
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 1)
        running.stop()  # a drain: lines in flight are not waited for, and stay pending
    with serving(tiny_chat_model, batch_db=db) as running:
        client = running.client()
        batch = wait_for(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 20
        assert [o["custom_id"] for o in read_jsonl(client, batch.output_file_id)] == [f"q{i}" for i in range(20)]
        running.wait_idle()


# ------------------------------------------------------------------------------------------------- run-batch
def test_run_batch_writes_every_answer_in_input_order(tiny_chat_model, tmp_path, capsys):
    from omniserve.entrypoints.cli import main

    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(jsonl([chat_line("a"), chat_line("b", model="nope"), chat_line("c")]))
    main(["run-batch", "-i", str(source), "-o", str(target), "--model", tiny_chat_model, "--served-model-name",
          "tiny", "--block-size", "4"])
    output = [json.loads(line) for line in target.read_text().splitlines()]
    assert [o["custom_id"] for o in output] == ["a", "b", "c"]
    assert output[0]["response"]["status_code"] == 200 and output[1]["error"]["code"] == "model_not_found"
    assert "2 of 3 lines answered, 1 failed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- beside LS traffic
def test_live_ls_requests_keep_their_slo_plans_during_a_large_batch(tiny_chat_model, tiny_profile):
    """As test_slo_engine's scheduler test, with the BE load a batch: every iteration that runs LS rows with more
    than their decodes is planned within the TPOT budget, and every LS request is served while the batch runs."""
    from omniserve.engine.scheduler.latency_model import BatchShape

    path, model = tiny_profile
    budget = 3 * model.iteration_time(BatchShape(1, 0, 64, 1, 1))
    with serving(tiny_chat_model, ls_tpot_slo=budget, profile_path=str(path), num_gpu_blocks_override=96) as running:
        engine, plans = running.engine, []
        step = engine.run_iteration

        def recording_step():
            outputs = step()
            plans.append(engine.last_iteration.plan)
            return outputs

        engine.run_iteration = recording_step
        client = running.client()
        # Short lines, and long ones (300 tokens: 300 iterations at least) that keep the batch running past the LS
        # requests (a few dozen iterations).
        lines = [chat_line(f"q{i}", max_tokens=300 if i % 10 == 0 else 24, ignore_eos=True) for i in range(80)]
        batch = submit(client, lines)
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 1)
        for i in range(3):
            answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, extra_body={
                "ignore_eos": True}, extra_headers={"x-request-id": f"ls-{i}"})
            assert answer.usage.completion_tokens == 12
        batch = wait_for(client, batch.id)
        del engine.run_iteration
        running.wait_idle()
    assert batch.status == "completed" and batch.request_counts.completed == 80
    mixed, over = 0, []
    for plan in plans:
        ls = [c for c in plan.chunks if "ls-" in c.request_id]
        if not ls:
            continue
        # Batch rows on the device, entering the CPU pool, or coming back from it at their layer.
        batch_rows = any("batch_req_" in c.request_id for c in plan.chunks) or plan.offloaded_starts or plan.returning
        mixed += bool(batch_rows) or plan.pipeline.row_limit > 0  # batch rows on the device, or in the CPU pool
        optional = any(len(c.token_ids) > 1 or "ls-" not in c.request_id for c in plan.chunks)
        optional = optional or plan.offloaded_starts or plan.returning or plan.swap_outs
        if optional and plan.predicted_time > plan.time_budget:
            over.append(plan.summary())
    assert mixed, "no iteration ran LS and batch rows together"
    assert not over, over[:3]
