"""The HTML report counts a reward when it is acknowledged (issue #29 point 9): a first reward
waiting on an open row (``learn_at: window_close``) and an aggregating placement's recorded
rewards (at their running aggregate) are rewards awaiting close, with their sum and reward
spend, and not in the mean; shown as such in headless Chromium."""

from __future__ import annotations

import html as htmllib
import os
import re
from pathlib import Path

import pytest

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.bandit.spec import PlacementSpec
from nextbest.offline.report import build_report
from nextbest.offline.stats_source import placement_stats
from nextbest.storage.base import FIRST, Close, PlacementRecord, RewardEvent
from nextbest.storage.sql import open_store
from tests.offline.test_report import CHROMIUM, _chromium

T0 = 1_780_000_000.0


def decision(placement: str, event_id: str, t: float) -> LoggedDecision:
    return LoggedDecision(
        event_id=event_id,
        placement=placement,
        customer_id="c1",
        timestamp=t,
        features=(feature("customer", "segment", "youth"),),
        arms=(("a", 1), ("b", 1)),
        pmf=(0.9, 0.1),
        chosen=0,
        probability=0.9,
        model_version=1,
        deadline=t + 600,
        outcome=Outcome.OPEN,
        cost=0.0,
        reward_cost=0.5,
        budgets=(("arm:p/a", "total"),),
    )


def write(url: str) -> None:
    store = open_store(url)
    for pid, how in (("first", "earliest"), ("agg", "sum")):
        spec = PlacementSpec.model_validate({"id": pid, "arms": [{"id": "a"}, {"id": "b"}], "reward_aggregation": how})
        store.save_placements([PlacementRecord(spec, {"a": 1, "b": 1})], [(pid, a, 1, {}) for a in ("a", "b")])
    store.lease("arm:p/a", "total", 1000.0, 1000.0)
    # "first": e0 closed with 1.0 long ago (measured); e1, e2 open with first rewards 1.0 and 0.0; e3 open, none
    store.write([decision("first", f"e{i}", T0 + i) for i in range(4)], [])
    store.write([], [Close("e0", Outcome.REWARD, 1.0, T0 + 5, 0.5)])
    store.write(
        [], [], events=[RewardEvent("e1", 0, 1.0, T0 + 6, FIRST, None, "first"), RewardEvent("e2", 0, 0.0, T0 + 7, FIRST, None, "first")]
    )
    # "agg": g1 open with 1.0 + 2.0 recorded (sum 3.0)
    store.write([decision("agg", "g1", T0)], [])
    store.write(
        [], [], events=[RewardEvent("g1", 0, 1.0, T0 + 1, "agg", None, "agg"), RewardEvent("g1", 0, 2.0, T0 + 2, "agg", None, "agg")]
    )
    # e0's window is over (measured), the open ones are not: as of T0 + 300
    store.close()


def variants_row(page: str) -> list[str]:
    table = page.split("<h2>Variants</h2>", 1)[1].split("</table>", 1)[0]
    head = [htmllib.unescape(x) for x in re.findall(r"<th[^>]*>(.*?)</th>", table)]
    cells = [htmllib.unescape(x) for x in re.findall(r"<td[^>]*>(.*?)</td>", table)]
    return [f"{h}={c}" for h, c in zip(head, cells, strict=True)]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp("acknowledged")
    url = f"sqlite:///{d}/log.db"
    write(url)
    return url, d


def test_the_report_counts_rewards_awaiting_close(log: tuple[str, Path]) -> None:
    url, _ = log
    s = placement_stats(url, "first", as_of=T0 + 300)
    [v] = s.variants
    assert (v.impressions, v.measured, v.rewards, v.awaiting_close, v.explicit_sum, v.awaiting_sum) == (4, 0, 3, 2, 2.0, 1.0)
    assert v.spend == pytest.approx(1.0)  # e0's and e1's reward costs: positive rewards, acknowledged
    [g] = placement_stats(url, "agg").variants
    assert (g.rewards, g.awaiting_close, g.explicit_sum, g.awaiting_sum, g.spend) == (1, 1, 3.0, 3.0, 0.5)
    row = variants_row(build_report(url, "first"))
    assert {"rewards=3", "awaiting close=2", "reward sum=2.00", "spend=1.00"} <= set(row), row
    assert {"rewards=1", "awaiting close=1", "reward sum=3.00"} <= set(variants_row(build_report(url, "agg")))


def test_the_rewards_awaiting_close_show_in_headless_chromium(log: tuple[str, Path]) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI has no /usr/bin/chromium: .ci/run installs it with apt-get install chromium")
        pytest.skip("/usr/bin/chromium is missing: apt-get install chromium (.ci/run does it on CI)")
    url, d = log
    page = d / "first.html"
    page.write_text(build_report(url, "first"))
    r = _chromium(["--dump-dom", "--virtual-time-budget=5000", page.as_uri()], d / "profile-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    row = variants_row(r.stdout)
    assert {"rewards=3", "awaiting close=2", "reward sum=2.00"} <= set(row), row
    assert "awaiting close" in r.stdout and "count once acknowledged" in r.stdout
