"""Fuzzing the API: schemathesis from ``/openapi.json``, hostile handwritten requests, the document itself.

The fuzzing runs against one real gunicorn API process in front of the scripted worker. Whatever
is sent, the answer is never a 5xx, every error has OpenAI's shape, and the process stays healthy.
The number of cases schemathesis generated and ran is printed (``pytest -s``).

schemathesis drives generation through its Python API (``APIOperation.as_strategy`` under
Hypothesis' ``@given``): its pytest plugin does not run under pytest 9.2, which renamed the node
attribute it rewrites.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error

from api.accounts.keys import create_key
from api.db import Database
from config import Settings
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, Process, start_api
from tests.hostile_cases import BAD_BODIES, CHAT, chat, encoded, raw_chat

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
MAX_REQUEST_BYTES = 64 * 1024
MAX_FILE_BYTES = 32 * 1024
MAX_EXAMPLES = 30  # per operation and generation mode
#: What test_schemathesis generates and runs (derandomized: the same on every run of this schema
#: with these versions of schemathesis and Hypothesis).
EXPECTED_CASES = 999
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
# The scripted engine emits max_tokens tokens, so a request for 10**12 of them would stream for
# ever (vLLM refuses it as longer than the context). Fuzzed requests for the served model are
# capped here; the huge values themselves are sent below with keys whose limits refuse them.
FUZZ_MAX_TOKENS = 16
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")


# --- the API under test ------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_proc(redis_url: str, scripted_worker: Process,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    proc, base = start_api(
        redis_url, tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL, FILES_DIR=str(tmp / "files"),
        QUEUE_TIMEOUT="10", IDLE_TIMEOUT="5", MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
        MAX_FILE_BYTES=str(MAX_FILE_BYTES), IP_RATE_LIMIT="100000/minute", AUTH_FAILURE_LIMIT="100000/minute")
    yield proc, base
    proc.stop()


@pytest.fixture(scope="module")
def base(api_proc: tuple[Process, str]) -> str:
    return api_proc[1]


@pytest.fixture(scope="module")
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def limited_keys(api_proc: tuple[Process, str]) -> dict[str, str]:
    """Keys with a daily quota and a tokens-per-minute limit, in the API's database."""
    db = Database(Settings(database_url=f"sqlite:///{api_proc[0].log_path.parent / 'inferq.db'}"))
    return {"quota": create_key(db, "fuzz-quota", daily_tokens=1000).key,
            "tpm": create_key(db, "fuzz-tpm", tpm=1000).key}


def assert_openai_error(status: int, content: bytes, code: str | None = None) -> dict[str, Any]:
    """``content`` is ``{"error": {"message": str, "type": str, "param", "code"}}``; returns the error."""
    try:
        body = json.loads(content)
    except ValueError:
        raise AssertionError(f"{status} with a body that is not JSON: {content[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"{status}: not OpenAI's error shape: {body}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- schemathesis --------------------------------------------------------------------------


def _served_model(ctx: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Half the generated bodies name the served model, so they reach the worker."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return st.sampled_from([body, {**body, "model": SCRIPTED_MODEL}])
    inner = body.get("body") if isinstance(body, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("model"), str):
        return st.sampled_from([body, {**body, "body": {**inner, "model": SCRIPTED_MODEL}}])
    return st.just(body)


@pytest.fixture(scope="module")
def api_schema(base: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    schema.config.update(headers=dict(AUTH))
    schema.hook("flatmap_body")(_served_model)
    return schema


def _too_many_tokens(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return float(value) > FUZZ_MAX_TOKENS  # pydantic also takes 1e20 and "100000" as ints
    except (TypeError, ValueError):
        return False


def _bound_tokens(case: schemathesis.Case) -> None:
    """Cap the tokens of requests that would run on the scripted engine (see FUZZ_MAX_TOKENS)."""
    for body in (case.body, case.body.get("body") if isinstance(case.body, dict) else None):
        if isinstance(body, dict) and body.get("model") == SCRIPTED_MODEL:
            for field in TOKEN_FIELDS:
                if _too_many_tokens(body.get(field)):
                    body[field] = FUZZ_MAX_TOKENS


def openai_error_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                       case: schemathesis.Case) -> bool | None:
    """Every 4xx and 5xx body has OpenAI's error shape."""
    if response.status_code >= 400:
        assert_openai_error(response.status_code, response.content)
    return None


def _run_cases(strategy: st.SearchStrategy[schemathesis.Case], mode: str, stats: Counter[str]) -> None:
    @settings(max_examples=1 if mode == "example" else MAX_EXAMPLES, deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        _bound_tokens(case)
        stats["cases"] += 1
        stats[mode] += 1
        stats[f"op {case.operation.label}"] += 1
        response = case.call(timeout=60)
        stats[f"status {response.status_code // 100}xx"] += 1
        case.validate_response(response, checks=[not_a_server_error, openai_error_shape])

    run()


def _can_be_invalid(operation: Any) -> bool:
    """Whether a negative case exists: a body or a typed parameter to break. An operation whose
    only inputs are path ids (any string is a valid id) or nothing at all has none."""
    definition = operation.definition.raw
    parameters = definition.get("parameters", [])
    return "requestBody" in definition or any(
        p.get("in") != "path" or p.get("schema") != {"type": "string"} for p in parameters)


def test_schemathesis(api_schema: Any) -> None:
    """Every operation: its documented examples, then MAX_EXAMPLES positive and (where an input can
    be invalid) negative cases each."""
    stats: Counter[str] = Counter()
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        negative = schemathesis.GenerationMode.NEGATIVE
        modes = [m for m in MODES if m is not negative or _can_be_invalid(operation)]
        strategies = [(mode.value, operation.as_strategy(generation_mode=mode)) for mode in modes]
        strategies += [("example", example) for example in operation.get_strategies_from_examples()]
        for mode, strategy in strategies:
            try:
                _run_cases(strategy, mode, stats)
            except Exception as exc:  # noqa: BLE001 - gathered, reported together below (Unsatisfiable too)
                failures.append(f"{operation.label} ({mode}): {type(exc).__name__}: {exc}")
    print(_summary(stats))  # shown with -s, and with the failures
    assert not failures, "\n\n".join(failures)
    # docs/failure-modes.md states this number: change both together.
    assert stats["cases"] == EXPECTED_CASES, _summary(stats)


def _summary(stats: Counter[str]) -> str:
    lines = [f"schemathesis: {stats['cases']} cases generated and run ({stats['example']} documented "
             f"examples, {stats['positive']} positive, {stats['negative']} negative); responses: "
             + ", ".join(f"{key[7:]} {n}" for key, n in sorted(stats.items()) if key.startswith("status "))]
    lines += [f"  {key[3:]}: {n}" for key, n in sorted(stats.items()) if key.startswith("op ")]
    return "\n".join(lines)


# --- handwritten hostile requests (cases in tests/hostile_cases.py) ------------------------


@pytest.mark.parametrize(("path", "content", "status", "code"), [case[1:] for case in BAD_BODIES],
                         ids=[case[0] for case in BAD_BODIES])
def test_bad_body_is_4xx_with_openai_error(http: httpx.Client, path: str, content: bytes, status: int,
                                           code: str | None) -> None:
    resp = http.post(path, content=content, headers=JSON_AUTH)
    assert resp.status_code == status, resp.text
    assert_openai_error(resp.status_code, resp.content, code)


@pytest.mark.parametrize("key", ["quota", "tpm", "unlimited"])
@pytest.mark.parametrize("max_tokens", [10**12, 2**63, 10**30])
@pytest.mark.parametrize("path", [CHAT, "/v1/jobs"])
def test_huge_max_tokens_is_refused_before_queueing(http: httpx.Client, limited_keys: dict[str, str],
                                                    key: str, max_tokens: int, path: str) -> None:
    # Refused as longer than the context (400, as vLLM's server does) before anything is queued;
    # a key's token limit may refuse it first (429). No Redis counter overflows either way.
    body = chat(max_tokens=max_tokens)
    headers = AUTH if key == "unlimited" else {"Authorization": f"Bearer {limited_keys[key]}"}
    resp = http.post(path, json=body if path == CHAT else {"endpoint": CHAT, "body": body}, headers=headers)
    limited = "quota_exceeded" if key == "quota" else "rate_limit_exceeded"
    expected = {400: None, 429: limited}
    assert resp.status_code in expected, resp.text
    if key == "unlimited":
        assert resp.status_code == 400
    assert_openai_error(resp.status_code, resp.content, expected[resp.status_code])


@pytest.mark.parametrize("text", [
    "a\u0000b", "\u202eright to left\u202c", "emoji 😀🎉", "4-byte 𝄞 \U0010fffd", "\ufeffbom \uffff nonchar",
    "e\u0301\u0301 combining", "\u05e9\u05dc\u05d5\u05dd",
])
def test_unusual_but_valid_unicode_is_served(http: httpx.Client, text: str) -> None:
    resp = http.post(CHAT, json=chat(messages=[{"role": "user", "content": text}]), headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "tok0 tok1"


def test_escaped_surrogate_pair_is_served(http: httpx.Client) -> None:
    resp = http.post(CHAT, content=raw_chat(r'"\ud83d\ude00"'), headers=JSON_AUTH)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("line", [
    b"[" * 20_000,
    encoded({"custom_id": "\ud800", "method": "POST", "url": CHAT, "body": chat()}),
    encoded({"custom_id": "a", "method": "POST", "url": CHAT, "body": chat(user="\ud800")}),
], ids=["nested deep", "surrogate custom_id", "surrogate body"])
def test_bad_upload_line_is_400(http: httpx.Client, line: bytes) -> None:
    resp = http.post("/v1/files", files={"file": ("in.jsonl", line + b"\n")}, data={"purpose": "batch"},
                     headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert_openai_error(400, resp.content, "invalid_file")


# --- oversize bodies -----------------------------------------------------------------------


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 8192):
        yield data[start:start + 8192]


OVERSIZE = encoded(chat(messages=[{"role": "user", "content": "x " * MAX_REQUEST_BYTES}]))


@pytest.mark.parametrize(("headers", "chunked"), [
    (JSON_AUTH, False), ({"Content-Type": "application/json"}, False), (JSON_AUTH, True),
], ids=["with length", "before auth", "chunked"])
def test_oversize_body_is_413(http: httpx.Client, headers: dict[str, str], chunked: bool) -> None:
    resp = http.post(CHAT, content=_chunks(OVERSIZE) if chunked else OVERSIZE, headers=headers)
    assert resp.status_code == 413, resp.text
    assert_openai_error(413, resp.content, "request_too_large")


def test_oversize_upload_is_413(http: httpx.Client) -> None:
    resp = http.post("/v1/files", files={"file": ("in.jsonl", b"{}\n" * 2 * MAX_FILE_BYTES)},
                     data={"purpose": "batch"}, headers=AUTH)
    assert resp.status_code == 413, resp.text
    assert_openai_error(413, resp.content, "file_too_large")


def raw_request(base: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (for what HTTP clients refuse to send); returns (status, body)."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_declared_oversize_is_413_without_reading_the_body(base: str) -> None:
    status, body = raw_request(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n"
                                     b"Connection: close\r\n\r\n{")
    assert status == 413
    assert_openai_error(413, body, "request_too_large")


# --- missing and odd headers -----------------------------------------------------------------

BODY = encoded(chat())
BAD_HEADERS: list[tuple[str, list[tuple[str, str]], int, str | None]] = [
    ("no Content-Type", [("Authorization", AUTH["Authorization"])], 400, None),
    ("text/plain", [("Authorization", AUTH["Authorization"]), ("Content-Type", "text/plain")], 400, None),
    ("form", [("Authorization", AUTH["Authorization"]),
              ("Content-Type", "application/x-www-form-urlencoded")], 400, None),
    ("multipart without boundary", [("Authorization", AUTH["Authorization"]),
                                    ("Content-Type", "multipart/form-data")], 400, None),
    ("no key", [("Content-Type", "application/json")], 401, "missing_api_key"),
    ("key without Bearer", [("Authorization", TEST_KEY), ("Content-Type", "application/json")], 401,
     "missing_api_key"),
    ("Basic", [("Authorization", "Basic dXNlcjpwYXNz"), ("Content-Type", "application/json")], 401,
     "missing_api_key"),
    ("Bearer and nothing", [("Authorization", "Bearer"), ("Content-Type", "application/json")], 401,
     "missing_api_key"),
    ("Token scheme", [("Authorization", f"Token {TEST_KEY}"), ("Content-Type", "application/json")], 401,
     "missing_api_key"),
    ("wrong X-API-Key", [("X-API-Key", "iq-wrong-key-000000000000"), ("Content-Type", "application/json")],
     401, "invalid_api_key"),
    ("huge key", [("Authorization", "Bearer " + "k" * 8000), ("Content-Type", "application/json")], 401,
     "invalid_api_key"),
    ("two Authorization headers", [("Authorization", AUTH["Authorization"]), ("Authorization", "Bearer x"),
                                   ("Content-Type", "application/json")], 401, "invalid_api_key"),
]


@pytest.mark.parametrize(("headers", "status", "code"), [case[1:] for case in BAD_HEADERS],
                         ids=[case[0] for case in BAD_HEADERS])
def test_odd_headers_are_4xx_with_openai_error(http: httpx.Client, headers: list[tuple[str, str]],
                                               status: int, code: str | None) -> None:
    resp = http.post(CHAT, content=BODY, headers=headers)
    assert resp.status_code == status, resp.text
    assert_openai_error(status, resp.content, code)


def test_non_ascii_key_bytes_are_401(base: str) -> None:
    status, body = raw_request(base, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    assert status == 401
    assert_openai_error(401, body, "invalid_api_key")


def test_odd_request_id_is_replaced(http: httpx.Client) -> None:
    resp = http.post(CHAT, json=chat(), headers={**AUTH, "X-Request-ID": "bad id\t" + "r" * 6000})
    assert resp.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"k" * 9000 + b"\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
], ids=["header over gunicorn's field limit", "two Content-Length", "Content-Length not a number",
        "two Content-Type"])
def test_malformed_http_is_refused_by_gunicorn(base: str, request_bytes: bytes) -> None:
    """gunicorn answers these itself, before the app: a 4xx, never a 5xx, in OpenAI's shape
    (``api/http/gunicorn_conf.py`` replaces its HTML page)."""
    status, body = raw_request(base, request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    assert 400 <= status < 500
    assert_openai_error(status, body)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", CHAT, 405), ("PUT", "/v1/files/file-x", 405), ("GET", "/v1/nope", 404),
    ("GET", "/v1/files/a%00b", 404), ("GET", "/v1/jobs/a%00b?wait=1", 404),
    ("GET", "/v1/batches/%ED%A0%80", 404), ("GET", "/v1/jobs?limit=0", 400),
    ("GET", "/v1/jobs?after=a%00b", 400), ("GET", "/v1/files?limit=10001", 400),
    ("GET", "/v1/batches?limit=-1", 400), ("GET", "/v1/jobs/x?wait=nan", 400),
    ("GET", "/v1/jobs/x?wait=-1", 400), ("GET", "/v1/usage?start_date=%00", 400),
    ("GET", "/v1/usage?start_date=2026-01-02&end_date=2026-01-01", 400),
])
def test_odd_paths_and_queries_are_4xx(http: httpx.Client, method: str, path: str, status: int) -> None:
    resp = http.request(method, path, headers=AUTH)
    assert resp.status_code == status, resp.text
    assert_openai_error(status, resp.content)


def test_job_over_the_context_fails_with_its_error(http: httpx.Client) -> None:
    created = http.post("/v1/jobs", json={"endpoint": CHAT, "body": chat(
        messages=[{"role": "user", "content": "[[too_long]]"}])}, headers=AUTH)
    assert created.status_code == 202, created.text
    job = http.get(f"/v1/jobs/{created.json()['id']}", params={"wait": 10}, headers=AUTH).json()
    assert job["status"] == "failed"
    assert "maximum context length" in job["error"]["message"]


# --- after all of it ---------------------------------------------------------------------------


def test_process_stays_healthy(api_proc: tuple[Process, str], http: httpx.Client) -> None:
    proc, _ = api_proc
    assert proc.proc.poll() is None
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    resp = http.post(CHAT, json=chat(max_tokens=3), headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    log = proc.log_path.read_text(errors="replace")
    assert "internal error" not in log, proc.log_tail()


# --- the document ------------------------------------------------------------------------------


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_openapi_document_is_valid_and_covers_every_route(app: Any, client: Any) -> None:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    validate(doc)  # OpenAPI 3.1 (openapi-spec-validator picks the version from the document)
    assert doc["openapi"].startswith("3.1")
    routes = {(_openapi_path(rule.rule), method.lower()) for rule in app.url_map.iter_rules()
              for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert {r for r in routes if r[0].startswith("/v1")} <= documented
    assert documented <= routes  # nothing documented that the app does not serve
    assert doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorInfo"}
    error_info = doc["components"]["schemas"]["ErrorInfo"]["properties"]
    assert set(error_info) == {"message", "type", "param", "code"}
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(chat_op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"400", "401", "404", "413", "429", "503", "504"} <= set(chat_op["responses"])
