from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServerThread, make_settings


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/nb.db"


@pytest.fixture
def server(db_url: str) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(db_url))
    yield s
    s.stop()
