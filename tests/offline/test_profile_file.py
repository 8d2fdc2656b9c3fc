"""``nextbest profiles load``: warehouse extracts (Parquet, CSV) into the profile store, checked as
a ChooseRequest is; a hostile file is refused naming its row and column, nothing of the bad batch
is stored, and the command says how far it got. The reader streams: batches come lazily."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import types
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextbest.cli.main import main
from nextbest.offline import profile_file
from nextbest.offline.profile_file import Limits, ProfileFileError, read_profiles
from nextbest.storage.base import Profile
from nextbest.storage.sql import open_store
from tests.harness import ROOT

AS_OF = dt.datetime(2026, 12, 1, 6, 0, tzinfo=dt.UTC)
T = AS_OF.timestamp()
DAY = 86400.0


def _profiles(url: str, ids: list[str]) -> dict[str, Profile]:
    store = open_store(url)
    try:
        return store.get_profiles(ids, now=T)
    finally:
        store.close()


def _count(url: str) -> int:
    store = open_store(url)
    try:
        with store.engine.connect() as c:
            return int(c.exec_driver_sql("SELECT count(*) FROM profiles").scalar_one())
    finally:
        store.close()


def _load(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["profiles", "load", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _features(p: Profile) -> dict[str, Any]:
    return {f"{ns}.{name}": v for ns, name, v in p.features}


def _table(n: int, **extra: Any) -> pa.Table:
    cols: dict[str, Any] = {
        "customer_id": [f"c{i}" for i in range(1, n + 1)],
        "customer.arpu": [float(i) for i in range(1, n + 1)],
        "customer.plan": ["prepaid" if i % 2 else "postpaid" for i in range(1, n + 1)],
    }
    cols.update(extra)
    return pa.table(cols)


# -- loading -------------------------------------------------------------------------------------


def test_a_parquet_file_loads_with_the_types_of_its_columns(any_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "profiles.parquet"
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array([101, 102, 103], pa.int64()),  # an integer id is its decimal text
                "as_of": pa.array([AS_OF, AS_OF - dt.timedelta(days=1), None], pa.timestamp("ms", tz="UTC")),
                "customer.plan": pa.array(["postpaid", None, "prepaid"]).dictionary_encode(),
                "customer.arpu": pa.array([Decimal("12.50"), Decimal("3.25"), None], pa.decimal128(10, 2)),
                "customer.tenure_months": pa.array([36, 2, 7], pa.int16()),
                "device.is_5g": [True, False, None],
                "usage.data_gb": [1.5, None, 0.0],
            }
        ),
        path,
    )
    code, out, err = _load(capsys, str(path), "--db", any_db, "--ttl", "7d")
    assert code == 0, err
    assert "3 rows read" in out and "3 stored, 0 stale" in out and "rows/s" in out
    got = _profiles(any_db, ["101", "102", "103"])
    assert _features(got["101"]) == {
        "customer.plan": "postpaid",
        "customer.arpu": 12.5,
        "customer.tenure_months": 36.0,
        "device.is_5g": "true",
        "usage.data_gb": 1.5,
    }
    assert _features(got["102"]) == {"customer.arpu": 3.25, "customer.tenure_months": 2.0, "device.is_5g": "false"}  # nulls: absent
    assert all(isinstance(v, float) for k, v in _features(got["101"]).items() if k != "customer.plan" and k != "device.is_5g")
    assert got["101"].as_of == T and got["101"].expires_at == T + 7 * DAY  # --ttl counts from as_of
    assert got["102"].as_of == T - DAY
    assert got["103"].as_of > T  # no as_of: the time of the load


def test_a_csv_file_loads(any_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "extract.csv"
    path.write_text(
        "customer_id,as_of,expires_at,customer.plan,customer.arpu,customer.segment,device.is_5g\n"
        '007,2026-12-01T06:00:00Z,,"postpaid, family",12.5,NA,true\n'
        "8,2026-12-01T08:00:00+02:00,1893456000,prepaid,,youth,false\n"
        "9,2026-12-01,,,0.25,,\n",
        encoding="utf-8",
    )
    code, out, err = _load(capsys, str(path), "--db", any_db)
    assert code == 0, err
    got = _profiles(any_db, ["007", "8", "9"])
    assert set(got) == {"007", "8", "9"}  # customer_id is text: 007 stays 007
    assert _features(got["007"]) == {
        "customer.plan": "postpaid, family",
        "customer.arpu": 12.5,
        "customer.segment": "NA",
        "device.is_5g": "true",
    }
    assert _features(got["8"]) == {"customer.plan": "prepaid", "customer.segment": "youth", "device.is_5g": "false"}
    assert _features(got["9"]) == {"customer.arpu": 0.25}  # an empty cell is a missing value
    assert got["007"].as_of == T and got["8"].as_of == T and got["9"].as_of == T - 6 * 3600
    assert got["8"].expires_at == 1893456000.0 and got["007"].expires_at is None


def test_the_command_runs_as_the_readme_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "customers.parquet"
    pq.write_table(_table(5), path)
    db = f"sqlite:///{tmp_path}/nb.db"
    r = subprocess.run(
        [sys.executable, "-m", "nextbest.cli.main", "profiles", "load", str(path), "--db", db, "--ttl", "7d"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "5 rows read" in r.stdout and "5 stored" in r.stdout
    assert "\r" not in r.stderr  # no progress line when standard error is not a terminal
    code = main(["profiles", "get", "c3", "--db", db])
    assert code == 0


def test_a_customer_twice_in_a_file_keeps_the_latest_as_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.parquet"
    pq.write_table(
        pa.table(
            {
                "customer_id": ["a", "b", "a", "a"],
                "as_of": [T + 10, T, T, T + 5],  # epoch seconds
                "customer.plan": ["newest", "b", "older", "old"],
            }
        ),
        path,
    )
    db = f"sqlite:///{tmp_path}/nb.db"
    code, out, err = _load(capsys, str(path), "--db", db, "--batch", "2")  # across batches too
    assert code == 0, err
    assert "2 stored, 2 stale" in out
    assert _features(_profiles(db, ["a"])["a"]) == {"customer.plan": "newest"}


def test_get_prints_the_profile_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(_table(2, as_of=[T, T]), path)
    db = f"sqlite:///{tmp_path}/nb.db"
    assert _load(capsys, str(path), "--db", db)[0] == 0
    assert main(["profiles", "get", "c2", "--db", db]) == 0
    import json

    assert json.loads(capsys.readouterr().out) == {
        "customer_id": "c2",
        "as_of": "2026-12-01T06:00:00Z",
        "expires_at": None,
        "features": {"customer.arpu": 2.0, "customer.plan": "postpaid"},
    }
    assert main(["profiles", "get", "nobody", "--db", db]) == 1
    assert "no profile" in capsys.readouterr().err


# -- hostile files -------------------------------------------------------------------------------


def _parquet(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return path


def _invalid_utf8() -> pa.Array:
    """Texts of which the second is the UTF-8 form of a lone surrogate (not valid UTF-8)."""
    data = b"okay" + b"x\xed\xa0\x80" + b"fine"
    offsets = pa.py_buffer(pa.array([0, 4, 8, 12], pa.int32()).buffers()[1])
    return pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])


HOSTILE: dict[str, tuple[Any, str | None, str | None, str]] = {
    # name: (table or CSV text, row named, column named, words of the message)
    "nul_in_text": (_table(3, **{"customer.plan": ["a", "b", "c\x00d"]}), "row 3", "customer.plan", "NUL"),
    "nan": (_table(3, **{"customer.arpu": [1.0, float("nan"), 2.0]}), "row 2", "customer.arpu", "finite"),
    "infinity": (_table(3, **{"customer.arpu": [1.0, 2.0, float("-inf")]}), "row 3", "customer.arpu", "finite"),
    "huge_number": (_table(3, **{"customer.arpu": [1.0, 2e13, 2.0]}), "row 2", "customer.arpu", "magnitude"),
    "oversized_text": (_table(3, **{"customer.plan": ["a", "x" * 5000, "c"]}), "row 2", "customer.plan", "longer than 1,024"),
    "lone_surrogate": (_table(3, **{"customer.plan": _invalid_utf8()}), "row 2", "customer.plan", "UTF-8"),
    "too_many_features": (_table(3, **{f"x.f{k}": [1.0, 2.0, 3.0] for k in range(511)}), None, None, "more than the server's max_features"),
    "no_dot": (_table(3, arpu=[1.0, 2.0, 3.0]), None, "arpu", "namespace.name"),
    "two_dots": (_table(3, **{"a.b.c": [1.0, 2.0, 3.0]}), None, "a.b.c", "exactly one dot"),
    "list_column": (_table(3, **{"customer.tags": [["a"], ["b"], []]}), None, "customer.tags", "a number, a text or a boolean"),
    "binary_column": (_table(3, **{"customer.blob": [b"a", b"b", b"c"]}), None, "customer.blob", "a number, a text or a boolean"),
    "no_customer_id": (pa.table({"id": ["a"], "customer.plan": ["x"]}), None, None, "no customer_id column"),
    "empty_customer_id": (pa.table({"customer_id": ["a", "b", ""], "customer.plan": ["x", "y", "z"]}), "row 3", "customer_id", "empty"),
    "null_customer_id": (pa.table({"customer_id": ["a", None, "c"], "customer.plan": ["x", "y", "z"]}), "row 2", "customer_id", "empty"),
    "long_customer_id": (
        pa.table({"customer_id": ["a", "b" * 300], "customer.plan": ["x", "y"]}),
        "row 2",
        "customer_id",
        "longer than 256",
    ),
    "float_customer_id": (pa.table({"customer_id": [1.5], "customer.plan": ["x"]}), None, "customer_id", "text or an integer"),
    "bad_as_of": (_table(2, as_of=["2026-12-01", "yesterday"]), "row 2", "as_of", "ISO 8601"),
    "csv_nul": ("customer_id,customer.plan\na,x\nb,y\x00z\n", "row 2", "customer.plan", "NUL"),
    "csv_nan": ("customer_id,customer.arpu\na,1.5\nb,NaN\n", "row 2", "customer.arpu", "finite"),
    "csv_empty_customer_id": ('customer_id,customer.plan\na,x\n"",y\n', "row 2", "customer_id", "empty"),
    "csv_ragged": ("customer_id,customer.plan\na,x\nb,y,z\n", None, None, "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_refused_naming_row_and_column(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    content, row, column, words = HOSTILE[case]
    if isinstance(content, str):
        path = tmp_path / "bad.csv"
        path.write_text(content, encoding="utf-8")
    else:
        path = _parquet(tmp_path, content)
    db = f"sqlite:///{tmp_path}/nb.db"
    code, out, err = _load(capsys, str(path), "--db", db)
    assert code == 2, (out, err)
    first = err.splitlines()[0]
    assert first.startswith(f"error: {path}"), err
    if row is not None:
        assert f", {row}," in first, err
    if column is not None:
        assert f"column {column!r}" in first, err
    assert words in first, err
    assert len(first) < 400, first  # an oversized value is quoted, not copied
    assert "loaded no rows before the error" in err
    assert _count(db) == 0  # nothing of the bad batch


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_an_unreadable_file_is_refused(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(_table(1000), path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"PAR1" + b"\x17" * 500)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    db = f"sqlite:///{tmp_path}/nb.db"
    code, _, err = _load(capsys, str(path), "--db", db)
    assert code == 2
    assert err.startswith(f"error: {path}") and ("cannot be read" in err or "no such file" in err), err
    assert len(err) < 1000


def test_an_error_after_good_batches_says_how_far_and_keeps_them(any_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arpu = [float(i) for i in range(1, 26)]
    arpu[22] = float("nan")  # row 23, in the third batch of 10
    path = _parquet(tmp_path, _table(25, **{"customer.arpu": arpu}))
    code, _, err = _load(capsys, str(path), "--db", any_db, "--batch", "10")
    assert code == 2
    assert "row 23, column 'customer.arpu'" in err
    assert "loaded rows 1-20 (2 batches) before the error; rows from 21 on were not loaded" in err
    got = _profiles(any_db, [f"c{i}" for i in range(1, 26)])
    assert sorted(got, key=lambda c: int(c[1:])) == [f"c{i}" for i in range(1, 21)]  # the good batches; none of the third


def test_a_file_error_on_postgres_leaves_nothing_of_the_batch(any_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A NUL byte PostgreSQL would refuse never reaches it: the reader refuses the batch first."""
    plan = ["ok"] * 30
    plan[14] = "bad\x00"
    path = _parquet(tmp_path, _table(30, **{"customer.plan": plan}))
    code, _, err = _load(capsys, str(path), "--db", any_db, "--batch", "10")
    assert code == 2 and "row 15, column 'customer.plan'" in err
    assert _count(any_db) == 10


# -- the reader ----------------------------------------------------------------------------------


def test_batches_are_read_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.parquet"
    pq.write_table(_table(5000), path, row_group_size=100)
    pulled = []
    real_open = profile_file._open

    def counting(path: str, fmt: Any, batch_rows: int) -> tuple[pa.Schema, Iterator[Any]]:
        schema, batches = real_open(path, fmt, batch_rows)

        def count() -> Iterator[Any]:
            for b in batches:
                pulled.append(b.num_rows)
                yield b

        return schema, count()

    monkeypatch.setattr(profile_file, "_open", counting)
    gen = read_profiles(path, batch_rows=100)
    assert isinstance(gen, types.GeneratorType)
    assert pulled == []  # nothing read before the first batch is asked for
    first = next(gen)
    assert (first.first_row, first.last_row, len(first.profiles)) == (1, 100, 100)
    assert sum(pulled) <= 200  # the first batch came before the rest of the 5,000 rows were read
    rest = list(gen)
    assert sum(len(b.profiles) for b in rest) == 4900 and rest[-1].last_row == 5000


def test_batches_number_their_rows_whatever_the_blocks(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("customer_id,customer.n\n" + "".join(f"c{i},{i}\n" for i in range(1, 1001)), encoding="utf-8")
    batches = list(read_profiles(path, batch_rows=300, now=T))
    assert [(b.first_row, b.last_row) for b in batches] == [(1, 300), (301, 600), (601, 900), (901, 1000)]
    assert batches[3].profiles[-1] == Profile("c1000", (("customer", "n", 1000.0),), T, None)


def test_limits_are_the_servers(tmp_path: Path) -> None:
    path = _parquet(tmp_path, _table(2, **{"customer.plan": ["abc", "abcdef"]}))
    with pytest.raises(ProfileFileError) as e:
        list(read_profiles(path, limits=Limits(max_text_length=5)))
    assert (e.value.row, e.value.column) == (2, "customer.plan")
    with pytest.raises(ProfileFileError, match="more than the server's max_features"):
        list(read_profiles(path, limits=Limits(max_features=1)))


def test_the_format_comes_from_the_name_or_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "extract.dat"
    path.write_text("customer_id,customer.plan\na,x\n", encoding="utf-8")
    db = f"sqlite:///{tmp_path}/nb.db"
    code, _, err = _load(capsys, str(path), "--db", db)
    assert code == 2 and "--format" in err
    code, _, err = _load(capsys, str(path), "--db", db, "--format", "csv")
    assert code == 0, err


# -- through a server ----------------------------------------------------------------------------

DATA_TOKEN = "warehouse-loader-71c2e9"


def test_a_file_loads_through_a_server(any_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--target: PutProfiles in batches of --batch, with a token of the "data" role."""
    from nextbest.rpc.auth import hash_token
    from tests.harness import running_server

    path = tmp_path / "p.parquet"
    pq.write_table(_table(25, as_of=[T] * 25, **{"device.is_5g": [i % 3 == 0 for i in range(25)]}), path)
    with running_server(any_db, auth_tokens=f"warehouse:data:{hash_token(DATA_TOKEN)}") as s:
        code, out, err = _load(capsys, str(path), "--target", s.target, "--token", DATA_TOKEN, "--batch", "10")
        assert code == 0, err
        assert "25 rows read" in out and "3 batches" in out and "25 stored, 0 stale" in out
        code, out, err = _load(capsys, str(path), "--target", s.target, "--token", "wrong")
        assert code == 1 and "UNAUTHENTICATED" in err and "loaded no rows" in err
        assert main(["profiles", "get", "c4", "--target", s.target, "--token", DATA_TOKEN]) == 0
        import json

        shown = json.loads(capsys.readouterr().out)
        assert shown["features"] == {"customer.arpu": 4.0, "customer.plan": "postpaid", "device.is_5g": "true"}
    got = _profiles(any_db, [f"c{i}" for i in range(1, 26)])
    assert len(got) == 25 and _features(got["c1"]) == {"customer.arpu": 1.0, "customer.plan": "prepaid", "device.is_5g": "true"}


def test_a_server_refusing_a_batch_stops_the_load_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server's own limits (here a lower max_text_length than the loader's) refuse a batch;
    the loader names the row from the server's field and keeps the batches before."""
    from tests.harness import running_server

    plan = ["ok"] * 30
    plan[24] = "x" * 50
    path = _parquet(tmp_path, _table(30, **{"customer.plan": plan}))
    db = f"sqlite:///{tmp_path}/nb.db"
    with running_server(db, max_text_length=20) as s:
        code, _, err = _load(capsys, str(path), "--target", s.target, "--batch", "10")
    assert code == 2, err
    assert "row 25" in err and "refused" in err, err
    assert "loaded rows 1-20 (2 batches) before the error; rows from 21 on were not loaded" in err
    assert _count(db) == 20


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """docs/configuration.md "Loading profiles from the warehouse": its CSV and its commands, in a fresh directory."""
    import re
    import shlex

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = text.split("### Loading profiles from the warehouse", 1)[1].split("\n### ", 1)[0]
    csv = re.search(r"<<'CSV'\n(.*?)\nCSV\n", section, re.S)
    assert csv is not None
    (tmp_path / "customers.csv").write_text(csv.group(1) + "\n", encoding="utf-8")
    commands = [line[2:] for line in section.splitlines() if line.startswith("$ nextbest profiles") and "--db" in line]
    assert len(commands) == 2
    outputs = []
    for command in commands:
        argv = shlex.split(command.split("#")[0])[1:]
        r = subprocess.run([sys.executable, "-m", "nextbest.cli.main", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout.strip())
    shown = section.split(commands[1], 1)[1].splitlines()[1]
    assert outputs[1] == shown  # the profile, exactly as the README prints it
    assert outputs[0].startswith("2 rows read from customers.csv in 1 batch: 2 stored, 0 stale")


def test_the_progress_line_shows_rows_share_and_rate() -> None:
    import io

    from nextbest.cli.profiles import Progress

    out = io.StringIO()
    p = Progress("x.parquet", 1000, stream=out, every=0.0)
    p(250)
    p.close()
    text = out.getvalue()
    assert text.startswith("\rloading [#######") and " 25% 250 rows, " in text and "/s" in text
    assert text.endswith("\r\033[K")  # the line is cleared before the summary is printed


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables_hold_the_profiles_read_profiles_gives(fmt: str, tmp_path: Path) -> None:
    """profile_table (the --db path): the same rows, times and features as read_profiles, each
    row's features as the JSON text the store keeps; and the same error for a bad row."""
    import orjson

    from nextbest.offline.profile_table import read_profile_tables
    from nextbest.storage.base import features_of

    n = 25
    t = _table(
        n,
        **{
            "as_of": [None if i % 7 == 0 else T - i for i in range(n)],
            "expires_at": [T + i if i % 3 == 0 else None for i in range(n)],
            "device.tier": [None if i % 4 == 0 else ['5g "fast"', "a,b\tc\nd \\ e", "né"][i % 3] for i in range(n)],
            "customer.usage": [None if i % 5 == 0 else [0.1 + 0.2, -0.0, 1e-7, 1e12, 120.0][i % 5] for i in range(n)],
            "customer.postpaid": [None if i % 6 == 0 else bool(i % 2) for i in range(n)],
            "customer.tenure": pa.array([i * 3 for i in range(n)], pa.int32()),
        },
    )
    path = tmp_path / f"p.{fmt}"
    if fmt == "parquet":
        pq.write_table(t, path)
    else:
        import pyarrow.csv as pv

        pv.write_csv(t, path)
    kw: dict[str, Any] = {"batch_rows": 10, "now": T, "ttl": DAY}
    expected = [
        (b.first_row, b.last_row, [(p.customer_id, p.features, p.as_of, p.expires_at) for p in b.profiles])
        for b in read_profiles(path, **kw)
    ]
    got = []
    for b in read_profile_tables(path, **kw):
        assert b.table.column_names == ["customer_id", "features", "as_of", "expires_at"]
        d = b.table.to_pydict()
        rows = zip(d["customer_id"], d["features"], d["as_of"], d["expires_at"], strict=True)
        got.append((b.first_row, b.last_row, [(c, features_of(orjson.loads(f)), a, e) for c, f, a, e in rows]))
    assert got == expected
    assert [len(r[2]) for r in got] == [10, 10, 5]
    bad = t.set_column(t.schema.get_field_index("customer.usage"), "customer.usage", pa.array([1.0] * 13 + [float("nan")] + [1.0] * 11))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ProfileFileError) as e:
        list(read_profile_tables(tmp_path / "bad.parquet", **kw))
    assert (e.value.row, e.value.column) == (14, "customer.usage")
