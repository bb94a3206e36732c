"""Differential test (issue 11): inferq answers as vLLM's own OpenAI server does.

vLLM's server (``python -m vllm.entrypoints.openai.api_server``) runs with the very
arguments the real worker gets (``workers.engine.server_argv`` of ``REAL_WORKER_ENV``);
each request goes to it, then to inferq (``real_stack``), one after the other (never
concurrently: batch composition changes float rounding), with the ``openai`` SDK.
Statuses must match (and vLLM's error message), and a success must be the same body
once ids and timestamps are set aside: content, tool calls, finish reasons, usage, and
every float (logprobs) within 1e-4.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from config import Settings
from tests.conftest import REAL_MODEL, REAL_WORKER_ENV, SCRIPTED_MODEL, TEST_KEY, Process, free_port, wait_for
from tests.hostile_cases import FORWARDED
from workers.engine import server_argv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two engines start before the first test

WORKER_FIELDS: dict[str, Any] = {k.lower(): v for k, v in REAL_WORKER_ENV.items()}
SETTINGS = Settings(_env_file=None, **WORKER_FIELDS)
M = REAL_MODEL
IGNORED = frozenset({"id", "created", "created_at"})  # ids and timestamps may be inferq's own
TOLERANCE = 1e-4
Q: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
          "required": ["capital"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA, "strict": True}}
# A tool call is decoded under a grammar nearly one character at a time: a whole call takes
# about 48 tokens on this model (16 ends it inside `{"name":`, and no tool call is parsed).
TOOL_TOKENS = 64


def hello(words: int) -> list[dict[str, str]]:
    """A chat prompt of ``words`` + 31 tokens (SmolLM2's chat template adds 31)."""
    return [{"role": "user", "content": "hello " * words}]


@pytest.fixture(scope="module")
def vllm_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server with the real worker's arguments, for this module."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *server_argv(SETTINGS, on_cpu=True),
            "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(SETTINGS.kv_cache_space_gib), "PYTHONUNBUFFERED": "1"}
    server = Process(argv, env, tmp_path_factory.mktemp("vllm-server") / "vllm-server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/health", timeout=2).is_success, 300, "vLLM's own server",
                 server.proc)
    except Exception:
        server.stop(30)
        print(server.log_tail(60))
        raise
    yield base
    server.stop(60)


@dataclass
class Pair:
    ref: openai.OpenAI
    iq: openai.OpenAI
    ref_base: str
    iq_base: str


@pytest.fixture(scope="module")
def pair(vllm_base: str, real_stack: dict[str, str]) -> Pair:
    def sdk(base: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=180)

    return Pair(sdk(vllm_base, "EMPTY"), sdk(real_stack["base"], TEST_KEY), vllm_base, real_stack["base"])


Outcome = tuple[int, Any]  # (HTTP status, JSON-able body or summary)


def outcome(call: Callable[[openai.OpenAI], Any], client: openai.OpenAI,
            summary: Callable[[Any], Any]) -> Outcome:
    try:
        result = call(client)
    except openai.APIStatusError as e:
        return e.status_code, e.body
    return 200, summary(result)


def difference(a: Any, b: Any, path: str = "$") -> str | None:
    """Where ``a`` (vLLM) and ``b`` (inferq) differ; a missing key counts as null."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted((a.keys() | b.keys()) - IGNORED, key=str):
            if found := difference(a.get(key), b.get(key), f"{path}.{key}"):
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items on vLLM, {len(b)} on inferq"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := difference(x, y, f"{path}[{i}]"))), None)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return None if abs(a - b) <= TOLERANCE else f"{path}: {a!r} on vLLM, {b!r} on inferq"
    return None if a == b else f"{path}: {a!r} on vLLM, {b!r} on inferq"


def assert_same(ref: Outcome, iq: Outcome, what: str, messages: bool = True) -> None:
    detail = (f"{what}\n--- vLLM {ref[0]}:\n{json.dumps(ref[1], indent=1, default=str)}"
              f"\n--- inferq {iq[0]}:\n{json.dumps(iq[1], indent=1, default=str)}")
    assert ref[0] == iq[0], f"status differs: {detail}"
    if ref[0] != 200:  # vLLM's error, with its message, in OpenAI's error shape
        assert isinstance(iq[1], dict) and set(iq[1]) >= {"message", "type", "param", "code"}, detail
        assert not messages or iq[1]["message"] == ref[1]["message"], f"error message differs: {detail}"
        return
    found = difference(ref[1], iq[1])
    assert found is None, f"{found}\n{detail}"


def dump(response: Any) -> Any:
    return response.model_dump(mode="json")


def ask(pair: Pair, call: Callable[[openai.OpenAI], Any], what: str, summary: Callable[[Any], Any] = dump,
        messages: bool = True) -> tuple[Outcome, Outcome]:
    """Send one request to vLLM's server, then to inferq, and assert they answer alike."""
    ref, iq = outcome(call, pair.ref, summary), outcome(call, pair.iq, summary)
    assert_same(ref, iq, what, messages)
    return ref, iq


def chunks_summary(chunks: list[Any]) -> dict[str, Any]:
    """A chat or completions stream as a client reads it: text and finish reason per choice, usage chunks."""
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text[choice.index] = text.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return {"text": text, "finish": finish, "usage_presence": sorted({c.usage is not None for c in chunks}),
            "usage": [c.usage.model_dump(mode="json") for c in chunks if c.usage is not None]}


def responses_summary(events: list[Any]) -> dict[str, Any]:
    """A streamed /v1/responses: event types, the text of its deltas, the completed response."""
    done = [e.response.model_dump(mode="json") for e in events if e.type == "response.completed"]
    return {"types": [e.type for e in events], "completed": done,
            "text": "".join(e.delta for e in events if e.type == "response.output_text.delta")}


def chat(**kw: Any) -> Callable[[openai.OpenAI], Any]:
    args = {"model": M, "messages": Q, "temperature": 0, "max_tokens": 16, **kw}
    if kw.get("stream"):
        return lambda c: list(c.chat.completions.create(**args))
    return lambda c: c.chat.completions.create(**args)


def completion(**kw: Any) -> Callable[[openai.OpenAI], Any]:
    args = {"model": M, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8, **kw}
    if kw.get("stream"):
        return lambda c: list(c.completions.create(**args))
    return lambda c: c.completions.create(**args)


def named(tool: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool}}


# n > 1 needs temperature > 0 in vLLM. Seeded sampling draws from a per-request generator, so it
# does not depend on the batch: the same server, and a restarted one, gave the same texts here.
SEEDED = {"temperature": 0.8, "seed": 1234, "n": 2, "max_tokens": 8}
USAGE = {"include_usage": True}
Case = tuple[Callable[[openai.OpenAI], Any], Callable[[Any], Any]]
CASES: dict[str, Case] = {
    # the table of issue 11 (json_schema and the named/required tool choices: tests below)
    "json_object": (chat(messages=[{"role": "user", "content": "Give a JSON object."}],
                         response_format={"type": "json_object"}), dump),
    "logprobs": (chat(max_tokens=6, logprobs=True, top_logprobs=5), dump),
    "n2": (chat(**SEEDED), dump),
    "n2 streamed with usage": (chat(**SEEDED, stream=True, stream_options=USAGE), chunks_summary),
    "completions echo logprobs": (completion(echo=True, logprobs=3), dump),
    "tool_choice auto": (chat(messages=WEATHER, tools=TOOLS, tool_choice="auto"), dump),
    "responses": (lambda c: c.responses.create(model=M, input=Q[0]["content"], temperature=0,
                                               max_output_tokens=16), dump),
    "responses streamed": (lambda c: list(c.responses.create(model=M, input=Q[0]["content"], temperature=0,
                                                             max_output_tokens=16, stream=True)),
                           responses_summary),
    # more
    "stop string": (chat(stop=[" of"]), dump),
    "seed": (chat(messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0, seed=42),
             dump),
    "penalties": (chat(messages=[{"role": "user", "content": "List fruits."}], presence_penalty=1.5,
                       frequency_penalty=1.0), dump),
    "vllm sampling extras": (chat(extra_body={"top_k": 5, "repetition_penalty": 1.3, "min_tokens": 4}), dump),
    "context edge": (chat(messages=hello(984)), dump),  # 1015 + 16 > 1024: vLLM clamps max_tokens, 200
    "context full": (chat(messages=hello(993), max_tokens=1), dump),  # 1024 tokens: 400, no room left
    "prompt over context": (chat(messages=hello(994), max_tokens=1), dump),  # 1025 tokens: 400
    "invalid json_schema": (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "nonsense"}}}), dump),
    "tool_choice unknown tool": (chat(messages=WEATHER, tools=TOOLS, tool_choice=named("nope")), dump),
    "top_logprobs over the limit": (chat(logprobs=True, top_logprobs=SETTINGS.max_logprobs + 1), dump),
    "n greedy": (chat(n=2), dump),  # 400 in vLLM: n > 1 needs temperature > 0
    "streamed error": (chat(stream=True, n=2), chunks_summary),  # the 400 comes before any chunk
    "n2 streamed without usage": (chat(**SEEDED, stream=True), chunks_summary),
    "streamed without usage": (chat(stream=True), chunks_summary),
    "streamed include_usage false": (chat(stream=True, stream_options={"include_usage": False}),
                                     chunks_summary),
    "max_tokens missing": (lambda c: c.chat.completions.create(model=M, messages=Q, temperature=0), dump),
    "completions two prompts": (completion(prompt=["The capital of France is", "One, two,"]), dump),
    "completions streamed with usage": (completion(stream=True, stream_options=USAGE), chunks_summary),
    "unknown model": (chat(model="no-such-model"), dump),  # inferq's API answers it: status only
}


@pytest.mark.parametrize("name", CASES)
def test_same_answer(pair: Pair, name: str) -> None:
    call, summary = CASES[name]
    ref, iq = ask(pair, call, name, summary, messages=name != "unknown model")
    if "without usage" in name or "false" in name:  # the worker asks for usage; the client must not see it
        assert ref[1]["usage_presence"] == iq[1]["usage_presence"] == [False]


def test_json_schema_output_is_valid(pair: Pair) -> None:
    ref, iq = ask(pair, chat(response_format=JSON_SCHEMA), "json_schema")
    for side, (_, body) in (("vLLM", ref), ("inferq", iq)):
        assert body["choices"][0]["finish_reason"] == "stop", side
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_calls(pair: Pair, choice: str) -> None:
    """The forced call ends within TOOL_TOKENS: both servers return it parsed (finish "tool_calls"/"stop")."""
    tool_choice = named("get_weather") if choice == "named" else choice
    ref, iq = ask(pair, chat(messages=WEATHER, tools=TOOLS, tool_choice=tool_choice, max_tokens=TOOL_TOKENS),
                  f"tool_choice {choice}")
    for _, body in (ref, iq):
        assert [t["function"]["name"] for t in body["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize(("path", "body"), [
    ("/tokenize", {"model": M, "prompt": "Hello world"}),
    ("/tokenize", {"model": M, "messages": Q, "add_generation_prompt": True}),
    ("/detokenize", {"model": M, "tokens": [19556, 905]}),
    ("/tokenize", {"model": M}),  # neither prompt nor messages
], ids=["tokenize prompt", "tokenize messages", "detokenize", "tokenize nothing"])
def test_tokenization(pair: Pair, path: str, body: dict[str, Any]) -> None:
    ref = httpx.post(pair.ref_base + path, json=body, timeout=60)
    iq = httpx.post(pair.iq_base + path, json=body, timeout=60,
                    headers={"Authorization": f"Bearer {TEST_KEY}"})

    def parsed(r: httpx.Response) -> Any:
        try:
            return r.json()
        except ValueError:
            return r.text

    def out(r: httpx.Response) -> Outcome:  # an error as the SDK reads it: the inner error object
        answer = parsed(r)
        if r.status_code != 200 and isinstance(answer, dict):
            answer = answer.get("error", answer)
        return r.status_code, answer

    assert_same(out(ref), out(iq), f"POST {path} {body}")


def test_models(pair: Pair) -> None:
    ref = {m.id: m.model_dump() for m in pair.ref.models.list().data}
    iq = {m.id: m.model_dump() for m in pair.iq.models.list().data}  # the session's scripted worker too
    assert sorted(ref) == [M] and M in iq
    for key in ("max_model_len", "root", "object"):
        assert iq[M].get(key) == ref[M][key], f"{key}: vLLM {ref[M]} inferq {iq[M]}"


@pytest.mark.parametrize(("path", "content"), [(case[1], case[2]) for case in FORWARDED],
                         ids=[case[0] for case in FORWARDED])
def test_hostile_values_get_vllms_answer(pair: Pair, path: str, content: bytes) -> None:
    """Hostile values the API forwards (it reads only what admission needs): vLLM's serving
    layer judges them on the worker, with the status and message its own server gives (it
    accepts a custom role, and so does inferq)."""
    body = json.loads(content.replace(SCRIPTED_MODEL.encode(), M.encode()))
    body.setdefault("temperature", 0)  # a body vLLM accepts must be sampled alike on both
    content = json.dumps(body).encode()  # NaN and Infinity stay the JSON literals they were
    headers = {"Content-Type": "application/json"}
    ref = httpx.post(pair.ref_base + path, content=content, headers=headers, timeout=60)
    iq = httpx.post(pair.iq_base + path, content=content, timeout=60,
                    headers={**headers, "Authorization": f"Bearer {TEST_KEY}"})
    assert ref.status_code < 500, ref.text

    def answer(r: httpx.Response) -> Outcome:
        body = r.json()
        return r.status_code, body if r.status_code == 200 else body.get("error")

    assert_same(answer(ref), answer(iq), f"POST {path} {content!r}")
