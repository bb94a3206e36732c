"""The durable usage ledger: settled usage drained from Redis into SQL, and read back.

Workers (and the API, for jobs cancelled while queued) settle usage inside the
job's terminal transition, which appends one entry to ``inferq:usage``. Every
API process drains that stream through one consumer group into the
``usage_ledger`` table, one row per job id (so a redelivered entry is written
once), and only then acknowledges it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api import metrics
from api.db import Database, UsageRecord
from queueing import keys

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 30_000  # entries a dead consumer read but never acknowledged


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


def _count_tokens(entries: list[tuple[str, dict[str, str]]]) -> None:
    for _, fields in entries:
        metrics.TOKENS.labels(fields["model"], "prompt").inc(int(fields["prompt_tokens"]))
        metrics.TOKENS.labels(fields["model"], "completion").inc(int(fields["completion_tokens"]))


class Ledger:
    """Drains the usage stream into SQL and answers usage questions from SQL."""

    def __init__(self, client: redis.Redis, db: Database):
        self.redis = client
        self.db = db
        #: Called with each drained batch of entries after they are in SQL, before they
        #: are acknowledged (so a crash in between replays them: hooks must be idempotent).
        self.hooks: list[Callable[[list[tuple[str, dict[str, str]]]], None]] = []
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

        Serialized per process, so a caller returns only after entries that
        another thread was writing are in SQL too (read-your-writes for /v1/usage).
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
            self._write(entries)
            _count_tokens(entries)
            for hook in self.hooks:
                hook(entries)
            ids = [entry_id for entry_id, _ in entries]
            pipe = self.redis.pipeline()
            pipe.xack(keys.USAGE_STREAM, keys.USAGE_LEDGER_GROUP, *ids)
            pipe.xdel(keys.USAGE_STREAM, *ids)  # in SQL now; the ledger group is the stream's only reader
            pipe.execute()
            return len(entries)

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

    def _write(self, entries: list[tuple[str, dict[str, str]]]) -> None:
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

    def run_forever(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Background drain loop (one per API process).

        It polls rather than blocking in XREADGROUP while holding the lock,
        which would starve ``drain`` callers under gevent.
        """
        while not stop.is_set():
            try:
                if self.drain() == 0:
                    stop.wait(interval)
            except Exception:  # noqa: BLE001 - keep draining after Redis/SQL hiccups
                log.exception("usage ledger drain failed; retrying")
                stop.wait(2.0)

    def start_background(self) -> threading.Event:
        """Start :meth:`run_forever` on a daemon thread; set the returned event to stop it."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="usage-ledger", daemon=True).start()
        return stop
