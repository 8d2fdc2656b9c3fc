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
from numpy.typing import NDArray

from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.offline.estimators import ESTIMATORS, Accumulator, dr, ips, snips
from nextbest.bandit.offline.policies import parse_policy
from nextbest.bandit.offline.replay import replay
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


def _golden(kind: str, whole: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The golden IPS and SNIPS; DR as the log read whole in memory gives it. The golden DR came
    from the squared-loss reward model, which this log's 0/1 rewards now replace with the logistic
    one (issue #33): its values moved, and the chunks must still give the whole log's."""
    dr_rows = iter([w for w in whole if w["estimator"] == "dr"])
    return [next(dr_rows) if g["estimator"] == "dr" else g for g in GOLDEN[kind]]


@pytest.fixture(scope="module")
def whole_db(sqlite_log: str) -> list[dict[str, Any]]:
    from nextbest.offline.log_source import read_replay_log

    log = read_replay_log(sqlite_log, rl.PLACEMENT, with_features=True)
    return _golden("db", _run(lambda: iter((log,))))


@pytest.fixture(scope="module")
def sqlite_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('stream')}/log.db"
    rl.write(url, 1200)
    return url


@pytest.mark.parametrize("chunk", [7, 1000, 50_000])
def test_sqlite_stream_equals_the_in_memory_replay(sqlite_log: str, whole_db: list[dict[str, Any]], chunk: int) -> None:
    """Slots, pacing's no-offer events, DR's folds and a VW candidate that learns as it goes: in
    chunks of 7 events (a two-slot event split across chunks) as read whole."""
    _same(_run(replay_chunks(sqlite_log, rl.PLACEMENT, with_features=True, chunk=chunk)), whole_db)


@pytest.mark.postgres
def test_postgres_stream_equals_the_in_memory_replay() -> None:
    from nextbest.offline.log_source import read_replay_log
    from tests.harness import postgres_available, postgres_schema

    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); streaming replay on PostgreSQL not run")
    with postgres_schema() as pg:
        rl.write(pg, 1200)
        want = _golden("db", _run(lambda: iter((read_replay_log(pg, rl.PLACEMENT, with_features=True),))))
        _same(_run(replay_chunks(pg, rl.PLACEMENT, with_features=True, chunk=7)), want)


@pytest.mark.parametrize("chunk", [7, 50_000])
def test_dsjson_stream_equals_the_in_memory_replay(sqlite_log: str, tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "log.json"
    decisions, arms = read_decisions(sqlite_log, rl.PLACEMENT)
    write_dsjson(str(path), decisions, arms)
    from nextbest.offline.log_source import read_dsjson

    whole = read_dsjson(str(path), rl.PLACEMENT)
    want = _golden("dsjson", _run(lambda: iter((whole,))))
    _same(_run(dsjson_chunks(str(path), rl.PLACEMENT, with_features=True, chunk=chunk)), want)


def test_a_dsjson_file_out_of_time_order_streams_except_for_vw_candidates(
    sqlite_log: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of time order, IPS and SNIPS equal the in-order golden values and DR is the same in
    chunks of any size (its folds follow the file's order); a vw: candidate, which learns in
    time order, is refused naming the line, and nothing reads the file whole."""
    from nextbest.bandit.offline.dsjson import iso_time
    from nextbest.cli.main import main

    path = tmp_path / "log.json"
    decisions, arms = read_decisions(sqlite_log, rl.PLACEMENT)
    write_dsjson(str(path), decisions, arms)
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text("\n".join(lines[500:] + lines[:500]) + "\n")
    with pytest.raises(LogOutOfOrder, match=f"line {len(lines) - 500 + 1}:"):
        _run(dsjson_chunks(str(shuffled), rl.PLACEMENT, with_features=True, chunk=100))
    args = ["replay", "--placement", rl.PLACEMENT, "--log", str(shuffled), "--chunk", "100"]
    capsys.readouterr()
    assert main([*args, "--policy", *POLICIES, "--json"]) == 2
    err = capsys.readouterr().err
    assert f"shuffled.json, line {len(lines) - 500 + 1}: event " in err and "vw:--cb_explore_adf" in err and "time order" in err
    simple = POLICIES[:-1]
    assert main([*args, "--policy", *simple, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = [w for w in GOLDEN["dsjson"] if w["policy"] in simple]
    _same([g for g in got if g["estimator"] != "dr"], [w for w in want if w["estimator"] != "dr"])
    assert main([*args[:-1], "50000", "--policy", *simple, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    _same([g for g in got if g["estimator"] == "dr"], [w for w in whole if w["estimator"] == "dr"])
    assert main(["replay", "--placement", rl.PLACEMENT, "--log", str(path), "--policy", *simple, "--json"]) == 0
    in_order = json.loads(capsys.readouterr().out)
    for g, w in zip([g for g in got if g["estimator"] == "dr"], [w for w in in_order if w["estimator"] == "dr"], strict=True):
        assert g["value"] == pytest.approx(w["value"], abs=0.02)  # other folds, the same estimate up to noise
    assert main([*args, "--policy", *simple]) == 0  # the table's span: the earliest and latest events, not the first and last lines
    head = capsys.readouterr().out.splitlines()[0]
    times = sorted(json.loads(x)["_nb"]["ts"] for x in lines)
    assert head.endswith(f"{iso_time(times[0])} .. {iso_time(times[-1])}"), head


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


# ------------------------------------------------------------------ the DSJSON reader


def _export(url: str, path: Path) -> list[str]:
    decisions, arms = read_decisions(url, rl.PLACEMENT)
    write_dsjson(str(path), decisions, arms)
    return path.read_text().splitlines()


def test_lines_from_another_tool_blank_lines_and_filters_read_like_the_full_decoder(sqlite_log: str, tmp_path: Path) -> None:
    """Lines without nextbest's exact block go through the full decoder inside the same chunks;
    the result equals the in-memory reader's, with --since/--until and the placement filter."""
    lines = _export(sqlite_log, tmp_path / "a.json")
    foreign = []
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if i % 3 == 0 and not obj["_nb"]["pmf_extra"]:  # without _nb a paced line's p would sum to less than 1
            del obj["_nb"]  # as another tool would write it: features from c, arm versions 0
        foreign.append(json.dumps(obj))
    path = tmp_path / "mixed.json"
    path.write_text("\n".join(foreign[:100]) + "\n\n   \n" + "\n".join(foreign[100:]) + "\n")
    since, until = 1.7e9 + 200.0, 1.7e9 + 2000.0
    from nextbest.offline.log_source import read_dsjson

    whole = read_dsjson(str(path), rl.PLACEMENT, since=since, until=until)
    pols = [parse_policy(p) for p in ("logged", "uniform", "constant:b", "vw:--cb_explore_adf --epsilon 0.2")]
    want = [r.to_dict() for r in replay(lambda: iter((whole,)), pols, ["ips", "snips", "dr"]).results]
    got = replay(
        dsjson_chunks(str(path), rl.PLACEMENT, since=since, until=until, with_features=True, chunk=37), pols, ["ips", "snips", "dr"]
    )
    assert got.n == whole.n and 1.7e9 + 200.0 <= got.first and got.last < until
    _same([r.to_dict() for r in got.results], want)
    # A line names its placement in _nb; one without (another tool's) belongs to any.
    with pytest.raises(NotFound, match="no closed decisions of 'other'"):
        list(dsjson_chunks(str(tmp_path / "a.json"), "other")())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.update(a=[o["a"][0], o["a"][0], *o["a"][2:]]), "a and p must list each action once"),
        (lambda o: o.update(a=[*o["a"][1:], o["a"][0]]), "the chosen action must come first"),
        (lambda o: o.update(a=[o["a"][0], 9, *o["a"][2:]]), "a and p must list each action once"),
        (lambda o: o.update(_label_probability=0.0), r"probability in \(0, 1\]"),
        (lambda o: o.update(p=o["p"][:-1]), "a and p must list each action once"),
        (lambda o: o.pop("EventId"), "not a nextbest DSJSON line"),
    ],
)
def test_a_bad_line_is_refused_naming_its_line(sqlite_log: str, tmp_path: Path, change: Any, message: str) -> None:
    lines = _export(sqlite_log, tmp_path / "a.json")[:60]
    obj = json.loads(lines[41])
    if len(obj["a"]) < 3:  # the cases need three actions
        obj = next(json.loads(x) for x in lines[30:] if len(json.loads(x)["a"]) == 3)
        lines[41] = json.dumps(obj)
    change(obj)
    lines[41] = json.dumps(obj)
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match=rf"line 42: .*{message}"):
        list(dsjson_chunks(str(path), rl.PLACEMENT, chunk=25)())


def test_a_line_that_is_not_utf8_is_refused_naming_its_line(sqlite_log: str, tmp_path: Path) -> None:
    lines = _export(sqlite_log, tmp_path / "a.json")[:10]
    path = tmp_path / "bad.json"
    path.write_bytes(("\n".join(lines[:4]) + "\n").encode() + b'{"EventId": "\xff\xfe"}\n')
    with pytest.raises(InvalidInput, match="line 5: not UTF-8"):
        list(dsjson_chunks(str(path), rl.PLACEMENT)())


def test_standard_input_is_read_twice_for_dr(sqlite_log: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    path = tmp_path / "a.json"
    _export(sqlite_log, path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
    got = _run(dsjson_chunks("-", rl.PLACEMENT, with_features=True, chunk=100))
    from nextbest.offline.log_source import read_dsjson

    whole = read_dsjson(str(path), rl.PLACEMENT)
    _same(got, _golden("dsjson", _run(lambda: iter((whole,)))))


# ------------------------------------------------------------------ VW candidates


def _predict_then_learn(args: str, log: Any) -> NDArray[np.float64]:
    """The reference: VW's wrapper predicts each event, then learns it."""
    from vowpalwabbit import Workspace

    ws = Workspace(f"--quiet {args}")
    out = []
    try:
        for i, text in enumerate(log.vw_examples()):
            ex = ws.parse(text)
            scores = np.asarray(ws.predict(ex), dtype=np.float64)
            if log.chosen[i] >= 0:
                ws.learn(ex)
            ws.finish_example(ex)
            out.append(scores)
    finally:
        ws.finish()
    return np.concatenate(out)


@pytest.mark.parametrize(
    "args",
    [
        "--cb_explore_adf --epsilon 0.1 -q UA",
        "--cb_explore_adf --softmax --lambda 5 -q UA",
        "--cb_explore_adf --squarecb --gamma_scale 10",
        "--cb_explore_adf --epsilon 0.05 --cb_type ips",
        "--cb_explore_adf --epsilon 0.05 --cb_type dr",
        "--cb_explore_adf --epsilon 0.05 --cb_type dm",
        "--cb_explore_adf --bag 3",
        "--cb_explore_adf --cover 3",
    ],
)
def test_a_vw_candidate_scores_each_event_before_learning_it(sqlite_log: str, args: str) -> None:
    """The replay takes the score VW's learn leaves on the example: that must be the score from
    before the update, as a predict followed by a learn gives it, for every exploration."""
    from nextbest.bandit.offline.policies import distribution
    from nextbest.offline.log_source import read_replay_log

    log = read_replay_log(sqlite_log, rl.PLACEMENT, with_features=True)
    got, _ = distribution(parse_policy(f"vw:{args}"), log)
    want = np.clip(_predict_then_learn(args, log), 0.0, 1.0)
    assert np.allclose(got, want, rtol=0, atol=1e-12), float(np.abs(got - want).max())


# ------------------------------------------------------------------ VW text and progress


_name = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["customer", "", "slot"]), _name, st.one_of(_name, st.floats(-1e6, 1e6, allow_nan=False))),
        max_size=8,
    )
)
def test_the_shared_line_of_logged_rows_is_the_one_of_features(rows: list[tuple[str, str, str | float]]) -> None:
    from nextbest.bandit.features import feature, shared_line, shared_line_of_rows

    logged = json.loads(json.dumps([list(r) for r in rows]))  # as the log stores them
    features = tuple(feature(ns, name, v if isinstance(v, str) else float(v)) for ns, name, v in logged)
    assert shared_line_of_rows(logged) == shared_line(features)


def test_progress_shows_a_bar_with_the_share_done_and_the_rate() -> None:
    import io

    from nextbest.cli.replay import Progress

    out = io.StringIO()
    p = Progress(1000, stream=out, every=0.0)
    p("replay", 250)
    p("replay", 1000)
    p.close()
    text = out.getvalue()
    assert "[#######.......................]  25% 250 events" in text
    assert "[##############################] 100% 1,000 events" in text and "/s" in text
    out = io.StringIO()
    q = Progress(None, stream=out, every=0.0)  # a DSJSON file: no total known
    q("reward model", 70)
    assert "reward model" in out.getvalue() and "70 events" in out.getvalue() and "%" not in out.getvalue()


def test_the_count_for_the_progress_bar_is_what_the_replay_reads(sqlite_log: str) -> None:
    from nextbest.offline.log_source import count_replay_events

    done = replay(replay_chunks(sqlite_log, rl.PLACEMENT, chunk=100), [parse_policy("logged")], ["ips"])
    assert count_replay_events(sqlite_log, rl.PLACEMENT) == done.n == GOLDEN["db"][0]["n"]
