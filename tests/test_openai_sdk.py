"""The official ``openai`` SDK against the real API server (gunicorn + gevent),
with a real worker process hosting the scripted engine (test double)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api


@pytest.fixture(scope="module")
def api_base(redis_url, scripted_worker, tmp_path_factory):
    api, base = start_api(redis_url, tmp_path_factory.mktemp("api-sdk"), SERVED_MODEL_NAME=SCRIPTED_MODEL)
    yield base
    api.stop()


@pytest.fixture
def sdk(api_base):
    return openai.OpenAI(base_url=f"{api_base}/v1", api_key=TEST_KEY, max_retries=0)


def test_models_list(sdk):
    assert SCRIPTED_MODEL in [m.id for m in sdk.models.list()]


def test_chat_buffered(sdk):
    out = sdk.chat.completions.create(model=SCRIPTED_MODEL, max_tokens=4,
                                      messages=[{"role": "user", "content": "hi there"}])
    assert out.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert out.usage.completion_tokens == 4 and out.usage.prompt_tokens == 2


def test_chat_stream_with_usage(sdk):
    stream = sdk.chat.completions.create(
        model=SCRIPTED_MODEL, max_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}])
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "tok0 tok1 tok2 tok3 tok4"
    assert finish == "length"
    assert usage.completion_tokens == 5 and usage.total_tokens == 6


def test_completions_buffered_and_stream(sdk):
    out = sdk.completions.create(model=SCRIPTED_MODEL, prompt="a b c", max_tokens=3)
    assert out.choices[0].text == "tok0 tok1 tok2"
    text = "".join(c.choices[0].text for c in
                   sdk.completions.create(model=SCRIPTED_MODEL, prompt="a", max_tokens=3, stream=True)
                   if c.choices)
    assert text == "tok0 tok1 tok2"


def test_stream_error_raises_in_sdk(sdk):
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model=SCRIPTED_MODEL, stream=True,
                                    messages=[{"role": "user", "content": "[[too_long]]"}])
    assert info.value.status_code == 400


def test_wrong_key_is_401(api_base):
    bad = openai.OpenAI(base_url=f"{api_base}/v1", api_key="iq-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_curl_style_x_api_key(api_base):
    resp = httpx.post(f"{api_base}/v1/chat/completions", headers={"X-API-Key": TEST_KEY},
                      json={"model": SCRIPTED_MODEL, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == "tok0 tok1"
