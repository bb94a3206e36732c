"""Stored files of the Files API: keys' uploads (batch input) and files the server writes.

A file's content lives in ``FILES_DIR`` as ``<id>.jsonl`` and its owner and metadata in
the ``files`` table. Content is written to a temporary file in ``FILES_DIR`` first and
renamed into place, so a file's name only ever holds complete content. An HTTP upload is
streamed into that temporary file as it arrives (:class:`UploadSpool`), so its bytes go to
disk once and never through memory or the system temp dir. Every lookup is by owner:
another key's file looks missing. No Flask here: batches use it outside requests.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import redis
from sqlalchemy import and_, func, or_, select

from api.db import Database, StoredFile
from api.files.checks import check_batch_input
from api.http import errors
from api.protocol import ErrorResponse
from config import Settings
from queueing import key_limits
from queueing.connections import redis_client

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
FILENAME_MAX = 255
YIELD_EVERY = 1000  # lines checked between two pauses for other greenlets
#: A temporary upload file untouched this long is a crash's leftover: an upload is written as it
#: arrives (each write moves its mtime) and checked and renamed right after, well within an hour.
STALE_PART_SECONDS = 3600.0
RESERVATION_SECONDS = 600.0  # an upload's reserved bytes lapse after this if never given back


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


@dataclass(frozen=True)
class StoredFileInfo:
    """One stored file; ``created_at`` in epoch seconds, ``path`` relative to ``FILES_DIR``."""

    id: str
    key_id: str
    filename: str
    purpose: str
    bytes: int
    line_count: int
    created_at: int
    path: str

    @classmethod
    def from_row(cls, row: StoredFile) -> StoredFileInfo:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.UTC)
        return cls(id=row.id, key_id=row.key_id, filename=row.filename, purpose=row.purpose,
                   bytes=row.bytes, line_count=row.line_count, created_at=int(created.timestamp()),
                   path=row.path)


@dataclass(frozen=True)
class FilePage:
    """A page of a key's files, newest first, and whether older ones follow."""

    data: list[StoredFileInfo]
    has_more: bool


class SpooledUpload(io.BufferedRandom):
    """One file part of an upload, written to a temporary file in ``FILES_DIR`` as it arrives."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "r+b"))
        self.path = path
        self._unyielded = 0

    def write(self, buffer: ReadableBuffer, /) -> int:
        """Write ``buffer``, pausing after each ``CHUNK_BYTES`` (see :func:`_cooperative`)."""
        self._unyielded += len(memoryview(buffer))
        if self._unyielded >= CHUNK_BYTES:
            self._unyielded = 0
            time.sleep(0)
        return super().write(buffer)

    def finish(self) -> int:
        """Flush the part to disk; its size in bytes."""
        _sync(self)
        return os.fstat(self.fileno()).st_size


class UploadSpool:
    """A multipart parser's ``stream_factory`` that streams every file part into ``FILES_DIR``.

    Use it as a context manager: leaving it closes the parts and removes those not stored, so an
    upload that is rejected, too large or cut off by its client leaves nothing behind.
    """

    def __init__(self, root: Path):
        self.root = root
        self.parts: list[SpooledUpload] = []

    def __call__(self, total_content_length: int | None, content_type: str | None,
                 filename: str | None, content_length: int | None = None) -> IO[bytes]:
        """A new temporary file in ``FILES_DIR`` for one file part (werkzeug's factory signature)."""
        part = SpooledUpload(_temp_path(self.root))
        self.parts.append(part)
        return part

    def close(self) -> None:
        """Close every part and remove what :meth:`FileStore.save_upload` did not rename into place."""
        for part in self.parts:
            part.close()
            part.path.unlink(missing_ok=True)
        self.parts.clear()

    def __enter__(self) -> UploadSpool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class FileStore:
    """Files on disk under ``FILES_DIR``, their rows in SQL."""

    def __init__(self, db: Database, settings: Settings):
        self.db = db
        # Absolute: Flask's send_file would take a relative path from the app's package.
        self.root = Path(settings.files_dir).resolve()
        self.max_bytes = settings.max_file_bytes
        self.max_lines = settings.max_file_lines
        self.max_stored_bytes = settings.key_max_stored_bytes
        self._settings = settings

    def spool(self) -> UploadSpool:
        """Somewhere to stream an upload's file parts: temporary files in ``FILES_DIR``."""
        return UploadSpool(self.root)

    def save_upload(self, key_id: str, filename: str, purpose: str,
                    stream: IO[bytes]) -> StoredFileInfo | ErrorResponse:
        """Store an upload once its size and every line pass.

        A part of this store's :meth:`spool` is checked where it lies and renamed into place; any
        other ``stream`` is first copied in chunks to a temporary file.
        """
        if purpose not in UPLOAD_PURPOSES:
            return errors.invalid_request(f"Invalid purpose {purpose!r}: this server stores files with "
                                          "purpose 'batch' only.", "purpose")
        try:
            if isinstance(stream, SpooledUpload) and stream.path.parent == self.root:
                return self._check_and_keep(stream.path, stream.finish(), key_id, filename, purpose)
            return self._copy_and_check(key_id, filename, purpose, stream)
        except OSError:
            log.exception("could not store an upload in %s", self.root)
            return errors.error(500, "The server could not store the file.", "server_error")

    def create_output(self, key_id: str, filename: str, lines: Iterable[str],
                      file_id: str | None = None) -> StoredFileInfo:
        """Store server-made JSONL (one line per item, empty items skipped) as ``batch_output``.

        Written to a temporary file in ``FILES_DIR`` first, removed if ``lines`` or the write
        fails. ``file_id``: see :meth:`keep_output`.
        """
        temp = _temp_path(self.root)
        try:
            size = count = 0
            with temp.open("wb") as out:
                for line in lines:
                    if line.strip():
                        data = line.rstrip("\n").encode() + b"\n"
                        out.write(data)
                        size, count = size + len(data), count + 1
                _sync(out)
            return self.keep_output(temp, key_id, filename, size, count, file_id)
        finally:
            temp.unlink(missing_ok=True)

    def keep_output(self, source: Path, key_id: str, filename: str, size: int, count: int,
                    file_id: str | None = None) -> StoredFileInfo:
        """Rename ``source``, complete JSONL already on disk in ``FILES_DIR``, into place as a
        ``batch_output`` file of ``size`` bytes and ``count`` lines, and insert its row.

        A fixed ``file_id`` (a batch's output) names one file however often it is stored: its
        content stays in place if the insert fails, as it may be another writer's (a repeat
        stores the same content again).
        """
        return self._commit(source, key_id, filename, OUTPUT_PURPOSE, size, count, file_id)

    def get(self, key_id: str, file_id: str) -> StoredFileInfo | None:
        """The key's file ``file_id``; ``None`` when missing or another key's."""
        with self.db.sessions() as session:
            row = session.get(StoredFile, file_id)
            return StoredFileInfo.from_row(row) if row is not None and row.key_id == key_id else None

    def list(self, key_id: str, limit: int, after: str | None,
             purpose: str | None = None) -> FilePage | ErrorResponse:
        """The key's files newest first: ``limit`` of them, older than ``after`` (a file id)."""
        query = select(StoredFile).where(StoredFile.key_id == key_id)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        with self.db.sessions() as session:
            if after:
                anchor = session.get(StoredFile, after)
                if anchor is None or anchor.key_id != key_id:
                    return errors.invalid_request(f"No file {after!r} to page after.", "after")
                query = query.where(or_(StoredFile.created_at < anchor.created_at,
                                        and_(StoredFile.created_at == anchor.created_at,
                                             StoredFile.id < anchor.id)))
            query = query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(limit + 1)
            rows = session.scalars(query).all()
        return FilePage([StoredFileInfo.from_row(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def delete(self, key_id: str, file_id: str) -> bool:
        """Remove the key's file (row, then content); ``False`` when missing or another key's."""
        with self.db.sessions.begin() as session:
            row = session.get(StoredFile, file_id)
            if row is None or row.key_id != key_id:
                return False
            path = row.path
            session.delete(row)
        (self.root / path).unlink(missing_ok=True)
        return True

    def stored_bytes(self, key_id: str) -> int:
        """Bytes of the key's stored files (uploads and batch outputs)."""
        with self.db.sessions() as session:
            total = session.scalar(select(func.coalesce(func.sum(StoredFile.bytes), 0))
                                   .where(StoredFile.key_id == key_id))
        return int(total or 0)

    def path_of(self, info: StoredFileInfo) -> Path:
        """Where the file's content is (absolute)."""
        return self.root / info.path

    def iter_lines(self, info: StoredFileInfo) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each non-empty line as (1-based line number, parsed JSON), numbered as validation numbers them."""
        with self.path_of(info).open("rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                if raw.strip():
                    yield line_no, json.loads(raw)

    def _copy_and_check(self, key_id: str, filename: str, purpose: str,
                        stream: IO[bytes]) -> StoredFileInfo | ErrorResponse:
        """Copy ``stream`` to a temporary file, then check it and keep it only if it passes."""
        temp = _temp_path(self.root)
        try:
            size = _copy(stream, temp, self.max_bytes)
            return self._check_and_keep(temp, size, key_id, filename, purpose)
        finally:
            temp.unlink(missing_ok=True)

    def _check_and_keep(self, temp: Path, size: int | None, key_id: str, filename: str,
                        purpose: str) -> StoredFileInfo | ErrorResponse:
        """Rename the upload at ``temp`` into place if its size and every line pass, reading it
        from disk line by line; remove it otherwise. ``size`` is ``None`` past the limit."""
        try:
            if size is None or size > self.max_bytes:
                return errors.error(413, f"The file is larger than {self.max_bytes} bytes, the most an "
                                    "upload may hold.", "invalid_request_error", "file_too_large", "file")
            if (full := self._storage_full(key_id, size, size)) is not None:  # before reading its lines
                return full
            with temp.open("rb") as lines:
                count = check_batch_input(_cooperative(lines), self.max_lines)
            if isinstance(count, ErrorResponse):
                return count
            return self._keep_upload(temp, key_id, filename, purpose, size, count)
        finally:
            temp.unlink(missing_ok=True)

    def _keep_upload(self, temp: Path, key_id: str, filename: str, purpose: str, size: int,
                     count: int) -> StoredFileInfo | ErrorResponse:
        """:meth:`_commit` the upload unless it takes the key past ``KEY_MAX_STORED_BYTES``.

        Its bytes are reserved in Redis before the key's stored bytes are read, and until its
        row is in: two uploads of one key stored at once cannot both pass on the same total.
        """
        if not self.max_stored_bytes:
            return self._commit(temp, key_id, filename, purpose, size, count)
        client = redis_client(self._settings)
        try:
            reservation, pending = key_limits.reserve_bytes(client, key_id, size, RESERVATION_SECONDS)
        except redis.RedisError:
            log.exception("could not reserve an upload's bytes")
            return errors.unavailable("The server could not check your storage limit; try again shortly.")
        try:
            if (full := self._storage_full(key_id, size, pending)) is not None:
                return full
            return self._commit(temp, key_id, filename, purpose, size, count)
        finally:
            try:
                key_limits.release_bytes(client, key_id, reservation)
            except redis.RedisError:  # it lapses after RESERVATION_SECONDS
                log.warning("could not release an upload's reserved bytes")

    def _storage_full(self, key_id: str, size: int, adding: int) -> ErrorResponse | None:
        """The 413 for an upload of ``size`` bytes when the key's stored bytes plus ``adding``
        (the upload, or every upload of the key being stored) pass ``KEY_MAX_STORED_BYTES``."""
        if not self.max_stored_bytes:
            return None
        stored = self.stored_bytes(key_id)
        if stored + adding <= self.max_stored_bytes:
            return None
        return errors.error(
            413, f"Storing this file ({size} bytes) would take this API key past its storage limit of "
            f"{self.max_stored_bytes} bytes ({stored} bytes are stored, {adding - size} more are being "
            "uploaded). Delete files you no longer need (DELETE /v1/files/{file_id}) and try again.",
            "invalid_request_error", "storage_limit_exceeded", "file")

    def _commit(self, temp: Path, key_id: str, filename: str, purpose: str, size: int,
                count: int, file_id: str | None = None) -> StoredFileInfo:
        """Rename ``temp`` into place and insert its row (the content goes again if the insert
        fails, unless its ``file_id`` was given: see :meth:`keep_output`)."""
        row = StoredFile(id=file_id or new_file_id(), key_id=key_id, filename=_clean_name(filename),
                         purpose=purpose, bytes=size, line_count=count,
                         created_at=dt.datetime.now(dt.UTC))
        row.path = f"{row.id}.jsonl"
        final = self.root / row.path
        os.replace(temp, final)
        _sync_dir(self.root)  # the rename itself survives a crash
        try:
            with self.db.sessions.begin() as session:
                session.add(row)
        except BaseException:
            if file_id is None:
                final.unlink(missing_ok=True)
            raise
        return StoredFileInfo.from_row(row)


def _clean_name(filename: str) -> str:
    """A client's file name fit to store and to send back in a header: printable, and not too long."""
    return "".join(c for c in filename if c.isprintable())[:FILENAME_MAX] or "file"


def _temp_path(root: Path) -> Path:
    """A new empty file in ``root`` (``FILES_DIR``: same filesystem, so the final rename is atomic)."""
    root.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=root, prefix=".part-", suffix=".jsonl")
    os.close(handle)
    return Path(name)


def _copy(stream: IO[bytes], target: Path, max_bytes: int) -> int | None:
    """Copy ``stream`` to ``target`` in chunks; its size, or ``None`` once it passes ``max_bytes``."""
    size = 0
    with target.open("wb") as out:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                return None
            out.write(chunk)
            time.sleep(0)  # see _cooperative
        _sync(out)
    return size


def _cooperative(lines: Iterable[bytes]) -> Iterator[bytes]:
    """``lines``, pausing now and then: under gevent (monkey-patched ``time.sleep``) a long
    upload would otherwise hold up every other request of its API worker."""
    for count, line in enumerate(lines, start=1):
        if count % YIELD_EVERY == 0:
            time.sleep(0)
        yield line


def _sync(out: IO[bytes]) -> None:
    """Flush ``out`` to disk, so that a renamed file survives a crash whole."""
    out.flush()
    os.fsync(out.fileno())


def _sync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries to disk: a file renamed into it stays there after a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_parts(root: Path, older_than: float = STALE_PART_SECONDS) -> int:
    """Remove temporary files (``.part-*``) a crashed API process left in ``root``; how many.

    Only those untouched for ``older_than`` seconds: another API process (on this host or,
    with shared storage, another) may be writing or checking one right now.
    """
    removed = 0
    cutoff = time.time() - older_than
    for part in root.glob(".part-*"):
        try:
            if part.stat().st_mtime < cutoff:
                part.unlink()
                removed += 1
        except FileNotFoundError:  # another process removed it meanwhile
            continue
    if removed:
        log.warning("removed %d temporary upload file(s) left in %s by a crash", removed, root)
    return removed

