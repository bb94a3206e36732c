"""Admission of a request (api/generation/job_request.py over the minimal models of
api/protocol.py): what the API reads of a body, the 400s it gives before anything is queued,
the body it forwards, and the worst case it reserves. Everything else in a body is vLLM's to
read (covered by the slow differential test)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.generation.job_request import (
    TEMPLATE_TOKENS,
    parse_job_request,
    prompt_token_bound,
    worst_case_tokens,
)
from api.http import sse
from api.protocol import REQUEST_MODELS, ErrorResponse
from queueing.jobs import CHAT, COMPLETIONS, DETOKENIZE, ENDPOINTS, RESPONSES, TOKENIZE, JobRequest

MODEL = "m"
USER = [{"role": "user", "content": "hi"}]
CONTEXT = 2048


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def parsed(endpoint: str, body: Any, param_prefix: str = "") -> JobRequest:
    request = parse_job_request(endpoint, body, param_prefix)
    assert isinstance(request, JobRequest), request
    return request


def refused(endpoint: str, body: Any, param_prefix: str = "") -> ErrorResponse:
    err = parse_job_request(endpoint, body, param_prefix)
    assert isinstance(err, ErrorResponse), err
    assert err.status_code == 400 and err.error.type == "invalid_request_error"
    return err


# --- parse_job_request: what admission reads -----------------------------------


def test_every_job_endpoint_has_a_request_model() -> None:
    assert set(REQUEST_MODELS) == set(ENDPOINTS)


@pytest.mark.parametrize("body", [[chat_body()], "x", 5, None, True])
def test_a_body_that_is_not_an_object_is_400(body: Any) -> None:
    assert refused(CHAT, body).error.param is None
    assert refused(CHAT, body, "body.").error.param == "body"


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    (CHAT, {"messages": USER}, "model"),
    (CHAT, {"model": "", "messages": USER}, "model"),
    (CHAT, {"model": MODEL}, "messages"),
    (CHAT, {"model": MODEL, "messages": []}, "messages"),
    (CHAT, chat_body(stream=[True]), "stream"),
    (CHAT, chat_body(stream={"on": True}), "stream"),
    (CHAT, chat_body(stream_options={"include_usage": "maybe"}), "stream_options.include_usage"),
    (COMPLETIONS, {"prompt": "x"}, "model"),
    (RESPONSES, {"model": MODEL}, "input"),
    (TOKENIZE, {"prompt": "x"}, "model"),
    (DETOKENIZE, {"model": MODEL, "tokens": "1 2"}, "tokens"),
])
def test_what_admission_cannot_read_is_400_naming_the_param(endpoint: str, body: dict[str, Any],
                                                            param: str) -> None:
    err = refused(endpoint, body)
    assert err.error.param == param
    assert param.split(".")[0] in err.error.message
    assert refused(endpoint, body, "body.").error.param == f"body.{param}"


def test_a_lone_surrogate_is_400() -> None:
    err = refused(CHAT, chat_body(messages=[{"role": "user", "content": "\ud800"}]))
    assert "surrogate" in err.error.message


@pytest.mark.parametrize(("stream", "expected"), [(1, True), ("true", True), (0, False), (None, False)])
def test_a_stream_flag_that_is_not_a_bool_is_forwarded_as_one(stream: Any, expected: bool) -> None:
    body = chat_body(stream=stream)
    request = parsed(CHAT, body)
    assert request.stream is expected
    assert request.body["stream"] is expected  # the worker sees what the API decided
    assert body["stream"] == stream  # the client's dict is not changed


def test_unknown_and_vllm_fields_pass_through_untouched() -> None:
    body = chat_body(temperature=3, n=4, logprobs=True, top_logprobs=5, frobnicate={"deep": [1, None]},
                     tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                     tool_choice="required", response_format={"type": "json_object"},
                     stop=["a", "b", "c", "d", "e"], ignore_eos=True, guided_choice=["x"], stream=True)
    request = parsed(CHAT, body)
    assert request.body == body
    assert (request.endpoint, request.model, request.stream) == (CHAT, MODEL, True)


@pytest.mark.parametrize(("endpoint", "body"), [
    (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "echo": True, "logprobs": 3, "n": 2}),
    (COMPLETIONS, {"model": MODEL, "prompt": [[1, 2, 3]]}),
    (RESPONSES, {"model": MODEL, "input": [{"role": "user", "content": "hi"}], "instructions": "be brief",
                 "text": {"format": {"type": "json_schema", "name": "s", "schema": {}}}}),
    (TOKENIZE, {"model": MODEL, "messages": USER, "add_generation_prompt": True}),
    (DETOKENIZE, {"model": MODEL, "tokens": [1, 2]}),
])
def test_each_endpoint_forwards_its_body(endpoint: str, body: dict[str, Any]) -> None:
    request = parsed(endpoint, body)
    assert (request.endpoint, request.model, request.body, request.stream) == (endpoint, MODEL, body, False)


# --- worst_case_tokens: the reservation, without a tokenizer -------------------


def worst(endpoint: str, **body: Any) -> int:
    return worst_case_tokens(JobRequest(endpoint, MODEL, {"model": MODEL, **body}), CONTEXT)


def bound(endpoint: str, **body: Any) -> int:
    return prompt_token_bound(JobRequest(endpoint, MODEL, {"model": MODEL, **body}))


def test_n_choices_of_max_tokens() -> None:
    assert worst(CHAT, messages=USER, max_tokens=10) == bound(CHAT, messages=USER) + 10
    assert worst(CHAT, messages=USER, max_tokens=10, n=3) == bound(CHAT, messages=USER) + 3 * 10
    assert worst(COMPLETIONS, prompt="p", max_tokens=5, n=2) == bound(COMPLETIONS, prompt="p") + 2 * 5


def test_max_completion_tokens_wins_over_max_tokens_for_chat() -> None:
    base = bound(CHAT, messages=USER)
    assert worst(CHAT, messages=USER, max_tokens=10, max_completion_tokens=20) == base + 20
    assert worst(CHAT, messages=USER, max_tokens=30, max_completion_tokens=20) == base + 20
    assert worst(CHAT, messages=USER, max_completion_tokens=20) == base + 20
    # completions have no max_completion_tokens: max_tokens counts
    assert worst(COMPLETIONS, prompt="p", max_tokens=10, max_completion_tokens=20) == bound(
        COMPLETIONS, prompt="p") + 10


def test_responses_count_max_output_tokens() -> None:
    base = bound(RESPONSES, input="hi")
    assert worst(RESPONSES, input="hi", max_output_tokens=7) == base + 7
    assert worst(RESPONSES, input="hi", max_output_tokens=7, max_tokens=100) == base + 7
    assert worst(RESPONSES, input="hi") == base + CONTEXT


def test_a_list_of_prompts_multiplies() -> None:
    for prompt, prompts in ((["a", "b", "c"], 3), ([[1], [2]], 2), ([1, 2, 3], 1)):  # token ids: one prompt
        assert worst(COMPLETIONS, prompt=prompt, max_tokens=5, n=2) == bound(
            COMPLETIONS, prompt=prompt) + prompts * 2 * 5


@pytest.mark.parametrize("max_tokens", [None, "lots", "12", -5, 0, True, 1.5, 10**12])
def test_no_usable_max_tokens_means_the_context_length(max_tokens: Any) -> None:
    fields = {} if max_tokens is None else {"max_tokens": max_tokens}
    assert worst(CHAT, messages=USER, **fields) == bound(CHAT, messages=USER) + CONTEXT
    assert worst(CHAT, messages=USER, n=2, **fields) == bound(CHAT, messages=USER) + 2 * CONTEXT
    assert worst(COMPLETIONS, prompt="p", **fields) == bound(COMPLETIONS, prompt="p") + CONTEXT


def test_the_prompt_bound_never_exceeds_the_context_per_prompt() -> None:
    long = "word " * 5000
    assert worst(CHAT, messages=[{"role": "user", "content": long}], max_tokens=1) == CONTEXT + 1
    assert worst(COMPLETIONS, prompt=[long, long], max_tokens=1) == 2 * CONTEXT + 2


@pytest.mark.parametrize(("endpoint", "body"), [
    (TOKENIZE, {"prompt": "word " * 5000}), (TOKENIZE, {"messages": USER}), (DETOKENIZE, {"tokens": [1, 2]})])
def test_tokenizer_endpoints_reserve_nothing(endpoint: str, body: dict[str, Any]) -> None:
    assert worst(endpoint, **body) == 0


def compact(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def test_the_prompt_bound_covers_every_byte_that_reaches_the_prompt() -> None:
    base = bound(CHAT, messages=USER)
    assert base >= len(compact(USER)) + TEMPLATE_TOKENS
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "d" * 300,
                                               "parameters": {"type": "object", "properties": {}}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": ["x" * 400]}}}
    assert bound(CHAT, messages=USER, tools=tools) >= base + len(compact(tools))
    assert bound(CHAT, messages=USER, response_format=schema) >= base + len(compact(schema))
    snowmen = [{"role": "user", "content": "☃" * 100}]  # UTF-8 bytes, not characters
    assert bound(CHAT, messages=snowmen) >= 300 + TEMPLATE_TOKENS
    assert bound(RESPONSES, input="hi", instructions="i" * 500) >= bound(RESPONSES, input="hi") + 500
    # sampling fields never reach the prompt
    assert bound(CHAT, messages=USER, temperature=0.5, max_tokens=10, n=2, seed=1, stream=True,
                 stream_options={"include_usage": True}, logprobs=True, top_logprobs=3) == base


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
    resp = client.post("/v1/chat/completions", json=[chat_body()], headers=auth)
    assert resp.status_code == 400
    assert assert_openai_error(resp.get_json())["type"] == "invalid_request_error"


def test_validation_error_names_param(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/chat/completions", headers=auth, json=chat_body(stream=["yes"]))
    assert resp.status_code == 400
    err = assert_openai_error(resp.get_json())
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "stream"
    assert "stream" in err["message"]


def test_nested_validation_error_param(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/completions", headers=auth,
                       json={"model": MODEL, "prompt": "x", "stream_options": {"include_usage": "maybe"}})
    assert resp.status_code == 400
    assert assert_openai_error(resp.get_json())["param"] == "stream_options.include_usage"


def test_job_body_errors_name_their_place_in_the_job(client: Any, auth: dict[str, str]) -> None:
    resp = client.post("/v1/jobs", headers=auth,
                       json={"endpoint": "/v1/chat/completions", "body": {"model": MODEL, "messages": []}})
    assert resp.status_code == 400
    assert assert_openai_error(resp.get_json())["param"] == "body.messages"


# --- SSE framing of the API's own frames ------------------------------------


def test_an_in_stream_error_is_one_data_frame() -> None:
    from api.http import errors

    frame = sse.data(errors.error(500, "boom", "server_error", "engine_error"))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n\n") == 1
    assert json.loads(frame[len(b"data: "):]) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "engine_error"}}
