"""The staged search of ``nextbest tune`` on a generated log where a better setting exists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.estimators import Estimate
from nextbest.bandit.offline.replay_log import ReplayLog
from nextbest.bandit.offline.tune import (
    Candidate,
    Options,
    Scored,
    Setting,
    TuneResult,
    history_record,
    interaction_sets,
    log_namespaces,
    search,
    stage_candidates,
    verdict,
)
from tests.tunelog import replay_log


@dataclass(frozen=True)
class Memory:
    log: ReplayLog

    def __call__(self) -> Iterator[ReplayLog]:
        return iter((self.log,))


def test_a_placement_setting_round_trips_through_its_options() -> None:
    s = Setting.of_placement("--cb_type ips -l0.3 -qUU --interactions UUA --l2=1e-6 --adaptive --ftrl_alpha 0.1", True)
    assert (s.cb_type, s.learning_rate, s.quadratic, s.cubic, s.l2) == ("ips", 0.3, ("UA", "UU"), ("UUA",), 1e-6)
    assert s.extra == ("--adaptive", "--ftrl_alpha", "0.1")
    assert s.interactions and s.vw_args == "--cb_type ips -l 0.3 -q UU --cubic UUA --l2 1e-06 --adaptive --ftrl_alpha 0.1"
    assert Setting.of_placement(s.vw_args, s.interactions) == s
    assert not Setting.of_placement("", False).interactions
    with pytest.raises(InvalidInput):
        Setting.of_placement("-f model.vw", True)


def test_stages_search_their_own_settings_and_exploration_stays_out() -> None:
    base = Setting()
    one = stage_candidates(1, base)
    assert {(s.cb_type, s.learning_rate) for s in one} >= {("mtr", 0.5), ("dr", 2.0), ("ips", 0.05)}
    assert interaction_sets("U", "A") == [
        ((), ()),
        (("UA",), ()),
        (("UA", "UU"), ()),
        (("UA", "AA"), ()),
        (("UA", "UU", "AA"), ()),
        (("UA",), ("UUA",)),
        (("UA",), ("UAA",)),
    ]
    assert all(s.l1 or s.l2 or s.power_t is not None for s in stage_candidates(3, base))
    for stage in (1, 2, 3):
        for s in stage_candidates(stage, base):
            assert not any(a in s.args() for a in ("--epsilon", "--squarecb", "--cb_explore_adf"))


def test_the_search_finds_a_better_setting_where_one_exists() -> None:
    """The best arm depends on segment and channel together: the default -q UA cannot learn
    it, a cubic cross can; the search (stages 1 and 2) finds one at least as good, and better."""
    log = replay_log(2000)
    assert log_namespaces(log) == ("U", "A")
    lines: list[tuple[str, bool]] = []
    result = search(
        Memory(log),
        Setting.of_placement("", True),
        stages=2,
        options=Options(estimators=("ips", "snips")),
        progress=lambda line, final: lines.append((line, final)),
    )
    cur, best = result.current, result.best
    assert cur.candidate.name == "current" and cur.events == 2000
    assert best.key("snips") >= cur.key("snips")
    assert best.estimates["snips"].value > cur.estimates["snips"].value + 0.1  # truth: 0.7 vs 0.45 when learned
    assert best.candidate.setting.cubic  # the cross that represents the truth
    assert best.low("snips") > cur.low("snips")
    assert result.ranked()[0] is best
    assert [final for _, final in lines].count(True) == 2 and lines[-1][0].startswith("stage 2/2")
    assert verdict(result, 1000).apply
    no = verdict(result, 5000)
    assert not no.apply and "2,000 events" in no.reason and "5,000" in no.reason


def _scored(name: str, low: float, value: float, events: int = 60_000) -> Scored:
    e = Estimate("snips", value, low, 2 * value - low, events, float(events))
    return Scored(Candidate(name, Setting(learning_rate=value), 0 if name == "current" else 1), {"snips": e}, 0.1, events)


@pytest.mark.parametrize(
    ("winner_low", "events", "applies", "says"),
    [
        (0.52, 60_000, True, "beats the current setting's (0.5000)"),
        (0.50, 60_000, False, "does not beat the current setting's (0.5000)"),
        (0.49, 60_000, False, "does not beat"),
        (0.60, 40_000, False, "the log has 40,000 events; applying needs at least 50,000"),
    ],
)
def test_the_rule_applies_only_a_winner_whose_lower_bound_beats_the_current_one(
    winner_low: float, events: int, applies: bool, says: str
) -> None:
    cur, win = _scored("current", 0.50, 0.51, events), _scored("s1.2", winner_low, 0.56, events)
    result = TuneResult([cur, win], cur, win, "snips", 1.0, 1, events)
    v = verdict(result, 50_000)
    assert v.apply is applies and says in v.reason
    same = TuneResult([cur], cur, cur, "snips", 1.0, 1, events)
    assert not verdict(same, 1).apply and "current setting is the best" in verdict(same, 1).reason
    record = history_record("offers", result, v, 1.8e9, "shadow:t" if applies else None)
    assert record["winner"]["ci_low"] == winner_low and record["current"]["ci_low"] == 0.5 and record["events"] == events


def test_bad_search_arguments() -> None:
    with pytest.raises(InvalidInput):
        search(Memory(replay_log(10)), Setting(), stages=4)
    with pytest.raises(InvalidInput):
        search(Memory(replay_log(10)), Setting(), score="dr", options=Options(estimators=("snips",)))
