"""The durable usage ledger: settled usage drained from Redis into SQL, and read back.

Workers (and the API, for jobs cancelled while queued) settle usage inside the
job's terminal transition, which appends one entry to ``inferq:usage``. Every
API process drains that stream through one consumer group into the
``usage_ledger`` table, one row per job id (so a redelivered entry is written
once), and only then acknowledges it.

An entry that can never be written (malformed, over a column's limit, holding NUL, or
refused by the database or by a drain hook for its own data) is set aside in the dead
letter stream ``inferq:usage:dead`` with why, logged, counted in
``inferq_ledger_dead_letters_total`` and acknowledged, so it never holds back the entries
drained with it. Errors that are not the entry's (the database or Redis unreachable, a full
disk) leave every entry pending, to be delivered again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import String, func, select
from sqlalchemy import exc as sql_errors
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api.db import Database, UsageRecord
from api.http import metrics
from queueing import keys

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 30_000  # entries a dead consumer read but never acknowledged
DEAD_LETTER_MAX = 100_000  # entries the dead letter keeps (approximately; the oldest go first)
MAX_TOKENS = 2**31 - 1  # the INTEGER token columns

Entry = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class DeadLetter:
    """An entry set aside: where it failed (``invalid``, ``sql`` or ``hook``) and why."""

    entry: Entry
    stage: str
    reason: str


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


class Ledger:
    """Drains the usage stream into SQL and answers usage questions from SQL."""

    def __init__(self, client: redis.Redis, db: Database,
                 hooks: Sequence[Callable[[list[Entry]], None]] = ()):
        self.redis = client
        self.db = db
        #: Called with each drained batch of entries after they are in SQL, before they
        #: are acknowledged (so a crash in between replays them: hooks must be idempotent).
        #: A hook that fails on the entries' data is called again with one entry at a time,
        #: and the entries it still fails on go to the dead letter.
        self.hooks = tuple(hooks)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._group_ready = False
        self._lock = threading.Lock()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(keys.USAGE_STREAM, keys.USAGE_LEDGER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def drain(self, count: int = 500) -> int:
        """Write pending usage entries to SQL; returns how many were written.

        Entries that can never be written go to the dead letter; the others are written
        and acknowledged all the same. Serialized per process, so a caller returns only
        after entries that another thread was writing are in SQL too (read-your-writes
        for /v1/usage).
        """
        with self._lock:
            try:
                entries = self._read(count)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # Redis lost the stream and its group: start over
                entries = self._read(count)
            if not entries:
                return 0
            written, dead = self._write(entries)
            _count_tokens(written)
            dead += self._run_hooks(written)
            self._acknowledge(entries, dead)
            return len(written)

    def catch_up(self, timeout: float = 1.0) -> None:
        """Drain, then wait (up to ``timeout``) while other API processes still write entries
        they have read: /v1/usage then includes every usage settled before it was called."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            # Only entries a live consumer is writing now: a dead consumer's wait for XAUTOCLAIM.
            pending: Any = self.redis.xpending_range(keys.USAGE_STREAM, keys.USAGE_LEDGER_GROUP,
                                                     min="-", max="+", count=100)
            busy = [p for p in pending if p["time_since_delivered"] < CLAIM_IDLE_MS]
            if not busy or time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def _read(self, count: int) -> list[tuple[str, dict[str, str]]]:
        self._ensure_group()
        claim: Any = self.redis.xautoclaim(
            keys.USAGE_STREAM, keys.USAGE_LEDGER_GROUP, self.consumer, CLAIM_IDLE_MS, count=count)
        fresh: Any = self.redis.xreadgroup(keys.USAGE_LEDGER_GROUP, self.consumer,
                                           {keys.USAGE_STREAM: ">"}, count=count)
        return list(claim[1] or []) + [e for _, batch in (fresh or []) for e in batch]

    def _write(self, entries: list[Entry]) -> tuple[list[Entry], list[DeadLetter]]:
        """Write the entries that can be written; those written, and those set aside."""
        dead = [DeadLetter(entry, "invalid", problem) for entry in entries
                if (problem := entry_problem(entry[1])) is not None]
        refused = {id(letter.entry) for letter in dead}
        good = [entry for entry in entries if id(entry) not in refused]
        if not good:
            return [], dead
        try:
            self._insert(good)
            return good, dead
        except Exception as exc:
            if not is_entry_fault(exc):
                raise
            log.warning("usage ledger: a drain of %d entries failed (%s); writing them one by one",
                        len(good), describe(exc))
        written = []
        for entry in good:  # which of them does the database refuse?
            try:
                self._insert([entry])
            except Exception as exc:
                if not is_entry_fault(exc):
                    raise
                dead.append(DeadLetter(entry, "sql", describe(exc)))
            else:
                written.append(entry)
        return written, dead

    def _run_hooks(self, entries: list[Entry]) -> list[DeadLetter]:
        """Run every hook on the written entries; those a hook fails on, for their data."""
        dead: list[DeadLetter] = []
        for hook in self.hooks:
            failed = {id(letter.entry) for letter in dead}
            todo = [entry for entry in entries if id(entry) not in failed]
            if not todo:
                break
            try:
                hook(todo)
                continue
            except Exception as exc:
                if not is_entry_fault(exc):
                    raise
                log.warning("usage ledger: a hook failed on %d entries (%s); running it on each",
                            len(todo), describe(exc))
            for entry in todo:
                try:
                    hook([entry])
                except Exception as exc:
                    if not is_entry_fault(exc):
                        raise
                    dead.append(DeadLetter(entry, "hook", describe(exc)))
        return dead

    def _acknowledge(self, entries: list[Entry], dead: list[DeadLetter]) -> None:
        """Set the dead entries aside and acknowledge every entry, in one transaction."""
        pipe = self.redis.pipeline()
        for letter in dead:
            entry_id, fields = letter.entry
            kept: dict[Any, Any] = {**fields, "entry_id": entry_id, "stage": letter.stage,
                                    "reason": letter.reason}
            pipe.xadd(keys.USAGE_DEAD_LETTERS, kept, maxlen=DEAD_LETTER_MAX, approximate=True)
        ids = [entry_id for entry_id, _ in entries]
        pipe.xack(keys.USAGE_STREAM, keys.USAGE_LEDGER_GROUP, *ids)
        pipe.xdel(keys.USAGE_STREAM, *ids)  # in SQL (or set aside) now; the ledger group is the only reader
        pipe.execute()
        for letter in dead:
            entry_id, fields = letter.entry
            log.error("usage ledger: entry %s (job %r) set aside in %s (%s stage): %s", entry_id,
                      fields.get("job_id", "")[:80], keys.USAGE_DEAD_LETTERS, letter.stage, letter.reason)
            metrics.LEDGER_DEAD_LETTERS.labels(letter.stage).inc()

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

    def run_forever(self, stop: threading.Event, interval: float = 1.0, gather: float = 0.25,
                    count: int = 500) -> None:
        """Background drain loop (one per API process).

        It polls rather than blocking in XREADGROUP while holding the lock,
        which would starve ``drain`` callers under gevent. After a drain that was not
        full it waits ``gather`` seconds, so that under load one SQL transaction takes
        many entries rather than one each (/v1/usage drains for itself meanwhile).
        """
        while not stop.is_set():
            try:
                written = self.drain(count)
                if written == 0:
                    stop.wait(interval)
                elif written < count:
                    stop.wait(gather)
            except Exception:  # noqa: BLE001 - keep draining after Redis/SQL hiccups
                log.exception("usage ledger drain failed; retrying")
                stop.wait(2.0)

    def start_background(self) -> threading.Event:
        """Start :meth:`run_forever` on a daemon thread; set the returned event to stop it."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="usage-ledger", daemon=True).start()
        return stop
