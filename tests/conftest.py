from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import envs
from tests.harness import ADMIN_TOKEN, TOKENS, ServerThread, make_settings, postgres_available, postgres_schema, token_client


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/nb.db"


@pytest.fixture
def server(db_url: str) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(db_url))
    yield s
    s.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL: SQLite, and PostgreSQL where it answers (else that case skips)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/nb.db"
        return
    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test)")
    with postgres_schema() as url:
        yield url


@pytest.fixture
def authed(db_url: str) -> Iterator[ServerThread]:
    """A server with auth on (tests.harness.TOKENS) and two placements."""
    s = ServerThread(make_settings(db_url, auth_tokens=TOKENS))
    with token_client(s.target, ADMIN_TOKEN) as admin:
        admin.apply([envs.placement("app_home_banner"), envs.placement("ussd_main_menu")])
    yield s
    s.stop()
