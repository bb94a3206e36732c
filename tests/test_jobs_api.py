"""``/v1/jobs`` on real processes: a worker with the scripted engine (test double), real Redis."""

from __future__ import annotations

import time

import pytest

from queueing import jobs
from queueing.jobs import JobStatus
from tests.conftest import SCRIPTED_MODEL, add_key

pytestmark = pytest.mark.usefixtures("scripted_worker")


def job_body(text: str, max_tokens: int = 4, **extra):
    return {"endpoint": "/v1/chat/completions", "metadata": {"ticket": "T-1"},
            "body": {"model": SCRIPTED_MODEL, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": text}], **extra}}


@pytest.fixture
def key_headers(app_config):
    key, _ = add_key(app_config["database_url"])
    return {"X-API-Key": key}


def test_job_lifecycle_with_long_poll(client, key_headers):
    created = client.post("/v1/jobs", headers=key_headers, json=job_body("one two three"))
    assert created.status_code == 202
    job = created.json
    assert job["object"] == "job" and job["status"] in ("queued", "running", "succeeded")
    assert job["metadata"] == {"ticket": "T-1"}
    done = client.get(f"/v1/jobs/{job['id']}?wait=10", headers=key_headers).json
    assert done["status"] == "succeeded"
    assert done["response"]["object"] == "chat.completion"
    assert done["response"]["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert done["response"]["usage"] == done["usage"]
    assert done["created_at"] <= done["started_at"] <= done["completed_at"]


def test_completions_job_and_failed_job(client, key_headers):
    body = {"endpoint": "/v1/completions",
            "body": {"model": SCRIPTED_MODEL, "prompt": "a b", "max_tokens": 2}}
    job = client.post("/v1/jobs", headers=key_headers, json=body).json
    done = client.get(f"/v1/jobs/{job['id']}?wait=10", headers=key_headers).json
    assert done["response"]["choices"][0]["text"] == "tok0 tok1"
    failed = client.post("/v1/jobs", headers=key_headers, json=job_body("[[too_long]]")).json
    failed = client.get(f"/v1/jobs/{failed['id']}?wait=10", headers=key_headers).json
    assert failed["status"] == "failed"
    assert "maximum context length" in failed["error"]["message"] and failed["response"] is None


def test_bad_job_requests_are_400(client, key_headers):
    cases = [
        ({"endpoint": "/v1/embeddings", "body": {}}, "endpoint"),
        (job_body("x", stream=True), "body.stream"),
        ({"endpoint": "/v1/chat/completions", "body": {"model": SCRIPTED_MODEL, "messages": []}},
         "body.messages"),
    ]
    for body, param in cases:
        resp = client.post("/v1/jobs", headers=key_headers, json=body)
        assert resp.status_code == 400, body
        assert resp.json["error"]["param"] == param


def test_list_is_newest_first_and_paginated(client, app_config):
    key, _ = add_key(app_config["database_url"])
    headers = {"X-API-Key": key}
    ids = [client.post("/v1/jobs", headers=headers, json=job_body(f"n{i}", 1)).json["id"] for i in range(5)]
    page1 = client.get("/v1/jobs?limit=2", headers=headers).json
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"] is True
    page2 = client.get(f"/v1/jobs?limit=2&after={page1['last_id']}", headers=headers).json
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:4]
    page3 = client.get(f"/v1/jobs?limit=2&after={page2['last_id']}", headers=headers).json
    assert [j["id"] for j in page3["data"]] == ids[:1] and page3["has_more"] is False


def test_a_key_never_sees_another_keys_job(client, app_config, key_headers):
    job = client.post("/v1/jobs", headers=key_headers, json=job_body("mine")).json
    other, _ = add_key(app_config["database_url"])
    for call in (lambda h: client.get(f"/v1/jobs/{job['id']}", headers=h),
                 lambda h: client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)):
        resp = call({"X-API-Key": other})
        assert resp.status_code == 404 and resp.json["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs", headers={"X-API-Key": other}).json["data"] == []


def test_cancel_running_job_aborts_it_in_the_engine(client, key_headers, redis_client):
    job = client.post("/v1/jobs", headers=key_headers, json=job_body("[[delay=0.1]]", 200)).json
    deadline = time.monotonic() + 5
    while jobs.get(redis_client, job["id"]).status is JobStatus.QUEUED and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=key_headers)
    done = client.get(f"/v1/jobs/{job['id']}?wait=5", headers=key_headers).json
    assert done["status"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 200  # the engine stopped generating


def test_cancel_queued_job_never_runs(client, key_headers, redis_client):
    # Fill every batch slot of the worker (32 slots x 0.5) with slow jobs, then queue one more.
    blockers = [client.post("/v1/jobs", headers=key_headers, json=job_body(f"[[delay=0.2]] {i}", 100)).json
                for i in range(16)]
    queued = client.post("/v1/jobs", headers=key_headers, json=job_body("waiting")).json
    time.sleep(0.5)
    assert jobs.get(redis_client, queued["id"]).status is JobStatus.QUEUED
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=key_headers).json
    assert cancelled["status"] == "cancelled"
    for job in blockers:
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=key_headers)
    time.sleep(1.0)  # the worker reaches the cancelled job: it must not run
    record = jobs.get(redis_client, queued["id"])
    assert record.status is JobStatus.CANCELLED and record.started_at is None


def test_interactive_request_overtakes_a_batch_backlog(client, key_headers, auth, redis_client):
    # 100 five-second batch jobs: 16 (the batch share of 32 slots) run, the rest wait in Redis.
    backlog = [client.post("/v1/jobs", headers=key_headers,
                           json=job_body(f"[[delay=0.25]] {i}", 20)).json["id"] for i in range(100)]
    time.sleep(0.5)
    records = [jobs.get(redis_client, job_id) for job_id in backlog]
    assert sum(r.status is JobStatus.RUNNING for r in records) == 16
    sent = time.time()
    chat = client.post("/v1/chat/completions", headers=auth, json={
        "model": SCRIPTED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    answered = time.time()
    assert chat.status_code == 200
    # Answered long before any batch job could finish (5 s), so it never waited for a batch slot.
    assert answered - sent < 2.0
    records = [jobs.get(redis_client, job_id) for job_id in backlog]
    assert not any(r.status.is_terminal for r in records)
    for job_id in backlog:
        client.post(f"/v1/jobs/{job_id}/cancel", headers=key_headers)
    for job_id in backlog:
        client.post(f"/v1/jobs/{job_id}/cancel", headers=key_headers)
