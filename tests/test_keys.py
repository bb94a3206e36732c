"""API-key management (api/accounts/keys.py) through ``inferq keys`` and ``inferq db``, and the keys
it makes through ``KeyStore.verify``; every SQL test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, update

from api import migrate
from api.accounts import keys as keystore
from api.accounts.auth import KeyStore, hash_key
from api.db import ApiKey, Database
from config import get_settings
from inferq.cli import main

KEY_PATTERN = re.compile(r"\biq-[A-Za-z0-9_-]{43}\b")
ID_PATTERN = re.compile(r"\bkey_[0-9a-f]{16}\b")
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)

Invoke = Callable[..., Result]


@pytest.fixture
def cli(settings_env: str) -> Invoke:
    """Run ``inferq ...`` against the test database; checks the exit code."""
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(main, list(args), env={"COLUMNS": "250"})
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return invoke


@pytest.fixture
def store(settings_env: str, database: Database) -> KeyStore:
    """A key store (no bootstrap keys) on the same database as the CLI."""
    return KeyStore(database, [])


def create(cli: Invoke, *args: str) -> tuple[str, str]:
    """Create a key through the CLI; returns the key and its public id."""
    out = cli("keys", "create", *args).output
    keys, ids = KEY_PATTERN.findall(out), ID_PATTERN.findall(out)
    assert len(keys) == 1 and len(ids) == 1, out
    return keys[0], ids[0]


def listed(cli: Invoke) -> dict[str, dict[str, Any]]:
    """``inferq keys list --json`` by public id."""
    return {k["public_id"]: k for k in json.loads(cli("keys", "list", "--json").output)}


def row_of(database: Database, public_id: str) -> ApiKey:
    with database.sessions() as session:
        return session.scalars(select(ApiKey).where(ApiKey.public_id == public_id)).one()


def set_expiry(database: Database, public_id: str, when: dt.datetime) -> None:
    """Write an expiry directly (the CLI refuses past ones)."""
    with database.sessions() as session:
        session.execute(update(ApiKey).where(ApiKey.public_id == public_id).values(expires_at=when))
        session.commit()


# --- create --------------------------------------------------------------------------


def test_create_shows_the_key_once_and_stores_only_its_hash(cli: Invoke, database: Database) -> None:
    out = cli("keys", "create", "--name", "ci").output
    assert "cannot be shown again" in out
    [key], [public_id] = KEY_PATTERN.findall(out), ID_PATTERN.findall(out)
    row = row_of(database, public_id)
    assert (row.key_hash, row.prefix, row.name) == (hash_key(key), key[:6] + "...", "ci")
    secret = key[len(row.prefix) - 3:]  # the part the prefix does not show
    for column in ApiKey.__table__.columns:
        value = str(getattr(row, column.key))
        assert key not in value and secret not in value, column.key
    listing = cli("keys", "list").output + cli("keys", "list", "--json").output
    assert public_id in listing and secret not in listing and hash_key(key) not in listing


def test_created_key_verifies_with_its_limits(cli: Invoke, store: KeyStore) -> None:
    key, public_id = create(cli, "--name", "team-a", "--rpm", "60", "--tpm", "10000",
                            "--daily-tokens", "500000", "--models", "m1, m2,m1", "--expires", "30d")
    principal = store.verify(key)
    assert principal is not None
    assert (principal.key_id, principal.name, principal.prefix) == (public_id, "team-a", key[:6] + "...")
    assert (principal.rpm, principal.tpm, principal.daily_tokens) == (60, 10000, 500000)
    assert principal.models == frozenset({"m1", "m2"})
    assert principal.may_use("m2") and not principal.may_use("m3")


def test_unrestricted_key_may_use_every_model(cli: Invoke, store: KeyStore) -> None:
    key, _ = create(cli, "--name", "open")
    principal = store.verify(key)
    assert principal is not None and principal.models is None and principal.rpm is None
    assert principal.may_use("anything")


def test_create_json_gives_key_and_record(cli: Invoke, store: KeyStore) -> None:
    body = json.loads(cli("keys", "create", "--name", "bot", "--rpm", "5", "--json").output)
    assert KEY_PATTERN.fullmatch(body["key"]) and ID_PATTERN.fullmatch(body["public_id"])
    assert (body["name"], body["rpm"], body["models"], body["status"]) == ("bot", 5, None, "active")
    assert store.verify(body["key"]) is not None


def test_every_key_and_id_is_new(cli: Invoke) -> None:
    made = [create(cli, "--name", f"k{i}") for i in range(3)]
    assert len({k for k, _ in made}) == len({i for _, i in made}) == 3


@pytest.mark.parametrize("args, message", [
    (["--rpm", "0"], "between 1 and"),
    (["--tpm", "lots"], "not a whole number"),
    (["--daily-tokens", str(2**31)], "between 1 and"),
    (["--models", " , "], "No model names"),
    (["--expires", "3x"], "Cannot read expiry"),
    (["--expires", "0d"], "zero"),
    (["--expires", "2020-01-31"], "in the past"),
])
def test_create_refuses_bad_values(cli: Invoke, args: list[str], message: str) -> None:
    result = cli("keys", "create", "--name", "x", *args, code=2)
    assert message in result.output
    assert listed(cli) == {}


def test_create_refuses_an_empty_name(cli: Invoke) -> None:
    assert "1 to 200 characters" in cli("keys", "create", "--name", "  ", code=1).output


# --- list ----------------------------------------------------------------------------


def test_list_table_and_json(cli: Invoke) -> None:
    assert "No keys yet" in cli("keys", "list").output
    key_a, id_a = create(cli, "--name", "alpha", "--rpm", "7", "--models", "m1,m2")
    _, id_b = create(cli, "--name", "beta", "--expires", "2099-01-31")
    table = cli("keys", "list").output
    for text in (id_a, id_b, "alpha", "beta", key_a[:6] + "...", "m1,m2", "2099-01-31 00:00", "Tokens/day"):
        assert text in table
    records = listed(cli)
    assert list(records) == [id_a, id_b]  # oldest first
    assert records[id_a]["models"] == ["m1", "m2"] and records[id_a]["rpm"] == 7
    assert records[id_b]["expires_at"] == "2099-01-31T00:00:00+00:00"
    assert set(records[id_a]) == {"public_id", "name", "prefix", "rpm", "tpm", "daily_tokens", "models",
                                  "created_at", "last_used_at", "expires_at", "revoked_at", "status"}


def test_list_narrow_terminal_still_shows_every_field(cli: Invoke, settings_env: str) -> None:
    _, public_id = create(cli, "--name", "narrow", "--rpm", "3")
    out = CliRunner().invoke(main, ["keys", "list"], env={"COLUMNS": "80"}).output
    assert public_id in out and "rpm 3" in out and "revoked -" in out


def test_list_shows_last_use(cli: Invoke, store: KeyStore) -> None:
    key, public_id = create(cli, "--name", "used")
    assert listed(cli)[public_id]["last_used_at"] is None
    assert store.verify(key) is not None
    assert listed(cli)[public_id]["last_used_at"] is not None


# --- revoke --------------------------------------------------------------------------


def test_revoke_by_id_refuses_the_key(cli: Invoke, store: KeyStore) -> None:
    key, public_id = create(cli, "--name", "leaky")
    other, _ = create(cli, "--name", "fine")
    assert store.verify(key) is not None
    assert "Revoked" in cli("keys", "revoke", public_id).output
    assert store.verify(key) is None
    assert store.verify(other) is not None
    record = listed(cli)[public_id]
    assert record["status"] == "revoked" and record["revoked_at"] is not None
    assert "already revoked" in cli("keys", "revoke", public_id).output


@pytest.mark.parametrize("shown", [lambda key: key[:6], lambda key: key[:6] + "...", lambda key: key])
def test_revoke_by_prefix_or_key(cli: Invoke, store: KeyStore, shown: Callable[[str], str]) -> None:
    key, public_id = create(cli, "--name", "by-prefix")
    assert public_id in cli("keys", "revoke", shown(key)).output
    assert store.verify(key) is None


def test_revoke_unknown_key_is_a_clear_error(cli: Invoke) -> None:
    assert "No key with id 'key_0000000000000000'" in \
        cli("keys", "revoke", "key_0000000000000000", code=1).output
    assert "No key matches 'iq-zzz'" in cli("keys", "revoke", "iq-zzz", code=1).output
    leaked = "iq-" + "x" * 43
    out = cli("keys", "revoke", leaked, code=1).output
    assert "No key matches" in out and leaked not in out


def test_ambiguous_prefix_is_refused(cli: Invoke, database: Database, store: KeyStore) -> None:
    key, id_a = create(cli, "--name", "first")
    twin = key[:6] + "something-else"
    with database.sessions() as session:
        session.add(ApiKey(public_id="key_00000000000000ff", name="twin", key_hash=hash_key(twin),
                           prefix=key[:6] + "..."))
        session.commit()
    out = cli("keys", "revoke", key[:6], code=1).output
    assert "2 keys start with" in out and id_a in out and "key_00000000000000ff" in out
    assert store.verify(key) is not None and store.verify(twin) is not None  # nothing revoked


# --- update --------------------------------------------------------------------------


def test_update_sets_and_clears_fields(cli: Invoke, store: KeyStore) -> None:
    key, public_id = create(cli, "--name", "old", "--rpm", "10", "--models", "m1", "--expires", "1d")
    cli("keys", "update", public_id, "--name", "new", "--tpm", "999", "--models", "m2,m3",
        "--daily-tokens", "1000")
    principal = store.verify(key)
    assert principal is not None
    assert (principal.name, principal.rpm, principal.tpm, principal.daily_tokens) == ("new", 10, 999, 1000)
    assert principal.models == frozenset({"m2", "m3"})

    out = cli("keys", "update", key[:6], "--rpm", "none", "--tpm", "unlimited", "--models", "all",
              "--expires", "never").output
    assert public_id in out
    record = listed(cli)[public_id]
    assert (record["rpm"], record["tpm"], record["models"], record["expires_at"]) == (None, None, None, None)
    assert record["daily_tokens"] == 1000 and record["name"] == "new"  # not given: kept


def test_update_needs_a_change_and_a_known_key(cli: Invoke) -> None:
    _, public_id = create(cli, "--name", "x")
    assert "Nothing to change" in cli("keys", "update", public_id, code=2).output
    assert "No key with id" in cli("keys", "update", "key_0123456789abcdef", "--rpm", "1", code=1).output
    assert "'x' is not a whole number" in cli("keys", "update", public_id, "--rpm", "x", code=2).output
    assert "in the past" in cli("keys", "update", public_id, "--expires", "2001-01-01", code=2).output


def test_updating_a_revoked_key_does_not_revive_it(cli: Invoke, store: KeyStore) -> None:
    key, public_id = create(cli, "--name", "gone")
    cli("keys", "revoke", public_id)
    assert "this key is revoked" in cli("keys", "update", public_id, "--rpm", "5").output
    assert store.verify(key) is None


# --- expiry --------------------------------------------------------------------------


def test_expired_key_is_refused(cli: Invoke, database: Database, store: KeyStore) -> None:
    key, public_id = create(cli, "--name", "temp", "--expires", "2h")
    expires = dt.datetime.fromisoformat(listed(cli)[public_id]["expires_at"])
    assert dt.timedelta(minutes=119) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)
    assert store.verify(key) is not None

    set_expiry(database, public_id, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    assert store.verify(key) is None
    assert listed(cli)[public_id]["status"] == "expired"
    assert "(expired)" in cli("keys", "list").output

    cli("keys", "update", public_id, "--expires", "never")
    assert store.verify(key) is not None


def test_expiry_parsing() -> None:
    assert keystore.parse_expiry("30d", NOW) == NOW + dt.timedelta(days=30)
    assert keystore.parse_expiry(" 90M ", NOW) == NOW + dt.timedelta(minutes=90)
    assert keystore.parse_expiry("2w", NOW) == NOW + dt.timedelta(weeks=2)
    assert keystore.parse_expiry("2027-01-31", NOW) == dt.datetime(2027, 1, 31, tzinfo=dt.UTC)
    assert keystore.parse_expiry("2027-01-31T12:30", NOW) == dt.datetime(2027, 1, 31, 12, 30, tzinfo=dt.UTC)
    assert keystore.parse_expiry("2027-01-31T12:30+02:00", NOW) == \
        dt.datetime(2027, 1, 31, 10, 30, tzinfo=dt.UTC)
    for bad in ("", "30", "d", "-1d", "1y", "30 days", "2026-02-30", "0h", "2026-03-01T11:59",
                "9" * 30 + "d"):
        with pytest.raises(keystore.KeyAdminError):
            keystore.parse_expiry(bad, NOW)


@given(amount=st.integers(min_value=1, max_value=10**5),
       unit=st.sampled_from(sorted(keystore.DURATION_UNITS)))
def test_durations_count_from_now(amount: int, unit: str) -> None:
    assert keystore.parse_expiry(f"{amount}{unit}", NOW) == NOW + amount * keystore.DURATION_UNITS[unit]


@given(st.lists(st.text(alphabet="abc-._/ ", min_size=1, max_size=8), min_size=1, max_size=6))
def test_model_lists_round_trip(names: list[str]) -> None:
    text = ",".join(names)
    if not any(n.strip() for n in names):
        with pytest.raises(keystore.KeyAdminError):
            keystore.parse_models(text)
        return
    models = keystore.parse_models(text)
    assert models == tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    assert keystore.split_models(keystore.join_models(models)) == models


# --- inferq db, help -------------------------------------------------------------------


def test_db_upgrade_prints_the_revision(cli: Invoke, settings_env: str) -> None:
    assert "never migrated" in cli("db", "current").output
    out = cli("db", "upgrade").output
    assert f"revision {migrate.head()} (head)" in out
    assert migrate.current(settings_env) == migrate.head()
    assert f"at revision {migrate.head()}" in cli("db", "current").output
    assert "Can't locate revision" in cli("db", "upgrade", "--revision", "nope", code=1).output


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg://postgres@127.0.0.1:1/none", "Cannot use the database"),
    ("not a url", "DATABASE_URL is not a database URL"),
])
@pytest.mark.parametrize("command", [["db", "upgrade"], ["db", "current"], ["keys", "list"]])
def test_database_errors_are_clear(monkeypatch: pytest.MonkeyPatch, url: str, message: str,
                                   command: list[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, command)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and message in result.output, (result.output, result.exception)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["db"], ["db", "upgrade"], ["db", "current"], ["keys"],
                                     ["keys", "create"], ["keys", "list"], ["keys", "revoke"],
                                     ["keys", "update"]])
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    if command[-1] in ("revoke", "update"):
        assert "KEY_ID is a key's id (key_...) or its prefix" in result.output
    if command[-1] == "create":
        assert "cannot be shown again" in result.output and "30d" in result.output
