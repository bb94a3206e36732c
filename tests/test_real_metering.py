"""Metering with the real engine answering through vLLM's serving layer: ``n`` choices are
charged in full, and a stream cancelled part-way settles what the engine generated."""

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
