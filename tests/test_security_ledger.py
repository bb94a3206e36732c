"""Issue 15, H1 and H3: batch input limits at upload, models checked at batch creation and
enqueue, and the usage ledger's dead letter. Real Redis; the ledger on SQLite and on the real
PostgreSQL (skipped, or failed with ``INFERQ_REQUIRE_POSTGRES=1``, when it is unreachable)."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pytest
from sqlalchemy import select

from api import create_app
from api.accounts.ledger import Ledger
from api.batches.store import BatchStore, now
from api.db import Batch, BatchResult, Database
from api.http import metrics
from api.protocol import ErrorResponse
from queueing import jobs, keys, metering
from queueing.jobs import CHAT, JobRecord, JobRequest
from tests.conftest import SCRIPTED_MODEL

TTL = 600
GHOST = "ghost-model"  # no worker serves it, and it is not the API's served model


def line(custom_id: str, model: Any = SCRIPTED_MODEL) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}}


def upload(client: Any, headers: dict[str, str], lines: list[dict[str, Any]]) -> Any:
    content = "".join(json.dumps(item) + "\n" for item in lines).encode()
    return client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")})


def assert_invalid_file(resp: Any, line_no: int, words: str) -> None:
    assert resp.status_code == 400, resp.json
    error = resp.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_file"
    assert error["message"].startswith(f"line {line_no}: "), error["message"]
    assert words in error["message"], error["message"]


# --- H1: limits at upload ------------------------------------------------------------------


@pytest.mark.parametrize(("custom_id", "words"), [
    ("x" * 201, "at most 200 characters"),
    ("a\x00b", "control character"),
    ("a\nb", "control character"),
    ("tab\there", "control character"),
    ("del\x7f", "control character"),
    ("c1\x85", "control character"),
], ids=["too-long", "nul", "newline", "tab", "del", "c1"])
def test_upload_refuses_a_bad_custom_id_naming_its_line(client: Any, auth: dict[str, str], custom_id: str,
                                                        words: str) -> None:
    resp = upload(client, auth, [line("fine"), line(custom_id), line("also-fine")])
    assert_invalid_file(resp, 2, words)
    assert "custom_id" in resp.json["error"]["message"]


def test_upload_takes_custom_ids_up_to_the_limit(client: Any, auth: dict[str, str]) -> None:
    resp = upload(client, auth, [line("x" * 200), line("ünïcödé id with spaces")])
    assert resp.status_code == 200, resp.json


@pytest.mark.parametrize(("model", "words"), [
    ("m" * 201, "at most 200 characters"),
    ("m\x00", "control character"),
    ("", "non-empty string"),
    (7, "non-empty string"),
], ids=["too-long", "nul", "empty", "not-a-string"])
def test_upload_refuses_a_bad_model_naming_its_line(client: Any, auth: dict[str, str], model: Any,
                                                    words: str) -> None:
    resp = upload(client, auth, [line("a"), line("b"), line("c", model=model)])
    assert_invalid_file(resp, 3, words)
    assert "'body.model'" in resp.json["error"]["message"]


def test_upload_refuses_a_second_model(client: Any, auth: dict[str, str]) -> None:
    resp = upload(client, auth, [line("a"), line("b", model=GHOST)])
    assert_invalid_file(resp, 2, "one model")


# --- H3: models checked at batch creation and at enqueue -------------------------------------


def test_batch_for_an_unknown_model_is_refused_at_creation(client: Any, auth: dict[str, str],
                                                          redis_client: Any) -> None:
    file_id = upload(client, auth, [line("a", model=GHOST), line("b", model=GHOST)]).json["id"]
    resp = client.post("/v1/batches", headers=auth, json={
        "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})
    assert resp.status_code == 404, resp.json
    assert resp.json["error"] == {
        "message": f"The model '{GHOST}' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert client.get("/v1/batches", headers=auth).json["data"] == []
    assert redis_client.exists(keys.batch_queue(GHOST)) == 0


def test_enqueue_batch_refuses_an_unknown_model(app: Any, redis_client: Any) -> None:
    gateway = app.extensions["inferq"].gateway
    record = gateway.new_record(JobRequest(CHAT, GHOST, line("a", model=GHOST)["body"]), None)
    refused = gateway.enqueue_batch(record)
    assert isinstance(refused, ErrorResponse)
    assert (refused.status_code, refused.error.code, refused.error.param) == (404, "model_not_found", "model")
    assert redis_client.exists(keys.batch_queue(GHOST)) == 0
    assert jobs.get(redis_client, record.id) is None


# --- H1: the ledger's dead letter ------------------------------------------------------------


def entry(key_id: str, **fields: str) -> dict[str, str]:
    """A usage-stream entry as a job's terminal transition appends it."""
    return {"job_id": jobs.new_job_id(), "key_id": key_id, "model": "m-ledger", "day": metering.quota_day(),
            "prompt_tokens": "3", "completion_tokens": "4", "status": "succeeded", "batch_id": "", **fields}


def dead_letters(client: Any, stream: str = keys.USAGE_DEAD_LETTERS) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(stream)]


def counted(stage: str) -> float:
    """``inferq_ledger_dead_letters_total{stage}`` in this process."""
    for family in metrics.LEDGER_DEAD_LETTERS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {"stage": stage}:
                return sample.value
    return 0.0


def settled(client: Any, stream: str = keys.USAGE_STREAM, group: str = keys.USAGE_LEDGER_GROUP) -> None:
    """The stream is empty and nothing is pending: every entry was written or set aside."""
    assert client.xlen(stream) == 0
    assert client.xpending(stream, group)["pending"] == 0


STREAMS = (keys.USAGE_STREAM, keys.USAGE_DEAD_LETTERS, keys.BATCH_LINES_STREAM, keys.BATCH_LINES_DEAD_LETTERS)


@pytest.fixture
def fresh_streams(redis_client: Any) -> Any:
    redis_client.delete(*STREAMS)
    yield redis_client
    redis_client.delete(*STREAMS)


def test_poisoned_usage_entries_are_set_aside_and_the_rest_written(database: Database,
                                                                  fresh_streams: Any) -> None:
    client, key_id = fresh_streams, f"key_{jobs.new_job_id()}"
    poisoned = [entry(key_id, model="m" * 300), entry(key_id, model="m\x00ledger"),
                entry(key_id, prompt_tokens="many"), entry(key_id, day="")]
    good = [entry(key_id) for _ in range(3)]
    for fields in (good[0], *poisoned[:2], good[1], *poisoned[2:], good[2]):
        client.xadd(keys.USAGE_STREAM, fields)
    before = counted("invalid")
    ledger = Ledger(client, database)
    assert ledger.drain() == 3
    today = dt.datetime.now(dt.UTC).date()
    rows = ledger.history(key_id, today, today)
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("m-ledger", 3, 9, 12)]
    dead = dead_letters(client)
    assert sorted(d["job_id"] for d in dead) == sorted(p["job_id"] for p in poisoned)
    assert {d["stage"] for d in dead} == {"invalid"}
    by_job = {d["job_id"]: d for d in dead}
    assert by_job[poisoned[0]["job_id"]]["model"] == "m" * 300  # set aside as it was, to be looked at
    assert "model" in by_job[poisoned[0]["job_id"]]["reason"]
    assert counted("invalid") - before == 4
    settled(client)
    assert ledger.drain() == 0  # nothing is delivered again


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_entries_postgresql_refuses_are_set_aside_one_by_one(database: Database, fresh_streams: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ledger's own check would miss: PostgreSQL refuses the entry, the others are written."""
    import api.accounts.ledger

    monkeypatch.setattr(api.accounts.ledger, "entry_problem", lambda fields: None)  # only SQL decides here
    client, key_id = fresh_streams, f"key_{jobs.new_job_id()}"
    poisoned = [entry(key_id, model="m" * 300), entry(key_id, model="m\x00ledger")]
    good = [entry(key_id) for _ in range(2)]
    for fields in (good[0], *poisoned, good[1]):
        client.xadd(keys.USAGE_STREAM, fields)
    before = counted("sql")
    ledger = Ledger(client, database)
    assert ledger.drain() == 2
    today = dt.datetime.now(dt.UTC).date()
    assert [(r.requests, r.prompt_tokens) for r in ledger.history(key_id, today, today)] == [(2, 6)]
    dead = dead_letters(client)
    assert sorted(d["job_id"] for d in dead) == sorted(p["job_id"] for p in poisoned)
    assert {d["stage"] for d in dead} == {"sql"}
    assert counted("sql") - before == 2
    settled(client)


def batch_line_job(client: Any, batch_id: str, custom_id: str, line_no: int, key_id: str) -> str:
    """A queued line of ``batch_id`` cancelled at once: its entry (naming the batch) is in the stream."""
    job_id = f"{batch_id}-{line_no}"
    record = JobRecord(id=job_id, request=JobRequest(CHAT, "m-ledger", line(custom_id)["body"]),
                       key_id=key_id, quota_day=metering.quota_day(), batch_id=batch_id, custom_id=custom_id,
                       batch_line=line_no)
    jobs.create(client, record, TTL)
    jobs.request_cancel(client, job_id, TTL)
    return job_id


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_batch_lines_postgresql_cannot_record_do_not_block_the_others(
        database_url: str, app_config: dict[str, Any], fresh_streams: Any) -> None:
    """The issue's scenario: batch lines whose custom_id is over 200 characters or holds NUL
    (as files uploaded before the limits may have) make the batch collector's insert fail on
    PostgreSQL; they go to the collector's dead letter and every other line of the drain is
    recorded. The usage ledger, which drains the same lines' usage, is not held up by them."""
    app = create_app({**app_config, "database_url": database_url})
    services = app.extensions["inferq"]
    ledger, collector, db = services.ledger, services.batches.collector, services.db
    client, key_id = fresh_streams, f"key_{jobs.new_job_id()}"
    batch_id = f"batch_{jobs.new_job_id()[:12]}"
    BatchStore(db).add(Batch(
        id=batch_id, key_id=key_id, input_file_id="file-x", endpoint=CHAT, model="m-ledger",
        completion_window="24h", status="in_progress", total=4, dispatched=4, dispatch_done=False,
        completed=0, failed=0, prompt_tokens=0, completion_tokens=0, created_at=now(),
        expires_at=now() + 86400))
    ids = ["ok-1", "x" * 300, "nul\x00id", "ok-2"]
    job_ids = [batch_line_job(client, batch_id, custom_id, n, key_id) for n, custom_id in enumerate(ids, 1)]
    before = counted("collect")
    assert ledger.drain() == 4  # all four are in the usage ledger: their usage fits
    assert dead_letters(client) == []
    settled(client)
    assert collector.drain() == 4
    with db.sessions() as session:
        recorded = set(session.scalars(select(BatchResult.custom_id).where(BatchResult.batch_id == batch_id)))
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.failed == 2  # the two good lines (cancelled: failed lines)
    assert recorded == {"ok-1", "ok-2"}
    dead = dead_letters(client, keys.BATCH_LINES_DEAD_LETTERS)
    assert sorted(d["job_id"] for d in dead) == sorted(job_ids[1:3])
    assert {d["stage"] for d in dead} == {"collect"}
    assert all("DataError" in d["reason"] for d in dead)
    assert counted("collect") - before == 2
    settled(client, keys.BATCH_LINES_STREAM, keys.BATCH_COLLECTOR_GROUP)
