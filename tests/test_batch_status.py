"""The batch state machine: :data:`api.batches.status.TRANSITIONS`, applied by
:meth:`api.batches.store.BatchStore.transition` in one ``UPDATE``, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from api.batches.status import ENTERED_AT, OPEN, RUNNING, TRANSITIONS, BatchStatus, allowed_sources
from api.batches.store import BatchStore
from api.db import Batch, Database
from api.protocol import BatchObject


def stored(store: BatchStore, status: BatchStatus, batch_id: str = "batch_1") -> Batch:
    created = int(time.time())
    return store.add(Batch(id=batch_id, key_id="key_1", input_file_id="file_1",
                           endpoint="/v1/chat/completions", completion_window="24h", status=status.value,
                           total=1, dispatched=0,
                           dispatch_done=False, completed=0, failed=0, prompt_tokens=0, completion_tokens=0,
                           created_at=created, expires_at=created + 86400))


@pytest.fixture
def store(database: Database) -> BatchStore:
    return BatchStore(database)


@pytest.fixture
def statements(database: Database) -> Iterator[list[str]]:
    """The SQL statements run on the database while the test runs."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        seen.append(statement)

    event.listen(database.engine, "before_cursor_execute", record)
    yield seen
    event.remove(database.engine, "before_cursor_execute", record)


def test_the_statuses_are_openais() -> None:
    assert {status.value for status in BatchStatus} == {"validating", "failed", "in_progress", "finalizing",
                                                         "completed", "expired", "cancelling", "cancelled"}
    assert set(BatchObject.model_fields) >= set(ENTERED_AT.values())


def test_the_table_ends_where_openai_ends() -> None:
    ended = {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
    assert {status for status in BatchStatus if status.has_ended} == ended
    assert set(RUNNING) == set(BatchStatus) - ended and set(OPEN) < set(RUNNING)
    assert set(TRANSITIONS) == set(BatchStatus)
    assert allowed_sources(BatchStatus.IN_PROGRESS) == (BatchStatus.VALIDATING,)
    assert allowed_sources(BatchStatus.COMPLETED) == (BatchStatus.FINALIZING,)
    assert allowed_sources(BatchStatus.CANCELLED) == (BatchStatus.CANCELLING,)
    assert set(allowed_sources(BatchStatus.CANCELLING)) == set(OPEN)
    assert set(allowed_sources(BatchStatus.EXPIRED)) == {*OPEN, BatchStatus.CANCELLING}


def test_a_legal_move_sets_status_and_its_time_in_one_update(store: BatchStore,
                                                             statements: list[str]) -> None:
    stored(store, BatchStatus.IN_PROGRESS)
    before = int(time.time())
    statements.clear()
    assert store.transition("batch_1", BatchStatus.FINALIZING)
    assert [s for s in statements if s.lstrip().upper().startswith("UPDATE")] == statements
    assert len(statements) == 1 and "status IN" in statements[0]
    batch = store.get("batch_1")
    assert batch is not None and batch.status == "finalizing"
    assert batch.finalizing_at is not None and batch.finalizing_at >= before


def test_a_move_sets_the_values_given_with_it(store: BatchStore) -> None:
    stored(store, BatchStatus.FINALIZING)
    assert store.transition("batch_1", BatchStatus.COMPLETED, output_file_id="file_out", dispatch_done=True)
    batch = store.get("batch_1")
    assert batch is not None and (batch.status, batch.output_file_id, batch.dispatch_done) == (
        "completed", "file_out", True)
    assert batch.completed_at is not None and batch.finalizing_at is None


@pytest.mark.parametrize(("source", "target"), [
    (BatchStatus.VALIDATING, BatchStatus.COMPLETED),
    (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLED),
    (BatchStatus.CANCELLING, BatchStatus.IN_PROGRESS),
    (BatchStatus.COMPLETED, BatchStatus.FAILED),
    (BatchStatus.EXPIRED, BatchStatus.CANCELLING),
], ids=lambda status: status.value)
def test_an_illegal_move_is_refused_and_writes_nothing(store: BatchStore, source: BatchStatus,
                                                       target: BatchStatus) -> None:
    assert target not in TRANSITIONS[source]
    stored(store, source)
    assert not store.transition("batch_1", target, output_file_id="file_out")
    batch = store.get("batch_1")
    assert batch is not None and batch.status == source.value and batch.output_file_id is None
    assert getattr(batch, ENTERED_AT[target]) is None


def test_a_missing_batch_does_not_move(store: BatchStore) -> None:
    assert not store.transition("batch_none", BatchStatus.IN_PROGRESS)


def test_status_is_not_written_around_the_table(store: BatchStore) -> None:
    stored(store, BatchStatus.VALIDATING)
    with pytest.raises(ValueError, match="transition"):
        store.update("batch_1", status="completed")
    assert store.update("batch_1", dispatched=1)
    batch = store.get("batch_1")
    assert batch is not None and (batch.status, batch.dispatched) == ("validating", 1)
