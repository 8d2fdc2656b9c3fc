"""Point-in-time logging (issue #30) in the offline consumers: replay, DR, `vw:` candidates and
the DSJSON and Parquet exports see a decision's context as it was used (the stored profile's
values of decision time, each arm's history features), read from the log alone, never from
today's profile; decisions without a context read and export as before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Text, cast, create_engine, delete, insert, select, update

from nextbest.bandit.decision_log import DecisionContext, LoggedDecision, Outcome, logged_arm_rows
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature, arm_line, feature, features_from_mapping
from nextbest.bandit.history import never_seen
from nextbest.bandit.offline import policies
from nextbest.bandit.offline.dsjson import from_dsjson, to_ccb_dsjson, to_dsjson
from nextbest.bandit.offline.policies import parse_policy
from nextbest.bandit.offline.replay import replay
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.bandit.offline.reward_model import RewardModel
from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.main import main
from nextbest.config.plans import plan
from nextbest.offline.log_source import dsjson_chunks, read_decisions, read_replay_log, replay_chunks
from nextbest.storage import tables as t
from nextbest.storage.base import Close, LearnRow
from nextbest.storage.sql import open_store
from tests.harness import postgres_available, postgres_schema

PLACEMENT = "offers"
ARMS = {"a": {"category": "data", "price": 4.99}, "b": {"category": "voice", "price": 2.5}, "c": {"category": "tv"}}
SPEC_FEATURES = {(k, 1): features_from_mapping(v) for k, v in ARMS.items()}
PROFILE_AS_OF = 1.69e9 + 0.125
VW = "vw:--cb_explore_adf --epsilon 0.1 -q UA"

# The query of profile-sourced features in docs/replay.md (section "Logs beyond one machine").
PROFILE_QUERY = """
SELECT event_id, f.name, f.text, f.number, profile_as_of
FROM (SELECT event_id, profile_as_of, profile_keys, unnest(features) AS f FROM read_parquet($files))
WHERE list_contains(profile_keys, concat_ws('.', nullif(f.namespace, ''), f.name))
"""


def _history(i: int, arm: int) -> tuple[Feature, ...]:
    return (
        feature("history", "impressions_7d", float((i + arm) % 4)),
        feature("history", "accepts_30d", float((i * arm) % 2)),
        feature("history", "days_since_impression", 0.5 + arm + (i % 3)),
    )


def _decisions(n: int, seed: int = 3) -> tuple[list[LoggedDecision], list[Close]]:
    """``n`` events over arms a, b, c: every other one used a stored profile and history (its
    context), the rest only the request; every 5th has a second slot, every 9th is paced."""
    rng = np.random.default_rng(seed)
    out: list[LoggedDecision] = []
    closes: list[Close] = []
    for i in range(n):
        ts = 1.7e9 + 2.0 * i
        arms = (("a", 1), ("b", 1), ("c", 1))
        pmf = (0.2, 0.5, 0.3)
        if i % 9 == 4:
            pmf = (0.16, 0.4, 0.24, 0.2)
        c = int(rng.choice(3, p=np.array(pmf[:3]) / sum(pmf[:3])))
        with_context = i % 2 == 0
        features: tuple[Feature, ...] = (feature("customer", "segment", ("gold", "silver")[i % 2]),)
        context = None
        if with_context:
            features += (feature("customer", "plan", ("prepaid", "postpaid")[i % 3 % 2]), feature("customer", "arpu", 10.0 + i % 7))
            context = DecisionContext(PROFILE_AS_OF + i, ("customer.plan", "customer.arpu"), tuple(_history(i, j) for j in range(3)))
        d = LoggedDecision(
            event_id=f"ev{i:04d}",
            placement=PLACEMENT,
            customer_id=f"c{i % 13}",
            timestamp=ts,
            features=features,
            arms=arms,
            pmf=pmf,
            chosen=c,
            probability=pmf[c],
            model_version=i,
            deadline=ts + 600.0,
            context=context,
        )
        out.append(d)
        r = float(rng.random() < 0.2 + 0.3 * c)
        closes.append(Close(d.event_id, Outcome.REWARD if r else Outcome.DEFAULT, r, ts + 5.0))
        if i % 5 == 0:  # a second slot over the arms left, with their history
            rest = [j for j in range(3) if j != c]
            own = None if context is None else replace(context, arm_features=tuple(context.arm_features[j] for j in rest))
            out.append(replace(d, slot=1, arms=tuple(arms[j] for j in rest), pmf=(0.5, 0.5), chosen=0, probability=0.5, context=own))
            closes.append(Close(d.event_id, Outcome.REWARD, 1.0, ts + 6.0, slot=1))
    return out, closes


def _write(url: str, n: int) -> list[LoggedDecision]:
    store = open_store(url)
    try:
        spec = PlacementSpec.model_validate({"id": PLACEMENT, "slots": 2, "arms": [{"id": k, "features": v} for k, v in ARMS.items()]})
        p = plan({}, [spec], 1)
        store.save_placements(p.records, p.new_arm_versions)
        decisions, closes = _decisions(n)
        store.write(decisions, [])
        store.write([], closes)
    finally:
        store.close()
    return decisions


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/log.db"
        return
    if not postgres_available():
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    with postgres_schema() as u:
        yield u


def _want_arm_lines(d: LoggedDecision) -> list[str]:
    """The arm lines the model saw at decision time: each arm's features, then its history."""
    own = d.context.arm_features if d.context is not None else ((),) * len(d.arms)
    return [arm_line(a, (*SPEC_FEATURES[(a, v)], *fs)) for (a, v), fs in zip(d.arms, own, strict=True)]


def _arm_lines(text: str) -> list[str]:
    """The arm lines of a VW example, without the chosen arm's label."""
    lines = text.split("\n")[1:]
    return [line.split(" ", 1)[1] if line[0].isdigit() else line for line in lines]


def _texts(chunks: Any) -> list[str]:
    return [text for chunk in chunks() for text in chunk.vw_texts]


def test_the_log_keeps_the_context_as_used(url: str) -> None:
    written = _write(url, 30)
    decisions, _ = read_decisions(url, PLACEMENT)
    by_key = {(d.event_id, d.slot): d for d in written}
    assert [d.context for d in decisions] == [by_key[(d.event_id, d.slot)].context for d in decisions]
    assert sum(d.context is not None for d in decisions) > 0 and sum(d.context is None for d in decisions) > 0


def test_contexts_logged_with_every_arms_rows_read_as_the_compact_ones(url: str, tmp_path: Path) -> None:
    """The context column is compact (each distinct arm tuple once, its names once); rows logged
    before held every arm's [namespace, name, value] rows (``to_json``'s form). Those read back,
    replay, export and learn exactly as the compact rows of the same decisions."""
    written = _write(url, 30)
    engine = create_engine(url)
    d = t.decisions.c

    def read_all(tag: str) -> tuple[list[LoggedDecision], list[str], bytes, list[Any]]:
        out = tmp_path / f"{tag}.json"
        assert main(["export-log", "--db", url, "--placement", PLACEMENT, "--out", str(out)]) == 0
        with engine.connect() as conn:
            texts = conn.execute(select(cast(d.context, Text)).order_by(d.event_id, d.slot)).scalars().all()
        learned = [LearnRow("e", 0, 1, (), 0, 1.0, 0.0, "[]", x).arm_features() for x in texts]
        return read_decisions(url, PLACEMENT)[0], read_replay_log(url, PLACEMENT, with_features=True).vw_texts, out.read_bytes(), learned

    try:
        with engine.connect() as conn:
            stored = [json.loads(x) for x in conn.execute(select(cast(d.context, Text))).scalars() if x]
        assert stored and all("arm_features" not in x and len(x["arm_names"]) == 1 for x in stored)  # one layout: names once
        compact = read_all("compact")
        with engine.begin() as conn:
            for x in written:
                if x.context is not None:
                    old = x.context.to_json()
                    conn.execute(update(t.decisions).where(d.event_id == x.event_id, d.slot == x.slot).values(context=old))
        with engine.connect() as conn:
            assert all("arm_names" not in json.loads(x) for x in conn.execute(select(cast(d.context, Text))).scalars() if x)
        assert read_all("old") == compact
        assert [x.context for x in compact[0]] == [
            {(w.event_id, w.slot): w for w in written}[(x.event_id, x.slot)].context for x in compact[0]
        ]
    finally:
        engine.dispose()


def test_an_unseen_arms_features_are_stored_once() -> None:
    never = never_seen((("7d", 7 * 86400.0), ("30d", 30 * 86400.0)))
    seen = (*never[:2], ("history", "impressions_30d", 3.0), never[3], ("history", "days_since_impression", 12.5))
    ctx = DecisionContext(None, (), (never, seen, *(never,) * 18, seen, ()))
    raw = json.loads(json.dumps(ctx.serializable()))
    assert len(raw["arm_rows"]) == 3 and len(raw["arm_names"]) == 3 and raw["arm_row"][:3] == [0, 1, 0]
    assert DecisionContext.from_json(raw) == ctx == DecisionContext.from_json(ctx.to_json())
    assert logged_arm_rows(raw) == ctx.to_json()["arm_features"]
    assert len(json.dumps(raw)) < len(json.dumps(ctx.to_json())) / 4


def test_replay_builds_each_decisions_arm_lines_with_its_history(url: str, tmp_path: Path) -> None:
    """From the database (whole and in chunks of 4), from DSJSON and from decisions in memory,
    a decision with a context has its history on its arm lines, in the order the model saw them;
    one without has its arms' features alone, as before."""
    _write(url, 40)
    decisions, arm_rows = read_decisions(url, PLACEMENT)
    closed = [d for d in decisions if d.chosen is not None]
    log = read_replay_log(url, PLACEMENT, with_features=True)
    assert log.event_arm_features is not None
    assert log.event_ids == [d.event_id for d in closed]
    for d, text in zip(closed, log.vw_texts, strict=True):
        assert _arm_lines(text) == _want_arm_lines(d), d.event_id
        assert ("history.impressions_7d" in text) == (d.context is not None)
    with_history = next(t for d, t in zip(closed, log.vw_texts, strict=True) if d.context is not None)
    assert "|A arm=a category=data price:4.99 history.impressions_7d:" in with_history  # after the arm's own
    assert "customer.plan=" in with_history.split("\n")[0]  # the profile's values are in the shared line
    out = tmp_path / "log.json"
    assert main(["export-log", "--db", url, "--placement", PLACEMENT, "--out", str(out)]) == 0
    sources = {
        "chunks": replay_chunks(url, PLACEMENT, with_features=True, chunk=4),
        "dsjson": dsjson_chunks(str(out), PLACEMENT, with_features=True, chunk=4),
        "decisions": lambda: iter((ReplayLog.from_decisions(decisions, arm_rows),)),
    }
    for name, chunks in sources.items():
        assert _texts(chunks) == log.vw_texts, name


def test_a_log_without_contexts_reads_as_before(url: str) -> None:
    """Decisions without a context: no per-event arm features, and arm lines of the arms' own
    features (the same text as the log of the same decisions whose contexts are dropped)."""
    _write(url, 20)
    with_ctx = read_replay_log(url, PLACEMENT, with_features=True)
    decisions, arm_rows = read_decisions(url, PLACEMENT)
    bare = ReplayLog.from_decisions([replace(d, context=None) for d in decisions], arm_rows)
    assert bare.event_arm_features is None
    assert read_replay_log(url, PLACEMENT).event_arm_features is None  # read without features: the context column is not read
    for a, b, d in zip(with_ctx.vw_texts, bare.vw_texts, [d for d in decisions if d.chosen is not None], strict=True):
        assert (a == b) == (d.context is None or not any(d.context.arm_features))


def test_a_vw_candidate_and_dr_learn_from_decision_time_history(url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    _write(url, 40)
    seen: list[str] = []
    parse = policies._VW.parse

    def recording(ws: Any, text: str) -> Any:
        seen.append(text)
        return parse(ws, text)

    monkeypatch.setattr(policies._VW, "parse", recording)
    learned: list[str] = []
    learn = RewardModel.learn

    def recording_learn(self: RewardModel, chunk: ReplayLog, start: int) -> None:
        learned.extend(chunk.vw_examples())
        learn(self, chunk, start)

    monkeypatch.setattr(RewardModel, "learn", recording_learn)
    assert main(["replay", "--db", url, "--placement", PLACEMENT, "--policy", VW, "--estimator", "ips", "dr", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {r["estimator"] for r in results} == {"ips", "dr"} and all(r["value"] is not None for r in results)
    decisions, _ = read_decisions(url, PLACEMENT)
    closed = [d for d in decisions if d.chosen is not None]
    assert len(seen) == len(learned) == len(closed)
    for d, text, dr_text in zip(closed, seen, learned, strict=True):
        assert _arm_lines(text) == _arm_lines(dr_text) == _want_arm_lines(d)


def test_decision_time_arm_features_must_follow_the_arms() -> None:
    decisions, closes = _decisions(3)
    rewards = {c.event_id: c.reward for c in closes if c.slot == 0}
    d = replace(decisions[0], reward=rewards[decisions[0].event_id], outcome=Outcome.REWARD)
    assert d.context is not None
    bad = replace(d, context=replace(d.context, arm_features=d.context.arm_features[:2]))
    log = ReplayLog.from_decisions([bad], {k: dict(v) for k, v in ARMS_ROWS.items()})
    with pytest.raises(InvalidInput, match="arm features for 2 arms, it has 3"):
        _ = log.vw_texts
    with pytest.raises(InvalidInput, match="arm features for 2 arms"):
        to_dsjson(bad, ARMS_ROWS)


ARMS_ROWS: dict[tuple[str, int], dict[str, float | str | bool]] = {(k, 1): dict(v) for k, v in ARMS.items()}


def test_dsjson_export_carries_the_context_in_multi_and_nb(url: str, tmp_path: Path) -> None:
    _write(url, 30)
    out = tmp_path / "log.json"
    assert main(["export-log", "--db", url, "--placement", PLACEMENT, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    decisions, _ = read_decisions(url, PLACEMENT)
    assert len(lines) == len(decisions)
    for d, line in zip(decisions, lines, strict=True):
        obj = json.loads(line)
        extra = obj["_nb"]["extra"]
        multi = [action["A"] for action in obj["c"]["_multi"]]
        assert from_dsjson(line)[0] == d  # exact, the context included
        if d.context is None:  # as before contexts were logged: no key, the arms' own features only
            assert "context" not in extra
            assert multi == [{f"arm={a}": 1, **_vw_pairs(SPEC_FEATURES[(a, v)])} for a, v in d.arms]
            continue
        assert extra["context"] == d.context.to_json()
        assert extra["context"]["profile_keys"] == ["customer.plan", "customer.arpu"]  # the feature source
        assert extra["context"]["profile_as_of"] == d.context.profile_as_of
        for (a, v), fs, got in zip(d.arms, d.context.arm_features, multi, strict=True):
            assert got == {f"arm={a}": 1, **_vw_pairs(SPEC_FEATURES[(a, v)]), **_vw_pairs(fs)}
            assert list(got)[-3:] == ["history.impressions_7d", "history.accepts_30d", "history.days_since_impression"]


def _vw_pairs(features: tuple[Feature, ...]) -> dict[str, Any]:
    return {
        (f"{ns}.{name}" if ns else name) + (f"={v}" if isinstance(v, str) else ""): 1 if isinstance(v, str) else v
        for ns, name, v in features
    }


def test_ccb_export_carries_slot_zeros_history() -> None:
    decisions, closes = _decisions(1)
    rewards = {c.slot: c.reward for c in closes}
    slots = [replace(d, reward=rewards[d.slot], outcome=Outcome.REWARD) for d in decisions]
    assert len(slots) == 2 and slots[0].context is not None
    obj = json.loads(to_ccb_dsjson(slots, ARMS_ROWS))
    for (a, v), fs, action in zip(slots[0].arms, slots[0].context.arm_features, obj["c"]["_multi"], strict=True):
        assert action["A"] == {f"arm={a}": 1, **_vw_pairs(SPEC_FEATURES[(a, v)]), **_vw_pairs(fs)}


def test_parquet_export_has_the_context_columns(url: str, tmp_path: Path) -> None:
    import duckdb
    import pandas as pd

    _write(url, 30)
    out = tmp_path / "log.parquet"
    assert main(["export-log", "--db", url, "--placement", PLACEMENT, "--format", "parquet", "--out", str(out)]) == 0
    frame = pd.read_parquet(out)
    decisions, _ = read_decisions(url, PLACEMENT)
    assert len(frame) == len(decisions)
    for d, row in zip(decisions, frame.itertuples(index=False), strict=True):
        assert (row.event_id, row.slot) == (d.event_id, d.slot)
        assert _context_of(row) == d.context  # the round trip is exact
        if d.context is None:
            assert pd.isna(row.profile_as_of) and len(row.profile_keys) == 0 and len(row.arm_features) == 0
        else:
            assert row.profile_as_of.timestamp() == pytest.approx(d.context.profile_as_of, abs=1e-6)
            assert [f["name"] for f in row.arm_features[0]] == ["impressions_7d", "accepts_30d", "days_since_impression"]
    assert PROFILE_QUERY.strip() in (Path(__file__).parents[2] / "docs" / "replay.md").read_text()
    rows = duckdb.execute(PROFILE_QUERY, {"files": str(out)}).fetchall()
    want = [
        (d.event_id, name, v if isinstance(v, str) else None, None if isinstance(v, str) else v)
        for d in decisions
        if d.context is not None
        for ns, name, v in d.features
        if f"{ns}.{name}" in d.context.profile_keys
    ]
    assert sorted(r[:4] for r in rows) == sorted(want) and len(want) > 0


def _context_of(row: Any) -> DecisionContext | None:
    """A DecisionContext from a Parquet row's context columns."""

    def value(f: dict[str, Any]) -> float | str:
        return f["text"] if f["text"] is not None else float(f["number"])

    as_of = None if np.isnan(row.profile_as_of_ts) else float(row.profile_as_of_ts)
    arm_features = tuple(tuple((f["namespace"], f["name"], value(f)) for f in fs) for fs in row.arm_features)
    ctx = DecisionContext(as_of, tuple(row.profile_keys), arm_features)
    return None if ctx.empty else ctx


def test_a_later_profile_change_does_not_change_an_exported_decision(url: str, tmp_path: Path) -> None:
    """The exports and replay read the log alone: a profile written, changed and erased after
    the decisions leaves every export byte for byte as it was and the replay's text unchanged."""
    _write(url, 20)
    engine = create_engine(url)
    profiles = t.profiles

    def exports(tag: str) -> tuple[bytes, bytes, list[str]]:
        dsjson, parquet = tmp_path / f"{tag}.json", tmp_path / f"{tag}.parquet"
        assert main(["export-log", "--db", url, "--placement", PLACEMENT, "--out", str(dsjson)]) == 0
        assert main(["export-log", "--db", url, "--placement", PLACEMENT, "--format", "parquet", "--out", str(parquet)]) == 0
        return dsjson.read_bytes(), _parquet_rows(parquet), read_replay_log(url, PLACEMENT, with_features=True).vw_texts

    try:
        before = exports("before")
        with engine.begin() as conn:
            conn.execute(
                insert(profiles),
                [
                    {
                        "customer_id": f"c{i}",
                        "features": [["customer", "plan", "business"], ["customer", "arpu", 999.0]],
                        "as_of": 2e9,
                        "expires_at": None,
                        "updated_at": 2e9,
                    }
                    for i in range(13)
                ],
            )
        assert exports("changed") == before
        with engine.begin() as conn:
            conn.execute(delete(profiles))
        assert exports("erased") == before
    finally:
        engine.dispose()


def _parquet_rows(path: Path) -> bytes:
    """The Parquet file's rows (its bytes hold a writer's timestamp-free metadata, but compare rows)."""
    import pyarrow.parquet as pq

    return json.dumps(pq.read_table(path).to_pylist(), default=str).encode()


def test_streaming_replay_with_contexts_equals_the_in_memory_one(url: str) -> None:
    _write(url, 60)
    pols = [parse_policy(p) for p in ("logged", "uniform", VW)]
    whole = replay(lambda: iter((read_replay_log(url, PLACEMENT, with_features=True),)), pols, ["ips", "snips", "dr"])
    pols = [parse_policy(p) for p in ("logged", "uniform", VW)]
    chunked = replay(replay_chunks(url, PLACEMENT, with_features=True, chunk=7), pols, ["ips", "snips", "dr"])
    assert [(r.policy, r.estimate.estimator) for r in chunked.results] == [(r.policy, r.estimate.estimator) for r in whole.results]
    for a, b in zip(chunked.results, whole.results, strict=True):
        assert a.estimate.value == pytest.approx(b.estimate.value, rel=1e-9, abs=1e-9), (a.policy, a.estimate.estimator)


def test_replay_sees_the_examples_the_server_learned(tmp_path: Path) -> None:
    """Decisions made by the engine with history features: replay from the log builds, event for
    event, the shared line and the arm lines the online learner learned (history included)."""
    from nextbest.bandit.features import shared_line
    from tests import envs
    from tests.harness import FakeClock, engine_on, run_async

    db = f"sqlite:///{tmp_path}/nb.db"
    learned: list[tuple[str, list[str], int]] = []

    async def body() -> None:
        clock = FakeClock()
        async with engine_on(db, clock) as e:
            await e.config.apply([envs.placement("p", context={"history": ["7d"]}, learn_at="reward")])
            model = e.states["p"].models[""].model
            learn = model.learn

            def spy(shared: str, arms: list[str], chosen: int, reward: float) -> None:
                learned.append((shared, list(arms), chosen))
                learn(shared, arms, chosen, reward)

            model.learn = spy  # type: ignore[method-assign]
            for i in range(12):
                d = (await e.chooser.choose("p", f"c{i % 3}", "", [feature("customer", "segment", ("gold", "silver")[i % 2])]))[0]
                assert d.context is not None and any(d.context.arm_features)
                clock.advance(60.0)
                await e.windows.reward(d.event_id, float(i % 2))
                await e.writer.flush()
                await e.learner.catch_up("p")
            clock.advance(100 * 86400.0)
            await e.windows.sweep()  # the windows close with their rewards: the decisions replay
            await e.writer.flush()

    run_async(body)
    log = read_replay_log(db, "p", with_features=True)
    assert log.n == len(learned) == 12
    for text, (shared, arms, chosen) in zip(log.vw_texts, learned, strict=True):
        assert text.split("\n")[0] == shared
        assert _arm_lines(text) == arms
        assert "history.impressions_7d" in arms[chosen]
    assert shared_line(()) != learned[0][0]  # the request's features are there too
