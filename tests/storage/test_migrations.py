"""Schema migrations (server/storage/migrate.py, server/storage/migrations/) on SQLite and on the
PostgreSQL at 127.0.0.1:5432 (database test), each test in a fresh schema.

test_upgrade_from_empty_gives_the_schema_of_tables_py is the drift guard: it fails when
server/storage/tables.py changes without a revision (scripts/db-revision "message").
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import (
    Column,
    DefaultClause,
    Engine,
    Index,
    MetaData,
    String,
    create_engine,
    event,
    inspect,
    select,
    text,
)

from nextbest.storage import migrate, tables
from tests.harness import ROOT, postgres_available, postgres_schema

_PG = postgres_available()
STORE_TABLES = set(tables.metadata.tables)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/nb.db"
        return
    if not _PG:
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); PostgreSQL migrations not tested")
    with postgres_schema() as u:
        yield u


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    e = create_engine(url)
    yield e
    e.dispose()


def schema_of(url: str) -> str:
    return url.split("search_path%3D", 1)[1].split("&", 1)[0]


def diff(engine: Engine, metadata: MetaData | None = None) -> list[Any]:
    with engine.connect() as c:
        return migrate.diff(c, metadata)


def flat(changes: list[Any]) -> list[tuple[Any, ...]]:
    """compare_metadata nests column modifications in lists; one tuple per change."""
    return [x for ch in changes for x in (ch if isinstance(ch, list) else [ch])]


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_from_empty_gives_the_schema_of_tables_py(engine: Engine, url: str) -> None:
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    changes = diff(engine)
    assert changes == [], (
        "server/storage/tables.py and server/storage/migrations/versions/ disagree; "
        f'write a revision with scripts/db-revision "message": {changes}'
    )
    if engine.dialect.name == "postgresql":  # the version table follows search_path into the test schema
        with engine.connect() as c:
            where = c.execute(
                text(
                    "SELECT n.nspname FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace "
                    "WHERE r.oid = to_regclass('alembic_version')"
                )
            ).scalar_one()
        assert where == schema_of(url)


def test_upgrading_twice_is_a_no_op(engine: Engine) -> None:
    migrate.upgrade(engine)
    before = (table_names(engine), migrate.current(engine))
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda conn, cur, stmt, *a: statements.append(stmt))
    migrate.upgrade(engine)
    assert (table_names(engine), migrate.current(engine)) == before
    writes = [s for s in statements if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE", "BEGIN"))]
    assert writes == []
    assert diff(engine) == []


_CHILD = """
import sys
from sqlalchemy import create_engine
from nextbest.storage import migrate
url = sys.argv[1]
engine = create_engine(url, connect_args={"timeout": 60} if url.startswith("sqlite") else {})
migrate.head()  # imports and revision files loaded before the start line
print("ready", flush=True)
migrate.upgrade(engine)
print(migrate.current(engine), flush=True)
"""


def test_processes_starting_at_once_all_upgrade(engine: Engine, url: str) -> None:
    """The test holds the upgrade lock while four processes start on an empty database, so
    all of them pass the quick "already at head?" check and then queue on the lock."""
    n = 4
    pg = engine.dialect.name == "postgresql"
    holder: Any
    if pg:
        holder = engine.connect()
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": migrate.LOCK_KEY})
    else:
        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        if pg:  # wait until all four queue on the advisory lock
            deadline = time.monotonic() + 30
            with engine.connect() as c:
                while (
                    c.execute(
                        text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = :hi AND objid = :lo"),
                        {"hi": migrate.LOCK_KEY >> 32, "lo": migrate.LOCK_KEY & 0xFFFFFFFF},
                    ).scalar_one()
                    < n
                ):
                    assert time.monotonic() < deadline, "the processes never queued on the advisory lock"
                    time.sleep(0.05)
                    c.rollback()
        else:
            time.sleep(0.5)  # they wait in SQLite's busy handler (timeout 60 s)
    finally:
        if pg:
            holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": migrate.LOCK_KEY})
            holder.close()
        else:
            holder.execute("COMMIT")
            holder.close()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == [migrate.head()] * n
    assert diff(engine) == []


def test_threads_with_their_own_engines_upgrade_at_once(url: str) -> None:
    """Alembic's context is process-wide; migrate serialises threads so they cannot cross."""
    n = 6
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run() -> None:
        e = create_engine(url)
        try:
            barrier.wait()
            migrate.upgrade(e)
        except BaseException as ex:
            errors.append(ex)
        finally:
            e.dispose()

    threads = [threading.Thread(target=run) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    e = create_engine(url)
    try:
        assert migrate.current(e) == migrate.head()
        assert diff(e) == []
    finally:
        e.dispose()


def make_legacy(engine: Engine) -> None:
    """A database as create_all made it before migrations: the 0001 schema, no version table.

    While 0001 is the only revision that is tables.metadata itself; once later revisions
    exist, the 0001 schema is rebuilt from the revision and its version table dropped.
    """
    if migrate.head() == migrate.INITIAL:
        tables.metadata.create_all(engine)
    else:
        with engine.begin() as c:
            command.upgrade(migrate.config(c), migrate.INITIAL)
            c.execute(text("DROP TABLE alembic_version"))


def test_a_create_all_database_is_stamped_then_upgraded(engine: Engine) -> None:
    make_legacy(engine)
    with engine.begin() as c:
        c.execute(tables.campaigns.insert().values(id="spring", spec={"budget": 1}))
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    assert diff(engine) == []
    with engine.connect() as c:
        assert c.execute(select(tables.campaigns.c.id, tables.campaigns.c.spec)).all() == [("spring", {"budget": 1})]


def drifted() -> MetaData:
    """tables.py as someone might change it without writing a revision."""
    m = MetaData()
    for tbl in tables.metadata.tables.values():
        tbl.to_metadata(m)
    m.tables["decisions"].append_column(Column("channel", String(32), nullable=False, server_default="app"))
    Index("ix_arms_version", m.tables["arms"].c.version)
    m.tables["campaigns"].c.id.type = String(64)
    m.tables["budget_accounts"].c.leased.server_default = DefaultClause("1")
    m.remove(m.tables["counters"])
    return m


def test_a_change_to_tables_py_without_a_revision_shows_as_drift(engine: Engine) -> None:
    migrate.upgrade(engine)
    kinds = {(ch[0], ch[2] if ch[0] in ("add_column", "modify_type", "modify_default") else None) for ch in flat(diff(engine, drifted()))}
    assert kinds == {
        ("add_column", "decisions"),
        ("add_index", None),
        ("modify_type", "campaigns"),
        ("modify_default", "budget_accounts"),
        ("remove_table", None),
    }


def test_scripts_db_revision_writes_a_revision_that_applies(engine: Engine, tmp_path: Path) -> None:
    """The developer workflow on a copy of the migrations: autogenerate, apply, downgrade."""
    loc = tmp_path / "migrations"
    shutil.copytree(migrate.SCRIPT_LOCATION, loc, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "db-revision"), "no changes", "--script-location", str(loc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stderr
    empty = Path(r.stdout.strip().splitlines()[-1])
    assert "no schema changes" in r.stderr
    assert empty.parent == loc / "versions" and empty.name.endswith("_no_changes.py")
    empty.unlink()

    m = drifted()
    path = migrate.revision("add channel", script_location=loc, metadata=m)
    assert path.name == f"{int(migrate.head()) + 1:04d}_add_channel.py"
    body = path.read_text()
    assert f"down_revision: str | Sequence[str] | None = '{migrate.head()}'" in body
    assert "add_column" in body and "channel" in body
    if engine.dialect.name == "sqlite":  # the file does not depend on the backend: one mypy run (10-40 s) is enough
        typed = subprocess.run([sys.executable, "-m", "mypy", str(path)], cwd=ROOT, capture_output=True, text=True, check=False)
        assert typed.returncode == 0, typed.stdout  # generated revisions stay mypy-strict clean

    with engine.begin() as c:
        command.upgrade(migrate.config(c, loc), "head")
    assert diff(engine, m) == []
    with engine.begin() as c:
        command.downgrade(migrate.config(c, loc), migrate.head())
    assert diff(engine) == []


def test_downgrade_to_base_and_up_again(engine: Engine) -> None:
    migrate.upgrade(engine)
    with engine.begin() as c:
        command.downgrade(migrate.config(c), "base")
    assert table_names(engine) == {"alembic_version"}
    migrate.upgrade(engine)
    assert diff(engine) == []


def test_a_database_from_a_newer_release_is_refused(engine: Engine) -> None:
    migrate.upgrade(engine)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(migrate.SchemaError, match="9999"):
        migrate.upgrade(engine)


def test_migrations_ship_with_the_package() -> None:
    pkg = files("nextbest.storage.migrations")
    assert pkg.joinpath("env.py").is_file() and pkg.joinpath("script.py.mako").is_file()
    assert pkg.joinpath("versions", f"{migrate.INITIAL}_initial.py").is_file()
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "script.py.mako" in package_data.get("nextbest.storage.migrations", [])


def test_the_upgrade_sql_can_be_printed_for_a_dba(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m nextbest.storage.migrate sql URL``: offline, nothing connects."""
    assert migrate.main(["sql", "postgresql+psycopg://nobody@db.invalid/nextbest"]) == 0
    out = capsys.readouterr().out
    assert "CREATE TABLE decisions" in out and "DOUBLE PRECISION" in out
    assert "CREATE TABLE contact_impressions" in out
    assert f"UPDATE alembic_version SET version_num='{migrate.head()}'" in out  # the last revision


def test_0002_starts_the_shared_contact_history_from_recent_shown_decisions(engine: Engine) -> None:
    with engine.begin() as c:
        command.upgrade(migrate.config(c), "0001")
    cols = (
        "(event_id, slot, placement_id, customer_id, created_at, deadline, features, arms, pmf, chosen, arm_id, "
        "probability, model_version, outcome, activated)"
    )
    rows = [  # (event, customer, created_at, arm, activated)
        ("old", "c1", 1_000.0, "a", True),  # beyond 31 days before the newest decision
        ("new", "c1", 3_000_000.0, "a", True),
        ("anon", "", 3_000_000.0, "a", True),  # anonymous: no customer to cap
        ("none", "c2", 3_000_000.0, None, True),  # nothing was shown
        ("deferred", "c2", 3_000_000.0, "b", False),  # never activated
    ]
    with engine.begin() as c:
        for ev, cust, at, arm, act in rows:
            c.execute(
                text(f"INSERT INTO decisions {cols} VALUES (:e, 0, 'p', :c, :t, :t, '[]', '[]', '[]', 0, :a, 1.0, 0, 0, :act)"),
                {"e": ev, "c": cust, "t": at, "a": arm, "act": act},
            )
        command.upgrade(migrate.config(c), "head")
    with engine.connect() as c:
        got = c.execute(text("SELECT customer_id, event_id, arm_id, at FROM contact_impressions")).all()
    assert [tuple(r) for r in got] == [("c1", "new", "a", 3_000_000.0)]


def test_the_model_name_column_keeps_the_saved_models_across_its_rename(engine: Engine) -> None:
    """0012 renames snapshots.slot to model_name (a "slot" is a decision's position): the rows a
    server saved before are the models it loads after, bytes intact, also back down and up."""
    with engine.begin() as c:
        command.upgrade(migrate.config(c), "0011")
        for name in ("", "B", "shadow:s"):
            c.execute(
                text(
                    "INSERT INTO snapshots (placement_id, slot, model_key, learned, learn_seq, model, created_at) "
                    "VALUES ('p', :n, '[\"\", false, 18]', 7, 9, :m, 1.0)"
                ),
                {"n": name, "m": f"model {name}".encode()},
            )
    migrate.upgrade(engine)
    assert diff(engine) == []
    with engine.connect() as c:
        rows = c.execute(text("SELECT model_name, learned, model FROM snapshots ORDER BY model_name")).all()
    assert [(r[0], r[1], bytes(r[2])) for r in rows] == [("", 7, b"model "), ("B", 7, b"model B"), ("shadow:s", 7, b"model shadow:s")]
    with engine.begin() as c:
        command.downgrade(migrate.config(c), "0011")
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM snapshots WHERE slot = 'B'")).scalar() == 1
