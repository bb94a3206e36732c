"""OpenAI's Batch API on real processes: a worker with the scripted engine (test double),
real Redis; one test drives the official ``openai`` SDK against gunicorn."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api
from tests.test_metering import add_key

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


@pytest.fixture
def headers(app_config):
    key, _ = add_key(app_config["database_url"])
    return {"X-API-Key": key}


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
    out = [json.loads(line) for line in
           client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).data.splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(12)]
    for i, o in enumerate(out):
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        assert o["response"]["body"]["usage"]["prompt_tokens"] == i + 1
    errors = [json.loads(line) for line in
              client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert batch["usage"]["completion_tokens"] == 36
    today = client.get("/v1/usage", headers=headers).json["today"]
    assert today["completion_tokens"] == 36  # the batch is metered like any other request


def test_cancelled_batch_keeps_finished_lines(client, headers):
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
    batch = wait_for(client, headers, batch_id, ("cancelled",))
    counts = batch["request_counts"]
    assert 0 < counts["completed"] < 40
    out = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).data.splitlines()
    assert len(out) == counts["completed"]
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert all(e["error"]["code"] == "batch_cancelled" for e in errs)


def test_bad_batch_requests(client, headers, app_config):
    other, _ = add_key(app_config["database_url"])
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
        assert batch.status == "completed"
        assert batch.request_counts.completed == 5
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
    batch = wait_for(client, headers, batch_id, ("expired",))
    assert batch["expired_at"] is not None and batch["request_counts"]["completed"] < 30
    errs = [json.loads(line) for line in
            client.get(f"/v1/files/{batch['error_file_id']}/content", headers=headers).data.splitlines()]
    assert errs and all(e["error"]["code"] == "batch_expired" for e in errs)


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
    assert runner.resume_orphaned(services.keys.principal_for) == 1  # what a live API process does
    assert runner.resume_orphaned(services.keys.principal_for) == 0  # it holds the lease now
    done = wait_for(client, headers, batch["id"], ("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=headers).get_data(as_text=True)
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(
        f"r{i}" for i in range(12))
