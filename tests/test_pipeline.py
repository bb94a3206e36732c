"""The full path API -> Celery/Redis -> worker -> pub/sub -> SSE, on real processes.

The worker is a real ``inferq worker`` process with the scripted engine (a
test double that emits ``tok0 tok1 ...``); Redis is the session's own server.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import api.generation.gateway
from queueing import jobs, keys
from queueing.jobs import JobRecord, JobRequest, JobStatus
from tests.conftest import SCRIPTED_MODEL
from tests.sse_client import chunks, content, frames
from workers.runner import JobRunner
from workers.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.usefixtures("scripted_worker")


def chat(text: str, **extra):
    return {"model": SCRIPTED_MODEL, "messages": [{"role": "user", "content": text}], **extra}


def test_buffered_chat_has_text_and_exact_usage(client, auth):
    resp = client.post("/v1/chat/completions", json=chat("one two three", max_tokens=5), headers=auth)
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert body["id"].startswith("chatcmpl-")


def test_stream_order_and_exactly_one_end(client, auth):
    resp = client.post("/v1/chat/completions", headers=auth,
                       json=chat("a b [[stop]]", max_tokens=6, stream=True,
                                 stream_options={"include_usage": True}))
    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    body = resp.get_data(as_text=True)
    raw = frames(body)
    assert raw[-1] == "[DONE]" and raw.count("[DONE]") == 1
    parsed = chunks(body)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content(body) == "tok0 tok1 tok2 tok3 tok4 tok5"
    finishes = [c["choices"][0]["finish_reason"] for c in parsed if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert all(c.get("usage") is None for c in parsed[:-1])


def test_stream_without_usage_option_has_no_usage_field(client, auth):
    body = client.post("/v1/chat/completions", headers=auth,
                       json=chat("x", max_tokens=2, stream=True)).get_data(as_text=True)
    assert all("usage" not in c for c in chunks(body))
    assert frames(body)[-1] == "[DONE]"


def test_immediate_tokens_are_not_lost(client, auth):
    # No delay at all: the first token is published the moment the worker starts.
    for _ in range(5):
        body = client.post("/v1/chat/completions", headers=auth,
                           json=chat("go", max_tokens=200, stream=True)).get_data(as_text=True)
        assert content(body) == " ".join(f"tok{i}" for i in range(200))


def test_tokens_published_inside_the_enqueue_call_all_arrive(client, auth, redis_client, monkeypatch):
    """Subscribe-before-enqueue, with no slack: the whole job runs (and publishes every event)
    synchronously inside the enqueue call, before the API reads anything."""
    runner = JobRunner(ScriptedEngine(), redis_client, "w-inline", 600)
    ran: list[str] = []

    def run_inline(celery, job_id, params, model, **kwargs):
        ran.append(job_id)
        runner.run(job_id, JobRequest.from_dict(params))

    monkeypatch.setattr(api.generation.gateway, "enqueue_generation", run_inline)
    body = client.post("/v1/chat/completions", headers=auth,
                       json=chat("go", max_tokens=50, stream=True)).get_data(as_text=True)
    assert len(ran) == 1
    assert content(body) == " ".join(f"tok{i}" for i in range(50))
    assert frames(body)[-1] == "[DONE]"


def _job_with_marker(redis_client, marker: str) -> JobRecord:
    """The job whose prompt holds ``marker`` (tests that get no job id back)."""
    for key in redis_client.scan_iter(keys.job("*")):
        record = jobs.get(redis_client, key.removeprefix(keys.job("")))
        if record is not None and marker in json.dumps(record.request.to_dict()):
            return record
    raise AssertionError(f"no job holds {marker}")


def _wait_for_status(redis_client, job_id: str, status: JobStatus, timeout: float = 5) -> JobRecord:
    deadline = time.monotonic() + timeout
    while True:
        record = jobs.get(redis_client, job_id)
        if (record is not None and record.status is status) or time.monotonic() > deadline:
            assert record is not None and record.status is status, record
            return record
        time.sleep(0.05)


def test_worker_error_mid_stream_is_an_error_frame_and_settles_what_streamed(client, auth, redis_client):
    resp = client.post("/v1/chat/completions", headers=auth,
                       json=chat("one two [[fail_after=2]]", max_tokens=10, stream=True))
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.get_data(as_text=True)
    assert content(body) == "tok0 tok1"
    last = json.loads(frames(body)[-1])
    assert set(last) == {"error"}
    assert last["error"]["type"] == "server_error" and last["error"]["code"] == "engine_error"
    assert "10.0.0.7" not in body and "Traceback" not in body
    assert resp.headers["X-Request-ID"] in last["error"]["message"]
    assert "[DONE]" not in frames(body)
    job_id = chunks(body)[0]["id"].removeprefix("chatcmpl-")
    record = _wait_for_status(redis_client, job_id, JobStatus.FAILED)
    assert (record.prompt_tokens, record.completion_tokens) == (3, 2)  # 3 words, 2 tokens


def test_completions_buffered_and_streamed(client, auth):
    resp = client.post("/v1/completions", headers=auth,
                       json={"model": SCRIPTED_MODEL, "prompt": "hello there", "max_tokens": 3})
    assert resp.status_code == 200
    assert resp.json["object"] == "text_completion"
    assert resp.json["choices"][0]["text"] == "tok0 tok1 tok2"
    assert resp.json["usage"]["prompt_tokens"] == 2
    body = client.post("/v1/completions", headers=auth,
                       json={"model": SCRIPTED_MODEL, "prompt": "p", "max_tokens": 3,
                             "stream": True}).get_data(as_text=True)
    texts = [c["choices"][0]["text"] for c in chunks(body) if c["choices"]]
    assert "".join(texts) == "tok0 tok1 tok2"
    assert frames(body)[-1] == "[DONE]"


def test_engine_failure_is_sanitized_500(client, auth):
    resp = client.post("/v1/chat/completions", headers=auth, json=chat("[[fail]]"))
    assert resp.status_code == 500
    err = resp.json["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "10.0.0.7" not in err["message"] and "Traceback" not in err["message"]
    assert err["type"] == "server_error"


def test_prompt_too_long_is_400_and_worker_keeps_serving(client, auth):
    resp = client.post("/v1/chat/completions", headers=auth, json=chat("[[too_long]]", stream=True))
    assert resp.status_code == 400
    assert "maximum context length" in resp.json["error"]["message"]
    ok = client.post("/v1/chat/completions", headers=auth, json=chat("after", max_tokens=2))
    assert ok.status_code == 200


def test_queue_deadline_is_504_and_cancels(app, client, auth, redis_client):
    app.extensions["inferq"].settings.queue_timeout = 0.5
    marker = f"m{uuid.uuid4().hex}"
    resp = client.post("/v1/chat/completions", headers=auth, json=chat(f"{marker} [[first_delay=3]]"))
    assert resp.status_code == 504
    assert resp.json["error"]["code"] == "timeout"
    record = _wait_for_status(redis_client, _job_with_marker(redis_client, marker).id, JobStatus.CANCELLED)
    assert record.completion_tokens == 0


def test_a_buffered_answer_longer_than_the_queue_deadline_is_served(app, client, auth):
    """Its body comes only at the end; the worker's progress deltas show the job is alive."""
    settings = app.extensions["inferq"].settings
    settings.queue_timeout, settings.idle_timeout = 0.5, 0.5
    resp = client.post("/v1/chat/completions", headers=auth, json=chat("[[delay=0.3]]", max_tokens=5))
    assert resp.status_code == 200, resp.json  # 1.5 s in all: three times the queue deadline
    assert resp.json["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"


def test_idle_deadline_ends_stream_with_error_event_and_cancels(app, client, auth, redis_client):
    app.extensions["inferq"].settings.idle_timeout = 0.5
    body = client.post("/v1/chat/completions", headers=auth,
                       json=chat("[[delay=2]]", max_tokens=3, stream=True)).get_data(as_text=True)
    last = json.loads(frames(body)[-1])
    assert last["error"]["code"] == "timeout"
    assert "[DONE]" not in frames(body)
    job_id = chunks(body)[0]["id"].removeprefix("chatcmpl-")
    record = _wait_for_status(redis_client, job_id, JobStatus.CANCELLED)
    assert record.completion_tokens is not None and record.completion_tokens < 3


def test_client_disconnect_cancels_job(client, auth, redis_client):
    resp = client.post("/v1/chat/completions", headers=auth, buffered=False,
                       json=chat("[[delay=0.2]]", max_tokens=100, stream=True))
    stream = iter(resp.response)
    first = next(stream).decode()
    assert "assistant" in first
    job_id = json.loads(first[len("data: "):])["id"].removeprefix("chatcmpl-")
    resp.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        record = jobs.get(redis_client, job_id)
        if record and record.status is JobStatus.CANCELLED:
            break
        time.sleep(0.1)
    assert record is not None and record.status is JobStatus.CANCELLED
    assert record.completion_tokens is not None and record.completion_tokens < 100


def test_jobs_run_concurrently_in_one_worker(client, auth, redis_client):
    def one(i):
        resp = client.post("/v1/chat/completions", headers=auth,
                           json=chat(f"[[delay=0.1]] {i}", max_tokens=10, stream=True))
        body = resp.get_data(as_text=True)
        return json.loads(frames(body)[0])["id"].removeprefix("chatcmpl-")

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(8)))
    records = [jobs.get(redis_client, i) for i in ids]
    assert all(r.status is JobStatus.SUCCEEDED for r in records)
    # All eight were running at one moment: the latest start precedes the earliest finish.
    assert max(r.started_at for r in records) < min(r.finished_at for r in records)
    assert len({r.worker for r in records}) == 1


def test_unknown_model_is_404(client, auth):
    resp = client.post("/v1/chat/completions", headers=auth,
                       json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 404
    assert resp.json["error"]["code"] == "model_not_found"


def test_models_and_ready(client, auth):
    assert client.get("/ready").status_code == 200
    models = client.get("/v1/models", headers=auth).json
    assert models["object"] == "list"
    assert SCRIPTED_MODEL in [m["id"] for m in models["data"]]


def test_full_queue_is_503_with_retry_after(app_config, auth, redis_client):
    from api import create_app
    from queueing import keys, liveness

    model = "busy-model"  # a live heartbeat, but nothing consumes its queue
    liveness.beat(redis_client, model, "fake-worker", ttl=30)
    queue = keys.model_queue(model)
    redis_client.delete(queue)
    client = create_app({**app_config, "served_model_name": model, "max_queue_depth": 3,
                         "queue_timeout": 0.5}).test_client()
    try:
        redis_client.rpush(queue, "waiting-1", "waiting-2")
        body = chat("x", max_tokens=1)
        body["model"] = model
        admitted = client.post("/v1/chat/completions", headers=auth, json=body)
        assert admitted.status_code == 504  # two waiting: admitted, then it timed out in the queue
        assert redis_client.llen(queue) == 3
        resp = client.post("/v1/chat/completions", headers=auth, json=body)
        assert resp.status_code == 503
        assert resp.json["error"]["code"] == "queue_full"
        assert resp.headers["Retry-After"] == "2"
    finally:
        redis_client.delete(queue)
        liveness.retire(redis_client, model, "fake-worker")


def test_requests_reuse_redis_connections(client, auth, redis_client):
    def connections_made() -> int:
        return int(redis_client.info("stats")["total_connections_received"])

    for _ in range(3):  # warm the pool
        client.post("/v1/chat/completions", json=chat("warm", max_tokens=2), headers=auth)
    before = connections_made()
    for i in range(30):
        body = chat(f"reuse {i}", max_tokens=2, stream=bool(i % 2))
        assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert connections_made() - before < 10  # was one new connection per request


def test_n_choices_come_back_and_are_all_charged(client, auth):
    resp = client.post("/v1/chat/completions", json=chat("a b", max_tokens=3, n=2), headers=auth)
    assert resp.status_code == 200, resp.json
    assert [c["message"]["content"] for c in resp.json["choices"]] == ["tok0 tok1 tok2"] * 2
    assert [c["index"] for c in resp.json["choices"]] == [0, 1]
    assert resp.json["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


def test_the_worker_gets_the_clients_body_untouched(client, auth, redis_client):
    marker = f"m{uuid.uuid4().hex}"
    body = chat(marker, max_tokens=2, stream=1, frobnicate={"deep": [1, None]}, logprobs=True, top_logprobs=2,
                response_format={"type": "json_object"}, stream_options={"include_usage": False})
    resp = client.post("/v1/chat/completions", json=body, headers=auth)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert frames(resp.get_data(as_text=True))[-1] == "[DONE]"
    record = _wait_for_status(redis_client, _job_with_marker(redis_client, marker).id, JobStatus.SUCCEEDED)
    assert record.request.endpoint == "/v1/chat/completions" and record.request.model == SCRIPTED_MODEL
    assert record.request.body == {**body, "stream": True}  # only "stream" is normalized
    assert (record.prompt_tokens, record.completion_tokens) == (1, 2)  # exact without the usage chunk
    assert record.result is None  # a stream's answer went out as frames


def test_responses_buffered_and_streamed(client, auth):
    resp = client.post("/v1/responses", headers=auth,
                       json={"model": SCRIPTED_MODEL, "input": "one two", "max_output_tokens": 3})
    assert resp.status_code == 200, resp.json
    assert resp.json["object"] == "response" and resp.json["status"] == "completed"
    assert resp.json["output"][0]["content"][0]["text"] == "tok0 tok1 tok2"
    assert resp.json["usage"]["input_tokens"] == 2 and resp.json["usage"]["output_tokens"] == 3
    streamed = client.post("/v1/responses", headers=auth, json={
        "model": SCRIPTED_MODEL, "input": "x", "max_output_tokens": 2, "stream": True})
    assert streamed.status_code == 200 and streamed.mimetype == "text/event-stream"
    blocks = [b for b in streamed.get_data(as_text=True).split("\n\n") if b.strip()]
    kinds = [b.split("\n", 1)[0].removeprefix("event: ") for b in blocks]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    completed = json.loads(blocks[-1].split("\ndata: ", 1)[1])
    assert completed["response"]["usage"]["output_tokens"] == 2


def test_tokenize_and_detokenize(client, auth):
    resp = client.post("/tokenize", headers=auth, json={"model": SCRIPTED_MODEL, "prompt": "a b c"})
    assert resp.status_code == 200, resp.json
    assert resp.json["count"] == 3 and resp.json["tokens"] == [0, 1, 2]
    resp = client.post("/detokenize", headers=auth, json={"model": SCRIPTED_MODEL, "tokens": [0, 1]})
    assert resp.status_code == 200 and resp.json == {"prompt": "tok0 tok1"}


def test_a_request_the_engine_refuses_keeps_its_message_and_type(client, auth):
    resp = client.post("/v1/completions", headers=auth,
                       json={"model": SCRIPTED_MODEL, "prompt": "[[too_long]]", "max_tokens": 2})
    assert resp.status_code == 400
    err = resp.json["error"]
    assert err["type"] == "BadRequestError" and "maximum context length" in err["message"]
