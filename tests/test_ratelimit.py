"""Rate limits: per key RPM/TPM with OpenAI's headers, per IP probe and brute-force limits."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from api import create_app
from api.accounts.ratelimit import AUTH_ATTEMPTS, AUTH_GATE, AuthFailureGate
from api.db import ApiKey, Database
from api.generation.job_request import parse_job_request, worst_case_tokens
from config import Settings
from queueing.jobs import JobRequest
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, add_key, start_api

BODY = {"model": SCRIPTED_MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
#: BODY's worst case: 45 bytes of its messages' JSON + 64 template + 8 per message + 20 = 137 tokens.
WORST = 137

pytestmark = pytest.mark.usefixtures("scripted_worker")


def a_client_address() -> dict[str, str]:
    """A fresh fake client IP, so per IP counters start at zero."""
    return {"REMOTE_ADDR": f"10.{secrets.randbelow(255)}.{secrets.randbelow(255)}.{secrets.randbelow(255)}"}


def assert_openai_429(resp, code="rate_limit_exceeded"):
    assert resp.status_code == 429
    assert set(resp.json["error"]) == {"message", "type", "param", "code"}
    assert resp.json["error"]["code"] == code
    assert int(resp.headers["Retry-After"]) >= 1


def test_requests_per_minute_with_openai_headers(client, app_config):
    key, _ = add_key(app_config["database_url"], rpm=5)
    responses = [client.get("/v1/models", headers={"X-API-Key": key}) for _ in range(7)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 2
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses[:5]] == ["4", "3", "2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in responses)
    assert responses[0].headers["x-ratelimit-reset-requests"].endswith("s")
    assert_openai_429(responses[-1])
    assert responses[-1].json["error"]["type"] == "requests"


def test_tokens_per_minute_counts_the_worst_case(client, app_config):
    key, _ = add_key(app_config["database_url"], tpm=2 * WORST + 50)
    body = BODY
    job = parse_job_request("/v1/chat/completions", body)
    assert isinstance(job, JobRequest) and worst_case_tokens(job, 2048) == WORST
    first = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == str(2 * WORST + 50)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(WORST + 50)
    second = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body)
    third = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body)
    assert second.status_code == 200
    assert_openai_429(third)
    assert third.json["error"]["type"] == "tokens"


def test_failed_keys_block_the_address(app_config):
    app = create_app({**app_config, "auth_failure_limit": "3/minute"})
    client, env = app.test_client(), a_client_address()
    codes = [client.get("/v1/models", headers={"X-API-Key": "iq-guess"}, environ_base=env).status_code
             for _ in range(3)]
    assert codes == [401, 401, 401]
    assert_openai_429(client.get("/v1/models", headers={"X-API-Key": "iq-guess"}, environ_base=env))
    other = client.get("/v1/models", headers={"X-API-Key": "iq-guess"}, environ_base=a_client_address())
    assert other.status_code == 401  # only the guessing address is blocked
    valid = client.get("/v1/models", headers={"X-API-Key": app_config["api_keys"]}, environ_base=env)
    assert valid.status_code == 200  # a valid key is never refused (issue 15, M3)


def test_failed_keys_share_one_budget_across_endpoints(app_config):
    app = create_app({**app_config, "auth_failure_limit": "4/minute"})
    client, env = app.test_client(), a_client_address()
    wrong, valid = {"X-API-Key": "iq-guess"}, {"X-API-Key": app_config["api_keys"]}
    for path in ("/v1/models", "/v1/usage", "/v1/jobs"):
        assert client.get(path, headers=wrong, environ_base=env).status_code == 401
    # Three failures so far: a valid key from the same address still works, and does not
    # reset the count.
    assert client.get("/v1/models", headers=valid, environ_base=env).status_code == 200
    assert client.get("/v1/files", headers=wrong, environ_base=env).status_code == 401
    # The fourth failure blocks the address's wrong keys on every endpoint; valid keys still work.
    for path in ("/v1/models", "/v1/batches", "/v1/usage"):
        assert_openai_429(client.get(path, headers=wrong, environ_base=env))
        assert client.get(path, headers=valid, environ_base=env).status_code == 200


def test_missing_keys_and_blocked_guesses_do_not_count(app_config, redis_client):
    app = create_app({**app_config, "auth_failure_limit": "2/minute"})
    client, env = app.test_client(), a_client_address()
    for _ in range(3):
        assert client.get("/v1/models", environ_base=env).status_code == 401  # no key at all: not counted
    for _ in range(2):
        assert client.get("/v1/usage", headers={"X-API-Key": "iq-guess"}, environ_base=env).status_code == 401
    for _ in range(2):
        blocked = client.get("/v1/models", headers={"X-API-Key": "iq-guess"}, environ_base=env)
        assert_openai_429(blocked)
        assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    assert client.get("/v1/models", environ_base=env).status_code == 401  # a missing key is named, not 429
    # Only the two refused keys are stored: answers given to a blocked address count nothing.
    assert redis_client.zcard(AuthFailureGate.key(env["REMOTE_ADDR"])) == 2


def test_auth_failure_gate_fails_open(app_config, monkeypatch, caplog):
    app = create_app({**app_config, "auth_failure_limit": "1/minute"})
    gate = app.extensions[AUTH_GATE]

    def down(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(gate, "_refuse", down)
    client, env = app.test_client(), a_client_address()
    with caplog.at_level(logging.WARNING, logger="api.accounts.ratelimit"):
        codes = [client.get("/v1/models", headers={"X-API-Key": "iq-guess"}, environ_base=env).status_code
                 for _ in range(3)]
        valid = client.get("/v1/models", headers={"X-API-Key": app_config["api_keys"]}, environ_base=env)
    assert codes == [401] * 3  # not 429: without Redis nothing is counted
    assert valid.status_code == 200
    assert "auth failure gate unavailable" in caplog.text


def a_forwarded_address() -> dict[str, str]:
    """A fresh client address as the trusted proxy in front of ``guarded_apis`` reports it."""
    return {"X-Forwarded-For": a_client_address()["REMOTE_ADDR"]}


@pytest.fixture(scope="module")
def guarded_apis(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two API processes sharing Redis, five refused keys per address and minute, behind one
    trusted proxy (so each test gets fresh addresses through X-Forwarded-For)."""
    tmp = tmp_path_factory.mktemp("guarded-apis")
    procs = [start_api(redis_url, tmp, AUTH_FAILURE_LIMIT="5/minute", TRUSTED_PROXY_COUNT="1")
             for _ in range(2)]
    yield [base for _, base in procs]
    for proc, _ in procs:
        proc.stop()


def send_together(requests: list[tuple[str, str]]) -> list[int]:
    """Send raw requests ``(base URL, request text)`` on connections opened beforehand, all within
    a millisecond or so (client threads would stagger them); their status codes."""
    socks = []
    for base, _ in requests:
        host, port = base.removeprefix("http://").split(":")
        socks.append(socket.create_connection((host, int(port)), timeout=30))
    for sock, (_, text) in zip(socks, requests, strict=True):
        sock.sendall(text.encode())
    codes = []
    for sock in socks:
        with sock, sock.makefile("rb") as response:
            codes.append(int(response.readline().split()[1]))
    return codes


def test_parallel_guesses_get_exactly_the_budget(guarded_apis: list[str]):
    address = a_forwarded_address()
    paths = ["/v1/models", "/v1/usage", "/v1/jobs", "/v1/files", "/v1/batches"]
    codes = send_together([
        (guarded_apis[i % 2], f"GET {paths[i % 5]} HTTP/1.1\r\nHost: api\r\nX-API-Key: iq-guess-{i}\r\n"
         f"X-Forwarded-For: {address['X-Forwarded-For']}\r\nConnection: close\r\n\r\n")
        for i in range(60)
    ])
    assert codes.count(401) == 5  # exactly the budget, though the 60 guesses arrived together
    assert codes.count(429) == 55
    wrong = {"X-API-Key": "iq-guess"}
    assert httpx.get(f"{guarded_apis[0]}/v1/models", headers={**address, **wrong}).status_code == 429
    other = a_forwarded_address()  # the proxy's X-Forwarded-For entry is the address counted
    assert httpx.get(f"{guarded_apis[1]}/v1/models", headers={**other, **wrong}).status_code == 401
    valid = {"X-API-Key": TEST_KEY}
    assert httpx.get(f"{guarded_apis[0]}/v1/models", headers={**address, **valid}).status_code == 200


@contextlib.contextmanager
def redis_commands(redis_url: str) -> Iterator[list[dict[str, Any]]]:
    """Every command Redis runs while the block runs (MONITOR: the commands scripts run too,
    with ``client_type`` ``lua``), in order."""
    client = redis.Redis.from_url(redis_url)
    seen: list[dict[str, Any]] = []
    marker = f"end-of-monitoring-{secrets.token_hex(8)}"
    with client.monitor() as monitor:  # monitoring once this returns

        def listen() -> None:
            for command in monitor.listen():
                if marker in command["command"]:
                    return
                seen.append(command)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        try:
            yield seen
        finally:
            client.echo(marker)
            listener.join(30)


def test_parallel_valid_keys_are_not_held_back_by_the_budget(guarded_apis: list[str], redis_url: str):
    address = a_forwarded_address()
    codes = [httpx.get(f"{guarded_apis[i % 2]}/v1/models", headers={**address, "X-API-Key": "iq-guess"}
                       ).status_code for i in range(6)]
    assert codes == [401] * 5 + [429]  # the address used up its budget: it is blocked
    with redis_commands(redis_url) as commands:
        codes = send_together([
            (guarded_apis[i % 2], f"GET /v1/models HTTP/1.1\r\nHost: api\r\nX-API-Key: {TEST_KEY}\r\n"
             f"X-Forwarded-For: {address['X-Forwarded-For']}\r\nConnection: close\r\n\r\n")
            for i in range(40)
        ])
    assert codes == [200] * 40  # a valid key is never refused, blocked address or not (issue 15, M3)
    # Nothing waits on anything: a valid key never reaches the gate (no Redis call on its behalf).
    ip = address["X-Forwarded-For"]
    assert [c for c in commands if AuthFailureGate.key(ip) in c["command"]] == []
    leftover = redis.Redis.from_url(redis_url).keys(f"{AUTH_ATTEMPTS}:{{{ip}}}*")
    assert [k.decode() for k in leftover] == [AuthFailureGate.key(ip)]


def test_probe_endpoints_are_limited_per_address(app_config):
    app = create_app({**app_config, "ip_rate_limit": "4/minute"})
    client, env = app.test_client(), a_client_address()
    codes = [client.get("/health", environ_base=env).status_code for _ in range(5)]
    assert codes == [200] * 4 + [429]
    assert_openai_429(client.get("/health", environ_base=env))


def test_rpm_holds_exactly_across_two_api_processes(two_apis):
    tmp, bases = two_apis
    key, _ = add_key(f"sqlite:///{tmp / 'inferq.db'}", rpm=20)

    def one(i: int) -> int:
        return httpx.get(f"{bases[i % 2]}/v1/models", headers={"X-API-Key": key}, timeout=30).status_code

    with ThreadPoolExecutor(25) as pool:
        codes = list(pool.map(one, range(60)))
    assert codes.count(200) == 20
    assert codes.count(429) == 40


def test_tpm_holds_exactly_across_two_api_processes(two_apis):
    tmp, bases = two_apis
    key, _ = add_key(f"sqlite:///{tmp / 'inferq.db'}", tpm=7 * WORST + 50)
    body = BODY

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{bases[i % 2]}/v1/chat/completions", headers={"X-API-Key": key}, json=body,
                          timeout=60)

    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(one, range(40)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 7
    assert codes.count(429) == 33
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["type"] == "tokens" for r in refused)
    assert all(r.headers["x-ratelimit-remaining-tokens"] == "50" for r in refused)


def test_refused_requests_cost_no_tokens_per_minute(client, app_config):
    key, _ = add_key(app_config["database_url"], tpm=300, daily_tokens=WORST + 10, models=SCRIPTED_MODEL)
    headers = {"X-API-Key": key}
    body = BODY

    def chat(**extra):
        return client.post("/v1/chat/completions", headers=headers, json={**body, **extra})

    for _ in range(4):  # each would charge WORST tokens if refusals were charged
        assert chat(model="some-other-model").status_code == 404
        assert chat(max_tokens=10**6).status_code == 400
        for job_body, status in (({"model": "some-other-model"}, 404), ({"max_tokens": 10**6}, 400)):
            job = {"endpoint": "/v1/chat/completions", "body": {**body, **job_body}}
            assert client.post("/v1/jobs", headers=headers, json=job).status_code == status
    first = chat()
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == str(300 - WORST)
    # The daily quota now refuses another WORST: the tokens charged per minute come back.
    for _ in range(3):
        refused = chat()
        assert_openai_429(refused, code="quota_exceeded")
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(300 - WORST)


def test_model_restricted_key_sees_and_uses_only_its_models(client, app_config):
    key, _ = add_key(app_config["database_url"], models="some-other-model")
    headers = {"X-API-Key": key}
    assert client.get("/v1/models", headers=headers).json["data"] == []
    resp = client.post("/v1/chat/completions", headers=headers,
                       json={"model": SCRIPTED_MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 404
    assert resp.json["error"]["code"] == "model_not_found"


def test_revocation_is_immediate_on_every_api_process(two_apis):
    import datetime as dt

    from sqlalchemy import update

    tmp, bases = two_apis
    url = f"sqlite:///{tmp / 'inferq.db'}"
    key, key_id = add_key(url)
    assert all(httpx.get(f"{b}/v1/models", headers={"X-API-Key": key}).status_code == 200 for b in bases)
    db = Database(Settings(database_url=url))
    with db.sessions.begin() as session:
        session.execute(update(ApiKey).where(ApiKey.public_id == key_id)
                        .values(revoked_at=dt.datetime.now(dt.UTC)))
    assert all(httpx.get(f"{b}/v1/models", headers={"X-API-Key": key}).status_code == 401 for b in bases)


def test_no_key_material_in_logs(two_apis):
    tmp, bases = two_apis
    secret_guess = "iq-" + secrets.token_urlsafe(24)
    httpx.get(f"{bases[0]}/v1/models", headers={"Authorization": f"Bearer {secret_guess}"})
    key, _ = add_key(f"sqlite:///{tmp / 'inferq.db'}")
    body = {"model": SCRIPTED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    httpx.post(f"{bases[1]}/v1/chat/completions", headers={"X-API-Key": key}, json=body)
    logs = "".join(p.read_text() for p in tmp.glob("*.log"))
    assert "rejected API key iq-" in logs  # the prefix is logged...
    assert secret_guess not in logs and key not in logs  # ...never the key
