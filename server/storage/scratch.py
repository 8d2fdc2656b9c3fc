"""A scratch PostgreSQL schema on the machine's own server, for the test suite and the benchmarks.

Every machine (and CI) runs PostgreSQL at 127.0.0.1:5432 with trust auth and a database ``test``;
each user gets a fresh schema of its own, dropped afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=2"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_DSN):
            return True
    except Exception:
        return False


@contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A fresh schema, dropped afterwards; yields a SQLAlchemy URL whose search_path is it."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {name} CASCADE")
