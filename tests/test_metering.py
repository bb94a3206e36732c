"""Exact token metering: reservations, settlement, the SQL ledger and /v1/usage.

Real Redis, a real worker process with the scripted engine (test double), the
Flask app in-process; the concurrency test fires at two gunicorn API processes.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api.generation.job_request import worst_case_tokens
from queueing import keys, metering
from queueing.jobs import CHAT, JobRequest
from tests.conftest import SCRIPTED_MODEL, add_key
from tests.sse_client import chunks, frames
from tests.test_batches import chat_line, upload, wait_for

pytestmark = pytest.mark.usefixtures("scripted_worker")


def chat(text: str, **extra):
    return {"model": SCRIPTED_MODEL, "messages": [{"role": "user", "content": text}], **extra}


def test_usage_equals_the_sum_of_returned_usage(client, app_config, coordinator):
    """Buffered, streamed, /v1/jobs and /v1/batches usage all land in /v1/usage, exactly
    (a coordinator dispatches and collects the batch)."""
    key, key_id = add_key(app_config["database_url"])
    headers = {"Authorization": f"Bearer {key}"}
    returned = []
    r = client.post("/v1/chat/completions", headers=headers, json=chat("one two", max_tokens=3))
    returned.append(r.json["usage"])
    body = client.post("/v1/chat/completions", headers=headers,
                       json=chat("a b c d", max_tokens=5, stream=True,
                                 stream_options={"include_usage": True})).get_data(as_text=True)
    returned.append(chunks(body)[-1]["usage"])
    r = client.post("/v1/completions", headers=headers,
                    json={"model": SCRIPTED_MODEL, "prompt": "x y z", "max_tokens": 4})
    returned.append(r.json["usage"])
    job = client.post("/v1/jobs", headers=headers, json={
        "endpoint": "/v1/chat/completions", "body": chat("p q r s t", max_tokens=6)}).json
    done = client.get(f"/v1/jobs/{job['id']}?wait=10", headers=headers).json
    assert done["status"] == "succeeded"
    returned.append(done["response"]["usage"])
    batch_lines = [chat_line(f"line-{i}", "w " * (i + 1), max_tokens=i + 1) for i in range(3)]
    batch = client.post("/v1/batches", headers=headers, json={
        "input_file_id": upload(client, headers, batch_lines), "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json
    batch = wait_for(client, headers, batch["id"], ("completed",))
    output = client.get(f"/v1/files/{batch['output_file_id']}/content", headers=headers).get_data(
        as_text=True)
    returned += [json.loads(line)["response"]["body"]["usage"] for line in output.splitlines()]

    usage = client.get("/v1/usage", headers=headers).json
    today = usage["today"]
    assert usage["key"]["id"] == key_id
    assert today["requests"] == len(returned) == 7
    assert today["prompt_tokens"] == sum(u["prompt_tokens"] for u in returned) == 2 + 4 + 3 + 5 + (1 + 2 + 3)
    assert today["completion_tokens"] == sum(u["completion_tokens"] for u in returned) == 3 + 5 + 4 + 6 + 6
    assert today["total_tokens"] == sum(u["total_tokens"] for u in returned)
    assert [row["model"] for row in usage["data"]] == [SCRIPTED_MODEL]
    assert usage["daily_quota"]["limit"] is None


def test_quota_reserves_then_settles_to_exact_usage(client, app_config, redis_client):
    key, key_id = add_key(app_config["database_url"], daily_tokens=10_000)
    headers = {"X-API-Key": key}
    r = client.post("/v1/chat/completions", headers=headers, json=chat("hello world", max_tokens=7))
    assert r.status_code == 200
    counter = redis_client.hgetall(keys.quota(key_id, metering.quota_day()))
    assert counter == {"used": str(2 + 7), "reserved": "0"}
    quota = client.get("/v1/usage", headers=headers).json["daily_quota"]
    assert quota == {"limit": 10_000, "used": 9, "reserved": 0, "remaining": 10_000 - 9}


def test_request_over_quota_is_429_with_retry_after(client, app_config):
    key, _ = add_key(app_config["database_url"], daily_tokens=50)
    resp = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=chat("hi", max_tokens=500))
    assert resp.status_code == 429
    assert resp.json["error"]["code"] == "quota_exceeded"
    assert resp.json["error"]["type"] == "insufficient_quota"
    assert 0 < int(resp.headers["Retry-After"]) <= 86400


def test_cancelled_job_settles_what_was_generated(client, app_config, redis_client):
    key, key_id = add_key(app_config["database_url"], daily_tokens=100_000)
    headers = {"X-API-Key": key}
    resp = client.post("/v1/chat/completions", headers=headers, buffered=False,
                       json=chat("[[delay=0.2]]", max_tokens=100, stream=True))
    next(iter(resp.response))
    time.sleep(0.5)
    resp.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        counter = redis_client.hgetall(keys.quota(key_id, metering.quota_day()))
        if counter.get("reserved") == "0":
            break
        time.sleep(0.1)
    used = int(counter["used"])
    assert counter["reserved"] == "0"
    assert 1 <= used < 1 + 100  # the prompt's one word and some, not all, of the 100 tokens
    today = client.get("/v1/usage", headers=headers).json["today"]
    assert today["total_tokens"] == used


def test_counters_rebuild_from_sql_after_redis_loses_them(client, app_config, redis_client, scripted_worker):
    key, key_id = add_key(app_config["database_url"], daily_tokens=1_000)
    headers = {"X-API-Key": key}
    for _ in range(2):
        assert client.post("/v1/chat/completions", headers=headers,
                           json=chat("p q r", max_tokens=10)).status_code == 200
    client.get("/v1/usage", headers=headers)  # drains the ledger into SQL
    redis_client.flushdb()
    # The worker's heartbeat comes back within a second.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not redis_client.zcard(keys.LIVE_WORKERS):
        time.sleep(0.1)
    resp = client.post("/v1/chat/completions", headers=headers, json=chat("s", max_tokens=4))
    assert resp.status_code == 200
    counter = redis_client.hgetall(keys.quota(key_id, metering.quota_day()))
    assert counter == {"used": str(2 * 13 + 5), "reserved": "0"}
    assert client.get("/v1/usage", headers=headers).json["today"]["total_tokens"] == 2 * 13 + 5


def test_fifty_concurrent_requests_never_cross_the_quota(two_apis, redis_client):
    tmp, bases = two_apis
    quota = 300
    key, key_id = add_key(f"sqlite:///{tmp / 'inferq.db'}", daily_tokens=quota)

    def one(i: int) -> tuple[int, int]:
        body = chat(f"w{i}", max_tokens=20, stream=True, stream_options={"include_usage": True})
        resp = httpx.post(f"{bases[i % 2]}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
        if resp.status_code != 200:
            assert resp.json()["error"]["code"] == "quota_exceeded"
            return resp.status_code, 0
        assert frames(resp.text)[-1] == "[DONE]"
        return 200, chunks(resp.text)[-1]["usage"]["total_tokens"]

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    served = sum(tokens for _, tokens in results)
    counter = redis_client.hgetall(keys.quota(key_id, metering.quota_day()))
    assert counter["reserved"] == "0"
    assert int(counter["used"]) == served <= quota
    assert any(status == 429 for status, _ in results)
    # At least as many as fit side by side at their worst case (the API's prompt bound
    # plus max_tokens); more when early ones settle while later ones still arrive.
    body = chat("w10", max_tokens=20, stream=True, stream_options={"include_usage": True})
    worst = worst_case_tokens(JobRequest(CHAT, SCRIPTED_MODEL, body), 2048)
    assert sum(status == 200 for status, _ in results) >= quota // worst
    usage = httpx.get(f"{bases[0]}/v1/usage", headers={"X-API-Key": key}).json()
    assert usage["today"]["total_tokens"] == served
    print(json.dumps({"fired": 50, "quota": quota, "served_tokens": served,
                      "accepted": sum(s == 200 for s, _ in results)}))
