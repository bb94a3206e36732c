"""Per-key caps and fairness (issue 15, M4 and M5) against a real redis-server, real scripted
workers (the engine's test double) and the app in process.

- the slot sets: taken atomically at admission, given back exactly once (worker, cancel,
  worker lost, reaper);
- fairness: a key that fills its share of the interactive queue does not refuse another key;
- open requests: long-polls count as streams and are capped;
- stored bytes: an upload past the key's cap is refused, uploads in flight counted;
- batch lines: paced to the key's lines in flight and to a per-minute token budget of their own.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from api import create_app
from api.batches.lines import line_job_id
from api.files.store import FileStore
from api.generation.job_request import worst_case_tokens
from config import Settings
from queueing import jobs, keys, liveness, recovery
from queueing.celery_app import make_celery
from queueing.jobs import CHAT, JobRecord, JobRequest, JobStatus
from queueing.key_limits import KeyLimits, Kind, assign, in_use, kind_of, release_bytes, reserve_bytes
from tests.conftest import (
    SCRIPTED_MODEL,
    Process,
    add_key,
    base_env,
    coordinating,
    redis_server,
    start_worker,
    wait_for,
)

TTL = 600
SLOW_MODEL = "caps-one-slot-model"  # served by a worker with one slot
IDLE_MODEL = "caps-idle-model"  # a live heartbeat, no consumer: its jobs stay queued


def chat_body(model: str, text: str, max_tokens: int = 2) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_rate_limit_error(resp: Any, code: str) -> None:
    assert resp.status_code == 429, resp.json
    assert set(resp.json["error"]) == {"message", "type", "param", "code"}
    assert resp.json["error"]["code"] == code
    assert int(resp.headers["Retry-After"]) >= 1


# --- the slot sets, on Redis alone -----------------------------------------------------------


def record_for(key_id: str, model: str = "caps-unit-model", **fields: Any) -> JobRecord:
    request = JobRequest(CHAT, model, chat_body(model, "hi"))
    return JobRecord(id=jobs.new_job_id(), request=request, key_id=key_id, **fields)


def admit(client: redis.Redis, record: JobRecord, limits: KeyLimits) -> None:
    jobs.create(client, record, TTL, caps=assign(record, limits))


def test_slots_are_taken_at_admission_and_given_back_once_when_the_job_ends(redis_client: Any) -> None:
    key, limits = f"key_{uuid.uuid4().hex}", KeyLimits(streams=2, queued=1)
    first = record_for(key)
    admit(redis_client, first, limits)
    assert (in_use(redis_client, key, Kind.STREAMS), in_use(redis_client, key, Kind.QUEUED)) == (1, 1)

    second = record_for(key)
    with pytest.raises(jobs.CapReached) as refused:  # one queued already
        admit(redis_client, second, limits)
    assert (kind_of(refused.value.slot), refused.value.cap) == (Kind.QUEUED, 1)
    assert jobs.get(redis_client, second.id) is None  # nothing written, nothing held

    jobs.transition(redis_client, first.id, JobStatus.RUNNING, TTL, model="caps-unit-model", worker="w-caps")
    assert (in_use(redis_client, key, Kind.STREAMS), in_use(redis_client, key, Kind.QUEUED)) == (1, 0)
    admit(redis_client, second, limits)
    third = record_for(key)
    with pytest.raises(jobs.CapReached) as refused:  # two open streams
        admit(redis_client, third, limits)
    assert kind_of(refused.value.slot) is Kind.STREAMS

    # The worker died: its stream fails with worker_lost, and gives its slot back.
    assert recovery.fail_running(redis_client, first.id, recovery.WORKER_LOST, TTL)
    assert (in_use(redis_client, key, Kind.STREAMS), in_use(redis_client, key, Kind.QUEUED)) == (1, 1)
    jobs.request_cancel(redis_client, second.id, TTL)  # cancelled while queued
    assert (in_use(redis_client, key, Kind.STREAMS), in_use(redis_client, key, Kind.QUEUED)) == (0, 0)
    with pytest.raises(jobs.TransitionRefused):  # a second end changes nothing
        jobs.transition(redis_client, second.id, JobStatus.FAILED, TTL)
    admit(redis_client, third, limits)
    assert in_use(redis_client, key, Kind.STREAMS) == 1
    jobs.request_cancel(redis_client, third.id, TTL)


def test_jobs_and_batch_lines_take_their_own_slots(redis_client: Any) -> None:
    key, limits = f"key_{uuid.uuid4().hex}", KeyLimits(streams=1, queued=1, batch_lines=2)
    job = record_for(key, endpoint=CHAT)  # /v1/jobs: a queued slot, no stream
    admit(redis_client, job, limits)
    lines = [record_for(key, endpoint=CHAT, batch_id="batch_caps") for _ in range(3)]
    admit(redis_client, lines[0], limits)
    admit(redis_client, lines[1], limits)
    with pytest.raises(jobs.CapReached) as refused:
        admit(redis_client, lines[2], limits)
    assert kind_of(refused.value.slot) is Kind.BATCH_LINES
    assert [in_use(redis_client, key, kind) for kind in Kind] == [0, 1, 2]
    jobs.transition(redis_client, lines[0].id, JobStatus.RUNNING, TTL, model="caps-unit-model", worker="w")
    assert in_use(redis_client, key, Kind.BATCH_LINES) == 2  # running still counts
    jobs.transition(redis_client, lines[0].id, JobStatus.SUCCEEDED, TTL)
    admit(redis_client, lines[2], limits)
    for record in (job, lines[1], lines[2]):
        jobs.request_cancel(redis_client, record.id, TTL)
    assert [in_use(redis_client, key, kind) for kind in Kind] == [0, 0, 0]


def test_a_requeued_orphan_takes_its_queued_slot_again(redis_client: Any, redis_url: str) -> None:
    key, limits, model = f"key_{uuid.uuid4().hex}", KeyLimits(queued=1), "caps-orphan-model"
    job = record_for(key, model=model, endpoint=CHAT)
    admit(redis_client, job, limits)
    jobs.transition(redis_client, job.id, JobStatus.RUNNING, TTL, model=model, worker="w-caps-dead")
    assert in_use(redis_client, key, Kind.QUEUED) == 0
    assert recovery.reap(redis_client, make_celery(Settings(redis_url=redis_url)), TTL)[0] >= 1
    assert jobs.get(redis_client, job.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert in_use(redis_client, key, Kind.QUEUED) == 1
    jobs.request_cancel(redis_client, job.id, TTL)
    assert in_use(redis_client, key, Kind.QUEUED) == 0
    redis_client.delete(keys.batch_queue(model))


def test_admission_is_atomic_across_clients(redis_url: str) -> None:
    key, limits = f"key_{uuid.uuid4().hex}", KeyLimits(queued=5)
    barrier = threading.Barrier(20)

    def one(_: int) -> bool:
        client = redis.Redis.from_url(redis_url, decode_responses=True)  # a connection each
        record = record_for(key, endpoint=CHAT)
        barrier.wait()
        try:
            admit(client, record, limits)
        except jobs.CapReached:
            return False
        return True

    with ThreadPoolExecutor(20) as pool:
        admitted = list(pool.map(one, range(20)))
    assert sum(admitted) == 5
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    assert in_use(client, key, Kind.QUEUED) == 5
    for job_id in client.zrange(keys.key_slots(key, Kind.QUEUED), 0, -1):
        jobs.request_cancel(client, job_id, TTL)


# --- fairness: a key filling its share of the queue ----------------------------------------------


@pytest.fixture(scope="module")
def one_slot_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A scripted worker that runs one interactive job at a time (so the others wait in Redis)."""
    tmp = tmp_path_factory.mktemp("caps-worker")
    env = base_env(redis_url, tmp, SERVED_MODEL_NAME=SLOW_MODEL, ENGINE="scripted", MAX_NUM_SEQS="1")
    worker = Process([sys.executable, "-m", "inferq.cli", "worker", "--concurrency", "1"], env,
                     tmp / "worker.log")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        wait_for(lambda: liveness.live_models(client)[SLOW_MODEL] > 0, 60, "one-slot worker", worker.proc)
    except BaseException:
        worker.stop()
        print(worker.log_tail())
        raise
    yield worker
    worker.stop()


def cancel_jobs_of(client: redis.Redis, key_id: str) -> None:
    """Cancel every job of ``key_id`` still queued or running (found by their records)."""
    for name in client.scan_iter(match=keys.job("*"), count=1000):
        if name.count(":") == 2 and client.hget(name, "key_id") == key_id:
            jobs.request_cancel(client, name.rsplit(":", 1)[1], TTL)


def settle(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_key_filling_its_queue_share_does_not_refuse_another_key(
        one_slot_worker: Process, app_config: dict[str, Any], redis_client: Any) -> None:
    # MAX_QUEUE_DEPTH 4: each key may have half of it (2) waiting (KEY_MAX_QUEUED_JOBS unset).
    app = create_app({**app_config, "served_model_name": SLOW_MODEL, "max_queue_depth": 4,
                      "queue_timeout": 60.0, "idle_timeout": 60.0})
    client = app.test_client()
    (key_a, id_a), (key_b, id_b) = add_key(app_config["database_url"]), add_key(app_config["database_url"])
    queue = keys.model_queue(SLOW_MODEL)

    def chat(key: str, text: str) -> Any:
        return client.post("/v1/chat/completions", headers=bearer(key), json=chat_body(SLOW_MODEL, text))

    def running() -> bool:
        return any(entry.startswith(f"{SLOW_MODEL}\t") for entry in redis_client.hvals(keys.RUNNING_JOBS))

    pool = ThreadPoolExecutor(10)
    try:
        blocker = pool.submit(chat, key_a, "[[first_delay=60]] holds the worker's one slot")
        assert settle(running), "the blocker never started"
        # Key A sends more requests than the queue holds, one at a time: each is queued or refused.
        queued, refused = 0, []
        for i in range(5):
            sent: Future[Any] = pool.submit(chat, key_a, f"a {i}")
            waiting = queued + 1
            assert settle(lambda sent=sent, n=waiting: sent.done() or redis_client.llen(queue) == n)
            if sent.done():
                refused.append(sent.result())
            else:
                queued += 1
        # Key B is admitted: it waits in the queue, it is not refused (before the cap: 503 queue_full).
        answer = pool.submit(chat, key_b, "b is served")
        assert settle(lambda: answer.done() or redis_client.llen(queue) == queued + 1)
        assert not answer.done(), answer.result().json
        assert in_use(redis_client, id_b, Kind.QUEUED) == 1
        assert queued == 2  # A's share (before the cap, A filled the queue, 4, and then got 503)
        for resp in refused:
            assert_rate_limit_error(resp, "too_many_queued_jobs")
    finally:
        cancel_jobs_of(redis_client, id_a)  # A's requests end; B's runs
    resp = answer.result(timeout=30)
    assert resp.status_code == 200 and resp.json["choices"][0]["message"]["content"] == "tok0 tok1"
    blocker.result(timeout=30)
    pool.shutdown()
    # Every slot went back when its job ended (ran, or was cancelled queued or running).
    assert settle(lambda: all(in_use(redis_client, key_id, kind) == 0
                              for key_id in (id_a, id_b) for kind in (Kind.STREAMS, Kind.QUEUED)))


# --- open requests: long-polls count as streams -----------------------------------------------------


def test_long_polls_count_as_streams_and_are_capped(app_config: dict[str, Any], redis_client: Any):
    liveness.beat(redis_client, IDLE_MODEL, "caps-no-consumer", 120)  # live, but nobody takes its jobs
    app = create_app({**app_config, "key_max_streams": 2})
    client = app.test_client()
    key, key_id = add_key(app_config["database_url"])
    job = client.post("/v1/jobs", headers=bearer(key),
                      json={"endpoint": CHAT, "body": chat_body(IDLE_MODEL, "never runs")})
    assert job.status_code == 202, job.json
    job_id = job.json["id"]
    poll = f"/v1/jobs/{job_id}?wait=3"
    try:
        with ThreadPoolExecutor(2) as pool:
            polls = [pool.submit(client.get, poll, headers=bearer(key)) for _ in range(2)]
            time.sleep(0.5)  # both are waiting
            started = time.monotonic()
            third = client.get(poll, headers=bearer(key))
            assert time.monotonic() - started < 1.0  # refused at once, not after its wait
            assert_rate_limit_error(third, "too_many_concurrent_requests")
            chat = client.post("/v1/chat/completions", headers=bearer(key), json=chat_body(IDLE_MODEL, "hi"))
            assert_rate_limit_error(chat, "too_many_concurrent_requests")
            other, _ = add_key(app_config["database_url"])  # another key is not affected
            assert client.get("/v1/jobs?limit=1", headers=bearer(other)).status_code == 200
            assert [p.result().json["status"] for p in polls] == ["queued", "queued"]
        assert in_use(redis_client, key_id, Kind.STREAMS) == 0  # given back when they answered
        assert client.get(f"/v1/jobs/{job_id}?wait=0.2", headers=bearer(key)).status_code == 200
    finally:
        jobs.request_cancel(redis_client, job_id, TTL)
        liveness.retire(redis_client, IDLE_MODEL, "caps-no-consumer")
        redis_client.delete(keys.batch_queue(IDLE_MODEL))


# --- stored bytes -----------------------------------------------------------------------------------


def jsonl_file(n: int, model: str = SCRIPTED_MODEL, max_tokens: int = 2, text: str = "hi") -> bytes:
    body = chat_body(model, text, max_tokens)
    lines = [{"custom_id": f"r-{i}", "method": "POST", "url": CHAT, "body": body} for i in range(n)]
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def upload(client: Any, key: str, content: bytes) -> Any:
    return client.post("/v1/files", headers=bearer(key), content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")})


def test_uploads_past_a_keys_stored_bytes_are_refused(app_config: dict[str, Any]):
    content = jsonl_file(3)
    app = create_app({**app_config, "key_max_stored_bytes": 2 * len(content) + 10})
    client = app.test_client()
    key, _ = add_key(app_config["database_url"])
    first, second = upload(client, key, content), upload(client, key, content)
    assert first.status_code == second.status_code == 200
    refused = upload(client, key, content)
    assert refused.status_code == 413
    error = refused.json["error"]
    assert (error["code"], error["param"], error["type"]) == ("storage_limit_exceeded", "file",
                                                               "invalid_request_error")
    assert f"storage limit of {2 * len(content) + 10} bytes" in error["message"]
    assert f"({2 * len(content)} bytes are stored" in error["message"]
    other, _ = add_key(app_config["database_url"])
    assert upload(client, other, content).status_code == 200  # each key has its own
    assert client.delete(f"/v1/files/{first.json['id']}", headers=bearer(key)).status_code == 200
    assert upload(client, key, content).status_code == 200  # room again


def test_bytes_of_uploads_being_stored_count(app_config: dict[str, Any], redis_client: Any,
                                             tmp_path: Path) -> None:
    content = jsonl_file(2)
    settings = Settings(**{**app_config, "key_max_stored_bytes": len(content) + 100})
    from api.db import Database

    db = Database(settings)
    db.create_schema()
    store = FileStore(db, settings)
    key_id = f"key_{uuid.uuid4().hex}"
    # Another API process is storing an upload of this key: its bytes are reserved.
    reservation, pending = reserve_bytes(redis_client, key_id, 150, 60)
    assert pending == 150
    refused = store.save_upload(key_id, "in.jsonl", "batch", io.BytesIO(content))
    assert getattr(refused, "status_code", None) == 413
    assert "150 more are being uploaded" in refused.error.message  # type: ignore[union-attr]
    release_bytes(redis_client, key_id, reservation)
    stored = store.save_upload(key_id, "in.jsonl", "batch", io.BytesIO(content))
    assert getattr(stored, "bytes", None) == len(content)
    assert redis_client.zcard(keys.key_pending_bytes(key_id)) == 0  # its own reservation is gone too


# --- batch lines ------------------------------------------------------------------------------------


def wait_for_batch(client: Any, key: str, batch_id: str, statuses: tuple[str, ...],
                   timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}", headers=bearer(key)).json
        if batch["status"] in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch stuck in {batch['status']}: {batch}")


def create_batch(client: Any, key: str, content: bytes) -> str:
    file_id = upload(client, key, content).json["id"]
    created = client.post("/v1/batches", headers=bearer(key), json={
        "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})
    assert created.status_code == 200, created.json
    return str(created.json["id"])


def line_statuses(client: Any, batch_id: str, count: int) -> list[str | None]:
    return [client.hget(keys.job(line_job_id(batch_id, seq)), "status") for seq in range(1, count + 1)]


@pytest.mark.usefixtures("scripted_worker")
def test_batch_dispatch_waits_for_the_keys_lines_in_flight(app_config: dict[str, Any],
                                                           redis_client: Any) -> None:
    app = create_app({**app_config, "key_max_batch_lines_in_flight": 2})
    client = app.test_client()
    key, _ = add_key(app_config["database_url"])
    with coordinating(app):
        batch_id = create_batch(client, key, jsonl_file(8, max_tokens=3, text="[[delay=0.1]] go"))
        batch, most = watch_lines_in_flight(client, key, batch_id, redis_client)
    assert batch["request_counts"] == {"total": 8, "completed": 8, "failed": 0}  # paced, never failed
    assert 1 <= most <= 2  # before the cap, all 8 ran at once


def watch_lines_in_flight(client: Any, key: str, batch_id: str, redis_client: Any) -> tuple[Any, int]:
    """The batch once completed, and the most of its lines queued or running at once."""
    most, done = 0, threading.Event()

    def watch() -> None:  # the lines queued or running, as the worker sees them
        nonlocal most
        while not done.is_set():
            statuses = line_statuses(redis_client, batch_id, 8)
            most = max(most, sum(s in (JobStatus.QUEUED, JobStatus.RUNNING) for s in statuses))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        batch = wait_for_batch(client, key, batch_id, ("completed",))
    finally:
        done.set()
        watcher.join()
    return batch, most


@pytest.fixture
def own_redis_and_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server and a scripted worker of this test's own: no coordinator of the session
    (they drain the usage and batch-line streams of the session's Redis into their own databases)
    takes the entries that finish this test's batch lines."""
    tmp = tmp_path_factory.mktemp("caps-own-redis")
    with redis_server(tmp) as url:
        worker = start_worker(url, tmp, SCRIPTED_MODEL, 60, ENGINE="scripted", MAX_NUM_SEQS="32")
        try:
            yield url
        finally:
            worker.stop()


def test_batch_lines_take_a_per_minute_token_charge_of_their_own(app_config: dict[str, Any],
                                                                 own_redis_and_worker: str) -> None:
    app_config = {**app_config, "redis_url": own_redis_and_worker}
    redis_client = redis.Redis.from_url(own_redis_and_worker, decode_responses=True)
    app = create_app(app_config)
    client = app.test_client()
    small = chat_body(SCRIPTED_MODEL, "hi", 2)
    worst = worst_case_tokens(JobRequest(CHAT, SCRIPTED_MODEL, small), 2048)
    tpm = worst * 5 // 2  # two small lines a minute
    key, _ = add_key(app_config["database_url"], tpm=tpm)
    big = {"custom_id": "big", "method": "POST", "url": CHAT,
           "body": chat_body(SCRIPTED_MODEL, "hi", 2000)}  # more than a whole minute's budget
    content = json.dumps(big).encode() + b"\n" + jsonl_file(3)
    with coordinating(app):
        batch_id = create_batch(client, key, content)
        time.sleep(2.0)
        # The big line failed at once (it never fits); two small lines ran; the third waits, unfailed.
        statuses = line_statuses(redis_client, batch_id, 4)
        assert statuses[0] is None and statuses[3] is None, statuses
        assert statuses[1] is not None and statuses[2] is not None, statuses
        batch = wait_for_batch(client, key, batch_id, ("in_progress",))
        assert batch["request_counts"]["failed"] == 1
        # The key's interactive budget is its own: a chat of the same worst case still fits.
        chat = client.post("/v1/chat/completions", headers=bearer(key), json=small)
        assert chat.status_code == 200, chat.json
        assert int(chat.headers["x-ratelimit-remaining-tokens"]) == tpm - worst
        assert client.post(f"/v1/batches/{batch_id}/cancel", headers=bearer(key)).status_code == 200
        # Its dispatcher looks every OPEN_CHECK_SECONDS; its lines settle behind the session's other work.
        batch = wait_for_batch(client, key, batch_id, ("cancelled",), timeout=120)
        assert line_statuses(redis_client, batch_id, 4)[3] is None  # the waiting line never ran
    assert batch["request_counts"]["completed"] == 2
