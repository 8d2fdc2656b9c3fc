"""Offline replay: policies, DSJSON, the log sources and the CLI, on hand-checked and synthetic logs."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from vowpalwabbit import Workspace

from nextbest.bandit.decision_log import DecisionContext, Explanation, LoggedDecision, Outcome
from nextbest.bandit.errors import InvalidInput, Unavailable
from nextbest.bandit.features import arm_line, feature, features_from_mapping, shared_line
from nextbest.bandit.offline.dsjson import from_dsjson, to_dsjson
from nextbest.bandit.offline.estimators import ESTIMATORS
from nextbest.bandit.offline.policies import distribution, parse_policy
from nextbest.bandit.offline.replay import evaluate
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.bandit.offline.reward_model import DEFAULT_REWARD_MODEL_ARGS, reward_model
from nextbest.bandit.spec import PlacementSpec
from nextbest.cli.replay import ESTIMATOR_NAMES, REWARD_MODEL_ARGS
from nextbest.config.plans import plan
from nextbest.offline.log_source import _connect
from nextbest.storage.base import Close
from nextbest.storage.sql import open_store

# ------------------------------------------------------------------ a hand-checked log
#
#   event  arms     logged pmf        chosen  r   uniform  w_u   constant:a  w_a
#   e0     a b      .5  .5            a       1   1/2      1     1           2
#   e1     a b      .25 .75           b       0   1/2      2/3   0           0
#   e2     a b c    .2  .4  .4        c       1   1/3      5/6   0           0
#   e3     b c      .5  .5            b       1   1/2      1     (a absent: logged) 1
#
#   logged:     IPS = SNIPS = mean(r) = 3/4
#   uniform:    IPS = (1 + 0 + 5/6 + 1) / 4 = 17/24;  SNIPS = (17/6) / (1 + 2/3 + 5/6 + 1) = 17/21
#   constant:a  IPS = (2 + 0 + 0 + 1) / 4 = 3/4;      SNIPS = 3 / (2 + 0 + 0 + 1) = 1


def _decision(i: int, arms: str, pmf: list[float], chosen: int, reward: float, seg: str = "gold") -> LoggedDecision:
    return LoggedDecision(
        event_id=f"e{i}",
        placement="p",
        customer_id=f"c{i}",
        timestamp=1000.0 + i,
        features=(feature("customer", "segment", seg), feature("customer", "arpu", 10.0 + i)),
        arms=tuple((a, 1) for a in arms),
        pmf=tuple(pmf),
        chosen=chosen,
        probability=pmf[chosen],
        model_version=0,
        deadline=2000.0 + i,
        outcome=Outcome.REWARD,
        reward=reward,
        learn_seq=i + 1,
    )


HAND = [
    _decision(0, "ab", [0.5, 0.5], 0, 1.0),
    _decision(1, "ab", [0.25, 0.75], 1, 0.0),
    _decision(2, "abc", [0.2, 0.4, 0.4], 2, 1.0),
    _decision(3, "bc", [0.5, 0.5], 0, 1.0),
]


def test_hand_checked_values() -> None:
    pols = [parse_policy(s) for s in ("logged", "uniform", "constant:a")]
    v = {(r.policy, r.estimate.estimator): r.estimate.value for r in evaluate(ReplayLog.from_decisions(HAND), pols, ["ips", "snips"])}
    assert v["logged", "ips"] == v["logged", "snips"] == 0.75
    assert v["uniform", "ips"] == pytest.approx(17 / 24, abs=1e-12)
    assert v["uniform", "snips"] == pytest.approx(17 / 21, abs=1e-12)
    assert v["constant:a", "ips"] == pytest.approx(0.75, abs=1e-12)
    assert v["constant:a", "snips"] == pytest.approx(1.0, abs=1e-12)


def test_constant_reports_ineligible_events_and_rejects_unknown_arms() -> None:
    log = ReplayLog.from_decisions(HAND)
    (res,) = evaluate(log, [parse_policy("constant:a")], ["ips"])
    assert any(w.startswith("not_eligible: arm a was not eligible in 1 of 4") for w in res.estimate.warnings)
    with pytest.raises(InvalidInput, match="'zz' is not in the log"):
        evaluate(log, [parse_policy("constant:zz")], ["ips"])


def test_mass_on_arms_the_logger_never_could_choose_is_flagged() -> None:
    greedy = [_decision(i, "ab", [1.0, 0.0], 0, 1.0) for i in range(4)]
    (res,) = evaluate(ReplayLog.from_decisions(greedy), [parse_policy("constant:b")], ["ips"])
    assert res.estimate.value == 0.0
    assert any(w.startswith("no_support: 100.0% of the candidate's mass") for w in res.estimate.warnings)
    (res,) = evaluate(ReplayLog.from_decisions(greedy), [parse_policy("logged")], ["ips"])
    assert not any(w.startswith("no_support") for w in res.estimate.warnings)


def test_open_and_no_arm_decisions_are_skipped() -> None:
    open_one = _decision(9, "ab", [0.5, 0.5], 0, 1.0)
    no_arm = LoggedDecision("e10", "p", "c", 1.0, (), (), (), None, 0.0, 0, 2.0, Outcome.NO_ARM)
    log = ReplayLog.from_decisions([*HAND, no_arm, replace(open_one, outcome=Outcome.OPEN, reward=None)])
    assert log.n == 4


@pytest.mark.parametrize("spec", ["", "random", "constant:", "vw:", "vw:--cb_explore_adf -d x.txt", "vw:'--cb_adf", "model:"])
def test_bad_policy_specs(spec: str) -> None:
    with pytest.raises(InvalidInput):
        parse_policy(spec)
    assert ESTIMATOR_NAMES == ESTIMATORS and REWARD_MODEL_ARGS == DEFAULT_REWARD_MODEL_ARGS  # the CLI's copies


def test_vw_policy_needs_a_contextual_bandit_model() -> None:
    log = ReplayLog.from_decisions(HAND)
    with pytest.raises(InvalidInput, match="cb_adf"):
        evaluate(log, [parse_policy("vw:--loss_function logistic")], ["ips"])
    with pytest.raises(InvalidInput, match="rejected"):
        evaluate(log, [parse_policy("vw:--no_such_option")], ["ips"])


def test_saved_model_policy_predicts_only_and_cb_adf_is_greedy(tmp_path: Path) -> None:
    log = ReplayLog.from_decisions(HAND)
    path = tmp_path / "model.vw"
    ws = Workspace(f"--cb_adf -q UA --quiet -f {path}")
    for example in log.vw_examples() * 20:
        ws.learn(example)
    ws.finish()  # saves the model
    policy = parse_policy(f"model:{path}")
    first, _ = distribution(policy, log)
    again, _ = distribution(policy, log)
    assert np.array_equal(first, again)  # nothing was learned in between
    assert set(first.tolist()) <= {0.0, 0.5, 1.0} and np.allclose(np.add.reduceat(first, log.offsets[:-1]), 1.0)
    assert first[log.chosen_slot][1] == 0.0  # it learned that b paid nothing in e1


def test_vw_policy_is_progressive_and_gives_distributions() -> None:
    log = ReplayLog.from_decisions(HAND)
    target, _ = distribution(parse_policy("vw:--cb_explore_adf --epsilon 0.2"), log)
    sums = np.add.reduceat(target, log.offsets[:-1])
    assert np.allclose(sums, 1.0, atol=1e-6)
    # The first event is scored before anything was learned: VW's untrained model is uniform.
    assert target[:2] == pytest.approx([0.5, 0.5])


# ------------------------------------------------------------------ DSJSON

ARM_FEATURES: dict[tuple[str, int], dict[str, float | str | bool]] = {
    ("a", 1): {"category": "data plan", "price": 4.99, "promo": True},
    ("b", 1): {"category": "voice|x", "price": 2.5},
    ("c", 1): {"category": "tv:1"},
}


def test_dsjson_round_trip_is_exact() -> None:
    d = replace(HAND[2], features=(feature("customer", "segment", "gold card"), feature("", "tenure", 3.25), feature("ctx", "x=y", 1.0)))
    back, arms = from_dsjson(to_dsjson(d, ARM_FEATURES))
    assert back == d
    assert arms == {k: ARM_FEATURES[k] for k in d.arms}
    obj = json.loads(to_dsjson(d, ARM_FEATURES))
    assert obj["a"] == [3, 1, 2] and obj["p"] == [0.4, 0.2, 0.4]  # chosen first, p follows a
    assert (obj["_label_Action"], obj["_labelIndex"], obj["_label_cost"]) == (3, 2, -1.0)
    paced = replace(d, pmf=(0.1, 0.2, 0.3, 0.4), probability=0.3)  # pacing's "no offer" last
    assert from_dsjson(to_dsjson(paced, ARM_FEATURES))[0] == paced
    assert json.loads(to_dsjson(paced, ARM_FEATURES))["p"] == [0.3, 0.1, 0.2]
    explained = replace(d, explanation=Explanation("squarecb", 10.0, 2.0, (0.1, 0.2, 0.3), (0.0, 0.5, 0.0)))
    assert from_dsjson(to_dsjson(explained, ARM_FEATURES))[0] == explained  # "why this offer" survives export
    assert "context" not in json.loads(to_dsjson(d, ARM_FEATURES))["_nb"]["extra"]  # no context: written as before
    history = tuple((feature("history", "impressions_7d", float(j)), feature("history", "days_since_accept", 2.5)) for j in range(3))
    used = replace(d, context=DecisionContext(1.69e9 + 0.25, ("customer.segment",), history))  # profile and history, point in time
    assert from_dsjson(to_dsjson(used, ARM_FEATURES))[0] == used
    line = json.loads(to_dsjson(used, ARM_FEATURES))
    assert line["c"]["_multi"][2]["A"] == {"arm=c": 1, "category=tv_1": 1, "history.impressions_7d": 2.0, "history.days_since_accept": 2.5}
    assert line["_nb"]["extra"]["context"]["profile_keys"] == ["customer.segment"]  # the features' source


def test_paced_logs_keep_no_offer_apart_and_say_so() -> None:
    log = ReplayLog.from_decisions([*HAND, replace(HAND[0], event_id="e4", pmf=(0.4, 0.4, 0.2), probability=0.4)])
    assert log.no_offer is not None and log.no_offer.tolist() == [0, 0, 0, 0, 0.2]
    assert len(log.logged_pmf) == len(log.arm_index)
    (res,) = evaluate(log, [parse_policy("logged")], ["ips"])
    (w,) = [w for w in res.estimate.warnings if w.startswith("no_offer")]  # no event without an offer: say what that means
    assert w.startswith("no_offer: in 1 of 5 events pacing could also make no offer") and "DSJSON" in w


def _paced(i: int, offered: bool) -> LoggedDecision:
    """Pacing offered arm a (reward 1) or nothing, each with probability 1/2."""
    d = _decision(i, "a", [0.5, 0.5], 0, 1.0)
    if offered:
        return d
    return replace(d, chosen=None, probability=0.5, outcome=Outcome.NO_ARM, reward=None, learn_seq=None)


def test_no_offer_events_are_replayed_so_ips_is_not_overstated() -> None:
    """Pacing made no offer in about half the events. Always offering a earns 1 per event, the
    logged policy about 1/2: skipping the no-offer events would double IPS's estimate of always
    offering (and of the logged policy)."""
    rng = np.random.default_rng(7)
    decisions = [_paced(i, bool(rng.random() < 0.5)) for i in range(400)]
    log = ReplayLog.from_decisions(decisions)
    shown = int(np.count_nonzero(log.offered))
    assert log.n == 400 and 150 < shown < 250
    pols = [parse_policy(s) for s in ("logged", "constant:a", "uniform")]
    got = {(r.policy, r.estimate.estimator): r.estimate for r in evaluate(log, pols, ["ips", "snips", "dr"])}
    assert got["logged", "ips"].value == pytest.approx(shown / 400)  # exactly what was earned
    assert got["constant:a", "ips"].value == pytest.approx(2 * shown / 400)  # 1 in expectation
    assert got["constant:a", "ips"].value == pytest.approx(1.0, abs=0.15)
    assert got["constant:a", "snips"].value == pytest.approx(1.0)
    assert got["uniform", "snips"].value == pytest.approx(1.0)  # one arm: uniform always offers it
    assert got["constant:a", "dr"].value == pytest.approx(1.0, abs=0.15)
    assert any(w.startswith(f"no_offer: in {400 - shown} of 400 events") for w in got["logged", "ips"].warnings)
    vw = evaluate(log, [parse_policy("vw:--cb_explore_adf --epsilon 0.1")], ["snips"])[0]
    assert vw.estimate.value == pytest.approx(1.0)  # VW never learns from, nor offers, "no offer"


def test_the_database_log_replays_no_offer_events_and_export_leaves_them_out(tmp_path: Path) -> None:
    from nextbest.offline.log_source import read_decisions, read_replay_log

    url = f"sqlite:///{tmp_path}/nb.db"
    store = open_store(url)
    try:
        nothing = replace(_paced(9, False), event_id="e9", arms=(), pmf=(), probability=0.0)  # no eligible arm
        rows = [_paced(0, True), _paced(1, False), _paced(2, True), nothing]
        store.write([replace(d, outcome=Outcome.OPEN, reward=None, learn_seq=None) if d.chosen is not None else d for d in rows], [])
        store.write([], [Close("e0", Outcome.REWARD, 1.0, 1100.0), Close("e2", Outcome.REWARD, 1.0, 1100.0)])
    finally:
        store.close()
    log = read_replay_log(url, "p")
    assert list(log.event_ids) == ["e0", "e1", "e2"] and log.chosen.tolist() == [0, -1, 0]
    assert log.rewards.tolist() == [1.0, 0.0, 1.0] and log.logged_prob.tolist() == [0.5, 0.5, 0.5]
    (est,) = evaluate(log, [parse_policy("constant:a")], ["ips"])
    assert est.estimate.value == pytest.approx(4 / 3)  # (2 + 0 + 2) / 3 events, the no-offer one included
    decisions, _ = read_decisions(url, "p")  # DSJSON has no "no offer": the export keeps shown decisions only
    assert [d.event_id for d in decisions] == ["e0", "e2"]


def _hashed(exs: list[Any]) -> list[dict[str, list[tuple[int, float]]]]:
    out = []
    for ex in exs:
        spaces = {}
        for i in range(ex.num_namespaces()):
            ns = chr(ex.namespace(i))
            spaces[ns] = sorted((ex.feature(ns, j), ex.feature_weight(ns, j)) for j in range(ex.num_features_in(ns)))
        out.append(spaces)
    return out


@pytest.mark.parametrize("chain_hash", [False, True])
def test_dsjson_features_hash_like_the_text_format(chain_hash: bool) -> None:
    d = replace(HAND[2], features=(feature("customer", "segment", "gold card"), feature("", "123", 2.0), feature("customer", "arpu", 12.5)))
    extra = " --chain_hash" if chain_hash else ""
    js = Workspace("--dsjson --cb_adf --quiet -q UA" + extra)
    txt = Workspace("--cb_adf --quiet -q UA" + extra)
    try:
        ex_json = js.parse(to_dsjson(d, ARM_FEATURES))
        lines = [arm_line(a, features_from_mapping(ARM_FEATURES[(a, v)])) for a, v in d.arms]
        ex_text = txt.parse("\n".join([shared_line(d.features), *lines]))
        assert _hashed(ex_json) == _hashed(ex_text)
        js.finish_example(ex_json)
        txt.finish_example(ex_text)
    finally:
        js.finish()
        txt.finish()


def test_dsjson_without_the_exact_block_decodes_from_c() -> None:
    obj = json.loads(to_dsjson(HAND[2], ARM_FEATURES))
    del obj["_nb"]
    back, arms = from_dsjson(json.dumps(obj))
    assert back.arms == (("a", 0), ("b", 0), ("c", 0)) and back.chosen == 2 and back.reward == 1.0
    assert shared_line(back.features) == shared_line(HAND[2].features)
    assert arm_line("c", features_from_mapping(arms[("c", 0)])) == arm_line("c", features_from_mapping(ARM_FEATURES[("c", 1)]))
    with pytest.raises(InvalidInput, match="chosen action must come first"):
        from_dsjson(json.dumps({**obj, "a": [1, 2, 3]}))


# ------------------------------------------------------------------ a synthetic database

SEGMENTS = ("gold", "silver", "bronze")
TRUE_P = np.array([[0.8, 0.2, 0.1], [0.7, 0.3, 0.2], [0.6, 0.1, 0.3]])  # arm a is clearly best
LOGGING = np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]])
N_EVENTS = 3000


def _write_log(url: str) -> dict[str, Any]:
    """A placement's log written through the store: closed, open and no-arm decisions."""
    store = open_store(url)
    spec = PlacementSpec.model_validate({"id": "offers", "arms": [{"id": a, "features": ARM_FEATURES[(a, 1)]} for a in "abc"]})
    p = plan({}, [spec], 1)
    store.save_placements(p.records, p.new_arm_versions)
    rng = np.random.default_rng(7)
    decisions, closes, rewards = [], [], []
    for i in range(N_EVENTS + 40):
        s = int(rng.integers(3))
        c = int(rng.choice(3, p=LOGGING[s]))
        r = float(rng.random() < TRUE_P[s, c])
        no_arm = i % 101 == 50
        decisions.append(
            LoggedDecision(
                event_id=f"ev{i:05d}",
                placement="offers",
                customer_id=f"c{i % 300}",
                timestamp=1.7e9 + i * 3.0,
                features=(feature("customer", "segment", SEGMENTS[s]), feature("customer", "arpu", float(rng.uniform(5, 50)))),
                arms=() if no_arm else (("a", 1), ("b", 1), ("c", 1)),
                pmf=() if no_arm else tuple(LOGGING[s]),
                chosen=None if no_arm else c,
                probability=0.0 if no_arm else float(LOGGING[s, c]),
                model_version=i,
                deadline=1.7e9 + i * 3.0 + 600,
                outcome=Outcome.NO_ARM if no_arm else Outcome.OPEN,
            )
        )
        if not no_arm and i < N_EVENTS:  # the last 40 stay open
            closes.append(Close(f"ev{i:05d}", Outcome.REWARD if r else Outcome.DEFAULT, r, 1.7e9 + i * 3.0 + 5))
            rewards.append(r)
    store.write(decisions, closes)
    store.close()
    return {"closed": len(closes), "mean": float(np.mean(rewards))}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    path = tmp_path_factory.mktemp("replay") / "log.db"
    return f"sqlite:///{path}", {**_write_log(str(path)), "path": path}


def cli(*argv: str) -> int:
    from nextbest.cli.main import main

    return main(list(argv))


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert cli(*argv, "--json") == 0
    out: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return out


def test_logged_policy_reproduces_the_observed_mean(db: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, info = db
    rows = _json(capsys, "replay", "--db", url, "--placement", "offers", "--policy", "logged", "--estimator", "ips", "snips")
    assert [r["n"] for r in rows] == [info["closed"]] * 2
    assert rows[0]["value"] == rows[1]["value"] == pytest.approx(info["mean"], abs=1e-12)
    for r in rows:
        assert {"policy", "estimator", "value", "ci_low", "ci_high", "n", "ess", "warnings"} <= r.keys()
        assert r["ci_low"] < r["value"] < r["ci_high"]


def test_estimates_cover_the_truth_and_vw_learns_the_best_arm(db: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = db
    rows = _json(
        capsys,
        "replay",
        "--db",
        url,
        "--placement",
        "offers",
        "--policy",
        "uniform",
        "constant:a",
        "vw:--cb_explore_adf --epsilon 0.1 -q UA",
    )
    est = {(r["policy"], r["estimator"]): r for r in rows}
    truth = {"uniform": float(TRUE_P.mean()), "constant:a": float(TRUE_P[:, 0].mean())}
    for (policy, _name), r in est.items():
        if policy in truth:
            assert r["ci_low"] <= truth[policy] <= r["ci_high"], r
    for name in ("ips", "snips", "dr"):
        vw, uni = est["vw:--cb_explore_adf --epsilon 0.1 -q UA", name], est["uniform", name]
        assert vw["ci_low"] > uni["ci_high"], (vw, uni)


def test_export_is_read_by_vw_and_replays_identically(
    db: tuple[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, info = db
    out = tmp_path / "log.dsjson"
    assert cli("export-log", "--db", url, "--placement", "offers", "--format", "dsjson", "--out", str(out)) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == info["closed"]
    ws = Workspace("--dsjson --cb_adf --quiet")
    try:
        for line in lines:
            ex = ws.parse(line)
            ws.learn(ex)
            ws.finish_example(ex)
        assert ws.get_weighted_examples() == info["closed"]
    finally:
        ws.finish()
    common = ["--placement", "offers", "--policy", "logged", "uniform", "constant:b", "vw:--cb_explore_adf --softmax --lambda 5 -q UA"]
    assert _json(capsys, "replay", "--log", str(out), *common) == _json(capsys, "replay", "--db", url, *common)


@pytest.mark.postgres
def test_postgres_gives_the_same_estimates(db: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    from tests.harness import postgres_available, postgres_schema

    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); replay on PostgreSQL not run")
    common = ["--placement", "offers", "--policy", "logged", "constant:a", "vw:--cb_explore_adf --epsilon 0.1 -q UA"]
    with postgres_schema() as pg:
        _write_log(pg)
        assert _json(capsys, "replay", "--db", pg, *common) == _json(capsys, "replay", "--db", db[0], *common)


def test_since_until_clip_and_table(db: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = db
    rows = _json(
        capsys,
        "replay",
        "--db",
        url,
        "--placement",
        "offers",
        "--policy",
        "constant:c",
        "--estimator",
        "ips",
        "--since",
        str(1.7e9 + 300),
        "--until",
        "2023-11-14T22:21:00",
        "--clip",
        "2",
    )
    assert rows[0]["n"] == len([i for i in range(100, 154) if i % 101 != 50])
    assert rows[0]["clipped"] > 0
    assert cli("replay", "--db", url, "--placement", "offers", "--policy", "logged", "uniform", "--estimator", "ips") == 0
    table = capsys.readouterr().out
    assert "policy" in table and "95% CI" in table and "\nuniform " in table


def test_errors_have_exit_codes(db: tuple[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = db
    assert cli("replay", "--db", url, "--placement", "nope", "--policy", "logged") == 1
    assert cli("replay", "--db", url, "--placement", "offers", "--policy", "constant:zz") == 2
    assert cli("replay", "--db", url, "--placement", "offers", "--policy", "bogus") == 2
    assert cli("replay", "--db", url, "--placement", "offers", "--policy", "logged", "--since", "yesterday") == 2
    missing = tmp_path / "missing.db"
    assert cli("replay", "--db", str(missing), "--placement", "offers", "--policy", "logged") == 1
    assert not missing.exists()  # read-only: never creates a database
    assert "error:" in capsys.readouterr().err


def test_reward_model_is_cross_fitted_and_needs_two_folds() -> None:
    log = ReplayLog.from_decisions(HAND)
    with pytest.raises(InvalidInput, match="at least 2"):
        reward_model(log, folds=1)
    rhat = reward_model(log)
    assert rhat.shape == log.logged_pmf.shape and np.isfinite(rhat).all()


def test_plot_writes_a_png(db: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, _ = db
    png = tmp_path / "estimates.png"
    assert (
        cli(
            "replay",
            "--db",
            url,
            "--placement",
            "offers",
            "--policy",
            "logged",
            "uniform",
            "--estimator",
            "ips",
            "snips",
            "--plot",
            str(png),
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(
    db: tuple[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = db
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert (
        cli("replay", "--db", url, "--placement", "offers", "--policy", "logged", "--estimator", "ips", "--plot", str(tmp_path / "x.png"))
        == 2
    )
    assert "needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("statement", ["DELETE FROM decisions", "CREATE TABLE x (a INTEGER)"])
def test_the_log_is_opened_read_only(db: tuple[str, dict[str, Any]], statement: str) -> None:
    with pytest.raises(Unavailable), _connect(db[0]) as conn:
        conn.execute(text(statement))
