"""An acknowledged reward is in the tallies at once (issue #29 point 9): the first reward on an
open decision's row (``learn_at: window_close``) and the running aggregate of an open window's
recorded rewards count as rewards awaiting the close, with their sum and reward spend; the
close moves them to the learned ones. SQLite and the PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.config.plans import plan
from nextbest.storage.base import FIRST, ArmTally, Close, RewardEvent
from nextbest.storage.sql import SqlStore, open_store
from tests import envs

P = "app_home_banner"


@pytest.fixture
def store(any_db: str) -> Iterator[SqlStore]:
    s = open_store(any_db)
    yield s
    s.close()


def decision(event_id: str, chosen: int = 0, **kw: object) -> LoggedDecision:
    d = LoggedDecision(
        event_id=event_id,
        placement=P,
        customer_id="c1",
        timestamp=100.0,
        features=(feature("customer", "segment", "youth"),),
        arms=(("data_5gb", 1), ("voice_300", 1)),
        pmf=(0.75, 0.25),
        chosen=chosen,
        probability=0.75 if chosen == 0 else 0.25,
        model_version=3,
        deadline=700.0,
        outcome=Outcome.OPEN,
        reward_cost=2.0,
    )
    return replace(d, **kw)  # type: ignore[arg-type]


def first(event_id: str, reward: float, at: float = 110.0) -> RewardEvent:
    return RewardEvent(event_id, 0, reward, at, FIRST, None, P)


def agg(event_id: str, reward: float, at: float = 110.0) -> RewardEvent:
    return RewardEvent(event_id, 0, reward, at, "agg", None, P)


def arms(store: SqlStore) -> dict[str, ArmTally]:
    tallies, _, _ = store.tally(P)
    return {t.arm_id: t for t in tallies}


def figures(t: ArmTally) -> tuple[object, ...]:
    return (
        t.rewards,
        t.reward_sum,
        t.rewards_learned,
        t.reward_sum_learned,
        t.rewards_awaiting_close,
        t.reward_sum_awaiting_close,
        t.spend_awaiting_close,
        t.spend,
        t.pending,
    )


def test_acknowledged_rewards_are_tallied_before_the_close(store: SqlStore) -> None:
    """learn_at: window_close: first rewards stored on open rows are rewards (and reward spend)
    at once, awaiting close; after the close the same figures are learned ones."""
    store.save_placements(plan({}, [envs.placement(P, learn_at="window_close")], 1).records, [])
    store.write([decision("e1"), decision("e2"), decision("e3"), decision("e4", 1), decision("e5", variant="B")], [])
    store.write([], [], events=[first("e1", 1.0), first("e2", -0.5), first("e4", 2.0), first("e5", 3.0)])
    by = arms(store)
    # data_5gb: e1 (1.0, positive: its reward cost 2.0 is spend), e2 (-0.5), e5 (3.0); e3 has none
    assert figures(by["data_5gb"]) == (3, 3.5, 0, 0.0, 3, 3.5, 4.0, 4.0, 4)
    assert figures(by["voice_300"]) == (1, 2.0, 0, 0.0, 1, 2.0, 2.0, 2.0, 1)
    variants = {v.variant: v for v in store.tally_variants(P)}
    assert (variants[""].rewards, variants[""].reward_sum, variants[""].rewards_awaiting_close, variants[""].closed) == (3, 2.5, 3, 0)
    assert (variants["B"].rewards, variants["B"].reward_sum_awaiting_close) == (1, 3.0)
    assert sorted((w.variant, w.arm_id, w.count, w.reward_sum, w.spend) for w in store.awaiting_close(P)) == [
        ("", "data_5gb", 2, 0.5, 2.0),
        ("", "voice_300", 1, 2.0, 2.0),
        ("B", "data_5gb", 1, 3.0, 2.0),
    ]
    # the closes take the rows' first rewards: the same figures, learned; e3 gets the default
    store.write([], [Close(e, Outcome.DEFAULT, 0.0, 701.0, 2.0) for e in ("e1", "e2", "e3", "e4", "e5")])
    by = arms(store)
    assert figures(by["data_5gb"]) == (3, 3.5, 3, 3.5, 0, 0.0, 0.0, 4.0, 0)
    assert by["data_5gb"].default_rewards == 1
    assert figures(by["voice_300"]) == (1, 2.0, 1, 2.0, 0, 0.0, 0.0, 2.0, 0)
    assert store.awaiting_close(P) == []


@pytest.mark.parametrize(("how", "running"), [("sum", 4.0), ("max", 3.0), ("average", 4 / 3)])
def test_an_open_windows_recorded_rewards_count_as_their_running_aggregate(store: SqlStore, how: str, running: float) -> None:
    store.save_placements(plan({}, [envs.placement(P, reward_aggregation=how, learn_at="window_close")], 1).records, [])
    store.write([decision("e1"), decision("e2"), decision("e3", 1)], [])
    store.write([], [], events=[agg("e1", 1.0), agg("e1", 3.0), agg("e1", 0.0), agg("e3", -1.0)])
    by = arms(store)
    data = (1, running, 0, 0.0, 1, running, 2.0, 2.0, 2)
    assert figures(by["data_5gb"]) == pytest.approx(data)
    assert figures(by["voice_300"]) == (1, -1.0, 0, 0.0, 1, -1.0, 0.0, 0.0, 1)  # not positive: no reward cost
    store.write([], [Close("e1", Outcome.REWARD, running, 701.0, 2.0), Close("e3", Outcome.REWARD, -1.0, 701.0, 2.0)])
    by = arms(store)
    assert figures(by["data_5gb"]) == pytest.approx((1, running, 1, running, 0, 0.0, 0.0, 2.0, 1))  # e2 still open, no reward
    assert figures(by["voice_300"]) == (1, -1.0, 1, -1.0, 0, 0.0, 0.0, 0.0, 0)


def test_a_decision_not_activated_or_of_another_placement_is_not_counted(store: SqlStore) -> None:
    store.save_placements(plan({}, [envs.placement(P, reward_aggregation="sum")], 1).records, [])
    store.write([decision("e1", activated=False), decision("o1", placement="elsewhere")], [])
    store.write([], [], events=[agg("o1", 5.0)])
    tallies, total, _ = store.tally(P)
    assert total == 1 and all(t.rewards == 0 for t in tallies)
    assert store.awaiting_close(P) == []
