"""DSJSON replay reads any writer's valid lines on its fast path, streams a file out of time order
in bounded memory (unless a vw: candidate needs the order), refuses a line whose probabilities
cannot weigh a replay, and refuses a line too long to hold, naming the file and line each time."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.estimators import ESTIMATORS
from nextbest.bandit.offline.policies import parse_policy
from nextbest.bandit.offline.replay import replay
from nextbest.cli.main import main
from nextbest.offline import dsjson_reader
from nextbest.offline.log_source import dsjson_chunks, read_decisions, write_dsjson
from tests.offline import replay_log as rl

POLICIES = ["logged", "uniform", "constant:a", "constant:c", "vw:--cb_explore_adf --epsilon 0.1 -q UA"]


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """export-log's lines of the replay tests' log (slots, pacing's "no offer")."""
    d = tmp_path_factory.mktemp("dsjson")
    url = f"sqlite:///{d}/log.db"
    rl.write(url, 1200)
    decisions, arms = read_decisions(url, rl.PLACEMENT)
    write_dsjson(str(d / "log.json"), decisions, arms)
    return (d / "log.json").read_text().splitlines()


def _file(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run(chunks: Any, policies: list[str] = POLICIES, estimators: tuple[str, ...] = ESTIMATORS) -> list[dict[str, Any]]:
    return [r.to_dict() for r in replay(chunks, [parse_policy(p) for p in policies], list(estimators)).results]


def _rewritten(line: str, i: int) -> str:
    """The line as another writer would give it: keys in another order, other spacing."""
    obj = json.loads(line)
    obj = dict(reversed(list(obj.items())))
    obj["_nb"] = dict(sorted(obj["_nb"].items()))
    return json.dumps(obj, separators=(",", ":") if i % 2 else (", ", ": "))


# ------------------------------------------------------------------ any writer, fast


def test_a_log_rewritten_by_json_dumps_replays_on_the_fast_path_to_the_same_estimates(
    lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every policy and estimator (a vw: candidate and DR's folds included) equals the original's
    to 1e-9, and no line of the rewritten file needs the full decoder."""
    want = _run(dsjson_chunks(_file(tmp_path / "own.json", lines), rl.PLACEMENT, with_features=True, chunk=100))
    other = _file(tmp_path / "dumps.json", [_rewritten(x, i) for i, x in enumerate(lines)])
    assert Path(other).read_text() != (tmp_path / "own.json").read_text()

    def slow(*_: Any) -> Any:
        raise AssertionError("a valid line went to the full decoder")

    monkeypatch.setattr(dsjson_reader, "from_dsjson", slow)
    monkeypatch.setattr(dsjson_reader, "decode", slow, raising=False)
    got = _run(dsjson_chunks(other, rl.PLACEMENT, with_features=True, chunk=100))
    assert [(g["policy"], g["estimator"], g["n"]) for g in got] == [(w["policy"], w["estimator"], w["n"]) for w in want]
    assert got[0]["n"] > 1000
    for g, w in zip(got, want, strict=True):
        for k in ("value", "ci_low", "ci_high", "ess"):
            assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-9), (g["policy"], g["estimator"], k)


# ------------------------------------------------------------------ out of time order


def _shuffled(lines: list[str], times: int) -> list[str]:
    """``times`` copies of the log (each its own event ids, later in time), in reverse time
    order by blocks of 100 lines."""
    out = []
    for k in range(times):
        for line in lines:
            obj = json.loads(line)
            obj["EventId"] += f"-{k}"
            obj["_nb"]["ts"] += k * 10_000.0
            out.append(json.dumps(obj))
    blocks = [out[i : i + 100] for i in range(0, len(out), 100)]
    return [x for b in reversed(blocks) for x in b]


def _peak(path: str) -> tuple[int, list[dict[str, Any]]]:
    tracemalloc.start()
    try:
        got = _run(dsjson_chunks(path, rl.PLACEMENT, chunk=200, time_order=False), ["logged", "uniform", "constant:a"], ("ips", "snips"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, got


def test_a_log_out_of_time_order_streams_in_bounded_memory(lines: list[str], tmp_path: Path) -> None:
    """Four times the events, out of order, read 200 at a time: the peak stays within a fifth of
    the smaller file's, and IPS and SNIPS equal the in-order file's."""
    small, large = _shuffled(lines, 1), _shuffled(lines, 4)
    peak_small, got_small = _peak(_file(tmp_path / "small.json", small))
    peak_large, got_large = _peak(_file(tmp_path / "large.json", large))
    assert got_large[0]["n"] == 4 * got_small[0]["n"] > 4000
    assert peak_large < 1.2 * peak_small, (peak_small, peak_large)
    in_order = _run(
        dsjson_chunks(_file(tmp_path / "order.json", lines), rl.PLACEMENT), ["logged", "uniform", "constant:a"], ("ips", "snips")
    )
    for g, w in zip(got_small, in_order, strict=True):
        assert (g["policy"], g["estimator"], g["n"]) == (w["policy"], w["estimator"], w["n"])
        assert g["value"] == pytest.approx(w["value"], rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------ probabilities


def _three_actions(lines: list[str]) -> int:
    return next(i for i in range(40, len(lines)) if len(json.loads(lines[i])["a"]) == 3 and not json.loads(lines[i])["_nb"]["pmf_extra"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o["p"].__setitem__(1, 1e308), r"p: ev\d+: every probability must be a number in \[0, 1\]"),
        (lambda o: o["p"].__setitem__(2, -0.25), r"p: ev\d+: every probability must be a number in \[0, 1\]"),
        (lambda o: o.update(p=[o["p"][0], 1.0, 1.0]), r"p: ev\d+: the probabilities sum to [\d.]+, not 1 \(within 1e-06\)"),
        (
            lambda o: o.update(_label_probability=o["p"][0] / 2),
            r"p: ev\d+: the chosen action's probability [\d.e-]+ is not _label_probability",
        ),
        (lambda o: o["_nb"].update(pmf_extra=[1.5]), r"every probability must be a number in \[0, 1\]"),
        (lambda o: o["_nb"].update(pmf_extra=[0.1, 0.1]), r"pmf_extra holds at most one probability"),
        (lambda o: o.pop("_nb") and o["p"].__setitem__(1, o["p"][1] + 0.01), r"p: ev\d+: the probabilities sum to 1.01, not 1"),
    ],
)
def test_a_line_whose_probabilities_cannot_weigh_a_replay_is_refused_by_the_cli(
    lines: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    """p of 1e308 gave a DR estimate of -3e303 and exit code 0; a PMF summing to 5 or disagreeing
    with the label passed. Now the CLI exits 2 naming the file and the line."""
    bad = list(lines[:120])
    i = _three_actions(bad)
    obj = json.loads(bad[i])
    change(obj)
    bad[i] = json.dumps(obj)
    path = _file(tmp_path / "bad.json", bad)
    capsys.readouterr()
    assert main(["replay", "--log", path, "--placement", rl.PLACEMENT, "--policy", "logged", "uniform", "--chunk", "50"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: --log: {path}, line {i + 1}: "), captured.err
    assert len(captured.err) < 400
    assert re.search(message, captured.err), captured.err


def test_a_pmf_within_the_tolerance_is_read_and_beyond_it_refused(lines: list[str], tmp_path: Path) -> None:
    """Another writer's rounding, 4e-7 on one probability of each line: the PMF sums to 1 within
    1e-6 and replays to the same estimates within that; 3e-6 is too far from 1."""

    def nudged(by: float) -> str:
        out = []
        for line in lines:
            obj = json.loads(line)
            obj["p"][-1] += by
            out.append(json.dumps(obj))
        return _file(tmp_path / f"n{by}.json", out)

    got = _run(dsjson_chunks(nudged(4e-7), rl.PLACEMENT), ["logged", "uniform"], ("ips", "snips"))
    want = _run(dsjson_chunks(_file(tmp_path / "o.json", lines), rl.PLACEMENT), ["logged", "uniform"], ("ips", "snips"))
    for g, w in zip(got, want, strict=True):
        assert g["n"] == w["n"] > 1000 and g["value"] == pytest.approx(w["value"], rel=1e-6)
    with pytest.raises(InvalidInput, match=r"n3e-06.json, line 1: p: ev\d+: the probabilities sum to 1.000003, not 1"):
        _run(dsjson_chunks(nudged(3e-6), rl.PLACEMENT), ["logged"], ("ips",))


def test_the_error_quotes_a_bounded_piece_of_a_huge_line(lines: list[str], tmp_path: Path) -> None:
    bad = list(lines[:60])
    i = _three_actions(bad)
    obj = json.loads(bad[i])
    obj["EventId"] = "x" * 500_000
    obj["p"][1] = 7.0
    bad[i] = json.dumps(obj)
    with pytest.raises(InvalidInput) as e:
        list(dsjson_chunks(_file(tmp_path / "bad.json", bad), rl.PLACEMENT, chunk=25)())
    assert f"line {i + 1}: p: xxx" in str(e.value) and "(500,000 characters)" in str(e.value)
    assert len(str(e.value)) < 500
    obj = json.loads(lines[i])  # another tool's line (no _nb) with a feature the decoder quotes
    del obj["_nb"]
    obj["c"]["U"]["huge"] = list(range(100_000))
    bad[i] = json.dumps(obj)
    with pytest.raises(InvalidInput) as e:
        list(dsjson_chunks(_file(tmp_path / "bad.json", bad), rl.PLACEMENT, chunk=25)())
    assert f"line {i + 1}: c: feature 'huge': expected a number or a text, got [0, 1, 2" in str(e.value)
    assert len(str(e.value)) < 800


# ------------------------------------------------------------------ line length


def test_a_line_longer_than_the_limit_is_refused_unread(lines: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 20 MB line (a huge context) is refused naming file and line while at most the limit of
    it is held; --max-line-bytes raises the limit and the same file replays."""
    obj = json.loads(lines[10])
    obj["_nb"]["features"].append(["customer", "blob", "y" * 20_000_000])
    path = _file(tmp_path / "long.json", [*lines[:10], json.dumps(obj), *lines[11:]])
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=r"long.json, line 11: longer than 1,048,576 bytes \(--max-line-bytes raises the limit\)"):
            list(dsjson_chunks(path, rl.PLACEMENT)())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, peak
    base = ["replay", "--log", path, "--placement", rl.PLACEMENT, "--policy", "logged", "--estimator", "ips", "--json"]
    capsys.readouterr()
    assert main(base) == 2
    assert "line 11: longer than 1,048,576 bytes" in capsys.readouterr().err
    assert main([*base, "--max-line-bytes", str(32 * 2**20)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n"] == sum(1 for x in lines if json.loads(x)["_nb"]["placement"] == rl.PLACEMENT)


def test_the_limit_counts_the_line_without_its_newline(lines: list[str], tmp_path: Path) -> None:
    size = len(lines[0].encode())
    path = _file(tmp_path / "a.json", lines[:3])
    assert len(list(dsjson_chunks(path, rl.PLACEMENT, max_line=max(len(x.encode()) for x in lines[:3]))())) == 1
    with pytest.raises(InvalidInput, match=f"line 1: longer than {size - 1:,} bytes"):
        list(dsjson_chunks(path, rl.PLACEMENT, max_line=size - 1)())


def test_the_cli_default_is_the_readers() -> None:
    from nextbest.cli.replay import MAX_LINE_BYTES

    assert MAX_LINE_BYTES == dsjson_reader.MAX_LINE == 2**20


@pytest.mark.parametrize(
    ("key", "value"),
    [("p", ["x", 0.5, 0.5]), ("a", [1, [2], 3]), ("pmf_extra", ["x"])],
)
def test_a_field_of_the_wrong_type_is_refused_naming_its_line(lines: list[str], tmp_path: Path, key: str, value: Any) -> None:
    """The line keeps export-log's own layout (only the one field changes): not a number where
    one is needed is refused naming its line, not an error without one."""
    bad = list(lines[:60])
    i = _three_actions(bad)
    field = re.compile(rf'"{key}": \[[^\]]*\]')
    assert len(field.findall(bad[i])) == 1
    bad[i] = field.sub(f'"{key}": {json.dumps(value)}', bad[i])
    with pytest.raises(InvalidInput, match=rf"bad.json, line {i + 1}: dsjson: not a nextbest DSJSON line \((Type|Value)Error"):
        list(dsjson_chunks(_file(tmp_path / "bad.json", bad), rl.PLACEMENT, chunk=25)())


@pytest.mark.parametrize("later", ["not json", "too long", "out of order"])
def test_the_first_bad_line_is_the_one_refused(lines: list[str], tmp_path: Path, later: str) -> None:
    """A line checked with its chunk is refused before a later line of the same chunk that fails
    on its own (a syntax error, its length, its time)."""
    bad = list(lines[:60])
    i = _three_actions(bad)
    obj = json.loads(bad[i])
    obj["p"][1] = 3.0
    bad[i] = json.dumps(obj)
    j = i + 5
    bad[j] = {"not json": "{oops", "too long": "x" * 5000, "out of order": bad[0]}[later]
    with pytest.raises(InvalidInput, match=rf"bad.json, line {i + 1}: p: "):
        list(dsjson_chunks(_file(tmp_path / "bad.json", bad), rl.PLACEMENT, chunk=50, max_line=4096)())
