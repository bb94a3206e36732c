"""The usage ledger, /v1/usage and the quota rebuild on each SQL backend (SQLite and PostgreSQL).

Real Redis, a real worker process with the scripted engine (test double), the Flask
app in-process on the backend under test.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from api.accounts.ledger import Ledger
from api.db import Database
from queueing import jobs, keys, liveness, metering
from queueing.jobs import COMPLETIONS, JobRecord, JobRequest, JobStatus
from tests.conftest import SCRIPTED_MODEL, add_key
from tests.test_metering import chat

TTL = 600


def _settled_job(client: Any, key_id: str, prompt: int, completion: int) -> str:
    """A job charged to ``key_id`` that ended with this usage (its ledger entry is in the stream)."""
    job_id = jobs.new_job_id()
    request = JobRequest(COMPLETIONS, "m-ledger", {"model": "m-ledger", "prompt": "x"})
    record = JobRecord(id=job_id, request=request, key_id=key_id, quota_day=metering.quota_day())
    jobs.create(client, record, TTL)
    liveness.beat(client, "m-ledger", "w", 60)  # else the session's workers would reap it as orphaned
    try:
        jobs.transition(client, job_id, JobStatus.RUNNING, TTL, model="m-ledger", worker="w")
        jobs.transition(client, job_id, JobStatus.SUCCEEDED, TTL, prompt_tokens=prompt,
                        completion_tokens=completion)
    finally:
        liveness.retire(client, "m-ledger", "w")
    return job_id


def test_ledger_drains_each_settlement_once(database: Database, redis_client: Any) -> None:
    ledger = Ledger(redis_client, database)
    key_id = f"key_{jobs.new_job_id()}"
    _settled_job(redis_client, key_id, 3, 4)
    _settled_job(redis_client, key_id, 10, 1)
    ledger.drain()
    # A replayed entry (a drain that crashed before its XACK) is written once.
    job_id = _settled_job(redis_client, key_id, 2, 2)
    entries = [(i, f) for i, f in redis_client.xrange(keys.USAGE_STREAM) if f["job_id"] == job_id]
    redis_client.xadd(keys.USAGE_STREAM, entries[0][1])
    ledger.drain()
    today = dt.datetime.now(dt.UTC).date()
    rows = ledger.history(key_id, today, today)
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("m-ledger", 3, 15, 7)]
    assert ledger.used_on(key_id, metering.quota_day()) == 22


@pytest.mark.usefixtures("scripted_worker")
def test_usage_and_quota_rebuild_through_the_api(database_url: str, app_config: dict[str, Any],
                                                 redis_client: Any) -> None:
    from api import create_app

    client = create_app({**app_config, "database_url": database_url}).test_client()
    key, key_id = add_key(database_url, daily_tokens=1_000)
    headers = {"Authorization": f"Bearer {key}"}
    first = client.post("/v1/chat/completions", headers=headers, json=chat("a b c", max_tokens=4))
    assert first.status_code == 200, first.json
    usage = client.get("/v1/usage", headers=headers).json
    assert usage["today"]["total_tokens"] == first.json["usage"]["total_tokens"] == 7
    assert [row["model"] for row in usage["data"]] == [SCRIPTED_MODEL]

    redis_client.delete(keys.quota(key_id, metering.quota_day()))  # Redis lost the day's counter
    assert client.get("/v1/usage", headers=headers).json["daily_quota"]["used"] == 7  # from SQL
    second = client.post("/v1/chat/completions", headers=headers, json=chat("d e", max_tokens=3))
    assert second.status_code == 200
    counter = redis_client.hgetall(keys.quota(key_id, metering.quota_day()))
    assert counter == {"used": str(7 + 5), "reserved": "0"}  # rebuilt from the ledger, then charged
    assert client.get("/v1/usage", headers=headers).json["today"]["requests"] == 2
