"""End to end on the real vLLM engine (SmolLM2-135M-Instruct on the CPU).

One worker and one API server for the whole test session (``real_stack`` in
conftest); the engine takes about a minute to start. ``max_tokens`` stays small.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import TEST_KEY

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def stack(real_stack):
    return real_stack


@pytest.fixture
def sdk(stack):
    return openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=TEST_KEY, max_retries=0, timeout=120)


def test_capital_of_france(sdk):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = sdk.chat.completions.create(model=MODEL, temperature=0, max_tokens=20, messages=question)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.prompt_tokens > 5 and 0 < out.usage.completion_tokens <= 20


def test_streaming_chunks_and_clean_end(sdk):
    stream = sdk.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Name three colors."}])
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16 or chunks[-2].choices[0].finish_reason == "stop"


def test_completions(sdk):
    out = sdk.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens <= 8


def _running(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=2).text
    found = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return max(map(float, found)) if found else 0.0


def test_eight_streams_share_the_engine(sdk, stack):
    assert "vllm:num_requests_running" in httpx.get(stack["metrics"], timeout=2).text
    # What Prometheus asks for: the samples keep vLLM's names (client_python#1177 renames them).
    openmetrics = "application/openmetrics-text;version=1.0.0;escaping=underscores,text/plain;q=0.5"
    scraped = httpx.get(stack["metrics"], timeout=2, headers={"Accept": openmetrics}).text
    assert re.search(r"^vllm:num_requests_running\{", scraped, re.M)
    assert not re.search(r"^vllm_", scraped, re.M)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _running(stack["metrics"]))
            time.sleep(0.05)

    t0 = time.monotonic()

    def one(i):
        # ignore_eos (a vLLM extension) keeps every request in the engine for all its tokens.
        stream = sdk.completions.create(model=MODEL, prompt=f"Chapter {i}. Once upon a time,",
                                        max_tokens=128, temperature=0.8, seed=i, stream=True,
                                        extra_body={"ignore_eos": True})
        chunks, first = [], None
        for c in stream:
            first = first or time.monotonic() - t0
            chunks.append(c)
        return chunks, (round(first, 2), round(time.monotonic() - t0, 2))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    finally:
        stop.set()
        sampler.join()
    assert all(chunks[-1].choices[0].finish_reason == "length" for chunks, _ in results)
    # The engine itself reported all eight requests in its running batch at once.
    spans = [span for _, span in results]
    assert peak[0] >= 8, f"peak vllm:num_requests_running was {peak[0]}; first/last chunk times {spans}"


@pytest.mark.timeout(900)  # its batch may take up to 600 s beside the session's other engine
def test_a_chat_request_overtakes_batch_lines_waiting_in_the_engine(redis_url, app_config, redis_client,
                                                                    tmp_path):
    """Batch lines run at a lower vLLM priority (``--scheduling-policy priority``): a chat request
    that arrives after a batch line already waits inside the full engine runs first.

    Its own worker: two engine slots (MAX_NUM_SEQS=2), both allowed to batch work (BATCH_SHARE=1).
    A long chat stream holds one slot, a batch line the other, the second line waits in vLLM's
    queue, the rest of the batch in Redis. A short chat sent then gets the first slot that frees:
    under first-come-first-served it would wait for a line to finish (vLLM does not preempt
    for priority when only the sequence count is full).
    """
    import threading

    from api import create_app
    from api.batches.lines import line_job_id
    from api.coordinator import Coordinator
    from queueing import jobs
    from queueing.jobs import JobStatus
    from tests.conftest import REAL_WORKER_ENV, start_worker, wait_for
    from tests.test_batches import upload
    from tests.test_batches import wait_for as wait_for_batch

    model = "SmolLM2-priority"
    env = {k: v for k, v in REAL_WORKER_ENV.items() if k != "SERVED_MODEL_NAME"}
    env.update(MAX_NUM_SEQS="2", BATCH_SHARE="1.0")
    worker = start_worker(redis_url, tmp_path, model, 600, **env)
    app = create_app({**app_config, "served_model_name": model, "queue_timeout": 120.0, "idle_timeout": 60.0})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    coordinator = Coordinator(app.extensions["inferq"], interval=0.5)  # dispatches and collects the batch
    coordinator.start()

    def chat(max_tokens: int, started: threading.Event | None = None) -> float:
        resp = app.test_client().post("/v1/chat/completions", headers=auth, buffered=False, json={
            "model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]})
        assert resp.status_code == 200
        body = b""
        for piece in resp.response:
            body += piece
            if started is not None and b'"content":"' in body:
                started.set()
        assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
        return time.time()

    try:
        long_started, long_ended = threading.Event(), []
        holder = threading.Thread(target=lambda: long_ended.append(chat(100, long_started)))
        holder.start()
        assert long_started.wait(60)
        lines = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": model, "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                           "messages": [{"role": "user", "content": f"Count from {i}."}]}} for i in range(3)]
        batch = client.post("/v1/batches", headers=auth, json={
            "input_file_id": upload(client, auth, lines), "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json
        ids = [line_job_id(batch["id"], seq) for seq in (1, 2, 3)]

        def running_lines() -> list[str]:
            return [j for j in ids if (r := jobs.get(redis_client, j)) and r.status is JobStatus.RUNNING]

        wait_for(lambda: len(running_lines()) == 2, 60, "two batch lines in the engine")
        in_engine = running_lines()  # one generating, one waiting in vLLM's queue
        assert holder.is_alive(), "the long chat ended before the short one was sent: inconclusive"
        short_ended = chat(4)
        holder.join(120)
        # generous: 900 tokens of batch lines on a CPU shared with the session's other engine
        done = wait_for_batch(client, auth, batch["id"], ("completed", "failed"), timeout=600)
    finally:
        coordinator.stop()
        worker.stop(60)
    assert done["status"] == "completed", done
    finished = {j: jobs.get(redis_client, j).finished_at for j in ids}
    # The short chat finished while both lines it found in the engine were still unfinished.
    assert all(finished[j] > short_ended for j in in_engine), (short_ended, finished, long_ended)
    assert max(finished.values()) > short_ended  # and before the backlog


def test_a_buffered_answer_outlasting_the_deadlines_is_kept_alive_by_progress(real_stack, app_config):
    """vLLM writes a non-streamed answer only at its end; meanwhile the worker reports the tokens
    generated each second (one timer on the engine's loop), which keeps the API's deadlines off."""
    from api import create_app

    app = create_app({**app_config, "served_model_name": MODEL, "queue_timeout": 3.0, "idle_timeout": 3.0})
    started = time.monotonic()
    resp = app.test_client().post("/v1/chat/completions", headers={"Authorization": f"Bearer {TEST_KEY}"},
                                  json={"model": MODEL, "max_tokens": 400, "ignore_eos": True,
                                        "messages": [{"role": "user", "content": "Tell me a long story."}]})
    assert resp.status_code == 200, resp.json
    assert resp.json["usage"]["completion_tokens"] == 400
    assert time.monotonic() - started > 4.0, "too fast to show the deadlines were outlasted: inconclusive"


def test_wrong_key(stack):
    bad = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key="iq-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_batch_through_the_sdk(sdk, real_coordinator):
    import json

    questions = ["What is the capital of France?", "Name a color.", "What is 2+2?", "Say hello."]
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "max_tokens": 12, "temperature": 0,
                       "messages": [{"role": "user", "content": q}]}} for i, q in enumerate(questions)]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = sdk.files.create(file=("questions.jsonl", data), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    content = sdk.files.content(batch.output_file_id).text
    out = {o["custom_id"]: o for o in map(json.loads, content.splitlines())}
    assert sorted(out) == ["q0", "q1", "q2", "q3"]
    assert "Paris" in out["q0"]["response"]["body"]["choices"][0]["message"]["content"]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] > 0 for o in out.values())


def test_cancelling_a_running_job_stops_the_engine(stack):
    base, headers = stack["base"], {"Authorization": f"Bearer {TEST_KEY}"}
    body = {"endpoint": "/v1/completions",
            "body": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}}
    job = httpx.post(f"{base}/v1/jobs", headers=headers, json=body).json()
    url = f"{base}/v1/jobs/{job['id']}"
    deadline = time.monotonic() + 30
    while httpx.get(url, headers=headers).json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # some tokens out, far from 900
    httpx.post(f"{url}/cancel", headers=headers)
    done = httpx.get(f"{url}?wait=10", headers=headers).json()
    assert done["status"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < 900
    deadline = time.monotonic() + 5
    while _running(stack["metrics"]) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(stack["metrics"]) == 0  # the engine itself dropped the request


def test_a_client_that_drops_its_socket_mid_stream_aborts_the_engine_request(stack, redis_client):
    """Under gunicorn: the hang-up is seen at the next write, the job is cancelled, the engine aborts."""
    import json
    import socket

    from queueing import jobs
    from queueing.jobs import JobStatus
    from tests.conftest import wait_for

    max_tokens = 800
    body = json.dumps({"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "messages": [{"role": "user", "content": "Count to one thousand."}]}).encode()
    host, port = stack["base"].removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    try:
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body)
        received = b""
        while received.count(b'"content":"') < 6:  # the role chunk and a few tokens
            data = sock.recv(65536)
            assert data, received
            received += data
    finally:
        sock.close()  # hang up mid-stream
    found = re.search(rb'"id":"chatcmpl-([^"]+)"', received)
    assert found is not None, received
    job_id = found.group(1).decode()
    wait_for(lambda: jobs.get(redis_client, job_id).status.is_terminal, 60, "the job to end")
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.CANCELLED, record
    assert record.completion_tokens is not None and 5 <= record.completion_tokens < max_tokens // 4, record
    deadline = time.monotonic() + 5
    while _running(stack["metrics"]) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(stack["metrics"]) == 0  # the engine itself dropped the request


def test_a_prompt_over_the_context_is_a_400_and_the_engine_keeps_serving(sdk):
    too_long = "hello " * 1500  # the worker's engine runs MAX_MODEL_LEN=1024
    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(sdk.chat.completions.create, model=MODEL, max_tokens=4,
                              messages=[{"role": "user", "content": too_long}])
        served = pool.submit(sdk.chat.completions.create, model=MODEL, max_tokens=8, temperature=0,
                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        with pytest.raises(openai.BadRequestError) as exc:
            refused.result()
        assert "Paris" in served.result().choices[0].message.content
    assert "maximum context length is 1024" in exc.value.message  # vLLM's own answer
    again = sdk.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4)
    assert again.choices[0].text.strip()


def test_jobs_and_batches_get_vllms_whole_surface(sdk, stack, real_coordinator):
    """Structured outputs through /v1/jobs, and /v1/responses lines in a batch: the worker answers
    them through vLLM's serving layer as it answers a direct request."""
    import json

    base, headers = stack["base"], {"Authorization": f"Bearer {TEST_KEY}"}
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
              "required": ["capital"], "additionalProperties": False}
    body = {"model": MODEL, "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    job = httpx.post(f"{base}/v1/jobs", headers=headers,
                     json={"endpoint": "/v1/chat/completions", "body": body})
    assert job.status_code == 202, job.text
    done = httpx.get(f"{base}/v1/jobs/{job.json()['id']}?wait=60", headers=headers, timeout=70).json()
    assert done["status"] == "succeeded", done
    direct = sdk.chat.completions.create(**body)
    assert done["response"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert set(json.loads(direct.choices[0].message.content)) == {"capital"}

    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": MODEL, "input": q, "max_output_tokens": 8, "temperature": 0}}
             for i, q in enumerate(["Say hello.", "Name a color."])]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = sdk.files.create(file=("responses.jsonl", data), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    out = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["r0", "r1"]
    for o in out:
        response = o["response"]["body"]
        assert response["object"] == "response" and response["usage"]["output_tokens"] > 0
    assert batch.usage.output_tokens == sum(o["response"]["body"]["usage"]["output_tokens"] for o in out)
