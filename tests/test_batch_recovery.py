"""Batches that survive their processes: a dispatcher or finalizer that died, a lapsed lease,
Redis errors, expired job records, revoked keys, and the SQL and file bookkeeping behind
them. Real Redis and a worker with the scripted engine (test double)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from api.batches.status import BatchStatus
from tests.conftest import coordinating
from tests.test_batches import chat_line, new_key, upload, wait_for

# No coordinator runs unless a test starts one: the tests call a coordinator's pass over the
# batches (``tend``) by hand, or run the collection loops alone (``collecting``).
pytestmark = pytest.mark.usefixtures("scripted_worker")


@pytest.fixture
def headers(app):
    return {"X-API-Key": new_key(app)}


def undispatched_batch(client, headers, lines: list[dict]) -> str:
    """A batch nobody dispatched: created while no coordinator runs (the API only stores it)."""
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    assert client.get(f"/v1/batches/{batch_id}", headers=headers).json["status"] == "validating"
    return batch_id


@pytest.fixture
def collecting(app) -> Iterator[None]:
    """A coordinator's usage ledger and batch-line collection on threads, without its batch loop:
    the test's hand calls of ``tend()`` are the passes over the batches."""
    services = app.extensions["inferq"]
    stop = threading.Event()
    threads = [threading.Thread(target=loop, args=(stop,), daemon=True)
               for loop in (services.ledger.run_forever, services.batches.collector.run_forever)]
    for thread in threads:
        thread.start()
    yield
    stop.set()
    for thread in threads:
        thread.join(10)


def dispatch_dying_after_five(runner, batch_id: str, redis_client) -> None:
    """A coordinator's pass starts the batch's dispatch, which dies after five lines (its process
    is gone); its lease lapses."""
    import itertools

    import redis as redis_lib

    from queueing import keys

    real_iter_lines = runner.files.iter_lines
    died = threading.Event()

    def dies_after_five(info):
        yield from itertools.islice(real_iter_lines(info), 5)
        died.set()
        raise redis_lib.ConnectionError("process gone")

    runner.files.iter_lines = dies_after_five
    try:
        assert runner.tend() == 1
        assert died.wait(10)
    finally:
        runner.files.iter_lines = real_iter_lines
    time.sleep(0.2)  # the dead dispatch's thread ends
    assert redis_client.delete(keys.batch_dispatcher(batch_id)) == 1  # its lease lapses


def test_a_batch_whose_dispatcher_died_is_resumed_with_every_line_once(client, headers, app, redis_client,
                                                                       collecting):
    runner = app.extensions["inferq"].batches
    lines = [chat_line(f"r{i}", f"resume {i}") for i in range(12)]
    batch = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json
    dispatch_dying_after_five(runner, batch["id"], redis_client)
    assert runner.store.get(batch["id"]).dispatch_done is False
    assert runner.tend() == 1  # what a live coordinator's next pass does
    assert runner.tend() == 0  # it holds the lease now
    done = wait_for(client, headers, batch["id"], ("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=headers).get_data(as_text=True)
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(
        f"r{i}" for i in range(12))


def test_the_coordinators_batch_loop_takes_over_an_orphaned_batch(app_config, redis_client):
    """No hand call of tend: the batch loop of a coordinator started afterwards finds a batch whose
    dispatcher died (with no wake-up pending: its periodic pass) and runs every line once. The
    app itself starts no background thread."""
    from api import create_app
    from queueing import keys

    before = set(threading.enumerate())
    app = create_app(app_config)
    assert {t.name for t in set(threading.enumerate()) - before} == set()  # gunicorn workers only serve
    client = app.test_client()
    headers = {"X-API-Key": new_key(app)}
    runner = app.extensions["inferq"].batches
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, [chat_line(f"o{i}", "x") for i in range(12)]),
        "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json["id"]
    dispatch_dying_after_five(runner, batch_id, redis_client)
    redis_client.delete(keys.BATCH_WAKE)  # no wake-up: only the periodic pass can find it
    started = []
    real_tend = runner.tend
    runner.tend = lambda: started.append(real_tend()) or started[-1]
    try:
        with coordinating(app, interval=0.3):
            done = wait_for(client, headers, batch_id, ("completed", "failed"))
    finally:
        del runner.tend
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=headers).get_data(as_text=True)
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(
        f"o{i}" for i in range(12))
    assert started.count(1) == 1  # the loop resumed it once: the lease keeps the next passes off


def test_a_finalizer_that_died_is_taken_over_and_its_file_rebuilt(client, headers, app, monkeypatch,
                                                                    collecting):
    services = app.extensions["inferq"]
    runner = services.batches
    monkeypatch.setattr(runner.collector, "maybe_finalize", lambda batch_id: None)  # dies before finalizing
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, [chat_line(f"f{i}", "x") for i in range(6)]),
        "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json["id"]
    assert runner.tend() == 1  # a coordinator's pass dispatches it
    deadline = time.monotonic() + 20
    while client.get(f"/v1/batches/{batch_id}", headers=headers).json["request_counts"]["completed"] < 6:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    monkeypatch.undo()
    assert runner.store.transition(batch_id, BatchStatus.FINALIZING)
    # It also died between storing a line in SQL and appending it to the file.
    partial = runner.outputs.partial_path(batch_id, ok=True)
    partial.write_text("".join(line + "\n" for line in partial.read_text().splitlines()[:-1]))
    assert runner.tend() == 0  # finalizes it: nothing to dispatch
    batch = client.get(f"/v1/batches/{batch_id}", headers=headers).json
    assert batch["status"] == "completed" and batch["error_file_id"] is None
    out = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).data.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in out) == [f"f{i}" for i in range(6)]


def test_a_line_whose_job_record_expired_fails_and_the_batch_ends(client, headers, app, redis_client):
    from api.batches.lines import line_job_id
    from queueing import jobs, keys

    lines = [chat_line(f"x{i}", "hello") for i in range(3)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    assert app.extensions["inferq"].batches.tend() == 1  # dispatched; nobody collects yet
    job_ids = [line_job_id(batch_id, seq) for seq in (1, 2, 3)]
    deadline = time.monotonic() + 20
    while not all((r := jobs.get(redis_client, j)) is not None and r.status.is_terminal for j in job_ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    redis_client.delete(keys.job(job_ids[1]))  # its record expired before the collection
    with coordinating(app):
        batch = wait_for(client, headers, batch_id, ("completed",))
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errs] == [("x1", "result_expired")]


def test_a_batch_cancelled_after_its_dispatcher_died_still_ends(client, headers, app, redis_client,
                                                                collecting):
    runner = app.extensions["inferq"].batches
    lines = [chat_line(f"k{i}", "[[delay=0.1]] go", 5) for i in range(12)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    dispatch_dying_after_five(runner, batch_id, redis_client)
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=headers).json["status"] == "cancelling"
    assert runner.tend() == 0  # wound down, not dispatched again
    batch = wait_for(client, headers, batch_id, ("cancelled",))
    counts = batch["request_counts"]
    assert counts["completed"] + counts["failed"] == 5  # the five lines it had dispatched
    ids = [json.loads(line)["custom_id"] for file_id in (batch["output_file_id"], batch["error_file_id"])
           if file_id
           for line in client.get(f"/v1/files/{file_id}/content", headers=headers).data.splitlines()]
    assert sorted(ids) == [f"k{i}" for i in range(5)]


def test_a_batch_whose_key_is_revoked_stops_dispatching_and_is_cancelled(client, headers, app, monkeypatch,
                                                                         coordinator):
    import api.batches.runner

    runner = app.extensions["inferq"].batches
    looked_up: list[str] = []
    real_lookup = runner.principal_for

    def revoked_after_two_looks(key_id: str):
        looked_up.append(key_id)
        return real_lookup(key_id) if len(looked_up) <= 3 else None  # revoked at the fourth look

    monkeypatch.setattr(api.batches.runner, "CHECK_EVERY", 5)
    runner.principal_for = revoked_after_two_looks
    lines = [chat_line(f"r-{i}", "[[delay=0.05]] go", 4) for i in range(60)]
    batch = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json
    batch = wait_for(client, headers, batch["id"], ("cancelled",))
    assert len(looked_up) == 4  # the coordinator's, to dispatch it, then the dispatcher's every 5 lines
    counts = batch["request_counts"]
    assert counts["total"] == 60
    assert counts["completed"] + counts["failed"] <= 10  # lines 1-10 went out before the fourth look
    assert batch["output_file_id"] or batch["error_file_id"]  # what went out is reported


def test_expiry_applies_in_the_coordinator_and_in_the_dispatcher(client, headers, app):
    services = app.extensions["inferq"]
    runner = services.batches
    lines = [chat_line(f"l{i}", "x") for i in range(4)]
    listed_id = undispatched_batch(client, headers, lines)
    runner.store.update(listed_id, expires_at=int(time.time()) - 1)
    assert client.get(f"/v1/batches/{listed_id}", headers=headers).json["status"] == "validating"  # reading
    assert runner.tend() == 0  # does not expire it: a coordinator's pass does, instead of dispatching it
    listed = client.get("/v1/batches", headers=headers).json["data"]
    assert [(b["id"], b["status"]) for b in listed] == [(listed_id, "expired")]

    batch_id = undispatched_batch(client, headers, lines)
    runner.store.update(batch_id, expires_at=int(time.time()) - 1)
    batch = runner.store.get(batch_id)
    principal = services.keys.principal_for(batch.key_id)
    runner.dispatch(batch_id, runner.lease.take(batch_id), principal, principal.may_use)
    ended = runner.store.get(batch_id)
    assert (ended.status, ended.failed, ended.completed) == ("expired", 4, 0)
    from queueing import jobs

    assert all(jobs.get(services.gateway.redis, f"{batch_id}-{seq}") is None for seq in range(1, 5))
    errs = client.get(f"/v1/files/{ended.error_file_id}/content", headers=headers).data.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in errs) == [f"l{i}" for i in range(4)]


def test_renewing_a_lease_someone_else_took_over_fails_and_its_dispatcher_stops(
        client, headers, app, monkeypatch, redis_client):
    import api.batches.runner
    from api.batches.lease import BatchLease
    from api.batches.lines import line_job_id
    from queueing import jobs, keys

    services = app.extensions["inferq"]
    runner = services.batches
    lines = [chat_line(f"t{i}", "x") for i in range(3)]
    batch_id = undispatched_batch(client, headers, lines)
    key = keys.batch_dispatcher(batch_id)
    old = runner.lease.take(batch_id)
    redis_client.delete(key)  # its lease lapses ...
    new = BatchLease(redis_client).take(batch_id)  # ... and another process takes the batch over
    assert old and new and new != old
    redis_client.expire(key, 5)
    assert runner.lease.renew(batch_id, old) is False
    assert redis_client.get(key) == new and 0 < redis_client.ttl(key) <= 5  # untouched
    assert runner.lease.renew(batch_id, new) is True and redis_client.ttl(key) > 5

    monkeypatch.setattr(api.batches.runner, "RENEW_EVERY", -1.0)  # it renews before its first line
    principal = services.keys.principal_for(runner.store.get(batch_id).key_id)
    runner.dispatch(batch_id, old, principal, principal.may_use)
    assert redis_client.get(key) == new  # neither released nor overwritten
    batch = runner.store.get(batch_id)
    assert (batch.dispatched, batch.dispatch_done, batch.completed + batch.failed) == (0, False, 0)
    assert jobs.get(services.gateway.redis, line_job_id(batch_id, 1)) is None


def test_redis_errors_waking_a_coordinator_leave_each_batch_to_its_next_pass(
        client, headers, app, monkeypatch, redis_client, collecting):
    import redis as redis_lib

    from queueing import keys

    runner = app.extensions["inferq"].batches

    def redis_down(*args, **kwargs):
        raise redis_lib.ConnectionError("Redis down")

    file_id = upload(client, headers, [chat_line(f"u{i}", "x") for i in range(3)])
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    monkeypatch.setattr(runner.gateway.redis, "pipeline", redis_down)  # the wake-up cannot be sent
    created = client.post("/v1/batches", headers=headers, json=body)
    assert created.status_code == 200 and created.json["status"] == "validating"  # stored: no retry
    batch_id = created.json["id"]
    cancelled_id = client.post("/v1/batches", headers=headers, json=body).json["id"]
    # Reading and cancelling a batch need no Redis: the coordinator does what needs it.
    assert client.get(f"/v1/batches/{batch_id}", headers=headers).json["status"] == "validating"
    cancelling = client.post(f"/v1/batches/{cancelled_id}/cancel", headers=headers)
    assert cancelling.status_code == 200 and cancelling.json["status"] == "cancelling", cancelling.json
    listed = client.get("/v1/batches", headers=headers)
    assert listed.status_code == 200
    # (Newest first; two batches of the same second are ordered by id.)
    assert {b["id"]: b["status"] for b in listed.json["data"]} == {cancelled_id: "cancelling",
                                                                    batch_id: "validating"}
    monkeypatch.undo()
    assert not {batch_id, cancelled_id} & set(redis_client.lrange(keys.BATCH_WAKE, 0, -1))  # nobody was woken
    assert runner.tend() == 1  # Redis is back: a coordinator's pass dispatches one, winds the other down
    batch = wait_for(client, headers, batch_id, ("completed", "failed"))
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    cancelled = wait_for(client, headers, cancelled_id, ("cancelled",))
    assert cancelled["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    listed = client.get("/v1/batches", headers=headers).json["data"]
    assert sorted(b["id"] for b in listed) == sorted([cancelled_id, batch_id])  # no retry made another


def test_winding_down_a_dead_dispatch_looks_up_only_lines_past_its_saved_count(client, headers, app,
                                                                              monkeypatch):
    import api.batches.runner
    from api.batches.lines import line_job_id

    runner = app.extensions["inferq"].batches
    lines = [chat_line(f"s{i}", "x") for i in range(9)]
    batch_id = undispatched_batch(client, headers, lines)
    runner.store.update(batch_id, dispatched=3)
    looked_up: list[str] = []

    def get(client, job_id):
        looked_up.append(job_id)
        return object() if job_id == line_job_id(batch_id, 5) else None  # the dead dispatcher sent 4, 5

    monkeypatch.setattr(api.batches.runner.jobs, "get", get)
    monkeypatch.setattr(api.batches.runner, "SAVE_EVERY", 4)
    assert runner._last_dispatched(runner.store.get(batch_id)) == 5
    assert looked_up == [line_job_id(batch_id, seq) for seq in (4, 5, 6, 7)]


def test_recording_lines_updates_each_batch_row_once(database):
    from sqlalchemy import event

    from api.batches.store import BatchStore, LineResult
    from api.db import Batch

    store = BatchStore(database)
    for batch_id in ("batch_a", "batch_b"):
        store.add(Batch(id=batch_id, key_id="k", input_file_id="file-x", endpoint="/v1/chat/completions",
                        completion_window="24h", status="in_progress", total=3, dispatched=3,
                        dispatch_done=True, completed=0, failed=0, prompt_tokens=0, completion_tokens=0,
                        created_at=0, expires_at=2**31 - 1))
    statements: list[str] = []
    event.listen(database.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: statements.append(statement))
    first = LineResult("batch_a", "a1", 1, True, "{}", 5, 2)
    stored = store.record([first, LineResult("batch_a", "a2", 2, False, "{}"),
                           LineResult("batch_a", "a3", 3, True, "{}", 1, 1),
                           LineResult("batch_b", "b1", 1, True, "{}", 4, 4), first])
    assert [r.custom_id for r in stored] == ["a1", "a2", "a3", "b1"]  # the repeat counts once
    assert sum(s.lstrip().upper().startswith("UPDATE BATCHES") for s in statements) == 2
    assert store.record([first]) == []
    a, b = store.get("batch_a"), store.get("batch_b")
    assert a is not None and b is not None
    assert (a.completed, a.failed, a.prompt_tokens, a.completion_tokens) == (2, 1, 6, 3)
    assert (b.completed, b.failed, b.prompt_tokens, b.completion_tokens) == (1, 0, 4, 4)


def test_batch_file_locks_are_waited_for_without_blocking_and_time_out(app, monkeypatch):
    import fcntl
    import os
    import threading

    import api.batches.outputs

    outputs = app.extensions["inferq"].batches.outputs
    outputs.prepare("batch_locks")
    path = outputs.partial_path("batch_locks", ok=True)
    sealer = os.open(path, os.O_RDWR)  # a seal of this process holds the file (another descriptor)
    fcntl.flock(sealer, fcntl.LOCK_EX)
    monkeypatch.setattr(api.batches.outputs, "LOCK_TIMEOUT", 0.2)
    with pytest.raises(api.batches.outputs.LockTimeout, match="stayed locked"):
        outputs.append("batch_locks", True, ['{"late":1}'])
    monkeypatch.setattr(api.batches.outputs, "LOCK_TIMEOUT", 30.0)
    threading.Timer(0.3, os.close, args=(sealer,)).start()  # the seal ends
    assert outputs.append("batch_locks", True, ['{"a":1}']) is True
    assert path.read_text() == '{"a":1}\n'
