"""SQL storage through SQLAlchemy 2: the engine, sessions and the tables.

SQLite file by default, PostgreSQL in production (``DATABASE_URL``).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Date, DateTime, Index, Integer, String, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from api import migrate
from config import Settings


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


class Database:
    """Engine and session factory for one process."""

    def __init__(self, settings: Settings):
        if settings.sqlite_path is not None:
            settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(settings.database_url, pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Migrate the schema to the newest revision (idempotent: one read when already there)."""
        migrate.upgrade_engine(self.engine)
