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


def test_wrong_key(stack):
    bad = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key="iq-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_batch_through_the_sdk(sdk):
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


def test_jobs_and_batches_get_vllms_whole_surface(sdk, stack):
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
