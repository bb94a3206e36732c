"""Issue 15, M3: the brute-force gate counts wrong keys only, and never refuses a valid key.

The real app in-process on real Redis; each test comes from its own fake client address.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from api import create_app
from api.accounts.ratelimit import AuthFailureGate
from tests.conftest import TEST_KEY, add_key

LIMIT = 20  # the default AUTH_FAILURE_LIMIT, 20/minute


def an_address() -> dict[str, str]:
    return {"REMOTE_ADDR": f"10.{secrets.randbelow(255)}.{secrets.randbelow(255)}.{secrets.randbelow(255)}"}


@pytest.fixture
def gated(app_config: dict[str, Any]) -> tuple[Any, str]:
    """A client of an app with the default gate, and a key stored in its database (not a bootstrap key)."""
    app = create_app({**app_config, "auth_failure_limit": f"{LIMIT}/minute"})
    key, _ = add_key(app_config["database_url"])
    return app.test_client(), key


def test_anonymous_requests_do_not_lock_out_valid_keys(gated: tuple[Any, str], redis_client: Any) -> None:
    client, sql_key = gated
    env = an_address()
    anonymous = [client.get("/v1/models", environ_base=env) for _ in range(30)]
    assert {r.status_code for r in anonymous} == {401}
    assert {r.json["error"]["code"] for r in anonymous} == {"missing_api_key"}
    assert redis_client.zcard(AuthFailureGate.key(env["REMOTE_ADDR"])) == 0  # nothing was counted
    for key in (TEST_KEY, sql_key):
        assert client.get("/v1/models", headers={"X-API-Key": key}, environ_base=env).status_code == 200
    wrong = client.get("/v1/models", headers={"X-API-Key": "iq-guess"}, environ_base=env)
    assert wrong.status_code == 401  # the address is not blocked: its budget is untouched


def test_a_blocked_address_is_still_served_with_a_valid_key(gated: tuple[Any, str],
                                                           redis_client: Any) -> None:
    client, sql_key = gated
    env = an_address()
    codes = [client.get("/v1/models", headers={"X-API-Key": f"iq-guess-{i}"}, environ_base=env).status_code
             for i in range(25)]
    assert codes == [401] * LIMIT + [429] * 5
    blocked = client.get("/v1/usage", headers={"Authorization": "Bearer iq-guess"}, environ_base=env)
    assert blocked.status_code == 429 and blocked.json["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    for key in (TEST_KEY, sql_key):
        assert client.get("/v1/models", headers={"X-API-Key": key}, environ_base=env).status_code == 200
        assert client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"},
                          environ_base=env).status_code == 200
    # Requests without a key stay 401 (they name what is missing), and are not counted.
    assert client.get("/v1/models", environ_base=env).status_code == 401
    assert redis_client.zcard(AuthFailureGate.key(env["REMOTE_ADDR"])) == LIMIT
