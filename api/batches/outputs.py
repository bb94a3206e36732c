"""A batch's output and error files, appended to as its lines finish.

While a batch runs, each line is appended as it settles to a hidden file in
``FILES_DIR`` (``.batch-<id>-output.jsonl`` or ``-error``), so a crash loses no
finished line. The ``batch_results`` rows stay the record of truth: a line is
appended only by the process whose insert stored it, after the insert, so a file
never holds a line twice and misses one only if that process died in between.

Appenders (API threads and processes) hold a shared ``flock`` and write each call's
lines with one ``write()`` to an ``O_APPEND`` descriptor, which lands whole at the
end of the file. Sealing holds the lock exclusively: it counts the file's lines
against SQL, rebuilds the file from SQL (streamed) when they disagree, and renames
it into place as a stored file. An append that was waiting for the lock then finds
its file gone and drops its line: SQL holds it, and the seal counted it.

The lock is asked for without blocking, again every few milliseconds: under gevent a
blocking ``flock`` would stop the whole worker, and a seal holding the lock yields to
other greenlets (at each SQL query), so a greenlet of the same process waiting on
that lock in ``flock`` would never let it go on.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

from api.batches.store import BatchStore, LineResult
from api.db import Batch, StoredFile
from api.files.store import FileStore

log = logging.getLogger(__name__)

READ_BYTES = 1024 * 1024
LOCK_TIMEOUT = 300.0  # seconds to wait for a file's lock (a seal may rebuild a large file from SQL)
LOCK_POLL = 0.01  # seconds between two tries (time.sleep: under gevent, other greenlets run)


class LockTimeout(TimeoutError):
    """A batch file stayed locked longer than ``LOCK_TIMEOUT``."""


def stored_file_id(batch_id: str, ok: bool) -> str:
    """The id the batch's output (``ok``) or error file gets: fixed, so sealing twice registers it once."""
    return f"file-{batch_id.removeprefix('batch_')}-{_kind(ok)}"


def _kind(ok: bool) -> str:
    return "output" if ok else "error"


class BatchOutputs:
    """The output and error files of running batches, on disk under ``FILES_DIR``."""

    def __init__(self, files: FileStore, store: BatchStore):
        self.files = files
        self.store = store

    def partial_path(self, batch_id: str, ok: bool) -> Path:
        """Where the running batch's output (``ok``) or error lines accumulate."""
        return self.files.root / f".batch-{batch_id}-{_kind(ok)}.jsonl"

    def prepare(self, batch_id: str) -> None:
        """Create the batch's two files if missing (a resumed batch keeps what they hold)."""
        self.files.root.mkdir(parents=True, exist_ok=True)
        for ok in (True, False):
            os.close(os.open(self.partial_path(batch_id, ok), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))

    def settle(self, results: list[LineResult]) -> None:
        """Record finished lines in SQL, then append those stored now (not before) to their files."""
        by_file: dict[tuple[str, bool], list[str]] = defaultdict(list)
        for result in self.store.record(results):
            by_file[(result.batch_id, result.ok)].append(result.line)
        for (batch_id, ok), lines in by_file.items():
            self.append(batch_id, ok, lines)

    def discard(self, batch_id: str) -> None:
        """Remove a failed batch's files (later appends find none and drop their lines)."""
        for ok in (True, False):
            self.partial_path(batch_id, ok).unlink(missing_ok=True)

    def append(self, batch_id: str, ok: bool, lines: list[str]) -> bool:
        """Append ``lines`` to the batch's output or error file; False if it is sealed (or missing)."""
        path = self.partial_path(batch_id, ok)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return False
        try:
            _lock(fd, fcntl.LOCK_SH, path)
            if not _still_at(fd, path):
                return False
            _write_all(fd, "".join(line + "\n" for line in lines).encode())
            return True
        finally:
            os.close(fd)  # releases the lock

    def seal(self, batch: Batch, ok: bool) -> str | None:
        """Register the batch's output (``ok``) or error file; its id, or ``None`` when it has no lines.

        Idempotent: a file sealed before (by a finalizer that died before it ended the
        batch) keeps its id.
        """
        file_id = stored_file_id(batch.id, ok)
        with self.store.db.sessions() as session:
            if session.get(StoredFile, file_id) is not None:
                return file_id
        path = self.partial_path(batch.id, ok)
        self.files.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _lock(fd, fcntl.LOCK_EX, path)
            expected = self.store.count_lines(batch.id, ok)
            if expected == 0:
                path.unlink(missing_ok=True)
                return None
            size, count = _measure(fd)
            name = f"{batch.id}_{_kind(ok)}.jsonl"
            if count == expected:
                os.fsync(fd)
                self.files.keep_output(path, batch.key_id, name, size, count, file_id)
                return file_id
            log.warning("batch %s: its %s file holds %d lines, SQL %d; rebuilding it from SQL",
                        batch.id, _kind(ok), count, expected)
            self.files.create_output(batch.key_id, name, self.store.stream_lines(batch.id, ok), file_id)
            path.unlink(missing_ok=True)  # appenders waiting for the lock find it gone
            return file_id
        finally:
            os.close(fd)


def _lock(fd: int, operation: int, path: Path) -> None:
    """``flock`` the file (``LOCK_SH`` or ``LOCK_EX``) without blocking the process: retry
    every ``LOCK_POLL`` seconds; :class:`LockTimeout` after ``LOCK_TIMEOUT``."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{path.name} stayed locked for over {LOCK_TIMEOUT:.0f} s "
                                  "(a seal of its batch is stuck?)") from None
            time.sleep(LOCK_POLL)


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (sealing renames it away)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` at the end of the file (one ``write()`` unless the disk is full or a signal cuts it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _measure(fd: int) -> tuple[int, int]:
    """The file's size and its number of whole lines (a torn last write ends in no newline)."""
    size = count = 0
    while chunk := os.pread(fd, READ_BYTES, size):
        size += len(chunk)
        count += chunk.count(b"\n")
    return size, count
