"""Batches in SQL: the batch row (status, counts, timestamps) and one row per finished line.

A finished line is written once per ``(batch_id, custom_id)``: a redelivered
result changes nothing, so counts and output files hold every line exactly once.
The ``batch_results`` rows are the record of truth the output files are checked
against (and rebuilt from) when a batch ends.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api.batches.status import ENTERED_AT, RUNNING, BatchStatus, allowed_sources
from api.db import Batch, BatchResult, Database

STREAM_ROWS = 500  # rows fetched at a time when streaming a batch's lines


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
        """Insert a new batch row."""
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

    def page(self, key_id: str, limit: int, after: str | None) -> tuple[list[Batch], bool] | None:
        """The key's batches, newest first, after the batch ``after``; and whether more follow.

        ``None`` when ``after`` names no batch of this key.
        """
        query = select(Batch).where(Batch.key_id == key_id)
        if after:
            anchor = self.get(after, key_id)
            if anchor is None:
                return None
            query = query.where((Batch.created_at < anchor.created_at)
                                | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id)))
        with self.db.sessions() as session:
            ordered = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
            rows = list(session.scalars(ordered))
        return rows[:limit], len(rows) > limit

    def update(self, batch_id: str, **values: object) -> bool:
        """Set fields other than the status (see :meth:`transition`); whether the batch exists."""
        if "status" in values:
            raise ValueError("a batch's status changes only through BatchStore.transition")
        with self.db.sessions.begin() as session:
            statement = update(Batch).where(Batch.id == batch_id).values(**values)
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def transition(self, batch_id: str, target: BatchStatus, **values: object) -> bool:
        """Move the batch to ``target`` if :data:`~api.batches.status.TRANSITIONS` allows it from
        its status now, setting when it entered ``target`` and ``values`` in the same statement.

        One ``UPDATE ... WHERE id = :id AND status IN (:sources)``: returns whether it moved
        (``False``, with nothing written, when the batch is missing or its status forbids it).
        """
        sources = [source.value for source in allowed_sources(target)]
        if target in ENTERED_AT:
            values[ENTERED_AT[target]] = now()
        statement = (update(Batch).where(Batch.id == batch_id, Batch.status.in_(sources))
                     .values(status=target.value, **values))
        with self.db.sessions.begin() as session:
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def record(self, results: list[LineResult]) -> list[LineResult]:
        """Store finished lines and count them, each once; returns those not stored before."""
        insert = pg_insert if self.db.engine.dialect.name == "postgresql" else sqlite_insert
        stored = []
        with self.db.sessions.begin() as session:
            for result in results:
                row = insert(BatchResult).values(batch_id=result.batch_id, custom_id=result.custom_id,
                                                 line_no=result.line_no, ok=result.ok, line=result.line)
                # preserve_rowcount: SQLAlchemy keeps the rowcount of UPDATE and DELETE only; an
                # INSERT's reads -1 on psycopg, and every repeated line would count as new.
                statement = row.on_conflict_do_nothing().execution_options(preserve_rowcount=True)
                if session.execute(statement).rowcount == 1:  # type: ignore[attr-defined]
                    stored.append(result)
            added: dict[str, Counter[str]] = defaultdict(Counter)  # batch id -> what its lines add
            for result in stored:
                added[result.batch_id].update({"completed" if result.ok else "failed": 1,
                                               "prompt_tokens": result.prompt_tokens,
                                               "completion_tokens": result.completion_tokens})
            for batch_id, sums in added.items():  # one update per batch, not per line
                session.execute(update(Batch).where(Batch.id == batch_id).values(
                    completed=Batch.completed + sums["completed"], failed=Batch.failed + sums["failed"],
                    prompt_tokens=Batch.prompt_tokens + sums["prompt_tokens"],
                    completion_tokens=Batch.completion_tokens + sums["completion_tokens"]))
        return stored

    def recorded(self, batch_id: str) -> set[str]:
        """The custom_ids of the batch's finished lines."""
        with self.db.sessions() as session:
            return set(session.scalars(select(BatchResult.custom_id).where(BatchResult.batch_id == batch_id)))

    def unfinished(self) -> list[Batch]:
        """Batches that have not ended (being dispatched, collected or finalized, or orphaned)."""
        with self.db.sessions() as session:
            running = [status.value for status in RUNNING]
            return list(session.scalars(select(Batch).where(Batch.status.in_(running))))

    def count_lines(self, batch_id: str, ok: bool) -> int:
        """How many output (``ok``) or error lines the batch has."""
        with self.db.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(BatchResult).where(
                BatchResult.batch_id == batch_id, BatchResult.ok == ok)) or 0)

    def stream_lines(self, batch_id: str, ok: bool) -> Iterator[str]:
        """The batch's output (``ok``) or error lines in input order, a few hundred rows at a time."""
        query = (select(BatchResult.line).where(BatchResult.batch_id == batch_id, BatchResult.ok == ok)
                 .order_by(BatchResult.line_no).execution_options(yield_per=STREAM_ROWS))
        with self.db.sessions() as session:
            yield from session.scalars(query)


def now() -> int:
    """Epoch seconds, as batch timestamps are stored."""
    return int(time.time())
