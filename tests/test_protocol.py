"""Request models (api/protocol.py), request parsing errors, and SSE chunk framing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from api import sse
from api.protocol import ChatCompletionRequest, CompletionRequest
from api.serving import ChatFormat, CompletionFormat
from queueing import events

MODEL = "m"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": MODEL, "messages": USER}
    body.update(fields)
    return ChatCompletionRequest.model_validate(body)


def error_locs(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[Any, ...]]:
    return [e["loc"] for e in exc.value.errors()]


# --- ChatCompletionRequest --------------------------------------------------


@pytest.mark.parametrize(("fields", "loc"), [
    ({"messages": []}, ("messages",)),
    ({"n": 2}, ("n",)),
    ({"stream_options": {"include_usage": True}}, ("stream_options",)),
    ({"temperature": 3}, ("temperature",)),
    ({"top_p": 0}, ("top_p",)),
    ({"stop": ["a", "b", "c", "d", "e"]}, ("stop",)),
    ({"logprobs": True}, ("logprobs",)),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ("tools",)),
])
def test_chat_request_rejects(fields: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    assert error_locs(exc) == [loc]


def test_chat_request_accepts_boundaries() -> None:
    req = chat(temperature=2, top_p=1, n=1, stop=["a", "b", "c", "d"], logprobs=False, tools=[])
    assert req.temperature == 2.0
    assert req.stop == ["a", "b", "c", "d"]
    assert req.logprobs is None and req.tools is None


def test_n_above_one_says_it_is_unsupported() -> None:
    with pytest.raises(ValidationError) as exc:
        chat(n=3)
    assert "n > 1 is not supported" in str(exc.value)
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert chat(stream=False, stream_options=None).include_usage is False


def test_stop_string_becomes_list() -> None:
    assert chat(stop="END").stop == ["END"]
    assert chat().to_params().stop == []  # the default (None) is not validated; to_params normalizes
    assert chat(stop="END").to_params().stop == ["END"]


def test_unknown_fields_are_ignored() -> None:
    req = chat(frobnicate=True, parallel_tool_calls=False)
    assert not hasattr(req, "frobnicate")
    assert "frobnicate" not in req.model_dump()


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=10, max_completion_tokens=20).to_params().max_tokens == 20
    assert chat(max_tokens=10).to_params().max_tokens == 10
    assert chat().to_params().max_tokens is None


def test_to_params_maps_developer_and_joins_text_parts() -> None:
    req = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
    ], temperature=0.5, seed=7)
    params = req.to_params()
    assert params.kind == "chat"
    assert params.model == MODEL
    assert params.messages == [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hello"}]
    assert params.temperature == 0.5 and params.seed == 7
    assert params.prompt is None


# --- CompletionRequest ------------------------------------------------------


def test_completion_defaults_and_single_prompt_list() -> None:
    req = CompletionRequest.model_validate({"model": MODEL, "prompt": ["once"]})
    assert req.max_tokens == 16
    params = req.to_params()
    assert params.kind == "completion" and params.prompt == "once" and params.max_tokens == 16


@pytest.mark.parametrize("fields", [{"prompt": ["a", "b"]}, {"prompt": "x", "echo": True}])
def test_completion_rejects(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": MODEL, **fields})


# --- parsing errors through the app (fail before any enqueue) --------------


def assert_openai_error(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def test_invalid_json_body_is_400(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/chat/completions", data="{not json",
                       headers={**auth, "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert assert_openai_error(resp.get_json())["type"] == "invalid_request_error"


def test_json_list_body_is_400(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/chat/completions", json=[{"model": MODEL, "messages": USER}], headers=auth)
    assert resp.status_code == 400
    assert assert_openai_error(resp.get_json())["type"] == "invalid_request_error"


def test_validation_error_names_param(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/chat/completions", headers=auth,
                       json={"model": MODEL, "messages": USER, "temperature": 3})
    assert resp.status_code == 400
    err = assert_openai_error(resp.get_json())
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "temperature"
    assert "temperature" in err["message"]


def test_nested_validation_error_param(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/completions", headers=auth, json={"model": MODEL, "prompt": ["a", "b"]})
    assert resp.status_code == 400
    assert assert_openai_error(resp.get_json())["param"] == "prompt"


# --- wire format and SSE framing -------------------------------------------


def frame_json(frame: str) -> dict[str, Any]:
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    assert frame.count("\n\n") == 1
    return json.loads(frame[len("data: "):])  # type: ignore[no-any-return]


def test_chat_opening_delta_finish_frames() -> None:
    fmt = ChatFormat("job1", MODEL)
    [opening] = fmt.opening()
    first = frame_json(sse.data(opening, {"usage"}))
    assert first["id"] == "chatcmpl-job1"
    assert first["object"] == "chat.completion.chunk"
    assert first["model"] == MODEL
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None

    delta = frame_json(sse.data(fmt.delta("x"), {"usage"}))
    assert delta["choices"][0]["delta"] == {"content": "x"}

    finish = frame_json(sse.data(fmt.finish("stop"), {"usage"}))
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert {first["created"], delta["created"], finish["created"]} == {first["created"]}


def test_usage_chunk_and_exclusion() -> None:
    fmt = ChatFormat("job2", MODEL)
    chunk = frame_json(sse.data(fmt.usage(events.Usage(prompt_tokens=3, completion_tokens=4))))
    assert chunk["choices"] == []
    assert chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}

    assert "usage" not in frame_json(sse.data(fmt.delta("y"), exclude={"usage"}))
    assert frame_json(sse.data(fmt.delta("y")))["usage"] is None


def test_completion_format_frames() -> None:
    fmt = CompletionFormat("job3", MODEL)
    assert fmt.opening() == []
    delta = frame_json(sse.data(fmt.delta("ab"), {"usage"}))
    assert delta["id"] == "cmpl-job3" and delta["object"] == "text_completion"
    assert delta["choices"] == [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": None}]
    resp = fmt.response("abc", "length", events.Usage(1, 2)).model_dump()
    assert resp["choices"][0]["text"] == "abc" and resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"]["total_tokens"] == 3


def test_done_frame() -> None:
    assert sse.DONE == "data: [DONE]\n\n"


def test_vllm_extension_fields_reach_the_job_params():
    params = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}],
        "ignore_eos": True, "min_tokens": 3, "top_k": 20, "repetition_penalty": 1.1,
    }).to_params()
    extras = (params.ignore_eos, params.min_tokens, params.top_k, params.repetition_penalty)
    assert extras == (True, 3, 20, 1.1)
