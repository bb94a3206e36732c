"""Revocation stops a key's work (issue 15, M6), bootstrap keys are revocable, and ENV=production
refuses placeholder keys.

The revocation test runs a real scripted worker (slow tokens, two slots) and the API under
gunicorn; ``inferq keys revoke`` runs as the operator would run it, in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.accounts.auth import bootstrap_id, hash_key
from api.accounts.keys import PlaceholderKeys
from queueing import keys, liveness
from tests.conftest import (
    ROOT,
    TEST_KEY,
    add_key,
    base_env,
    redis_server,
    start_api,
    start_coordinator,
    start_worker,
)

pytestmark = pytest.mark.timeout(180)

MODEL = "revoke-model"
SLOW = {"ENGINE": "scripted", "SCRIPTED_TOKEN_DELAY": "0.05", "MAX_NUM_SEQS": "2"}
LONG = 1500  # tokens: 75 s at the scripted pace, far past the test


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own redis-server: no session coordinator collects the entries that settle
    this module's batch lines into a database of its own (the batch then never ends)."""
    with redis_server(tmp_path_factory.mktemp("revocation-redis")) as url:
        yield url


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A slow scripted worker for MODEL (6 interactive Celery slots, 1 batch slot), one API and
    its coordinator."""
    tmp = tmp_path_factory.mktemp("revocation")
    worker = start_worker(redis_url, tmp, MODEL, 60, **SLOW)
    api, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=MODEL, FILES_DIR=str(tmp / "files"))
    coordinator = start_coordinator(redis_url, tmp, SERVED_MODEL_NAME=MODEL, FILES_DIR=str(tmp / "files"))
    yield {"base": base, "tmp": tmp, "database_url": f"sqlite:///{tmp / 'inferq.db'}"}
    coordinator.stop()
    api.stop()
    worker.stop()


def chat(stream: bool, max_tokens: int = LONG) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}


def job(max_tokens: int) -> dict[str, Any]:
    return {"endpoint": "/v1/chat/completions", "body": chat(False, max_tokens)}


class StreamReader(threading.Thread):
    """One streamed chat, read to its end: the status, the body, and when it ended."""

    def __init__(self, base: str, key: str):
        super().__init__(daemon=True)
        self.base, self.key = base, key
        self.status: int | None = None
        self.body = ""
        self.first_token = threading.Event()
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=chat(True), timeout=120,
                              headers={"Authorization": f"Bearer {self.key}"}) as response:
                self.status = response.status_code
                for text in response.iter_text():
                    self.body += text
                    if '"content"' in self.body:
                        self.first_token.set()
        except httpx.HTTPError as exc:  # the API stopped under it (a failed test's teardown)
            self.body += f"\n{exc!r}"
            return
        self.ended_at = time.monotonic()

    def ended_cancelled(self) -> bool:
        """A queued stream is answered 503 ``cancelled``; a running one ends with that error in-stream."""
        if self.status == 503:
            return json.loads(self.body)["error"]["code"] == "cancelled"
        return self.status == 200 and '"code": "cancelled"' in self.body.replace('"code":"', '"code": "')


def upload_batch(base: str, key: str, lines: int) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    content = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": chat(False)}) + "\n" for i in range(lines))
    uploaded = httpx.post(f"{base}/v1/files", headers=auth, data={"purpose": "batch"},
                          files={"file": ("in.jsonl", content.encode())}, timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    created = httpx.post(f"{base}/v1/batches", headers=auth, timeout=30, json={
        "input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def revoke(redis_url: str, tmp: Path, key_ref: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``inferq keys revoke`` in its own process, against the stack's SQL and Redis."""
    return subprocess.run([sys.executable, "-m", "inferq.cli", "keys", "revoke", key_ref], cwd=ROOT,
                          env=base_env(redis_url, tmp, **env), capture_output=True, text=True, timeout=60)


def test_revoking_a_key_cancels_its_streams_jobs_and_batches(stack: dict[str, Any], redis_url: str,
                                                             redis_client: redis.Redis) -> None:
    base, tmp = stack["base"], stack["tmp"]
    key, key_id = add_key(stack["database_url"])
    auth = {"Authorization": f"Bearer {key}"}
    other, _ = add_key(stack["database_url"])  # another key's work goes on

    streams = [StreamReader(base, key) for _ in range(9)]  # 6 run (the worker's Celery slots), 3 queue
    for stream in streams:
        stream.start()
    deadline = time.monotonic() + 30
    while sum(s.first_token.is_set() for s in streams) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sum(s.first_token.is_set() for s in streams) == 6, [(s.status, s.body[:200]) for s in streams]
    job_ids = []
    for _ in range(3):  # one runs in the batch slot, two wait in the batch queue
        submitted = httpx.post(f"{base}/v1/jobs", headers=auth, json=job(LONG), timeout=30)
        assert submitted.status_code == 202, submitted.text
        job_ids.append(submitted.json()["id"])
    batch_id = upload_batch(base, key, lines=5)
    survivor = httpx.post(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {other}"},
                          json=job(3), timeout=30).json()["id"]
    time.sleep(1)  # the batch's lines are dispatched
    statuses = [redis_client.hget(keys.job(job_id), "status") for job_id in job_ids]
    assert "queued" in statuses and redis_client.llen(keys.model_queue(MODEL)) == 3
    assert not any(s.ended_at for s in streams)

    started = time.monotonic()
    done = revoke(redis_url, tmp, key_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Revoked {key_id}" in done.stdout and "Cancelled 1 open batch(es)" in done.stdout, done.stdout

    for stream in streams:  # every stream ended with its cancelled event, within seconds
        stream.join(10)
        assert stream.ended_at is not None and stream.ended_cancelled(), (stream.status, stream.body[-300:])
        assert stream.ended_at - started < 10
    assert [redis_client.hget(keys.job(job_id), "status") for job_id in job_ids] == ["cancelled"] * 3
    assert httpx.get(f"{base}/v1/models", headers=auth, timeout=10).status_code == 401

    batch_status = _batch_status(stack["database_url"], batch_id)
    assert batch_status in ("cancelling", "cancelled")
    # Its cancelled lines settle (each popped by the worker's one batch slot), and it ends with its files.
    deadline = time.monotonic() + 120
    while batch_status != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.5)
        batch_status = _batch_status(stack["database_url"], batch_id)
    lines = [redis_client.hget(keys.job(f"{batch_id}-{seq}"), "status") for seq in range(1, 6)]
    assert batch_status == "cancelled", (batch_status, lines)
    assert set(lines) <= {"cancelled", None}  # a line never dispatched has no job

    deadline = time.monotonic() + 30
    while redis_client.hget(keys.job(survivor), "status") != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert redis_client.hget(keys.job(survivor), "status") == "succeeded"

    again = revoke(redis_url, tmp, key_id)  # idempotent: a second run only sweeps again
    assert again.returncode == 0 and "was already revoked" in again.stdout, again.stdout + again.stderr
    assert "Cancelled 0 open batch(es) and 0 queued or running job(s)" in again.stdout


def _batch_status(database_url: str, batch_id: str) -> str:
    from api.batches.store import BatchStore
    from api.db import Database
    from config import Settings

    batch = BatchStore(Database(Settings(_env_file=None, database_url=database_url))).get(batch_id)
    assert batch is not None
    return batch.status


def test_a_revoked_bootstrap_key_gets_401(app_config: dict[str, Any], redis_url: str,
                                          tmp_path: Path) -> None:
    from api import create_app

    other = "iq-bootstrap-" + "x" * 24
    app = create_app({**app_config, "api_keys": f"{TEST_KEY},{other}"})
    client = app.test_client()
    for key in (TEST_KEY, other):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    env = {"DATABASE_URL": app_config["database_url"], "API_KEYS": f"{TEST_KEY},{other}"}
    done = revoke(redis_url, tmp_path, bootstrap_id(hash_key(other)), **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Revoked {bootstrap_id(hash_key(other))}" in done.stdout
    assert other not in done.stdout + done.stderr  # never echoed

    time.sleep(1.1)  # each API process reads the revoked bootstrap keys again at most once a second
    refused = client.get("/v1/models", headers={"Authorization": f"Bearer {other}"})
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"}).status_code == 200
    keys_service = app.extensions["inferq"].keys
    assert keys_service.principal_for(bootstrap_id(hash_key(other))) is None  # batches stop dispatching
    assert keys_service.principal_for(bootstrap_id(hash_key(TEST_KEY))) is not None

    listed = subprocess.run([sys.executable, "-m", "inferq.cli", "keys", "list", "--json"], cwd=ROOT,
                            env=base_env(redis_url, tmp_path, **env), capture_output=True, text=True,
                            timeout=60)
    [row] = json.loads(listed.stdout)
    assert row["public_id"] == bootstrap_id(hash_key(other)) and row["status"] == "revoked"


def test_production_refuses_placeholder_keys(app_config: dict[str, Any], redis_url: str,
                                             tmp_path: Path) -> None:
    from api import create_app

    for weak in ("changeme", "dev-key-1", "short-key-15chr"):
        with pytest.raises(PlaceholderKeys, match="ENV=production: API_KEYS holds 1 placeholder or short"):
            create_app({**app_config, "env": "production", "api_keys": f"{TEST_KEY},{weak}"})
        create_app({**app_config, "api_keys": weak})  # development: a warning only
    create_app({**app_config, "env": "production"})  # a strong key starts

    env = base_env(redis_url, tmp_path, ENV="production", API_KEYS=f"{TEST_KEY},changeme,short-secret-15")
    api = subprocess.run([sys.executable, "-m", "inferq.cli", "api", "--port", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert api.returncode != 0
    assert "ENV=production: API_KEYS holds 2 placeholder or short key(s)" in api.stderr, api.stderr
    assert "short-secret-15" not in api.stderr and "Traceback" not in api.stderr  # no key shown


def test_revocation_sweep_finds_a_key_s_jobs_wherever_they_wait(redis_client: redis.Redis) -> None:
    """Unit view of the sweep: jobs in an interactive queue, taken by a worker, running, listed
    under /v1/jobs or holding a capped slot are cancelled for the revoked key only; queued ones
    announce ``cancelled``."""
    from queueing import events, jobs
    from queueing.jobs import JobRecord, JobRequest, JobStatus
    from queueing.key_limits import Kind
    from queueing.revocation import KOMBU_UNACKED, cancel_jobs_of_key

    model, ttl = f"sweep-{time.monotonic_ns()}", 600
    k1, k2 = f"{model}-k1", f"{model}-k2"
    request = JobRequest("/v1/chat/completions", model, {"model": model})

    def job(key_id: str, index: str | None = None) -> str:
        record = JobRecord(id=jobs.new_job_id(), request=request, key_id=key_id)
        jobs.create(redis_client, record, ttl, index=index)
        return record.id

    def message(job_id: str) -> str:
        return json.dumps({"body": "", "headers": {"id": job_id, "task": "inferq.generate"},
                           "properties": {}})

    queued, taken, running, others, slotted = job(k1), job(k1), job(k1), job(k2), job(k1)
    listed = job(k1, keys.jobs_of(k1))
    lapse = time.time() + 600
    redis_client.zadd(keys.key_slots(k1, Kind.STREAMS), {slotted: lapse, "hold:poll": lapse})
    redis_client.lpush(keys.model_queue(model), message(queued), message(others), "not json")
    redis_client.hset(KOMBU_UNACKED, f"tag-{taken}", json.dumps([json.loads(message(taken)), "", model]))
    liveness.beat(redis_client, model, "w1", ttl)  # alive: no reaper of the session fails its job meanwhile
    jobs.transition(redis_client, running, JobStatus.RUNNING, ttl, model=model, worker="w1")
    cancels = redis_client.pubsub()
    cancels.subscribe(keys.CANCEL_CHANNEL, keys.job_events(queued))
    try:
        for _ in range(2):
            assert cancels.get_message(timeout=5)["type"] == "subscribe"
        assert cancel_jobs_of_key(redis_client, k1, [model], ttl) == 5
        ended = [redis_client.hget(keys.job(j), "status") for j in (queued, taken, listed, slotted)]
        assert ended == ["cancelled"] * 4
        assert redis_client.hget(keys.job(running), "status") == "running"  # its worker aborts it
        assert redis_client.hget(keys.job(others), "status") == "queued"
        got = [cancels.get_message(timeout=1) for _ in range(2)]
        data = {(m["channel"], m["data"]) for m in got if m and m["type"] == "message"}
        assert (keys.CANCEL_CHANNEL, running) in data
        assert (keys.job_events(queued), events.encode(events.Cancelled()).decode()) in data
    finally:
        cancels.close()
        liveness.retire(redis_client, model, "w1")
        redis_client.hdel(KOMBU_UNACKED, f"tag-{taken}")
        redis_client.delete(keys.model_queue(model))
        redis_client.hdel(keys.RUNNING_JOBS, running)
