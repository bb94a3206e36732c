"""The durable usage ledger: settled usage drained from Redis into SQL, and read back.

Workers (and the API, for jobs cancelled while queued) settle usage inside the
job's terminal transition, which appends one entry to ``inferq:usage``. The
coordinators (``inferq coordinator``) drain that stream through one consumer group
(:mod:`queueing.stream_group`) into the ``usage_ledger`` table, one row per job id (so
a redelivered entry is written once), and only then acknowledge it; /v1/usage drains
too before it answers.

An entry that can never be written (malformed, over a column's limit, holding NUL, or
refused by the database for its own data) is set aside in the dead
letter stream ``inferq:usage:dead`` with why, logged, counted in
``inferq_ledger_dead_letters_total`` and acknowledged, so it never holds back the entries
drained with it. Errors that are not the entry's (the database or Redis unreachable, a full
disk) leave every entry pending, to be delivered again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass

import redis
from sqlalchemy import String, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api.db import Database, UsageRecord, describe, is_entry_fault
from api.http import metrics
from queueing import keys
from queueing.stream_group import DeadLetter, Entry, StreamGroup, drain_forever, each_apart

log = logging.getLogger(__name__)

MAX_TOKENS = 2**31 - 1  # the INTEGER token columns


@dataclass(frozen=True)
class UsageRow:
    """Totals for one key, model and day."""

    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count_tokens(entries: list[Entry]) -> None:
    for _, fields in entries:
        metrics.TOKENS.labels(fields["model"], "prompt").inc(int(fields["prompt_tokens"]))
        metrics.TOKENS.labels(fields["model"], "completion").inc(int(fields["completion_tokens"]))


def _column_chars(name: str) -> int:
    column_type = UsageRecord.__table__.c[name].type
    assert isinstance(column_type, String) and column_type.length is not None
    return column_type.length


#: The text fields of an entry and the characters their ``usage_ledger`` columns hold.
TEXT_LIMITS = {name: _column_chars(name) for name in ("job_id", "key_id", "model", "status")}


def entry_problem(fields: dict[str, str]) -> str | None:
    """Why a usage entry can never be written to ``usage_ledger``, or ``None``."""
    for name, limit in TEXT_LIMITS.items():
        value = fields.get(name)
        if not value:
            return f"'{name}' is missing or empty"
        if len(value) > limit:
            return f"'{name}' has {len(value)} characters, over the column's {limit}"
        if "\x00" in value:
            return f"'{name}' holds NUL, which PostgreSQL refuses in text"
    for name in ("prompt_tokens", "completion_tokens"):
        value = fields.get(name, "")
        if not (value.isascii() and value.isdigit()) or int(value) > MAX_TOKENS:
            return f"'{name}' is not a token count: {value[:40]!r}"
    try:
        dt.date.fromisoformat(fields.get("day", ""))
    except ValueError:
        return f"'day' is not a date: {fields.get('day', '')[:40]!r}"
    return None


class Ledger:
    """Drains the usage stream into SQL and answers usage questions from SQL."""

    def __init__(self, client: redis.Redis, db: Database):
        self.redis = client
        self.db = db
        self.group = StreamGroup(client, keys.USAGE_STREAM, keys.USAGE_LEDGER_GROUP, keys.USAGE_DEAD_LETTERS)
        self._lock = threading.Lock()

    def drain(self, count: int = 500) -> int:
        """Write pending usage entries to SQL; returns how many were written.

        Entries that can never be written go to the dead letter; the others are written
        and acknowledged all the same. Serialized per process, so a caller returns only
        after entries that another thread was writing are in SQL too (read-your-writes
        for /v1/usage).
        """
        with self._lock:
            entries = self.group.read(count)
            if not entries:
                return 0
            written, dead = self._write(entries)
            _count_tokens(written)
            self.group.acknowledge(entries, dead)
            for letter in dead:
                metrics.LEDGER_DEAD_LETTERS.labels(letter.stage).inc()
            return len(written)

    def catch_up(self, timeout: float = 1.0) -> None:
        """Drain, then wait (up to ``timeout``) while other processes still write entries
        they have read: /v1/usage then includes every usage settled before it was called."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if not self.group.others_busy() or time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def _write(self, entries: list[Entry]) -> tuple[list[Entry], list[DeadLetter]]:
        """Write the entries that can be written; those written, and those set aside."""
        dead = [DeadLetter(entry, "invalid", problem) for entry in entries
                if (problem := entry_problem(entry[1])) is not None]
        refused = {id(letter.entry) for letter in dead}
        good = [entry for entry in entries if id(entry) not in refused]
        if not good:
            return [], dead
        dead += each_apart(self._insert, good, "sql", is_entry_fault, describe)
        failed = {id(letter.entry) for letter in dead}
        return [entry for entry in good if id(entry) not in failed], dead

    def _insert(self, entries: list[Entry]) -> None:
        rows = [
            {
                "job_id": fields["job_id"],
                "key_id": fields["key_id"],
                "model": fields["model"],
                "day": dt.date.fromisoformat(fields["day"]),
                "prompt_tokens": int(fields["prompt_tokens"]),
                "completion_tokens": int(fields["completion_tokens"]),
                "status": fields["status"],
            }
            for _, fields in entries
        ]
        insert = pg_insert if self.db.engine.dialect.name == "postgresql" else sqlite_insert
        statement = insert(UsageRecord).values(rows).on_conflict_do_nothing(index_elements=["job_id"])
        with self.db.sessions.begin() as session:
            session.execute(statement)

    def used_on(self, key_id: str, day: str) -> int:
        """Tokens the ledger holds for ``key_id`` on ``day`` (to rebuild a lost counter)."""
        with self.db.sessions() as session:
            total = session.scalar(
                select(func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0))
                .where(UsageRecord.key_id == key_id, UsageRecord.day == dt.date.fromisoformat(day)))
        return int(total or 0)

    def history(self, key_id: str, start: dt.date, end: dt.date) -> list[UsageRow]:
        """Per day and model totals for ``key_id`` between ``start`` and ``end`` (inclusive)."""
        with self.db.sessions() as session:
            result = session.execute(
                select(UsageRecord.day, UsageRecord.model, func.count(),
                       func.sum(UsageRecord.prompt_tokens), func.sum(UsageRecord.completion_tokens))
                .where(UsageRecord.key_id == key_id, UsageRecord.day >= start, UsageRecord.day <= end)
                .group_by(UsageRecord.day, UsageRecord.model)
                .order_by(UsageRecord.day, UsageRecord.model))
            return [UsageRow(day.isoformat(), model, int(n), int(p), int(c))
                    for day, model, n, p, c in result]

    def run_forever(self, stop: threading.Event) -> None:
        """Drain until ``stop`` is set (the coordinator's usage-ledger thread)."""
        drain_forever(self.drain, stop, "usage ledger drain")
