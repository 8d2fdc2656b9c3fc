"""Alembic environment for the SQL store.

Run from code (nextbest.storage.migrate), which passes an open connection in
``config.attributes["connection"]`` so the upgrade shares its transaction and lock.
SQLite gets batch mode: it cannot ALTER most things in place, so autogenerate must
render table rebuilds, which PostgreSQL runs as plain ALTERs.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine, pool
from sqlalchemy.engine import Connection

from nextbest.storage import migrate, tables

config = context.config
# Tests may pass another MetaData to autogenerate against; the store always uses tables.metadata.
target_metadata: MetaData = config.attributes.get("target_metadata", tables.metadata)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        **migrate.COMPARE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Print the SQL instead of running it (``migrate sql URL``), for a DBA to review or apply."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url set")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
