"""Experiment statistics: intervals against hand-computed values, lifts, buckets, and the
figures read from a real (synthetic) decision log, read-only."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.offline.experiment_stats import (
    GroupStats,
    Interval,
    LogColumns,
    bucket_starts,
    difference,
    even_schedule,
    explored,
    group,
    lifts,
    mean_interval,
    rolling_mean,
    summarize,
    wilson,
)
from nextbest.offline import notebook as sdk
from nextbest.offline.stats_source import placement_stats
from tests.synthlog import T0, write_log


def close(a: Interval, b: tuple[float, float, float], tol: float = 5e-4) -> bool:
    return all(abs(x - y) <= tol for x, y in zip((a.estimate, a.low, a.high), b, strict=True))


# -- intervals, by hand -----------------------------------------------------------------------


def test_wilson_matches_published_values() -> None:
    # Newcombe (1998), table I: 8/10 -> 0.4902..0.9433; 0/10 -> 0..0.2775; 10/10 -> 0.7225..1.
    assert close(wilson(8, 10), (0.8, 0.4902, 0.9433))
    assert close(wilson(0, 10), (0.0, 0.0, 0.2775))
    assert close(wilson(10, 10), (1.0, 0.7225, 1.0))
    # 81/263 (Newcombe's example 1): 0.2553..0.3662
    assert close(wilson(81, 263), (81 / 263, 0.2553, 0.3662))
    assert math.isnan(wilson(0, 0).estimate)


def test_normal_interval_of_a_mean() -> None:
    # 1..5: mean 3, s = sqrt(2.5), se = s / sqrt(5) = 0.70711, half = 1.95996 * 0.70711 = 1.38590
    x = np.arange(1.0, 6.0)
    assert close(mean_interval(float(x.sum()), float((x * x).sum()), 5), (3.0, 1.61410, 4.38590), 1e-5)
    assert math.isnan(mean_interval(2.0, 4.0, 1).low)  # one sample: no interval
    assert math.isnan(mean_interval(0.0, 0.0, 0).estimate)


def test_difference_of_means() -> None:
    # 0.2 (n 1000, var 0.16) - 0.1 (n 500, var 0.09): se = sqrt(0.00016 + 0.00018) = 0.0184391
    d = difference(0.2, 0.16, 1000, 0.1, 0.09, 500)
    assert close(d, (0.1, 0.1 - 1.959964 * 0.0184391, 0.1 + 1.959964 * 0.0184391), 1e-6)
    assert math.isnan(difference(0.2, 0.1, 0, 0.1, 0.1, 10).estimate)


def _g(variant: str, measured: int, total: float, sq: float, binary: bool) -> GroupStats:
    mean = wilson(total, measured) if binary else mean_interval(total, sq, measured)
    return GroupStats(variant, None, None, measured, measured, 0, 0, 0, measured, measured, total, sq, mean, 0.0, 0)


def test_lift_against_the_holdout() -> None:
    groups = [_g("A", 1000, 200, 200, True), _g("holdout", 500, 50, 50, True), _g("B", 1000, 100, 100, True)]
    a, b = lifts(groups, binary=True)
    assert (a.variant, a.control, b.variant) == ("A", "holdout", "B")
    assert close(a.difference, (0.1, 0.1 - 1.959964 * 0.0184391, 0.1 + 1.959964 * 0.0184391), 1e-6)
    assert a.relative == pytest.approx(1.0)
    assert b.difference.estimate == pytest.approx(0.0) and b.difference.low < 0 < b.difference.high
    # general rewards: the sample variances. A: 1,2,3 (var 1); holdout: 0,0,1,1 (var 1/3)
    groups = [_g("A", 3, 6, 14, False), _g("holdout", 4, 2, 2, False)]
    [x] = lifts(groups, binary=False)
    se = math.sqrt(1 / 3 + (1 / 3) / 4)
    assert close(x.difference, (1.5, 1.5 - 1.959964 * se, 1.5 + 1.959964 * se), 1e-5)
    assert lifts([_g("A", 3, 6, 14, False)], binary=False) == []  # no holdout, no lift


def test_buckets_exploration_rolling_and_schedule() -> None:
    t = np.array([T0, T0 + 3599.9, T0 + 3600, T0 + 86399, T0 + 86400])
    assert (bucket_starts(t, "hour") - T0).tolist() == [0, 0, 3600, 82800, 86400]
    assert (bucket_starts(t, "day") - T0).tolist() == [0, 0, 0, 0, 86400]
    pmfs = [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.5], [0.2, 0.3, 0.5], [1.0]]
    assert explored(pmfs, [0, 1, 1, 2, None]).tolist() == [False, True, False, False, False]
    assert rolling_mean(np.array([1.0, 0.0, 1.0, 1.0]), 2).tolist() == [1.0, 0.5, 0.5, 1.0]
    assert even_schedule(np.array([0.0, 5.0, 10.0, 20.0]), 0.0, 10.0, 100.0).tolist() == [0, 50, 100, 100]


def _cols(**kw: object) -> LogColumns:
    base: dict[str, object] = {
        "created_at": np.array([T0, T0 + 10, T0 + 3700, T0 + 3800, T0 + 3900, T0 + 4000]),
        "arm": ["a", "b", "a", None, "a", "b"],
        "outcome": np.array([1, 2, 1, 3, 0, 1]),
        "reward": np.array([1.0, 0.0, 0.0, np.nan, np.nan, 1.0]),
        "cost": np.array([0.1, 0.2, 0.1, 0.0, 0.1, 0.2]),
        "reward_cost": np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]),
        "explored": np.array([False, True, False, False, False, True]),
        "variant": ["A", "A", "holdout", "A", "A", "holdout"],
    }
    base.update(kw)
    return LogColumns(**base)  # type: ignore[arg-type]


def test_grouping_counts_by_hand() -> None:
    cols = _cols()
    assert cols.is_binary()
    by_variant = {g.variant: g for g in group(cols, by_arm=False)}
    a = by_variant["A"]
    assert (a.decisions, a.impressions, a.no_offer, a.pending, a.measured, a.rewards) == (4, 3, 1, 1, 2, 1)
    assert a.reward_sum == 1.0 and a.exploration_share == pytest.approx(1 / 3)
    assert a.spend == pytest.approx(0.1 + 1.0 + 0.2 + 0.1)  # the reward cost only where a positive reward came
    h = by_variant["holdout"]
    assert (h.measured, h.rewards, h.reward_sum) == (2, 2, 1.0) and h.spend == pytest.approx(0.3)
    rows = {(g.variant, g.arm, g.bucket): g for g in group(cols, bucket="hour")}
    assert set(rows) == {("A", "a", T0), ("A", "b", T0), ("A", "a", T0 + 3600), ("holdout", "a", T0 + 3600), ("holdout", "b", T0 + 3600)}
    assert rows[("A", "a", T0 + 3600)].pending == 1
    s = summarize("p", cols, "hour")
    assert [x.variant for x in s.lifts] == ["A"]
    assert {g.bucket for g in s.variant_buckets} == {T0, T0 + 3600}
    json.dumps(s.to_dict())  # JSON-ready: no nan


def test_not_shown_decisions_are_neither_impressions_nor_spend() -> None:
    cols = _cols(activated=np.array([True, True, True, True, False, True]))
    a = {g.variant: g for g in group(cols, by_arm=False)}["A"]
    assert (a.impressions, a.not_shown, a.pending) == (2, 1, 0)
    assert a.spend == pytest.approx(0.1 + 1.0 + 0.2)


def test_rewards_count_only_once_their_window_is_over() -> None:
    """A hit closes early, a miss waits for its window: counting early hits would inflate rates."""
    deadline = np.array([T0 + 600, T0 + 610, T0 + 4300, T0 + 4400, T0 + 4500, T0 + 4600])
    cols = _cols(deadline=deadline, as_of=T0 + 4000)
    by_variant = {g.variant: g for g in group(cols, by_arm=False)}
    assert (by_variant["A"].measured, by_variant["A"].pending) == (2, 1)
    # the hits are rewards as soon as they are acknowledged, but not measured: the mean waits
    assert (by_variant["holdout"].measured, by_variant["holdout"].pending, by_variant["holdout"].rewards) == (0, 2, 2)
    assert math.isnan(by_variant["holdout"].mean.estimate)
    later = {g.variant: g for g in group(_cols(deadline=deadline, as_of=T0 + 5000), by_arm=False)}
    assert later["holdout"].measured == 2


def test_rewards_awaiting_close_count_at_once_but_not_in_the_mean() -> None:
    """learn_at: window_close: a first reward waits on the open row (outcome OPEN, its reward
    set); it is a reward, with its sum and reward spend, awaiting close; the mean is unchanged."""
    cols = _cols(reward=np.array([1.0, 0.0, 0.0, np.nan, 2.0, 1.0]))  # the open decision 4 got 2.0
    before = {g.variant: g for g in group(_cols(), by_arm=False)}["A"]
    a = {g.variant: g for g in group(cols, by_arm=False)}["A"]
    assert (a.rewards, a.explicit_sum, a.awaiting_close, a.awaiting_sum) == (2, 3.0, 1, 2.0)
    assert (before.rewards, before.explicit_sum, before.awaiting_close) == (1, 1.0, 0)
    assert (a.measured, a.pending, a.mean) == (before.measured, before.pending, before.mean)
    assert a.spend == pytest.approx(before.spend + 1.0)  # its reward cost, counted when acknowledged
    d = a.to_dict()
    assert (d["rewards"], d["rewards_awaiting_close"], d["reward_sum_awaiting_close"]) == (2, 1, 2.0)


def test_general_rewards_get_a_normal_interval() -> None:
    cols = _cols(reward=np.array([4.99, 0.0, 2.5, np.nan, np.nan, 1.0]), variant=None)
    assert not cols.is_binary()
    [g] = group(cols, by_arm=False)
    assert g.variant is None and g.measured == 4
    x = np.array([4.99, 0.0, 2.5, 1.0])
    half = 1.959964 * x.std(ddof=1) / 2
    assert close(g.mean, (x.mean(), x.mean() - half, x.mean() + half), 1e-5)
    assert summarize("p", cols).lifts == []


# -- from a decision log -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('stats')}/log.db"
    write_log(url, n=2000, hours=48)
    return url


def test_stats_from_the_log(log_db: str) -> None:
    path = Path(log_db.removeprefix("sqlite:///"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    s = placement_stats(log_db, "app_home_banner", bucket="day")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # read-only
    assert s.n == 2000 and s.binary
    assert {g.variant for g in s.variants} == {"A", "B", "holdout"}
    assert sum(g.decisions for g in s.variants) == 2000
    assert sum(g.no_offer for g in s.variants) == 4  # every 500th
    assert sum(g.impressions + g.not_shown for g in s.arms) == 1996
    assert sum(g.measured for g in s.variants) == 2000 - 4 - 20 + sum(1 for i in (499, 999, 1499, 1999) if i >= 1980)
    assert {x.variant for x in s.lifts} == {"A", "B"}
    a = next(x for x in s.lifts if x.variant == "A")
    assert a.difference.low > 0  # A (20 %) beats the holdout (10 %) on 2,000 decisions
    for g in s.variants:
        assert g.mean.low <= g.mean.estimate <= g.mean.high
    days = sorted({g.bucket or 0.0 for g in s.buckets})
    assert len(days) == 2 and days[0] == T0
    assert sum(g.impressions for g in s.buckets) == sum(g.impressions for g in s.arms)
    spent = sum(g.spend for g in s.variants)
    assert spent > 0 and all(g.spend == 0 for g in s.arms if g.arm != "data_5gb")


def test_a_log_without_variants(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/plain.db"
    write_log(url, n=300, variants=False)
    s = placement_stats(url, "app_home_banner")
    assert [g.variant for g in s.variants] == [None] and s.lifts == []


def test_errors(log_db: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        placement_stats(log_db, "nope")
    with pytest.raises(InvalidInput):
        placement_stats(log_db, "app_home_banner", bucket="week")
    with pytest.raises(NotFound):
        placement_stats(f"sqlite:///{tmp_path}/missing.db", "app_home_banner")
    assert not (tmp_path / "missing.db").exists()


def _cli(argv: list[str]) -> int:
    from nextbest.cli.main import main

    return main(argv)


def test_stats_log_command(log_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["stats-log", "--db", log_db, "--placement", "app_home_banner", "--bucket", "day"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("placement app_home_banner: 2,000 decisions")
    assert "lift over holdout" in out and "per day" in out and "Wilson" in out
    assert _cli(["stats-log", "--db", log_db, "--placement", "app_home_banner", "--json", "--since", str(T0 + 86400)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["first"] >= "2025-10-11" and doc["decisions"] < 2000 and doc["interval"] == "wilson"
    assert "variantBuckets" in doc and "rewardsAwaitingClose" in doc["variants"][0]  # the CLI's JSON style: lowerCamelCase
    assert _cli(["stats-log", "--db", log_db, "--placement", "nope"]) == 1
    assert "no decisions" in capsys.readouterr().err


def test_sdk_stats(log_db: str) -> None:
    rows = sdk.stats("app_home_banner", db=log_db, as_frame=False)
    assert {(r["variant"], r["arm"]) for r in rows} >= {("A", "data_5gb"), ("holdout", "voice_300")}
    lift = sdk.stats("app_home_banner", db=log_db, by="lift", as_frame=False)
    assert {r["variant"] for r in lift} == {"A", "B"}
    per_day = sdk.stats("app_home_banner", db=log_db, bucket="day", by="variant", as_frame=False)
    assert len(per_day) == 6
    assert sdk.summary("app_home_banner", db=log_db)["binary"] is True
