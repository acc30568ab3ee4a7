"""The BatchService with a stand-in runner: the order lines are fed in (round robin between API keys, oldest batch
first), that at most max_queued lines wait unstarted, and that a stop mid-batch (what a crash leaves) followed by a
new service on the same store answers every line once, without running an answered line again."""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time

import pytest

from omniserve.batch.protocol import TERMINAL, BatchCreateRequest
from omniserve.batch.service import BatchLimits, BatchService
from omniserve.batch.store import BatchStore
from omniserve.config import ConfigError

ENDPOINT = "/v1/completions"


class Runner:
    """Starts lines once `go` is set, and answers as many as `budget` allows (the rest wait in flight)."""

    accepting = True

    def __init__(self, budget: float = math.inf) -> None:
        self.go = asyncio.Event()
        self.budget = budget
        self.started: list[str] = []
        self.answered: list[str] = []
        self.waiting = 0
        self.most_waiting = 0

    def check(self, endpoint: str, body: dict):
        return None

    async def run(self, endpoint: str, body: dict, request_id: str, on_started, owner=None):
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        await self.go.wait()
        self.waiting -= 1
        self.started.append(body["prompt"])
        on_started()
        await until(lambda: self.budget > 0)
        self.budget -= 1
        self.answered.append(body["prompt"])
        return 200, {"text": body["prompt"]}


def lines(name: str, count: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{name}{i}", "method": "POST", "url": ENDPOINT,
                                "body": {"prompt": f"{name}{i}"}}).encode() + b"\n" for i in range(count))


async def submit(service: BatchService, owner: str, name: str, count: int) -> str:
    uploaded = await service.upload(owner, "in.jsonl", "batch", io.BytesIO(lines(name, count)))
    batch = service.create(owner, None, BatchCreateRequest(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                                           completion_window="24h"))
    await until(lambda: service.get(owner, batch.id).status != "validating")
    return batch.id


async def until(condition, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_lines_are_fed_in_turn_between_keys_and_oldest_batch_first(tmp_path):
    async def scenario() -> list[str]:
        runner = Runner()
        service = BatchService(BatchStore(tmp_path / "b.db"), runner, BatchLimits(max_queued=1))
        await service.start()
        first = await submit(service, "alice", "a", 3)
        second = await submit(service, "alice", "c", 2)
        third = await submit(service, "bob", "b", 3)
        runner.go.set()
        for owner, batch_id in (("alice", first), ("alice", second), ("bob", third)):
            await until(lambda: service.get(owner, batch_id).status in TERMINAL)
        await service.stop()
        assert runner.most_waiting == 1  # max_queued: one line waits unstarted at a time
        return runner.started

    # a0 went before bob's batch existed; then the keys in turn, alice's older batch before her newer one
    assert asyncio.run(scenario()) == ["a0", "b0", "a1", "b1", "a2", "b2", "c0", "c1"]


def test_a_stop_mid_batch_then_a_new_service_answers_every_line_once(tmp_path):
    async def first_life() -> tuple[str, list[str]]:
        runner = Runner(budget=10)  # then the lines in flight stay in flight, until the stop aborts them
        service = BatchService(BatchStore(tmp_path / "b.db"), runner, BatchLimits(max_queued=4))
        await service.start()
        runner.go.set()
        batch_id = await submit(service, "", "q", 30)
        await until(lambda: len(runner.answered) == 10 and len(runner.started) > 10)
        await service.stop()
        service.store.close()
        return batch_id, list(runner.answered)

    async def second_life(batch_id: str) -> tuple[list[str], dict]:
        runner = Runner()
        runner.go.set()
        service = BatchService(BatchStore(tmp_path / "b.db"), runner)
        await service.start()
        await until(lambda: service.get(None, batch_id).status in TERMINAL)
        batch = service.get(None, batch_id)
        output = service.file_path(None, batch.output_file_id).read_text().splitlines()
        await service.stop()
        return runner.answered, {"counts": batch.request_counts.model_dump(), "output": output}

    batch_id, before = asyncio.run(first_life())
    after, result = asyncio.run(second_life(batch_id))
    assert not set(before) & set(after)  # nothing answered ran again
    assert sorted(before + after) == sorted(f"q{i}" for i in range(30))
    assert result["counts"] == {"total": 30, "completed": 30, "failed": 0}
    assert [json.loads(line)["custom_id"] for line in result["output"]] == [f"q{i}" for i in range(30)]


def test_a_stop_while_an_answer_is_written_keeps_the_answer(tmp_path):
    """stop() cancels the lines in flight; one whose answer is being written when it comes keeps it, and stop returns
    once it is written (before, stop returned with the write under way, and a write whose thread had not started yet
    was dropped: the line ran again after the restart)."""
    async def scenario() -> tuple[list[str], dict]:
        runner = Runner()
        service = BatchService(BatchStore(tmp_path / "b.db"), runner)
        writing, answer_lines = threading.Event(), service.store.answer_lines

        def slow_answer(rows):
            writing.set()
            time.sleep(0.2)  # the stop comes meanwhile
            answer_lines(rows)

        service.store.answer_lines = slow_answer
        await service.start()
        runner.go.set()
        batch_id = await submit(service, "", "q", 1)
        await asyncio.to_thread(writing.wait, 30)
        await service.stop()
        return runner.answered, service.store.line_counts(service.store.get_batch(batch_id).seq)

    answered, counts = asyncio.run(scenario())
    assert answered == ["q0"] and counts.get("done") == 1


@pytest.mark.parametrize("status", ["cancelled", "expired"])
def test_cancel_and_expiry_end_the_batch_with_what_finished(tmp_path, status):
    async def scenario():
        runner = Runner(budget=2)
        service = BatchService(BatchStore(tmp_path / "b.db"), runner, BatchLimits(max_queued=2))
        await service.start()
        batch_id = await submit(service, "", "q", 10)
        runner.go.set()
        await until(lambda: len(runner.answered) == 2)
        if status == "cancelled":
            service.cancel(None, batch_id)
        else:
            next(iter(service._active.values())).obj["expires_at"] = 0  # the window is over
        await until(lambda: service.get(None, batch_id).status in TERMINAL)
        batch = service.get(None, batch_id)
        errors = service.file_path(None, batch.error_file_id).read_text() if batch.error_file_id else ""
        await service.stop()
        return batch, len(runner.answered), errors

    batch, answered, errors = asyncio.run(scenario())
    assert batch.status == status and batch.request_counts.completed == answered
    if status == "expired":  # the lines not answered are in the error file
        assert batch.request_counts.failed == 10 - answered and errors.count("batch_expired") == 10 - answered
    else:
        assert batch.request_counts.failed == 0 and batch.error_file_id is None


def test_a_database_serves_one_server_at_a_time(tmp_path):
    store = BatchStore(tmp_path / "b.db")
    with pytest.raises(ConfigError, match="in use by another server"):
        BatchStore(tmp_path / "b.db")
    store.close()
    BatchStore(tmp_path / "b.db").close()  # free again once closed (or once its process ends, however it ends)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot open the batch database"):
        BatchStore(tmp_path / "file" / "b.db")


def test_feeding_goes_on_after_a_failure(tmp_path, caplog):
    async def scenario():
        runner = Runner()
        runner.go.set()
        store = BatchStore(tmp_path / "b.db")
        service = BatchService(store, runner)
        pending_lines, failures = store.pending_lines, []

        def failing_once(*args):
            if not failures:
                failures.append(1)
                raise OSError("disk I/O error")
            return pending_lines(*args)

        store.pending_lines = failing_once
        await service.start()
        batch_id = await submit(service, "", "q", 5)
        await until(lambda: service.get(None, batch_id).status in TERMINAL)
        await service.stop()
        return service.get(None, batch_id)

    batch = asyncio.run(scenario())
    assert batch.status == "completed" and batch.request_counts.completed == 5
    assert "batch feeding failed; retrying" in caplog.text
