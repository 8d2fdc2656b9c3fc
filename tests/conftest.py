from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import envs
from tests.harness import ADMIN_TOKEN, TOKENS, ServerThread, make_settings, postgres_available, postgres_schema, token_client

# tmp_path (and so every test's SQLite file) on tmpfs where the machine has one: the store
# commits with PRAGMA synchronous=FULL, and on this machine's disk the fsync of each group
# commit was a quarter to a third of a server test's time (tests/service/test_slots_modes.py and
# two other files: 108 s on disk, 75-89 s on /dev/shm). Nothing here tests power loss; a kill -9
# keeps the page cache either way. Read before tmp_path's root is made (by pytest-xdist's
# controller too: its workers inherit it). Set PYTEST_DEBUG_TEMPROOT to choose another root.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", "/dev/shm")


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
