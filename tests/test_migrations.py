"""Alembic migrations (api/migrate.py, api/migrations/): the migrated schema is the models'
schema, upgrades are idempotent and safe to run concurrently; on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from api import migrate
from api.db import Base, Database
from config import Settings

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"api_keys", "usage_ledger", "files", "alembic_version"}
RACER = """
import sys
from api import migrate
print("ready", flush=True)
sys.stdin.readline()
print(migrate.upgrade(sys.argv[1]))
"""


def tables(database_url: str) -> set[str]:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrated_schema_equals_the_models(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                                "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_indexes_and_unique_constraints(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = create_engine(database_url, poolclass=NullPool)
    inspector = inspect(engine)
    indexes = {i["name"]: (i["column_names"], bool(i["unique"]))
               for t in ("api_keys", "usage_ledger", "files") for i in inspector.get_indexes(t)}
    assert indexes["ix_api_keys_key_hash"] == (["key_hash"], True)
    assert indexes["ix_usage_ledger_key_day"] == (["key_id", "day"], False)
    assert indexes["ix_files_key_id"] == (["key_id"], False)
    uniques = {u["name"]: u["column_names"] for u in inspector.get_unique_constraints("api_keys")}
    assert uniques["uq_api_keys_public_id"] == ["public_id"]
    engine.dispose()


def test_upgrade_is_idempotent(database_url: str) -> None:
    assert migrate.current(database_url) is None
    assert migrate.upgrade(database_url) == migrate.head()
    assert migrate.upgrade(database_url) == migrate.head()
    assert migrate.current(database_url) == migrate.head()
    assert TABLES <= tables(database_url)


def test_create_schema_migrates_and_keeps_rows(database_url: str) -> None:
    settings = Settings(_env_file=None, database_url=database_url)
    first = Database(settings)
    first.create_schema()
    with first.engine.begin() as connection:
        connection.execute(text("INSERT INTO usage_ledger (job_id, key_id, model, day, prompt_tokens, "
                                "completion_tokens, status, settled_at) VALUES ('j1', 'key_1', 'm', "
                                "'2026-01-01', 1, 2, 'done', '2026-01-01 00:00:00')"))
    first.engine.dispose()
    again = Database(settings)
    again.create_schema()  # at every start: a no-op
    with again.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM usage_ledger")).scalar() == 1
    again.engine.dispose()
    assert migrate.current(database_url) == migrate.head()


def test_sqlite_directory_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'inferq.db'}"
    assert migrate.current(url) is None and not (tmp_path / "a").exists()  # reading creates nothing
    assert migrate.upgrade(url) == migrate.head()
    assert (tmp_path / "a" / "b" / "inferq.db").is_file()


def test_concurrent_upgrades_all_succeed(database_url: str) -> None:
    """Several API processes starting at once against a new database."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, database_url], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(6)]
    for proc in procs:  # all imported: release them together
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == migrate.head()
    assert TABLES <= tables(database_url)


def test_downgrade_to_base_and_back(database_url: str) -> None:
    migrate.upgrade(database_url)
    command.downgrade(migrate.alembic_config(database_url), "base")
    assert migrate.current(database_url) is None
    assert not {"api_keys", "usage_ledger", "files"} & tables(database_url)
    assert migrate.upgrade(database_url) == migrate.head()


def test_database_from_before_migrations_is_refused(database_url: str) -> None:
    migrate.upgrade(database_url, "base")  # creates the SQLite file's directory
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE api_keys (id INTEGER PRIMARY KEY, name VARCHAR(200))"))
    engine.dispose()
    with pytest.raises(migrate.MigrationError, match="no Alembic version"):
        migrate.upgrade(database_url)


def test_offline_sql_is_rendered(capsys: pytest.CaptureFixture[str]) -> None:
    command.upgrade(migrate.alembic_config("postgresql+psycopg://u@h/db"), "head", sql=True)
    out = capsys.readouterr().out
    assert "CREATE TABLE api_keys" in out and "CREATE UNIQUE INDEX ix_api_keys_key_hash" in out
