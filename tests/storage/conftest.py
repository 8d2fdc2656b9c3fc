"""What the storage tests share: one ``store`` fixture over every backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nextbest.storage.sql import SqlStore, open_store
from tests.harness import postgres_available, postgres_schema

_PG = postgres_available()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    """A fresh store on SQLite, and on the PostgreSQL at 127.0.0.1:5432 (database test) where it
    answers (else that case skips, saying so)."""
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/nb.db")
        yield s
        s.close()
        return
    if not _PG:
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); PostgreSQL contract not run")
    with postgres_schema() as url:
        s = open_store(url)
        yield s
        s.close()
