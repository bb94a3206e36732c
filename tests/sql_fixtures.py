"""SQL fixtures (a pytest plugin): each SQL test runs on SQLite and on PostgreSQL.

PostgreSQL is the server on 127.0.0.1:5432 (user ``postgres``, trust auth): the
session creates its own uniquely named database there and drops it at the end;
each test starts from an empty schema. Without a reachable server the
PostgreSQL variants are skipped, or fail when ``INFERQ_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from api.db import Database
from config import Settings, get_settings

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_ADMIN = f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres dbname=postgres connect_timeout=3"
POSTGRES_UNREACHABLE = (f"PostgreSQL not reachable at {POSTGRES_HOST}:{POSTGRES_PORT}: "
                        "PostgreSQL variants skipped")
SQL_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database owned by this test session (created here, dropped at the end)."""
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("INFERQ_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL not reachable at {POSTGRES_HOST}:{POSTGRES_PORT} and "
                        f"INFERQ_REQUIRE_POSTGRES=1: {exc}")
        pytest.skip(POSTGRES_UNREACHABLE)
    name = f"inferq_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=SQL_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a fresh SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'inferq.db'}"
        return
    url: str = request.getfixturevalue("postgres_url")
    _empty_postgres(url)
    yield url
    _empty_postgres(url)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A migrated :class:`Database` on each backend, disposed afterwards."""
    db = Database(Settings(_env_file=None, database_url=database_url))
    db.create_schema()
    yield db
    db.engine.dispose()


@pytest.fixture
def settings_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``DATABASE_URL`` in the environment, read afresh by ``get_settings()`` (the CLI's way)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def _empty_postgres(url: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
