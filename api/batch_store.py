"""Batches in SQL: the batch row (status, counts, timestamps) and one row per finished line.

A finished line is written once per ``(batch_id, custom_id)``: a redelivered
result changes nothing, so counts and output files hold every line exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api.db import Batch, BatchResult, Database


@dataclass(frozen=True)
class LineResult:
    """What a finished line adds to its batch."""

    batch_id: str
    custom_id: str
    line_no: int
    ok: bool
    line: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BatchStore:
    """SQL access for batches."""

    def __init__(self, db: Database):
        self.db = db

    def add(self, batch: Batch) -> Batch:
        with self.db.sessions.begin() as session:
            session.add(batch)
        return batch

    def get(self, batch_id: str, key_id: str | None = None) -> Batch | None:
        """The batch (only if it belongs to ``key_id``, when given)."""
        with self.db.sessions() as session:
            batch = session.get(Batch, batch_id)
        if batch is None or (key_id is not None and batch.key_id != key_id):
            return None
        return batch

    def page(self, key_id: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
        """The key's batches, newest first, after the batch ``after``; and whether more follow."""
        query = select(Batch).where(Batch.key_id == key_id)
        if after and (anchor := self.get(after, key_id)) is not None:
            query = query.where((Batch.created_at < anchor.created_at)
                                | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id)))
        with self.db.sessions() as session:
            ordered = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
            rows = list(session.scalars(ordered))
        return rows[:limit], len(rows) > limit

    def update(self, batch_id: str, *, only_if_status: tuple[str, ...] | None = None,
               **values: object) -> bool:
        """Set fields; with ``only_if_status``, only while the batch is in one of those statuses."""
        statement = update(Batch).where(Batch.id == batch_id)
        if only_if_status:
            statement = statement.where(Batch.status.in_(only_if_status))
        with self.db.sessions.begin() as session:
            return bool(session.execute(statement.values(**values)).rowcount)  # type: ignore[attr-defined]

    def record(self, result: LineResult) -> bool:
        """Store a finished line and count it, once; False if it was already there."""
        insert = pg_insert if self.db.engine.dialect.name == "postgresql" else sqlite_insert
        row = insert(BatchResult).values(batch_id=result.batch_id, custom_id=result.custom_id,
                                         line_no=result.line_no, ok=result.ok, line=result.line)
        with self.db.sessions.begin() as session:
            inserted = session.execute(row.on_conflict_do_nothing()).rowcount  # type: ignore[attr-defined]
            if inserted:
                counts = {"completed": Batch.completed + 1} if result.ok else {"failed": Batch.failed + 1}
                session.execute(update(Batch).where(Batch.id == result.batch_id).values(
                    prompt_tokens=Batch.prompt_tokens + result.prompt_tokens,
                    completion_tokens=Batch.completion_tokens + result.completion_tokens, **counts))
        return bool(inserted)

    def recorded(self, batch_id: str) -> set[str]:
        """The custom_ids of the batch's finished lines."""
        with self.db.sessions() as session:
            return set(session.scalars(select(BatchResult.custom_id).where(BatchResult.batch_id == batch_id)))

    def undispatched(self) -> list[Batch]:
        """Batches whose lines are not all dispatched yet (running, or orphaned by a dead API)."""
        with self.db.sessions() as session:
            return list(session.scalars(select(Batch).where(
                Batch.status.in_(("validating", "in_progress")), Batch.dispatch_done.is_(False))))

    def lines(self, batch_id: str, ok: bool) -> list[str]:
        """The batch's output (``ok``) or error lines, in input order."""
        with self.db.sessions() as session:
            return list(session.scalars(
                select(BatchResult.line).where(BatchResult.batch_id == batch_id, BatchResult.ok == ok)
                .order_by(BatchResult.line_no)))


def now() -> int:
    return int(time.time())
