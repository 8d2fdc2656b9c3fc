"""``nextbest tune`` on small SQLite logs: the table, the refusals, and --apply through a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextbest.cli.main import main
from tests.harness import running_server
from tests.tunelog import PLACEMENT, write_log


def _log(tmp_path: Path, n: int, **kw: object) -> str:
    path = tmp_path / "log.db"
    write_log(str(path), n, **kw)  # type: ignore[arg-type]
    return f"sqlite:///{path}"


def test_a_log_too_short_for_the_search_is_refused_with_the_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _log(tmp_path, 300)
    assert main(["tune", PLACEMENT, "--db", db, "--jobs", "1"]) == 2
    assert "has 300 closed decisions; the search needs at least 1,000" in capsys.readouterr().err
    assert main(["tune", PLACEMENT, "--db", db, "--jobs", "1", "--apply", "--min-search-events", "100"]) == 2
    err = capsys.readouterr().err
    assert "has 300 closed decisions; --apply needs at least 50,000 (--min-events)" in err


def test_dry_run_prints_the_table_and_the_history_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _log(tmp_path, 1200)
    assert main(["tune", PLACEMENT, "--db", db, "--jobs", "1", "--stages", "1", "--reward-model-loss", "logistic"]) == 0
    out, err = capsys.readouterr()
    assert "16 settings of offers over 1,200 events" in out and "ranked by the SNIPS lower 95 % bound" in out
    assert "current*" in out and "--cb_type ips -l 0.05 -q UA" in out
    assert "dry run: --apply would" in out and "history: {" in out
    assert "stage 1/1 (cb_type x learning rate): 16/16 candidates" in err and "current setting (the database): -q UA" in err


def test_apply_below_min_events_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _log(tmp_path, 1200)
    code = main(["tune", PLACEMENT, "--db", db, "--jobs", "1", "--apply", "--min-events", "5000", "--target", "127.0.0.1:1"])
    assert code == 2
    assert "has 1,200 closed decisions; --apply needs at least 5,000 (--min-events)" in capsys.readouterr().err


def test_apply_refuses_when_the_winner_does_not_beat_the_current_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing to learn (no offer is ever accepted): every setting is worth the same."""
    db = _log(tmp_path, 1200, flat=0.0)
    code = main(
        ["tune", PLACEMENT, "--db", db, "--jobs", "1", "--stages", "1", "--apply", "--min-events", "1000", "--target", "127.0.0.1:1"]
    )
    assert code == 2
    out = capsys.readouterr().out
    assert "refused: " in out and "nothing applied" in out
    assert "current setting is the best one found" in out or "does not beat the current setting's" in out


def test_apply_starts_the_winner_as_a_shadow_and_keeps_the_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The best arm needs segment x channel x arm: stage 2 finds the cubic cross, whose lower
    bound beats the current -q UA's by far; the server gets it as a shadow."""
    db = _log(tmp_path, 1500)
    history = tmp_path / "tune.jsonl"
    with running_server(db) as s:
        argv = ["tune", PLACEMENT, "--db", db, "--jobs", "1", "--stages", "2", "--apply", "--min-events", "1000"]
        code = main([*argv, "--target", s.target, "--shadow-id", "tuned", "--history", str(history)])
        out = capsys.readouterr().out
        assert code == 0, out
        with s.client() as c:
            spec = c.placement(PLACEMENT)
    assert "applied: the winner's lower 95 % bound" in out and "shadow:tuned" in out
    (shadow,) = spec.shadows
    assert shadow.id == "tuned" and "--cubic UUA" in shadow.vw_args and "-q UA" not in shadow.vw_args and shadow.interactions
    assert spec.vw_args == ""  # the placement's own setting is unchanged: the shadow only learns
    (line,) = history.read_text().splitlines()
    record = json.loads(line)
    assert record["applied"] == "shadow:tuned" and record["events"] == 1500 and "--cubic UUA" in record["winner"]["vw_args"]
    assert record["winner"]["ci_low"] > record["current"]["ci_low"]
    assert "tuning history of offers" in out
