"""The streaming replay: the same estimates as the in-memory replay it replaced, from SQLite,
PostgreSQL and DSJSON, in chunks of any size; and memory that does not grow with the log."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextbest.bandit.offline.estimators import ESTIMATORS, Accumulator, dr, ips, snips
from nextbest.bandit.offline.replay import parse_policy, replay
from nextbest.offline.dsjson_reader import LogOutOfOrder
from nextbest.offline.log_source import dsjson_chunks, read_decisions, replay_chunks, write_dsjson
from tests.offline import replay_log as rl

GOLDEN = json.loads((Path(__file__).parent / "data" / "replay_golden.json").read_text())
POLICIES = ["logged", "uniform", "constant:a", "constant:c", "vw:--cb_explore_adf --epsilon 0.1 -q UA"]


def _same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [(g["policy"], g["estimator"]) for g in got] == [(w["policy"], w["estimator"]) for w in want]
    for g, w in zip(got, want, strict=True):
        assert (g["n"], g["clipped"], g["warnings"]) == (w["n"], w["clipped"], w["warnings"]), (g, w)
        for k in ("value", "ci_low", "ci_high", "ess"):
            assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-9), (g["policy"], g["estimator"], k)


def _run(chunks: Any) -> list[dict[str, Any]]:
    return [r.to_dict() for r in replay(chunks, [parse_policy(p) for p in POLICIES], list(ESTIMATORS)).results]


@pytest.fixture(scope="module")
def sqlite_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('stream')}/log.db"
    rl.write(url, 1200)
    return url


@pytest.mark.parametrize("chunk", [7, 1000, 50_000])
def test_sqlite_stream_equals_the_in_memory_replay(sqlite_log: str, chunk: int) -> None:
    """Slots, pacing's no-offer events, DR's folds and a VW candidate that learns as it goes: in
    chunks of 7 events (a two-slot event split across chunks) as read whole."""
    _same(_run(replay_chunks(sqlite_log, rl.PLACEMENT, with_features=True, chunk=chunk)), GOLDEN["db"])


@pytest.mark.postgres
def test_postgres_stream_equals_the_in_memory_replay() -> None:
    from tests.harness import postgres_available, postgres_schema

    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); streaming replay on PostgreSQL not run")
    with postgres_schema() as pg:
        rl.write(pg, 1200)
        _same(_run(replay_chunks(pg, rl.PLACEMENT, with_features=True, chunk=7)), GOLDEN["db"])


@pytest.mark.parametrize("chunk", [7, 50_000])
def test_dsjson_stream_equals_the_in_memory_replay(sqlite_log: str, tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "log.json"
    decisions, arms = read_decisions(sqlite_log, rl.PLACEMENT)
    write_dsjson(str(path), decisions, arms)
    _same(_run(dsjson_chunks(str(path), rl.PLACEMENT, with_features=True, chunk=chunk)), GOLDEN["dsjson"])


def test_a_dsjson_file_out_of_time_order_is_refused_by_the_stream_and_sorted_by_the_cli(
    sqlite_log: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nextbest.cli.main import main

    path = tmp_path / "log.json"
    decisions, arms = read_decisions(sqlite_log, rl.PLACEMENT)
    write_dsjson(str(path), decisions, arms)
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text("\n".join(lines[500:] + lines[:500]) + "\n")
    with pytest.raises(LogOutOfOrder, match=f"line {len(lines) - 500 + 1}:"):
        _run(dsjson_chunks(str(shuffled), rl.PLACEMENT, with_features=True, chunk=100))
    args = ["replay", "--placement", rl.PLACEMENT, "--policy", *POLICIES, "--json", "--chunk", "100"]
    capsys.readouterr()
    assert main([*args, "--log", str(shuffled)]) == 0
    out = capsys.readouterr()
    assert "reading the whole file to sort it" in out.err
    _same(json.loads(out.out), GOLDEN["dsjson"])


def _peak(url: str, chunk: int) -> tuple[int, int]:
    """Peak traced memory (numpy's buffers included) of a replay of every non-VW policy with
    IPS and SNIPS, and the events it read."""
    pols = [parse_policy(p) for p in ("logged", "uniform", "constant:a")]
    tracemalloc.start()
    try:
        done = replay(replay_chunks(url, rl.PLACEMENT, chunk=chunk), pols, ["ips", "snips"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, done.n


def test_memory_does_not_grow_with_the_log(tmp_path: Path) -> None:
    """Four times the events, read 500 at a time: the peak stays within a fifth of the smaller
    log's (whose chunks alone take most of it), where holding the log would take four times."""
    small, large = f"sqlite:///{tmp_path}/small.db", f"sqlite:///{tmp_path}/large.db"
    rl.write(small, 3_000)
    rl.write(large, 12_000)
    peak_small, n_small = _peak(small, 500)
    peak_large, n_large = _peak(large, 500)
    assert n_large > 3.9 * n_small
    assert peak_large < 1.2 * peak_small, (peak_small, peak_large)


# ------------------------------------------------------------------ the estimators in chunks

_prob = st.floats(min_value=1e-3, max_value=1.0)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(-5, 5), _prob, st.floats(0.0, 1.0), st.floats(-2, 2), st.floats(-2, 2)), min_size=2, max_size=60),
    cuts=st.lists(st.integers(1, 59), max_size=6),
    clip=st.sampled_from([None, 3.0]),
)
def test_the_accumulator_in_chunks_equals_the_estimators_on_the_whole_log(
    data: list[tuple[float, float, float, float, float]], cuts: list[int], clip: float | None
) -> None:
    r, p_log, p_tgt, hl, ht = (np.array(c, dtype=np.float64) for c in zip(*data, strict=True))
    acc = Accumulator(ESTIMATORS, clip=clip)
    bounds = [0, *sorted({c for c in cuts if c < len(data)}), len(data)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        acc.add(r[lo:hi], p_log[lo:hi], p_tgt[lo:hi], hl[lo:hi], ht[lo:hi])
    whole = [ips(r, p_log, p_tgt, clip=clip), snips(r, p_log, p_tgt, clip=clip), dr(r, p_log, p_tgt, hl, ht, clip=clip)]
    for got, want in zip(acc.estimates(), whole, strict=True):
        assert (got.estimator, got.n, got.clipped, got.warnings) == (want.estimator, want.n, want.clipped, want.warnings)
        for k in ("value", "ci_low", "ci_high", "ess"):
            a, b = getattr(got, k), getattr(want, k)
            assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-9), (k, a, b)


def test_one_chunk_is_bit_for_bit_the_one_shot_estimator() -> None:
    rng = np.random.default_rng(3)
    r, p_log, p_tgt = rng.random(1000), rng.uniform(0.05, 1, 1000), rng.random(1000)
    acc = Accumulator(["ips", "snips"])
    acc.add(r, p_log, p_tgt)
    assert acc.estimates() == [ips(r, p_log, p_tgt), snips(r, p_log, p_tgt)]
