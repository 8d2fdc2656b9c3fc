"""What the process tests share: a fresh PostgreSQL schema for servers to share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import postgres_available, postgres_schema


@pytest.fixture
def pg() -> Iterator[str]:
    """A fresh schema in database test (its URL); the test skips, saying so, where none answers."""
    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); replica tests not run")
    with postgres_schema() as url:
        yield url
