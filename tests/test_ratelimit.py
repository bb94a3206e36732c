"""Rate limits: per key RPM/TPM with OpenAI's headers, per IP probe and brute-force limits."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api import create_app
from tests.conftest import SCRIPTED_MODEL
from tests.test_metering import add_key

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
    key, _ = add_key(app_config["database_url"], tpm=250)
    body = {"model": SCRIPTED_MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    first = client.post("/v1/chat/completions", headers={"X-API-Key": key}, json=body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "250"
    # worst case = 2 bytes + 64 template + 8 per message + 20 = 94 tokens
    assert first.headers["x-ratelimit-remaining-tokens"] == str(250 - 94)
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
    blocked = client.get("/v1/models", headers={"X-API-Key": app_config["api_keys"]}, environ_base=env)
    assert_openai_429(blocked)
    other = client.get("/v1/models", headers={"X-API-Key": app_config["api_keys"]},
                       environ_base=a_client_address())
    assert other.status_code == 200  # only the guessing address is blocked


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

    from api.db import ApiKey, Database
    from config import Settings

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
