"""SQL storage through SQLAlchemy 2: the engine, sessions and the tables.

SQLite file by default, PostgreSQL in production (``DATABASE_URL``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Boolean, Date, DateTime, Index, Integer, String, Text, create_engine, event
from sqlalchemy import exc as sql_errors
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from api import migrate
from config import Settings


def _sqlite_write_ahead_log(connection: Any, _record: Any) -> None:
    """SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a commit appends to the log
    without an fsync (a power cut may lose the last commits; a crashed process loses none), and
    readers never wait for a writer. In the default mode every commit fsyncs several times,
    and the API's gevent loop, every stream on it, waits for the disk meanwhile."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Base(DeclarativeBase):
    pass


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ApiKey(Base):
    """An API key, stored only as its SHA-256 hash and a short display prefix.

    ``public_id`` names the key in the usage ledger, logs and the CLI; limits
    left ``NULL`` are unlimited; ``models`` (comma separated) restricts which
    served models the key may use.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    models: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UsageRecord(Base):
    """One settled job in the durable usage ledger (written once per job id).

    Per key, model and day totals are sums over these rows.
    """

    __tablename__ = "usage_ledger"
    __table_args__ = (Index("ix_usage_ledger_key_day", "key_id", "day"),)

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    day: Mapped[dt.date] = mapped_column(Date)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    settled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class StoredFile(Base):
    """A file of the Files API: a key's upload, or a file the server wrote for that key.

    The content lives at ``path`` (relative to ``FILES_DIR``); ``purpose`` is
    ``batch`` for uploads and ``batch_output`` for files the server writes.
    """

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    line_count: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)


class Batch(Base):
    """One OpenAI batch; times are epoch seconds, as OpenAI returns them."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), index=True)
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    metadata_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    errors_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    dispatched: Mapped[int] = mapped_column(Integer, default=0)
    dispatch_done: Mapped[bool] = mapped_column(Boolean, default=False)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[int] = mapped_column(Integer)
    in_progress_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class BatchResult(Base):
    """One finished line: its output (or error) line, exactly as the output file holds it."""

    __tablename__ = "batch_results"

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer)
    ok: Mapped[bool] = mapped_column(Boolean)
    line: Mapped[str] = mapped_column(Text)


class Database:
    """Engine and session factory for one process."""

    def __init__(self, settings: Settings):
        if settings.sqlite_path is not None:
            settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(settings.database_url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_write_ahead_log)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Migrate the schema to the newest revision (idempotent: one read when already there)."""
        migrate.upgrade_engine(self.engine)


def is_entry_fault(exc: BaseException) -> bool:
    """Whether ``exc`` lies in the data of the entries being written (writing them again would
    fail again), rather than in the database, Redis or the disk (worth retrying)."""
    if isinstance(exc, sql_errors.DataError | sql_errors.IntegrityError):
        return True
    if isinstance(exc, sql_errors.DBAPIError):  # connection lost, missing table, server error
        return False
    if isinstance(exc, sql_errors.StatementError):  # raised while binding the entry's values
        return True
    return isinstance(exc, ValueError | TypeError | KeyError)


def describe(exc: BaseException) -> str:
    """A short account of an error for the log and the dead letter (no SQL, no parameters)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"
