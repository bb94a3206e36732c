"""Metering with the real engine answering through vLLM's serving layer: ``n`` choices are
charged in full, the token counts the worker publishes with each delta add up to the usage that
vLLM reports and the ledger charges, and a stream cancelled part-way settles what the engine
generated."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import REAL_MODEL, TEST_KEY

pytestmark = pytest.mark.slow
HEADERS = {"Authorization": f"Bearer {TEST_KEY}"}


def _today(base: str) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) the ledger holds for this key today."""
    today = httpx.get(f"{base}/v1/usage", headers=HEADERS, timeout=10).json()["today"]
    return today["requests"], today["prompt_tokens"], today["completion_tokens"]


def _settled(base: str, before: tuple[int, int, int], requests: int = 1) -> tuple[int, int]:
    """The (prompt, completion) tokens charged since ``before``, once ``requests`` more settled."""
    deadline = time.monotonic() + 15
    while True:
        now = _today(base)
        if now[0] >= before[0] + requests or time.monotonic() > deadline:
            return now[1] - before[1], now[2] - before[2]
        time.sleep(0.2)


def test_n_choices_are_charged_in_full(real_stack):
    base = real_stack["base"]
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=TEST_KEY, max_retries=0, timeout=120)
    before = _today(base)
    out = sdk.chat.completions.create(model=REAL_MODEL, n=3, temperature=0.8, seed=3, max_tokens=6,
                                      messages=[{"role": "user", "content": "Tell me a story."}],
                                      extra_body={"ignore_eos": True})
    assert len(out.choices) == 3
    assert out.usage.completion_tokens == 18  # vLLM's usage: three choices of six tokens
    assert _settled(base, before) == (out.usage.prompt_tokens, 18)


def _job_events(pubsub, job_id: str, timeout: float = 15) -> list:
    """The events published on ``job_id``'s channel (a pattern subscription made before the job)."""
    from queueing import events, keys

    channel, found = keys.job_events(job_id), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (found and events.is_terminal(found[-1])):
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "pmessage" and message["channel"] == channel:
            found.append(events.decode(message["data"]))
    return found


@pytest.mark.parametrize("n", [1, 2])
def test_per_delta_token_counts_add_up_to_the_usage_sdk_and_ledger_report(real_stack, redis_client, n):
    from queueing import events, keys

    base = real_stack["base"]
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=TEST_KEY, max_retries=0, timeout=120)
    pubsub = redis_client.pubsub()
    pubsub.psubscribe(keys.job_events("*"))  # every job's events, from before this one starts
    assert pubsub.get_message(timeout=5)["type"] == "psubscribe"
    before = _today(base)
    try:
        stream = sdk.chat.completions.create(
            model=REAL_MODEL, n=n, temperature=0.8, seed=11, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": n == 2},  # n=1 may stop early
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        chunks = list(stream)
        usage = chunks[-1].usage
        published = _job_events(pubsub, chunks[0].id.removeprefix("chatcmpl-"))
    finally:
        pubsub.close()
    assert usage is not None and usage.prompt_tokens > 5
    assert published and isinstance(published[-1], events.Done), published[-1:]
    deltas = [e for e in published if isinstance(e, events.Delta)]
    assert len(deltas) >= 2
    # The worker's count of every delta adds up to vLLM's usage, which the client and the ledger see.
    assert sum(d.tokens for d in deltas) == published[-1].usage.completion_tokens == usage.completion_tokens
    assert published[-1].usage.prompt_tokens == usage.prompt_tokens
    assert 0 < usage.completion_tokens <= 12 * n
    assert _settled(base, before) == (usage.prompt_tokens, usage.completion_tokens)


def test_a_streamed_n2_request_cancelled_part_way_settles_what_was_generated(real_stack):
    base = real_stack["base"]
    before = _today(base)
    body = {"model": REAL_MODEL, "n": 2, "temperature": 0.8, "seed": 5, "max_tokens": 400, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": "Count to one thousand."}]}
    received = 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers=HEADERS, json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                received += 1
            if received >= 10:
                break  # hang up: the API cancels the job, the worker aborts both choices
    prompt, completion = _settled(base, before)
    assert prompt > 0
    # Settled to what the engine generated: at least what reached the client, far from 2 x 400.
    assert received <= completion < 400, (received, completion)
    # Both sequences left the engine.
    deadline = time.monotonic() + 10
    running = 1.0
    while time.monotonic() < deadline and running:
        text = httpx.get(real_stack["metrics"], timeout=2).text
        running = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("vllm:num_requests_running{"))
        time.sleep(0.2)
    assert running == 0
