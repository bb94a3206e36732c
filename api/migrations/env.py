"""Alembic environment: runs the revisions on the connection :mod:`api.migrate` hands over.

:mod:`api.migrate` builds the config in code (no ``alembic.ini``) and passes an
open connection in ``config.attributes["connection"]``, already inside the
transaction that holds the migration lock; without one (the ``alembic`` tool
pointed at this directory) a connection is opened from ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from api.db import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    # Batch mode lets later revisions alter SQLite tables (copy and move).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Emit the SQL instead of running it (``--sql``)."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate through the handed-over connection, or a fresh one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url", ""), poolclass=pool.NullPool)
    with engine.connect() as fresh:
        _configure(fresh)


if context.is_offline_mode():
    run_offline()
else:
    run_online()
