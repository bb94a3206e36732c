"""OpenAI's Batch API on real processes: a worker with the scripted engine (test double),
real Redis; one test drives the official ``openai`` SDK against gunicorn."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from api.keys import create_key
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api

pytestmark = pytest.mark.usefixtures("scripted_worker")


def jsonl(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def chat_line(custom_id: str, text: str, max_tokens: int = 3) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": SCRIPTED_MODEL, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": text}]}}


def upload(client, headers, lines: list[dict]) -> str:
    resp = client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(jsonl(lines)), "in.jsonl")})
    assert resp.status_code == 200, resp.json
    return resp.json["id"]


def wait_for(client, headers, batch_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.get("/v1/usage", headers=headers)  # drains finished lines (no background drain in tests)
        batch = client.get(f"/v1/batches/{batch_id}", headers=headers).json
        if batch["status"] in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch stuck in {batch['status']}: {batch}")


def new_key(app) -> str:
    return create_key(app.extensions["inferq"].db, "batch tests").key


@pytest.fixture
def headers(app):
    return {"X-API-Key": new_key(app)}


def test_batch_runs_every_line_once(client, headers):
    lines = [chat_line(f"req-{i}", f"w{i} " * (i + 1)) for i in range(12)]
    lines.append({**chat_line("bad", "x"), "body": {"model": SCRIPTED_MODEL, "messages": []}})
    file_id = upload(client, headers, lines)
    created = client.post("/v1/batches", headers=headers, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
        "metadata": {"project": "x"}})
    assert created.status_code == 200, created.json
    assert created.json["status"] in ("validating", "in_progress")
    batch = wait_for(client, headers, created.json["id"], ("completed",))
    assert batch["request_counts"] == {"total": 13, "completed": 12, "failed": 1}
    out = {o["custom_id"]: o for o in (json.loads(line) for line in client.get(
        f"/v1/files/{batch['output_file_id']}/content", headers=headers).data.splitlines())}
    assert sorted(out) == sorted(f"req-{i}" for i in range(12))  # in the order they finished
    for i in range(12):
        o = out[f"req-{i}"]
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        assert o["response"]["body"]["usage"]["prompt_tokens"] == i + 1
    errors = [json.loads(line) for line in
              client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    sdk_batch = openai.types.Batch.model_validate(batch)  # OpenAI's shape, usage included
    assert sdk_batch.model == SCRIPTED_MODEL
    assert sdk_batch.usage is not None
    assert (sdk_batch.usage.input_tokens, sdk_batch.usage.output_tokens) == (sum(range(1, 13)), 36)
    assert sdk_batch.usage.total_tokens == sum(range(1, 13)) + 36
    assert sdk_batch.usage.input_tokens_details.cached_tokens == 0
    today = client.get("/v1/usage", headers=headers).json["today"]
    assert today["completion_tokens"] == 36  # the batch is metered like any other request


def test_cancelled_batch_keeps_finished_lines(client, headers, monkeypatch):
    import api.batch_runner

    # Past REDIS_CHUNK dispatched lines, a cancel winds them down on a background thread,
    # reading job records a chunk per round trip.
    monkeypatch.setattr(api.batch_runner, "REDIS_CHUNK", 7)
    lines = [chat_line(f"c-{i}", "[[delay=0.2]] go", 10) for i in range(40)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    # The first 16 lines (the batch share of the worker) take 2 s each: cancel once some finished.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        client.get("/v1/usage", headers=headers)  # drains finished lines
        if client.get(f"/v1/batches/{batch_id}", headers=headers).json["request_counts"]["completed"]:
            break
        time.sleep(0.1)
    cancelling = client.post(f"/v1/batches/{batch_id}/cancel", headers=headers).json
    assert cancelling["status"] in ("cancelling", "cancelled")
    seen: list[dict] = []
    deadline = time.monotonic() + 30
    while not seen or seen[-1]["status"] != "cancelled":
        assert time.monotonic() < deadline, seen[-1]
        client.get("/v1/usage", headers=headers)
        seen.append(client.get(f"/v1/batches/{batch_id}", headers=headers).json)
        time.sleep(0.05)
    # Status and files change in one update: a cancelled batch never shows a missing output file.
    assert all(b["output_file_id"] for b in seen if b["status"] == "cancelled")
    batch = seen[-1]
    counts = batch["request_counts"]
    assert 0 < counts["completed"] < 40
    out = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).data.splitlines()
    assert len(out) == counts["completed"]
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert all(e["error"]["code"] == "batch_cancelled" for e in errs)


def test_bad_batch_requests(client, headers, app):
    other = new_key(app)
    file_id = upload(client, headers, [chat_line("a", "x")])
    cases = [
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 404),
        ({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}, 400),
        ({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}, 400),
    ]
    for body, status in cases:
        resp = client.post("/v1/batches", headers=headers, json=body)
        assert resp.status_code == status, (body, resp.json)
        assert set(resp.json["error"]) == {"message", "type", "param", "code"}
    # Another key can neither use the file nor see the batch.
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert client.post("/v1/batches", headers={"X-API-Key": other}, json=body).status_code == 404
    batch_id = client.post("/v1/batches", headers=headers, json=body).json["id"]
    assert client.get(f"/v1/batches/{batch_id}", headers={"X-API-Key": other}).status_code == 404
    listed = client.get("/v1/batches?limit=1", headers=headers).json
    assert listed["data"][0]["id"] == batch_id


def test_openai_sdk_files_and_batches(redis_url, scripted_worker, tmp_path):
    api, base = start_api(redis_url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL,
                          FILES_DIR=str(tmp_path / "f"))
    try:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=TEST_KEY, max_retries=0)
        lines = [chat_line(f"sdk-{i}", "hello there", 4) for i in range(5)]
        uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        deadline = time.monotonic() + 30
        while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.3)
            batch = sdk.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts and batch.output_file_id
        assert batch.request_counts.completed == 5
        assert batch.usage and batch.usage.output_tokens == 20 and batch.model == SCRIPTED_MODEL
        out = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == [f"sdk-{i}" for i in range(5)]
        assert all(o["response"]["body"]["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"
                   for o in out)
    finally:
        api.stop()


def test_batch_past_its_window_expires(client, headers, app):
    lines = [chat_line(f"e-{i}", "[[delay=0.3]] go", 10) for i in range(30)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    wait_for(client, headers, batch_id, ("in_progress",))
    time.sleep(1.0)
    app.extensions["inferq"].batches.store.update(batch_id, expires_at=int(time.time()) - 1)
    batch = client.get(f"/v1/batches/{batch_id}", headers=headers).json
    assert batch["status"] == "expired"  # straight there: no visible cancelling
    assert batch["expired_at"] is not None and batch["cancelling_at"] is None
    counts = batch["request_counts"]
    assert counts["completed"] < 30 and counts["completed"] + counts["failed"] == 30
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert len(errs) == counts["failed"] and all(e["error"]["code"] == "batch_expired" for e in errs)
    assert all(e["response"] is None for e in errs)
    # The lines it cancelled settle later and change nothing.
    time.sleep(1.0)
    client.get("/v1/usage", headers=headers)
    assert client.get(f"/v1/batches/{batch_id}", headers=headers).json["request_counts"] == counts


def test_a_batch_whose_dispatcher_died_is_resumed_with_every_line_once(client, headers, app, redis_client):
    import itertools

    import redis as redis_lib

    from queueing import keys

    services = app.extensions["inferq"]
    runner = services.batches
    real_iter_lines = runner.files.iter_lines

    def dies_after_five(info):  # the API process dies after dispatching five lines
        yield from itertools.islice(real_iter_lines(info), 5)
        raise redis_lib.ConnectionError("process gone")

    runner.files.iter_lines = dies_after_five
    lines = [chat_line(f"r{i}", f"resume {i}") for i in range(12)]
    batch = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json
    deadline = time.monotonic() + 10
    while redis_client.exists(keys.batch_dispatcher(batch["id"])) and time.monotonic() < deadline:
        redis_client.delete(keys.batch_dispatcher(batch["id"]))  # its lease lapses
        time.sleep(0.2)
    assert runner.store.get(batch["id"]).dispatch_done is False
    runner.files.iter_lines = real_iter_lines
    assert runner.resume_orphaned() == 1  # what a live API process does
    assert runner.resume_orphaned() == 0  # it holds the lease now
    done = wait_for(client, headers, batch["id"], ("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=headers).get_data(as_text=True)
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(
        f"r{i}" for i in range(12))


def undispatched_batch(client, headers, app, monkeypatch, lines: list[dict]) -> str:
    """A batch created while its API process dispatches nothing (as if it died right away)."""
    runner = app.extensions["inferq"].batches
    monkeypatch.setattr(runner, "start", lambda *args: None)
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    monkeypatch.undo()
    return batch_id


def test_finished_lines_are_on_disk_before_the_batch_ends(client, headers, app):
    runner = app.extensions["inferq"].batches
    lines = [chat_line(f"fast-{i}", "quick") for i in range(3)]
    lines += [chat_line(f"slow-{i}", "[[delay=0.5]] slow", 20) for i in range(5)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    partial = runner.outputs.partial_path(batch_id, ok=True)
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline
        client.get("/v1/usage", headers=headers)  # drains finished lines
        batch = client.get(f"/v1/batches/{batch_id}", headers=headers).json
        if batch["request_counts"]["completed"] >= 3:
            break
        time.sleep(0.1)
    assert batch["status"] == "in_progress" and batch["output_file_id"] is None
    on_disk = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(on_disk) == batch["request_counts"]["completed"]
    assert {o["custom_id"] for o in on_disk} >= {f"fast-{i}" for i in range(3)}
    client.post(f"/v1/batches/{batch_id}/cancel", headers=headers)
    done = wait_for(client, headers, batch_id, ("cancelled",))
    assert not partial.exists()  # sealed: renamed into place as the output file
    out = client.get(f"/v1/files/{done['output_file_id']}/content", headers=headers).data.splitlines()
    assert [json.loads(line) for line in out][:len(on_disk)] == on_disk


def test_a_finalizer_that_died_is_taken_over_and_its_file_rebuilt(client, headers, app, monkeypatch):
    services = app.extensions["inferq"]
    runner = services.batches
    monkeypatch.setattr(runner, "maybe_finalize", lambda batch_id: None)  # it dies before finalizing
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, [chat_line(f"f{i}", "x") for i in range(6)]),
        "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json["id"]
    deadline = time.monotonic() + 20
    while client.get(f"/v1/batches/{batch_id}", headers=headers).json["request_counts"]["completed"] < 6:
        assert time.monotonic() < deadline
        client.get("/v1/usage", headers=headers)
        time.sleep(0.1)
    monkeypatch.undo()
    runner.store.update(batch_id, status="finalizing", finalizing_at=int(time.time()))
    # It also died between storing a line in SQL and appending it to the file.
    partial = runner.outputs.partial_path(batch_id, ok=True)
    partial.write_text("".join(line + "\n" for line in partial.read_text().splitlines()[:-1]))
    runner.resume_orphaned()
    batch = client.get(f"/v1/batches/{batch_id}", headers=headers).json
    assert batch["status"] == "completed" and batch["error_file_id"] is None
    out = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).data.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in out) == [f"f{i}" for i in range(6)]


def test_a_line_whose_job_record_expired_fails_and_the_batch_ends(client, headers, app, redis_client):
    from api.batch_lines import line_job_id
    from queueing import jobs, keys

    lines = [chat_line(f"x{i}", "hello") for i in range(3)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    job_ids = [line_job_id(batch_id, seq) for seq in (1, 2, 3)]
    deadline = time.monotonic() + 20
    while not all((r := jobs.get(redis_client, j)) is not None and r.status.is_terminal for j in job_ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    redis_client.delete(keys.job(job_ids[1]))  # its record expired before the drain
    batch = wait_for(client, headers, batch_id, ("completed",))
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errs] == [("x1", "result_expired")]


def test_expiry_applies_in_the_list_and_in_the_dispatcher(client, headers, app, monkeypatch):
    services = app.extensions["inferq"]
    runner = services.batches
    lines = [chat_line(f"l{i}", "x") for i in range(4)]
    listed_id = undispatched_batch(client, headers, app, monkeypatch, lines)
    runner.store.update(listed_id, expires_at=int(time.time()) - 1)
    listed = client.get("/v1/batches", headers=headers).json["data"]
    assert [(b["id"], b["status"]) for b in listed] == [(listed_id, "expired")]

    batch_id = undispatched_batch(client, headers, app, monkeypatch, lines)
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


def test_a_batch_cancelled_after_its_dispatcher_died_still_ends(client, headers, app, redis_client):
    import itertools

    import redis as redis_lib

    from queueing import keys

    services = app.extensions["inferq"]
    runner = services.batches
    real_iter_lines = runner.files.iter_lines

    def dies_after_five(info):
        yield from itertools.islice(real_iter_lines(info), 5)
        raise redis_lib.ConnectionError("process gone")

    runner.files.iter_lines = dies_after_five
    lines = [chat_line(f"k{i}", "[[delay=0.1]] go", 5) for i in range(12)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    deadline = time.monotonic() + 10
    while redis_client.exists(keys.batch_dispatcher(batch_id)) and time.monotonic() < deadline:
        redis_client.delete(keys.batch_dispatcher(batch_id))  # its lease lapses
        time.sleep(0.2)
    runner.files.iter_lines = real_iter_lines
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=headers).json["status"] == "cancelling"
    assert runner.resume_orphaned() == 0  # wound down, not dispatched again
    batch = wait_for(client, headers, batch_id, ("cancelled",))
    counts = batch["request_counts"]
    assert counts["completed"] + counts["failed"] == 5  # the five lines it had dispatched
    ids = [json.loads(line)["custom_id"] for file_id in (batch["output_file_id"], batch["error_file_id"])
           if file_id
           for line in client.get(f"/v1/files/{file_id}/content", headers=headers).data.splitlines()]
    assert sorted(ids) == [f"k{i}" for i in range(5)]


def test_paging_after_an_unknown_batch_is_a_400(client, headers):
    resp = client.get("/v1/batches?after=batch_nope", headers=headers)
    assert resp.status_code == 400
    assert resp.json["error"]["param"] == "after" and set(resp.json["error"]) == {
        "message", "type", "param", "code"}


def test_a_batch_whose_key_is_revoked_stops_dispatching_and_is_cancelled(client, headers, app, monkeypatch):
    import api.batch_runner

    runner = app.extensions["inferq"].batches
    looked_up: list[str] = []
    real_lookup = runner.principal_for

    def revoked_after_two_looks(key_id: str):
        looked_up.append(key_id)
        return real_lookup(key_id) if len(looked_up) <= 2 else None  # revoked at the third look

    monkeypatch.setattr(api.batch_runner, "CHECK_EVERY", 5)
    runner.principal_for = revoked_after_two_looks
    lines = [chat_line(f"r-{i}", "[[delay=0.05]] go", 4) for i in range(60)]
    batch = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json
    batch = wait_for(client, headers, batch["id"], ("cancelled",))
    assert len(looked_up) == 3
    counts = batch["request_counts"]
    assert counts["total"] == 60
    assert counts["completed"] + counts["failed"] <= 10  # lines 1-10 went out before the third look
    assert batch["output_file_id"] or batch["error_file_id"]  # what went out is reported


def test_renewing_a_lease_someone_else_took_over_fails_and_its_dispatcher_stops(
        client, headers, app, monkeypatch, redis_client):
    import api.batch_runner
    from api.batch_lease import BatchLease
    from api.batch_lines import line_job_id
    from queueing import jobs, keys

    services = app.extensions["inferq"]
    runner = services.batches
    lines = [chat_line(f"t{i}", "x") for i in range(3)]
    batch_id = undispatched_batch(client, headers, app, monkeypatch, lines)
    key = keys.batch_dispatcher(batch_id)
    old = runner.lease.take(batch_id)
    redis_client.delete(key)  # its lease lapses ...
    new = BatchLease(redis_client).take(batch_id)  # ... and another process takes the batch over
    assert old and new and new != old
    redis_client.expire(key, 5)
    assert runner.lease.renew(batch_id, old) is False
    assert redis_client.get(key) == new and 0 < redis_client.ttl(key) <= 5  # untouched
    assert runner.lease.renew(batch_id, new) is True and redis_client.ttl(key) > 5

    monkeypatch.setattr(api.batch_runner, "RENEW_EVERY", -1.0)  # it renews before its first line
    principal = services.keys.principal_for(runner.store.get(batch_id).key_id)
    runner.dispatch(batch_id, old, principal, principal.may_use)
    assert redis_client.get(key) == new  # neither released nor overwritten
    batch = runner.store.get(batch_id)
    assert (batch.dispatched, batch.dispatch_done, batch.completed + batch.failed) == (0, False, 0)
    assert jobs.get(services.gateway.redis, line_job_id(batch_id, 1)) is None


def test_redis_errors_leave_one_batch_for_the_resumer_and_answer_503(client, headers, app, monkeypatch):
    import redis as redis_lib

    runner = app.extensions["inferq"].batches

    def redis_down(*args, **kwargs):
        raise redis_lib.ConnectionError("Redis down")

    monkeypatch.setattr(runner.lease, "take", redis_down)
    file_id = upload(client, headers, [chat_line(f"u{i}", "x") for i in range(3)])
    created = client.post("/v1/batches", headers=headers, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200 and created.json["status"] == "validating"  # stored: no retry
    batch_id = created.json["id"]
    runner.store.update(batch_id, expires_at=int(time.time()) - 1)  # due, and expiring needs Redis
    for resp in (client.get(f"/v1/batches/{batch_id}", headers=headers),
                 client.get("/v1/batches", headers=headers),
                 client.post(f"/v1/batches/{batch_id}/cancel", headers=headers)):
        assert resp.status_code == 503, resp.json
        assert resp.json["error"]["code"] == "queue_unavailable"
        assert set(resp.json["error"]) == {"message", "type", "param", "code"}
    monkeypatch.undo()
    runner.store.update(batch_id, expires_at=int(time.time()) + 3600)
    assert runner.resume_orphaned() == 1  # Redis is back: a resumer dispatches it
    batch = wait_for(client, headers, batch_id, ("completed", "failed"))
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    assert [b["id"] for b in client.get("/v1/batches", headers=headers).json["data"]] == [batch_id]


def test_winding_down_a_dead_dispatch_looks_up_only_lines_past_its_saved_count(client, headers, app,
                                                                              monkeypatch):
    import api.batch_runner
    from api.batch_lines import line_job_id

    runner = app.extensions["inferq"].batches
    lines = [chat_line(f"s{i}", "x") for i in range(9)]
    batch_id = undispatched_batch(client, headers, app, monkeypatch, lines)
    runner.store.update(batch_id, dispatched=3)
    looked_up: list[str] = []

    def get(client, job_id):
        looked_up.append(job_id)
        return object() if job_id == line_job_id(batch_id, 5) else None  # the dead dispatcher sent 4, 5

    monkeypatch.setattr(api.batch_runner.jobs, "get", get)
    monkeypatch.setattr(api.batch_runner, "SAVE_EVERY", 4)
    assert runner._last_dispatched(runner.store.get(batch_id)) == 5
    assert looked_up == [line_job_id(batch_id, seq) for seq in (4, 5, 6, 7)]


def test_recording_lines_updates_each_batch_row_once(database):
    from sqlalchemy import event

    from api.batch_store import BatchStore, LineResult
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

    import api.batch_outputs

    outputs = app.extensions["inferq"].batches.outputs
    outputs.prepare("batch_locks")
    path = outputs.partial_path("batch_locks", ok=True)
    sealer = os.open(path, os.O_RDWR)  # a seal of this process holds the file (another descriptor)
    fcntl.flock(sealer, fcntl.LOCK_EX)
    monkeypatch.setattr(api.batch_outputs, "LOCK_TIMEOUT", 0.2)
    with pytest.raises(api.batch_outputs.LockTimeout, match="stayed locked"):
        outputs.append("batch_locks", True, ['{"late":1}'])
    monkeypatch.setattr(api.batch_outputs, "LOCK_TIMEOUT", 30.0)
    threading.Timer(0.3, os.close, args=(sealer,)).start()  # the seal ends
    assert outputs.append("batch_locks", True, ['{"a":1}']) is True
    assert path.read_text() == '{"a":1}\n'
