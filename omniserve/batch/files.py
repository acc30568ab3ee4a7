"""Uploaded files: streamed to disk in chunks (never whole in memory), checked to be JSONL on the way, and recorded
once their bytes are safely down."""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from omniserve.batch.store import BatchStore, FileRow, write_file_atomically
from omniserve.errors import APIError

_CHUNK = 1 << 20


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def save_upload(store: BatchStore, owner: str, filename: str, purpose: str, source: BinaryIO,
                max_bytes: int) -> FileRow:
    """Copies an upload into the store (a worker thread's job). A batch file must be UTF-8 whose first line is a JSON
    object: anything else (a CSV, a JSON array, a binary) is refused here, before a batch is made of it. Single
    lines that are not requests are found when a batch is made, and go to its error file."""
    file_id = new_file_id()
    checker = _JsonlCheck()

    def chunks() -> Iterator[bytes]:
        size = 0
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"the file is larger than this server's limit of {max_bytes} bytes",
                               param="file", code="file_too_large")
            checker.feed(chunk)
            yield chunk
        checker.finish()

    try:
        size = write_file_atomically(store.file_path(file_id), chunks())
    except BaseException:
        store.file_path(file_id).with_name(file_id + ".tmp").unlink(missing_ok=True)
        raise
    row = FileRow(file_id, owner, purpose, filename, size, int(time.time()))
    store.add_file(row)
    return row


class _JsonlCheck:
    """UTF-8 throughout, and a first non-blank line that is a JSON object."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._head = b""  # the first non-blank line, until it is complete
        self._checked = False

    def feed(self, chunk: bytes) -> None:
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError:
            raise _not_jsonl("it is not UTF-8 text") from None
        if not self._checked:
            self._head = (self._head + chunk).lstrip()
            if b"\n" in self._head:
                self._check_head()
            elif len(self._head) > 64 * _CHUNK:
                raise _not_jsonl("its first line is longer than 64 MiB")

    def finish(self) -> None:
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _not_jsonl("it is not UTF-8 text") from None
        if not self._checked:
            if not self._head:
                raise _not_jsonl("it is empty")
            self._check_head()

    def _check_head(self) -> None:
        self._checked = True
        first = self._head.split(b"\n", 1)[0]
        self._head = b""
        try:
            line = json.loads(first)
        except ValueError:
            raise _not_jsonl("its first line is not JSON") from None
        if not isinstance(line, dict):
            raise _not_jsonl("its first line is not a JSON object")


def _not_jsonl(why: str) -> APIError:
    return APIError(400, f"a batch file must be JSONL, one request object per line, but {why}", param="file",
                    code="invalid_file_format")
