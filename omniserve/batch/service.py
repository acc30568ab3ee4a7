"""Batches from creation to their output files: validation, feeding lines to the engine, answers, cancel, expiry,
and resuming after a restart.

    validating -> in_progress -> finalizing -> completed
        |              |-> cancelling -> cancelled        (lines in flight are aborted, the rest marked cancelled)
        |              '-> expired                        (past completion_window: the rest go to the error file)
        '-> failed                                        (the file is not a batch: too many lines, none readable)

Feeding. Lines go to the engine as best-effort requests as it takes them, not all at once: at most `max_queued`
lines are submitted and not yet started (no first output), so the engine's queue always has batch work to fit
around live traffic without holding a whole 50,000-line batch in memory. The next line comes from the API keys in
turn (one line each, the key fed longest ago first; a key new to the queue goes next), and for one key from its
oldest batch first, so a key with a huge batch does not starve another's small one.

Durability. Every state change is written to the store before it is acted on (store.py): a line's answer in the
same statement that ends it, a batch's status before its work. A restart (after a crash or a drain) takes every
batch up where the store has it: validating batches validate again, running ones feed their pending lines (those in
flight at the crash run again; none answered does), finalizing ones write their files again, cancelling ones end.
A drain stops the feeding and does not wait for lines in flight: they are pending, and run after the restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from omniserve.batch.files import new_file_id, save_upload
from omniserve.batch.lines import BodyCheck, error_line, line_id, read_line, response_line
from omniserve.batch.protocol import (
    BATCH_ENDPOINTS, Batch, BatchCreateRequest, BatchList, FileDeleted, FileList, FileObject,
    window_seconds,
)
from omniserve.batch.store import BatchRow, BatchStore, FileRow, Line, write_file_atomically
from omniserve.config import ConfigError
from omniserve.errors import APIError
from omniserve.sampling.params import ServiceClass

logger = logging.getLogger(__name__)

_REFILL = 256  # pending lines read from the store at a time, per batch
_ROWS_PER_WRITE = 1000  # lines written per transaction while validating
_EXPIRY_CHECK_S = 1.0
_RETRY_S = 1.0  # after a failure of the feeding or the expiry check


class LineNotRun(Exception):
    """The line could not run now (the server drains, or its engine stopped): it stays pending."""


class LineRunner(Protocol):
    """Runs a line's request as the endpoint's HTTP route would (omniserve.entrypoints.openai.serving_batch)."""

    @property
    def accepting(self) -> bool:
        """Whether lines may start now."""

    check: BodyCheck

    async def run(self, endpoint: str, body: dict, request_id: str, on_started: Callable[[], None],
                  owner: str | None = None) -> tuple[int, dict]:
        """(HTTP status, response body); raises LineNotRun. `owner`: the batch's API key owner (its lines share
        cached prompt prefixes only with that key's requests)."""


@dataclass(frozen=True)
class BatchLimits:
    max_file_bytes: int = 200 * 2**20
    """The largest upload (OpenAI's limit for batch files)."""
    max_lines: int = 50_000
    """The most lines (requests) in one batch: OpenAI's limit."""
    max_line_bytes: int = 25 * 2**20
    """The largest line: the server's request body limit."""
    max_queued: int = 64
    """Lines submitted to the engine and not started yet (see the module docstring)."""

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_lines", "max_line_bytes", "max_queued"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batch {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class _Active:
    """A batch in progress, in memory."""

    seq: int
    owner: str
    obj: dict
    counts: Counter
    """Lines by state (pending, done, failed, cancelled), as the store has them."""
    buffer: deque[Line] = field(default_factory=deque)
    next_idx: int = 0
    exhausted: bool = False
    in_flight: dict[int, asyncio.Task] = field(default_factory=dict)
    ended: bool = False
    """Finishing (completed, cancelled or expired): no more lines start."""
    fed_at: float | None = None
    answered: int = 0
    """Lines answered by this process since fed_at (lines/s)."""

    @property
    def id(self) -> str:
        return self.obj["id"]


class _InvalidFile(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message}


class _Stopped(Exception):
    pass


class BatchService:
    def __init__(self, store: BatchStore, runner: LineRunner, limits: BatchLimits = BatchLimits()) -> None:
        self.store = store
        self.runner = runner
        self.limits = limits
        self.lines_answered: Counter = Counter()
        """Lines answered by this process, by outcome (done, failed, cancelled)."""
        self._active: dict[int, _Active] = {}
        self._last_fed: dict[str, int] = {}  # API key (owner) -> when it was last fed a line (0: never)
        self._feeds = 0
        self._queued = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._stopping = threading.Event()

    # ------------------------------------------------------------------------------------------------- lifetime
    async def start(self) -> None:
        """Takes up the batches the store has unfinished, then feeds."""
        for row in self.store.batches_with_status(("validating", "in_progress", "finalizing", "cancelling")):
            logger.info("batch %s: resuming (%s)", row.id, row.status)
            if row.status == "validating":
                self._spawn(self._validate(row.seq, row.owner, row.object))
            elif row.status == "finalizing":
                self._spawn(self._finalize(row.seq, row.owner, row.object, "completed"))
            else:
                active = self._activate(row.seq, row.owner, row.object)
                if row.status == "cancelling" or not active.counts["pending"]:
                    self._end(active, "cancelled" if row.status == "cancelling" else "completed")
        self._loops = [asyncio.ensure_future(self._forever(self._feed, "feeding")),
                       asyncio.ensure_future(self._forever(self._expire, "expiry check"))]

    async def stop(self) -> None:
        """Stops feeding and aborts the lines in flight (they stay pending); waits for writes under way."""
        self._stopping.set()
        for task in self._loops:
            task.cancel()
        for active in self._active.values():
            for task in active.in_flight.values():
                task.cancel()
        await asyncio.gather(*self._loops, *self._tasks,
                             *(t for a in self._active.values() for t in a.in_flight.values()), return_exceptions=True)

    def wake(self) -> None:
        """Lines may start again (the runner was not accepting, and now is): feeding looks at once."""
        self._wake.set()

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch work failed", exc_info=task.exception())

    # ---------------------------------------------------------------------------------------------------- files
    async def upload(self, owner: str | None, filename: str, purpose: str, source: BinaryIO) -> FileObject:
        if purpose != "batch":
            raise APIError(400, f"this server keeps files for batches only: purpose must be 'batch', got {purpose!r}",
                           param="purpose")
        row = await asyncio.to_thread(save_upload, self.store, owner or "", filename, purpose, source,
                                      self.limits.max_file_bytes)
        return _file_object(row)

    def file(self, owner: str | None, file_id: str) -> FileRow:
        row = self.store.get_file(file_id)
        if row is None or not _sees(owner, row.owner):
            raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return row

    def file_object(self, owner: str | None, file_id: str) -> FileObject:
        return _file_object(self.file(owner, file_id))

    def file_path(self, owner: str | None, file_id: str) -> Path:
        return self.store.file_path(self.file(owner, file_id).id)

    def list_files(self, owner: str | None, purpose: str | None, limit: int, after: str | None,
                   order: str) -> FileList:
        rows = self.store.list_files(owner, purpose, limit + 1, after, newest_first=order == "desc")
        data = [_file_object(r) for r in rows[:limit]]
        return FileList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    async def delete_file(self, owner: str | None, file_id: str) -> FileDeleted:
        row = self.file(owner, file_id)
        await asyncio.to_thread(self.store.delete_file, row.id)
        return FileDeleted(id=row.id)

    # -------------------------------------------------------------------------------------------------- batches
    def create(self, owner: str | None, classes: frozenset[ServiceClass] | None,
               request: BatchCreateRequest) -> Batch:
        if classes is not None and ServiceClass.BE not in classes:
            raise APIError(403, "batch lines run as best effort, which this API key may not use",
                           code="service_class_not_allowed")
        if request.endpoint not in BATCH_ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, got {request.endpoint!r}",
                           param="endpoint")
        source = self.file(owner, request.input_file_id)
        if source.purpose != "batch":
            raise APIError(400, f"file {source.id} has purpose {source.purpose!r}, not 'batch'",
                           param="input_file_id")
        now = int(time.time())
        obj = Batch(id=f"batch_{uuid.uuid4().hex[:24]}", endpoint=request.endpoint, input_file_id=source.id,
                    completion_window=request.completion_window, status="validating", created_at=now,
                    expires_at=now + window_seconds(request.completion_window), metadata=request.metadata
                    ).model_dump(mode="json")
        seq = self.store.add_batch(obj["id"], owner or "", obj)
        self._spawn(self._validate(seq, owner or "", obj))
        return Batch(**obj)

    def get(self, owner: str | None, batch_id: str) -> Batch:
        row = self._batch(owner, batch_id)
        active = self._active.get(row.seq)
        return Batch(**(_with_counts(active) if active is not None else row.object))

    def list(self, owner: str | None, limit: int, after: str | None) -> BatchList:
        rows = self.store.list_batches(owner, limit + 1, after)
        data = [Batch(**(_with_counts(self._active[r.seq]) if r.seq in self._active else r.object))
                for r in rows[:limit]]
        return BatchList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                         last_id=data[-1].id if data else None)

    def cancel(self, owner: str | None, batch_id: str) -> Batch:
        """Marks the batch cancelling (durably), then ends it: lines in flight are aborted, the rest cancelled, and
        the output file holds what finished."""
        row = self._batch(owner, batch_id)
        active = self._active.get(row.seq)
        if row.status in ("cancelling", "cancelled"):
            return self.get(owner, batch_id)
        if row.status not in ("validating", "in_progress") or (active is not None and active.ended):
            raise APIError(409, f"cannot cancel a batch that is {row.status if active is None else 'finishing'}",
                           param="batch_id", code="batch_not_cancellable")
        obj = active.obj if active is not None else row.object
        obj.update(status="cancelling", cancelling_at=int(time.time()))
        self.store.update_batch(row.seq, obj)
        if active is not None:  # a batch still validating ends when its validation does
            self._end(active, "cancelled")
        return Batch(**(_with_counts(active) if active is not None else obj))

    def _batch(self, owner: str | None, batch_id: str) -> BatchRow:
        row = self.store.get_batch(batch_id)
        if row is None or not _sees(owner, row.owner):
            raise APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        return row

    # ----------------------------------------------------------------------------------------------- validation
    async def _validate(self, seq: int, owner: str, obj: dict) -> None:
        try:
            total = await asyncio.to_thread(self._read_lines, seq, obj)
        except _Stopped:
            return  # validated again after the restart
        except _InvalidFile as exc:
            self.store.delete_lines(seq)
            obj.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [exc.error]})
            self.store.update_batch(seq, obj)
            logger.info("batch %s failed validation: %s", obj["id"], exc)
            return
        row = self.store.get_batch(obj["id"])  # a cancel may have come meanwhile (no await from here on)
        obj = row.object
        if row.status == "validating":
            obj.update(status="in_progress", in_progress_at=int(time.time()))
            self.store.update_batch(seq, obj)
        active = self._activate(seq, owner, obj)
        self.lines_answered["failed"] += active.counts["failed"]  # the unreadable lines, in the error file
        logger.info("batch %s: %d lines, %d of them unreadable", obj["id"], total, active.counts["failed"])
        if row.status == "cancelling" or not active.counts["pending"]:
            self._end(active, "cancelled" if row.status == "cancelling" else "completed")

    def _read_lines(self, seq: int, obj: dict) -> int:
        """Reads the input file into the lines table (a worker thread's job), a transaction per 1,000 lines; returns
        the number of lines. Starts from the first line each time, so a restart mid-way leaves no half batch."""
        self.store.delete_lines(seq)
        path = self.store.file_path(obj["input_file_id"])
        if self.store.get_file(obj["input_file_id"]) is None or not path.exists():
            raise _InvalidFile("file_not_found", f"the input file {obj['input_file_id']} was deleted")
        seen: set[str] = set()
        rows, total, readable = [], 0, 0
        with open(path, "rb") as source:
            for number, raw in enumerate(source, 1):
                raw = raw.strip()
                if not raw:
                    continue
                if total == self.limits.max_lines:
                    raise _InvalidFile("too_many_lines", f"the file has more than {self.limits.max_lines} lines, "
                                       "this server's limit for a batch")
                read = read_line(raw, number, line_id(obj["id"], total), obj["endpoint"], seen,
                                 self.limits.max_line_bytes, self.runner.check)
                readable += read.custom_id is not None
                rows.append((total, read.custom_id, read.request, "pending" if read.error is None else "failed",
                             read.error))
                total += 1
                if len(rows) == _ROWS_PER_WRITE:
                    if self._stopping.is_set():
                        raise _Stopped()
                    self.store.add_lines(seq, rows)
                    rows = []
        self.store.add_lines(seq, rows)
        if total == 0:
            raise _InvalidFile("empty_file", "the input file has no lines")
        if readable == 0:
            raise _InvalidFile("invalid_file_format", "no line of the input file is a request object with a "
                               "custom_id: it is not a batch file (JSONL)")
        return total

    def _activate(self, seq: int, owner: str, obj: dict) -> _Active:
        active = _Active(seq, owner, obj, Counter(self.store.line_counts(seq)))
        self._active[seq] = active
        self._last_fed.setdefault(owner, 0)
        self._wake.set()
        return active

    # -------------------------------------------------------------------------------------------------- feeding
    async def _forever(self, step, what: str) -> None:
        """Runs `step` again and again. A failure (a full disk, say) is logged and retried after a pause, so that
        batches go on once its cause is gone, instead of stopping without a word."""
        while True:
            try:
                await step()
            except Exception:
                logger.exception("batch %s failed; retrying in %.0f s", what, _RETRY_S)
                await asyncio.sleep(_RETRY_S)
                self._wake.set()

    async def _feed(self) -> None:
        await self._wake.wait()
        self._wake.clear()
        while self._queued < self.limits.max_queued and self.runner.accepting:
                picked = await self._next_line()
                if picked is None:
                    break
                active, line = picked
                self._queued += 1
                active.fed_at = active.fed_at or time.monotonic()
                active.in_flight[line.idx] = asyncio.ensure_future(self._run_line(active, line))

    async def _next_line(self) -> tuple[_Active, Line] | None:
        """The next line to run: from the API key fed longest ago (a key new to the queue first), from its oldest
        batch."""
        for owner in sorted(self._last_fed, key=self._last_fed.__getitem__):
            for active in sorted((a for a in self._active.values() if a.owner == owner), key=lambda a: a.seq):
                if not active.buffer and not active.exhausted and not active.ended:
                    lines = await asyncio.to_thread(self.store.pending_lines, active.seq, active.next_idx, _REFILL)
                    active.exhausted = not lines
                    active.buffer.extend(lines)
                    active.next_idx = lines[-1].idx + 1 if lines else active.next_idx
                if active.buffer and not active.ended:
                    self._feeds += 1
                    self._last_fed[owner] = self._feeds
                    return active, active.buffer.popleft()
        return None

    async def _run_line(self, active: _Active, line: Line) -> None:
        started = False

        def on_started() -> None:
            nonlocal started
            if not started:
                started = True
                self._queued -= 1
                self._wake.set()

        request_id = line_id(active.id, line.idx)
        try:
            try:
                status, body = await self.runner.run(active.obj["endpoint"], json.loads(line.request), request_id,
                                                     on_started, active.owner or None)
            except LineNotRun:
                active.buffer.appendleft(line)  # runs when lines may start again, or after the restart
                return
            except Exception:
                logger.exception("batch %s: line %d failed", active.id, line.idx)
                status, body = 500, {"error": {"message": "internal error while running this line",
                                               "type": "server_error", "param": None, "code": None}}
            state = "done" if status == 200 else "failed"
            result = response_line(request_id, line.custom_id, status, body)
            # Written whole even if a stop comes meanwhile (stop waits for it): an answer the engine gave is never run
            # again after a restart.
            await _to_its_end(asyncio.to_thread(self.store.answer_lines, [(active.seq, line.idx, state, result)]))
            active.counts["pending"] -= 1
            active.counts[state] += 1
            active.answered += 1
            self.lines_answered[state] += 1
        finally:
            if not started:
                self._queued -= 1
            active.in_flight.pop(line.idx, None)
            self._wake.set()
            if not active.ended and not active.counts["pending"] and not active.in_flight:
                self._end(active, "completed")

    # --------------------------------------------------------------------------------------------------- ending
    async def _expire(self) -> None:
        await asyncio.sleep(_EXPIRY_CHECK_S)
        now = time.time()
        for active in list(self._active.values()):
            if not active.ended and now >= active.obj["expires_at"]:
                logger.warning("batch %s: past its completion window, expiring", active.id)
                self._end(active, "expired")

    def _end(self, active: _Active, status: str) -> None:
        active.ended = True
        self._spawn(self._ending(active, status))

    async def _ending(self, active: _Active, status: str) -> None:
        """Aborts the lines in flight, ends the pending ones and writes the files."""
        tasks = list(active.in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if status == "cancelled":
            ended = await asyncio.to_thread(self.store.end_pending_lines, active.seq, "cancelled")
            self.lines_answered["cancelled"] += ended
        elif status == "expired":
            def expired(line: Line) -> str:
                return error_line(line_id(active.id, line.idx), line.custom_id, "batch_expired",
                                  "the batch's completion window ended before this line ran")
            self.lines_answered["failed"] += await asyncio.to_thread(
                self.store.end_pending_lines, active.seq, "failed", expired)
        del self._active[active.seq]
        if not any(a.owner == active.owner for a in self._active.values()):
            del self._last_fed[active.owner]
        await self._finalize(active.seq, active.owner, active.obj, status)

    async def _finalize(self, seq: int, owner: str, obj: dict, status: str) -> None:
        """Writes the output file (answered lines) and the error file (failed ones), in input order, and ends the
        batch with them in one transaction."""
        if status == "completed" and obj["status"] != "finalizing":
            obj.update(status="finalizing", finalizing_at=int(time.time()))
            self.store.update_batch(seq, obj)
        files, usage = await asyncio.to_thread(self._write_results, seq, owner, obj["id"])
        counts = self.store.line_counts(seq)
        obj.update(status=status, output_file_id=files["done"] and files["done"].id,
                   error_file_id=files["failed"] and files["failed"].id, usage=usage.as_batch_usage(),
                   request_counts={"total": sum(counts.values()), "completed": counts.get("done", 0),
                                   "failed": counts.get("failed", 0)})
        obj[f"{status}_at"] = int(time.time())
        self.store.finish_batch(seq, obj, [f for f in files.values() if f is not None])
        logger.info("batch %s %s: %s", obj["id"], status, obj["request_counts"])

    def _write_results(self, seq: int, owner: str, batch_id: str) -> tuple[dict[str, FileRow | None], _Usage]:
        """The output and error files (a worker thread's job), and the tokens of the answered lines."""
        files: dict[str, FileRow | None] = {}
        usage = _Usage()
        for state, name in (("done", "output"), ("failed", "error")):
            file_id = new_file_id()
            path = self.store.file_path(file_id)
            results = self.store.results(seq, state)
            if state == "done":
                results = map(usage.add, results)
            size = write_file_atomically(path, (r.encode() + b"\n" for r in results))
            if size == 0:
                path.unlink()
                files[state] = None
            else:
                files[state] = FileRow(file_id, owner, "batch_output", f"{batch_id}_{name}.jsonl", size,
                                       int(time.time()))
        return files, usage

    # -------------------------------------------------------------------------------------------------- metrics
    def status_counts(self) -> dict[str, int]:
        return self.store.count_by_status()

    def lines_per_second(self) -> dict[str, float]:
        """Lines answered per second by this process, per batch in progress, since its first line was fed."""
        now = time.monotonic()
        return {a.id: a.answered / max(now - a.fed_at, 1e-3) for a in self._active.values() if a.fed_at is not None}


@dataclass
class _Usage:
    """The tokens of a batch's answers, as OpenAI's batch `usage` reports them."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0

    def add(self, result: str) -> str:
        usage = json.loads(result)["response"]["body"].get("usage") or {}
        self.prompt += usage.get("prompt_tokens", 0)
        self.cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        self.completion += usage.get("completion_tokens", 0)
        return result

    def as_batch_usage(self) -> dict:
        return {"input_tokens": self.prompt, "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt + self.completion}


async def _to_its_end(work) -> None:
    """Awaits `work` to its end even if the caller is cancelled meanwhile, then lets the cancellation through. (A
    cancelled `to_thread` whose thread had not started yet would never run: a stop just after the engine answered a
    line lost the answer, and the line ran again after the restart.)"""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _sees(viewer: str | None, owner: str) -> bool:
    """None: a server without API keys, where everyone sees everything."""
    return viewer is None or viewer == owner


def _with_counts(active: _Active) -> dict:
    counts = active.counts
    return {**active.obj, "request_counts": {"total": sum(counts.values()), "completed": counts["done"],
                                             "failed": counts["failed"]}}


def _file_object(row: FileRow) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose)

