"""API keys (api/accounts/auth.py), the app's hooks (api/__init__.py) and OpenAI-shaped errors
(api/http/errors.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api import create_app
from api.accounts.auth import KeyStore, Principal, display_prefix, hash_key
from api.accounts.keys import new_public_id
from api.db import ApiKey, Database
from config import Settings
from queueing import jobs
from tests.conftest import TEST_KEY, start_api

WRONG_KEY = "sk-wrong-0123456789abcdef0123"


def openai_error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def build_app(app_config: dict[str, Any], **overrides: Any) -> Any:
    flask_app = create_app({**app_config, **overrides})
    flask_app.config["TESTING"] = True
    return flask_app


def add_key(app: Any, key: str, name: str = "ci") -> str:
    """Store ``key`` as a SQL key; returns its public id."""
    public_id = new_public_id()
    with app.extensions["inferq"].db.sessions() as session:
        session.add(ApiKey(public_id=public_id, name=name, key_hash=hash_key(key),
                           prefix=display_prefix(key)))
        session.commit()
    return public_id


# --- keys -------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"},
                                     {"X-API-Key": "  "}])
def test_missing_key_is_401(client: Any, headers: dict[str, str]) -> None:
    err = openai_error(client.get("/v1/models", headers=headers), 401)
    assert err["code"] == "missing_api_key"
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_wrong_key_is_401_without_echoing_it(client: Any, header: str) -> None:
    value = f"Bearer {WRONG_KEY}" if header == "Authorization" else WRONG_KEY
    resp = client.get("/v1/models", headers={header: value})
    err = openai_error(resp, 401)
    assert err["code"] == "invalid_api_key"
    assert WRONG_KEY[:6] + "..." in err["message"]
    text = resp.get_data(as_text=True)
    assert WRONG_KEY not in text and WRONG_KEY[:7] not in text


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {TEST_KEY}"},
                                     {"Authorization": f"bearer  {TEST_KEY} "},
                                     {"X-API-Key": TEST_KEY}])
def test_bootstrap_key_works(client: Any, headers: dict[str, str]) -> None:
    resp = client.get("/v1/models", headers=headers)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["object"] == "list" and isinstance(body["data"], list)


def test_sql_key_works_until_revoked(app: Any, client: Any) -> None:
    key = f"iq-sql-{jobs.new_job_id()}"
    headers = {"Authorization": f"Bearer {key}"}
    assert openai_error(client.get("/v1/models", headers=headers), 401)["code"] == "invalid_api_key"

    add_key(app, key)
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200

    with app.extensions["inferq"].db.sessions() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).one()
        assert row.prefix == key[:6] + "..."
        row.revoked_at = dt.datetime.now(dt.UTC)
        session.commit()
    assert openai_error(client.get("/v1/models", headers=headers), 401)["code"] == "invalid_api_key"


def test_verify_returns_principal(app: Any) -> None:
    store: KeyStore = app.extensions["inferq"].keys
    key = f"iq-named-{jobs.new_job_id()}"
    public_id = add_key(app, key, name="alice")
    principal = store.verify(key)
    assert principal == Principal(key_id=public_id, name="alice", prefix=key[:6] + "...")
    assert principal.may_use("any-model")
    boot = store.verify(TEST_KEY)
    assert boot is not None and boot.name == "bootstrap" and boot.prefix == TEST_KEY[:6] + "..."
    assert boot.key_id.startswith("bootstrap-") and TEST_KEY not in boot.key_id
    assert store.verify(WRONG_KEY) is None


def test_hash_key_is_sha256_hex() -> None:
    digest = hash_key("abc")
    assert digest == hashlib.sha256(b"abc").hexdigest()
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def test_keystore_keeps_no_plaintext(app: Any) -> None:
    store = app.extensions["inferq"].keys
    attrs = repr(vars(store))
    assert TEST_KEY not in attrs
    assert hash_key(TEST_KEY) in attrs


# --- request size -----------------------------------------------------------


def test_oversize_body_is_413_before_auth(app_config: dict[str, Any]) -> None:
    client = build_app(app_config, max_request_bytes=2048).test_client()
    resp = client.post("/v1/chat/completions", data="x" * 4096, content_type="application/json")
    err = openai_error(resp, 413)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "request_too_large"
    assert "2048" in err["message"]
    assert resp.headers["X-Frame-Options"] == "DENY"


def test_body_under_limit_reaches_auth(app_config: dict[str, Any]) -> None:
    client = build_app(app_config, max_request_bytes=2048).test_client()
    resp = client.post("/v1/chat/completions", data="x" * 1000, content_type="application/json")
    assert openai_error(resp, 401)["code"] == "missing_api_key"


@pytest.fixture(scope="module")
def small_body_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A real API server (gunicorn, as in production) whose request bodies may hold 4 KiB."""
    tmp = tmp_path_factory.mktemp("small-body-api")
    proc, base = start_api(redis_url, tmp, MAX_REQUEST_BYTES="4096")
    yield tmp, base
    proc.stop()


def chunked(total: int) -> Iterator[bytes]:
    """A body of ``total`` bytes sent without a Content-Length (Transfer-Encoding: chunked)."""
    for start in range(0, total, 1000):
        yield b"x" * min(1000, total - start)


def test_oversize_chunked_body_is_413_before_auth_and_rate_limits(small_body_api: tuple[Path, str]) -> None:
    tmp, base = small_body_api
    url = f"{base}/v1/chat/completions"
    resp = httpx.post(url, content=chunked(20_000), headers={"Content-Type": "application/json"})
    assert resp.request.headers["Transfer-Encoding"] == "chunked"
    assert resp.status_code == 413  # not 401: refused before the key was looked at
    assert resp.json()["error"]["code"] == "request_too_large"
    key = "iq-" + secrets.token_urlsafe(24)
    db = Database(Settings(database_url=f"sqlite:///{tmp / 'inferq.db'}"))
    with db.sessions.begin() as session:
        session.add(ApiKey(public_id=new_public_id(), name="one-rpm", key_hash=hash_key(key),
                           prefix=display_prefix(key), rpm=1))
    for _ in range(3):
        resp = httpx.post(url, content=chunked(20_000), headers={"X-API-Key": key})
        assert resp.status_code == 413
    # The 413s spent none of the key's one request per minute.
    resp = httpx.get(f"{base}/v1/models", headers={"X-API-Key": key})
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"


def test_chunked_body_under_limit_reaches_the_route(small_body_api: tuple[Path, str]) -> None:
    _, base = small_body_api
    body = b'{"model": "m", "messages": "not a list"}'
    resp = httpx.post(f"{base}/v1/chat/completions", content=iter([body[:10], body[10:]]),
                      headers={"Content-Type": "application/json", "X-API-Key": TEST_KEY})
    assert resp.request.headers["Transfer-Encoding"] == "chunked"
    assert resp.status_code == 400  # parsed: the body read before auth is the one the route sees
    assert resp.json()["error"]["param"] == "messages"


# --- headers ----------------------------------------------------------------


def assert_security_headers(resp: Any) -> None:
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_security_headers(client: Any, auth: dict[str, str]) -> None:
    health = client.get("/health")
    assert_security_headers(health)
    assert health.headers.get("Cache-Control") != "no-store"
    unauthorized = client.get("/v1/models")
    assert unauthorized.status_code == 401
    assert_security_headers(unauthorized)
    assert unauthorized.headers["Cache-Control"] == "no-store"
    ok = client.get("/v1/models", headers=auth)
    assert ok.status_code == 200
    assert_security_headers(ok)
    assert ok.headers["Cache-Control"] == "no-store"


# --- routing errors and probes ---------------------------------------------


def test_unknown_path_is_404(client: Any) -> None:
    resp = client.get("/v1/nope")
    err = openai_error(resp, 404)
    assert err["type"] == "not_found_error"
    assert_security_headers(resp)


def test_wrong_method_is_405(client: Any, auth: dict[str, str]) -> None:
    err = openai_error(client.get("/v1/chat/completions", headers=auth), 405)
    assert err["type"] == "invalid_request_error"


def test_health(client: Any) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}


def test_ready_without_worker_is_503(app_config: dict[str, Any]) -> None:
    # A model no worker serves, so a worker started by another test cannot make this ready.
    client = build_app(app_config, served_model_name=f"absent-{jobs.new_job_id()}").test_client()
    resp = client.get("/ready")
    err = openai_error(resp, 503)
    assert err["type"] == "service_unavailable"
    assert err["code"] == "no_live_worker"
    assert resp.headers["Retry-After"] == "10"


def test_redis_down_is_a_generic_503_naming_the_request_id(app_config):
    from api import create_app
    from tests.conftest import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = create_app({**app_config, "redis_url": dead}).test_client()
    resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {app_config['api_keys']}",
                                                          "X-Request-ID": "req-abc-123"},
                       json={"model": "scripted-model", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 503
    assert resp.headers["X-Request-ID"] == "req-abc-123"
    message = resp.json["error"]["message"]
    assert "req-abc-123" in message
    assert "127.0.0.1" not in message and dead not in message and "Traceback" not in message
