"""Schema migrations with Alembic, configured in code (no ``alembic.ini``).

:func:`upgrade_engine` runs at every API start, possibly in several processes at
once: it returns after one read when the database is already at head, and
otherwise migrates under a lock (a file lock beside a SQLite file, a
transaction-level advisory lock on PostgreSQL). Alembic re-reads the version
once the lock is held, so a process that waited finds nothing left to do.
"""

from __future__ import annotations

import fcntl
import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
PG_LOCK_KEY = 0x696E6665727100  # "inferq" as a bigint: the advisory lock of schema changes
# Tables created before inferq had migrations (``create_all``, no ``alembic_version``).
PRE_MIGRATION_TABLES = ("api_keys",)


class MigrationError(RuntimeError):
    """The database cannot be brought to the wanted revision."""


def alembic_config(database_url: str) -> Config:
    """An Alembic config for this package's migrations and ``database_url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def sqlite_file(database_url: str | URL) -> Path | None:
    """The file behind a SQLite URL, or ``None`` (another database, or in memory)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def upgrade(database_url: str, revision: str = "head") -> str | None:
    """Migrate the database at ``database_url`` to ``revision``; returns the revision it is then at."""
    path = sqlite_file(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        return upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def current(database_url: str) -> str | None:
    """The revision the database is at, ``None`` if it was never migrated (or does not exist)."""
    path = sqlite_file(database_url)
    if path is not None and not path.exists():
        return None
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return _current(connection)
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision of this package's migrations."""
    return _heads()[0]


def upgrade_engine(engine: Engine, revision: str = "head") -> str | None:
    """Migrate through ``engine`` to ``revision`` (idempotent, safe to run concurrently)."""
    if revision == "head":
        with engine.connect() as connection:
            now = _current(connection)
        if now is not None and (now,) == _heads():
            return now
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with _migration_lock(engine) as connection:
        _refuse_unversioned(connection, engine.url)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        return _current(connection)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that only one migrating process holds at a time."""
    path = sqlite_file(engine.url)
    lock_file = path.with_name(path.name + ".lock") if path is not None else None
    file_lock: AbstractContextManager[None] = _file_lock(lock_file) if lock_file else nullcontext()
    with file_lock, engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Released at commit, after the new version row is visible to the waiters.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        yield connection


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (other processes, and other opens in this one, wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _refuse_unversioned(connection: Connection, url: URL) -> None:
    if _current(connection) is not None:
        return
    found = [t for t in PRE_MIGRATION_TABLES if inspect(connection).has_table(t)]
    if found:
        raise MigrationError(
            f"{url.render_as_string(hide_password=True)} has table(s) {', '.join(found)} but no "
            "Alembic version: it was created by an inferq without migrations. Move any keys you "
            "need, then drop those tables (or point DATABASE_URL at a new database) and start again.")


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@functools.lru_cache(maxsize=1)
def _heads() -> tuple[str, ...]:
    return tuple(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())
