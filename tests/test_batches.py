"""OpenAI's Batch API on real processes: a worker with the scripted engine (test double),
real Redis; one test drives the official ``openai`` SDK against gunicorn."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from api.accounts.keys import create_key
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api, start_coordinator

pytestmark = pytest.mark.usefixtures("scripted_worker", "coordinator")

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
    import api.batches.runner

    # The cancel only marks it cancelling: a coordinator (or its dispatcher, while still at it)
    # winds its lines down, reading job records REDIS_CHUNK per round trip.
    monkeypatch.setattr(api.batches.runner, "REDIS_CHUNK", 7)
    lines = [chat_line(f"c-{i}", "[[delay=0.2]] go", 10) for i in range(40)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    # The first 16 lines (the batch share of the worker) take 2 s each: cancel once some finished.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.get(f"/v1/batches/{batch_id}", headers=headers).json["request_counts"]["completed"]:
            break
        time.sleep(0.1)
    cancelling = client.post(f"/v1/batches/{batch_id}/cancel", headers=headers).json
    assert cancelling["status"] in ("cancelling", "cancelled")
    seen: list[dict] = []
    deadline = time.monotonic() + 30
    while not seen or seen[-1]["status"] != "cancelled":
        assert time.monotonic() < deadline, seen[-1]
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


def test_openai_sdk_files_and_batches(redis_url, scripted_worker, tmp_path, coordinator):
    coordinator.stop()  # its consumer groups would take this stack's lines into another database
    api, base = start_api(redis_url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL,
                          FILES_DIR=str(tmp_path / "f"))
    coordinator = start_coordinator(redis_url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL,
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
        coordinator.stop()
        api.stop()


def test_batch_past_its_window_expires(client, headers, app):
    lines = [chat_line(f"e-{i}", "[[delay=0.3]] go", 10) for i in range(30)]
    batch_id = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json["id"]
    wait_for(client, headers, batch_id, ("in_progress",))
    time.sleep(1.0)
    app.extensions["inferq"].batches.store.update(batch_id, expires_at=int(time.time()) - 1)
    seen = []  # the coordinator's next pass (or the dispatcher, if still at it) expires it
    deadline = time.monotonic() + 10
    while not seen or seen[-1]["status"] != "expired":
        assert time.monotonic() < deadline, seen[-1]
        seen.append(client.get(f"/v1/batches/{batch_id}", headers=headers).json)
        time.sleep(0.05)
    assert {b["status"] for b in seen} <= {"in_progress", "expired"}  # straight there: no visible cancelling
    batch = seen[-1]
    assert batch["expired_at"] is not None and batch["cancelling_at"] is None
    counts = batch["request_counts"]
    assert counts["completed"] < 30 and counts["completed"] + counts["failed"] == 30
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert len(errs) == counts["failed"] and all(e["error"]["code"] == "batch_expired" for e in errs)
    assert all(e["response"] is None for e in errs)
    # The lines it cancelled settle later and change nothing.
    time.sleep(1.0)  # the coordinator collects them meanwhile
    assert client.get(f"/v1/batches/{batch_id}", headers=headers).json["request_counts"] == counts


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


def test_paging_after_an_unknown_batch_is_a_400(client, headers):
    resp = client.get("/v1/batches?after=batch_nope", headers=headers)
    assert resp.status_code == 400
    assert resp.json["error"]["param"] == "after" and set(resp.json["error"]) == {
        "message", "type", "param", "code"}
