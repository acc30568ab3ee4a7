"""Durable state of the Batch API: files, batches and every line's state and result, in SQLite.

    files    one row per uploaded or generated file; the bytes live in `<db>-files/<id>` beside the database
    batches  one row per batch: its OpenAI object as JSON, and its status and owner as columns to query by
    lines    one row per input line: its request, its state (pending, done, failed, cancelled) and, once answered,
             its output line

A line's answer is written in the same statement that moves it out of `pending`, and only if it was still pending, so
an answer is recorded once; after a crash the pending lines run again and nothing answered runs twice. Output files
are made from the lines table, in input order, so each line appears once however often the server restarted.

The database is in WAL mode with synchronous=NORMAL: a commit survives the process being killed (the OS has the
write-ahead log), though not a power cut before the next checkpoint; that is the trade a serving engine wants.
One connection, serialised by a lock, is used from worker threads (never from the event loop for long).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from omniserve.config import ConfigError

_VERSION = 1  # of the schema below (PRAGMA user_version)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL,
    object TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lines (
    batch_seq INTEGER NOT NULL, idx INTEGER NOT NULL, custom_id TEXT, request TEXT, state TEXT NOT NULL,
    result TEXT, PRIMARY KEY (batch_seq, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_by_state ON lines (batch_seq, state, idx);
"""
_PAGE = 512  # rows read at a time when streaming a batch's lines


@dataclass(frozen=True)
class FileRow:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int


@dataclass(frozen=True)
class BatchRow:
    seq: int
    id: str
    owner: str
    status: str
    object: dict


@dataclass(frozen=True)
class Line:
    idx: int
    custom_id: str | None
    request: str | None


class BatchStore:
    """One server's batches. The database is locked to the process that opened it (until it closes it or exits):
    two servers on one database would both run its batches."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files_dir = self.path.with_name(self.path.name + "-files")
        try:
            self.files_dir.mkdir(parents=True, exist_ok=True)
            self._owner_lock = _lock_exclusively(self.path.with_name(self.path.name + ".lock"))
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _VERSION):
                raise ConfigError(f"batch database {self.path} has version {version}; this omniserve reads "
                                  f"version {_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the batch database {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self._remove_orphan_files()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner_lock.close()

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def _remove_orphan_files(self) -> None:
        """Bytes on disk without a row: written by a process that died before it recorded them."""
        known = {row[0] for row in self._query("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)

    def _query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def _write(self, statements: Iterable[tuple[str, Iterable]]) -> None:
        """Runs the statements in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._db.execute(sql, tuple(params))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------------ files
    def add_file(self, row: FileRow) -> None:
        self._write([("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                      (row.id, row.owner, row.purpose, row.filename, row.bytes, row.created_at))])

    def get_file(self, file_id: str) -> FileRow | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRow(*rows[0]) if rows else None

    def list_files(self, owner: str | None, purpose: str | None, limit: int, after: str | None,
                   newest_first: bool) -> list[FileRow]:
        """Files in the order they were made, from after the file `after`, of one owner (None: every owner)."""
        where, params = ["1"], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            where.append(f"rowid {'<' if newest_first else '>'} (SELECT rowid FROM files WHERE id = ?)")
            params.append(after)
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY rowid {order} LIMIT ?"
        return [FileRow(*row) for row in self._query(sql, [*params, limit])]

    def delete_file(self, file_id: str) -> None:
        self._write([("DELETE FROM files WHERE id = ?", (file_id,))])
        self.file_path(file_id).unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------------- batches
    def add_batch(self, batch_id: str, owner: str, obj: dict) -> int:
        self._write([("INSERT INTO batches (id, owner, status, object) VALUES (?, ?, ?, ?)",
                      (batch_id, owner, obj["status"], json.dumps(obj)))])
        return self.get_batch(batch_id).seq

    def get_batch(self, batch_id: str) -> BatchRow | None:
        rows = self._query("SELECT seq, id, owner, status, object FROM batches WHERE id = ?", (batch_id,))
        return _batch(rows[0]) if rows else None

    def list_batches(self, owner: str | None, limit: int, after: str | None) -> list[BatchRow]:
        """Newest first, as OpenAI lists them, from after the batch `after`."""
        where, params = ["1"], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if after is not None and (cursor := self.get_batch(after)) is not None:
            where.append("seq < ?")
            params.append(cursor.seq)
        sql = (f"SELECT seq, id, owner, status, object FROM batches WHERE {' AND '.join(where)} "
               "ORDER BY seq DESC LIMIT ?")
        return [_batch(row) for row in self._query(sql, [*params, limit])]

    def batches_with_status(self, statuses: Iterable[str]) -> list[BatchRow]:
        statuses = list(statuses)
        marks = ", ".join("?" * len(statuses))
        sql = f"SELECT seq, id, owner, status, object FROM batches WHERE status IN ({marks}) ORDER BY seq"
        return [_batch(row) for row in self._query(sql, statuses)]

    def count_by_status(self) -> dict[str, int]:
        return dict(self._query("SELECT status, count(*) FROM batches GROUP BY status"))

    def update_batch(self, seq: int, obj: dict, *more: tuple[str, Iterable]) -> None:
        """Writes the batch's object (and status), with more statements, in one transaction."""
        self._write([("UPDATE batches SET status = ?, object = ? WHERE seq = ?", (obj["status"], json.dumps(obj), seq)),
                     *more])

    def finish_batch(self, seq: int, obj: dict, files: list[FileRow]) -> None:
        """The batch's final object and its output files, in one transaction."""
        self.update_batch(seq, obj, *[("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                                       (f.id, f.owner, f.purpose, f.filename, f.bytes, f.created_at)) for f in files])

    # ------------------------------------------------------------------------------------------------------ lines
    def add_lines(self, seq: int, rows: list[tuple[int, str | None, str | None, str, str | None]]) -> None:
        """(idx, custom_id, request, state, result) rows of a batch being validated."""
        self._write([("INSERT OR REPLACE INTO lines VALUES (?, ?, ?, ?, ?, ?)", (seq, *row)) for row in rows])

    def delete_lines(self, seq: int) -> None:
        self._write([("DELETE FROM lines WHERE batch_seq = ?", (seq,))])

    def pending_lines(self, seq: int, from_idx: int, limit: int) -> list[Line]:
        rows = self._query("SELECT idx, custom_id, request FROM lines WHERE batch_seq = ? AND state = 'pending' "
                           "AND idx >= ? ORDER BY idx LIMIT ?", (seq, from_idx, limit))
        return [Line(*row) for row in rows]

    def answer_lines(self, answers: list[tuple[int, int, str, str | None]]) -> None:
        """(batch seq, idx, state, result) for lines still pending; a line answered already keeps its answer."""
        self._write([("UPDATE lines SET state = ?, result = ? WHERE batch_seq = ? AND idx = ? AND state = 'pending'",
                      (state, result, seq, idx)) for seq, idx, state, result in answers])

    def end_pending_lines(self, seq: int, state: str, result_of: Callable[[Line], str] | None = None) -> int:
        """Every pending line of the batch to `state` (cancelled; or failed, with result_of(line) as its answer);
        returns how many."""
        ended = 0
        while rows := self.pending_lines(seq, 0, _PAGE):
            self.answer_lines([(seq, line.idx, state, None if result_of is None else result_of(line)) for line in rows])
            ended += len(rows)
        return ended

    def line_counts(self, seq: int) -> dict[str, int]:
        return dict(self._query("SELECT state, count(*) FROM lines WHERE batch_seq = ? GROUP BY state", (seq,)))

    def results(self, seq: int, *states: str) -> Iterator[str]:
        """The results of the batch's lines in these states, in input order, a page at a time."""
        after = -1
        marks = ", ".join("?" * len(states))
        while True:
            rows = self._query(f"SELECT idx, result FROM lines WHERE batch_seq = ? AND state IN ({marks}) AND idx > ? "
                               "ORDER BY idx LIMIT ?", (seq, *states, after, _PAGE))
            if not rows:
                return
            for _, result in rows:
                yield result
            after = rows[-1][0]


def _lock_exclusively(path: Path):
    """An open file holding an exclusive lock, released when it is closed or the process ends (even by kill -9)."""
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"the batch database {path.with_suffix('')} is in use by another server; give each server "
                          "its own --batch-db") from None
    return handle


def _batch(row: tuple) -> BatchRow:
    seq, batch_id, owner, status, obj = row
    return BatchRow(seq, batch_id, owner, status, json.loads(obj))


def write_file_atomically(path: Path, chunks: Iterable[bytes]) -> int:
    """Writes the chunks to `path` through a temporary name (a crash leaves no half file under the real name);
    returns the bytes written."""
    tmp = path.with_name(path.name + ".tmp")
    size = 0
    with open(tmp, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return size
