"""Acknowledged means visible (issue #29 point 9): under ``learn_at: window_close`` with its
10-minute window, GetStats counts every acknowledged reward at once (rewards, their sum, the
reward spend), as awaiting the close and not yet learned; a restart on the same database shows
the same; the close moves them to the learned ones. An aggregating placement's recorded rewards
count as their running aggregate. SQLite and the PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextbest.client import NextbestClient
from tests import envs
from tests.harness import FakeClock, running_server

ROUNDS = 200
COST = 0.25  # cost_per_reward of every arm: spent by a positive reward


def placements() -> list[Any]:
    arms = [{"id": a, "features": {"category": envs.CATEGORY[a]}, "cost_per_reward": COST, "budget": {"total": 1000.0}} for a in envs.ARMS]
    return [
        envs.placement("app_home_banner", learn_at="window_close", reward_window=600, arms=arms),
        envs.placement("ussd_main_menu", learn_at="window_close", reward_window=600, arms=arms, reward_aggregation="sum"),
    ]


def figures(c: NextbestClient, placement: str) -> dict[str, Any]:
    s = c.stats(placement)
    return {
        "rewards": sum(a.rewards for a in s.arms),
        "reward_sum": round(sum(a.reward_sum for a in s.arms), 9),
        "learned": sum(a.rewards_learned for a in s.arms),
        "reward_sum_learned": round(sum(a.reward_sum_learned for a in s.arms), 9),
        "awaiting": sum(a.rewards_awaiting_close for a in s.arms),
        "reward_sum_awaiting": round(sum(a.reward_sum_awaiting_close for a in s.arms), 9),
        "spend": round(sum(a.spend for a in s.arms), 9),
        "spend_awaiting": round(sum(a.spend_awaiting_close for a in s.arms), 9),
        "pending": s.pending,
        "variant_rewards": sum(v.rewards for v in s.variants),
        "variant_awaiting": sum(v.rewards_awaiting_close for v in s.variants),
        "per_arm": sorted((a.arm_id, a.rewards, a.rewards_awaiting_close) for a in s.arms if a.impressions),
    }


def served(c: NextbestClient, placement: str) -> Any:
    """A decision that served an arm (one that served none has nothing to reward: it may happen
    while a budget lease is being taken, and leaves every figure here unchanged)."""
    deadline = time.monotonic() + 10.0  # a lease taken on a loaded machine (two test workers) can take a while
    tries = 0
    while time.monotonic() < deadline:
        d = c.choose(placement, {"segment": "youth"})
        if d.arm_id:
            return d
        tries += 1
        time.sleep(0.01)
    raise AssertionError(f"{placement} served no arm in 10 s ({tries} Chooses)")


def awaiting_metrics(port: int | None, placement: str) -> tuple[float, float, float]:
    """The Prometheus gauges of rewards awaiting close, summed over the placement's arms."""
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    names = ("nextbest_rewards_awaiting_close", "nextbest_reward_sum_awaiting_close", "nextbest_reward_spend_awaiting_close")
    got = dict.fromkeys(names, 0.0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in got and sample.labels.get("placement") == placement:
                got[sample.name] += sample.value
    n, total, spend = got.values()
    return n, round(total, 9), round(spend, 9)


def test_acknowledged_rewards_are_visible_at_once_and_after_a_restart(any_db: str) -> None:
    clock = FakeClock()
    with running_server(any_db, clock=clock, metrics_port=0) as s, s.client() as c:
        c.apply(placements())
        expected = 0.0
        for i in range(ROUNDS):
            d = served(c, "app_home_banner")
            reward = (0.0, 1.0, 2.5)[i % 3]  # zeros too: a reward of 0 is a reward, with no reward cost
            expected += reward
            assert c.reward(d.event_id, reward) == "learned"
        positive = sum(1 for i in range(ROUNDS) if i % 3)
        aggregated = []
        for _ in range(10):
            d = served(c, "ussd_main_menu")
            assert c.reward(d.event_id, 1.0, reward_id="a") == "recorded"
            assert c.reward(d.event_id, 2.0, reward_id="b") == "recorded"
            aggregated.append(d.event_id)
        assert c.reward(aggregated[0], -4.0, reward_id="c") == "recorded"  # that window's running sum: -1, no reward cost
        want = {
            "rewards": ROUNDS,
            "reward_sum": round(expected, 9),
            "learned": 0,
            "reward_sum_learned": 0.0,
            "awaiting": ROUNDS,
            "reward_sum_awaiting": round(expected, 9),
            "spend": positive * COST,
            "spend_awaiting": positive * COST,
            "pending": ROUNDS,
            "variant_rewards": ROUNDS,
            "variant_awaiting": ROUNDS,
        }
        got = figures(c, "app_home_banner")
        per_arm = got.pop("per_arm")
        assert got == want
        assert all(rewards == awaiting > 0 for _, rewards, awaiting in per_arm)
        want_agg = dict(want, rewards=10, reward_sum=26.0, awaiting=10, reward_sum_awaiting=26.0, pending=10)
        want_agg.update(spend=9 * COST, spend_awaiting=9 * COST, variant_rewards=10, variant_awaiting=10)
        got_agg = figures(c, "ussd_main_menu")
        got_agg.pop("per_arm")
        assert got_agg == want_agg
        assert s.engine.states["app_home_banner"].model.learned == 0  # nothing learned before the close
        metrics = (ROUNDS, round(expected, 9), positive * COST)
        assert awaiting_metrics(s.running.metrics_port, "app_home_banner") == metrics
        assert awaiting_metrics(s.running.metrics_port, "ussd_main_menu") == (10, 26.0, 9 * COST)
    # a restart on the same database (a kill -9 leaves the same rows: every reward is durable)
    with running_server(any_db, clock=clock, metrics_port=0) as s, s.client() as c:
        got = figures(c, "app_home_banner")
        assert got.pop("per_arm") == per_arm
        assert got == want
        got_agg = figures(c, "ussd_main_menu")
        got_agg.pop("per_arm")
        assert got_agg == want_agg
        assert awaiting_metrics(s.running.metrics_port, "app_home_banner") == metrics
        assert awaiting_metrics(s.running.metrics_port, "ussd_main_menu") == (10, 26.0, 9 * COST)
        # the close: the same rewards, now learned
        clock.advance(601)
        closed = 0
        while closed < ROUNDS + 10:
            closed += s.call(s.engine.windows.sweep())
        learned = dict(want, learned=ROUNDS, reward_sum_learned=round(expected, 9), awaiting=0, reward_sum_awaiting=0.0)
        learned.update(spend_awaiting=0.0, pending=0, variant_awaiting=0)
        got = figures(c, "app_home_banner")
        got.pop("per_arm")
        assert got == learned
        got_agg = figures(c, "ussd_main_menu")
        got_agg.pop("per_arm")
        assert got_agg == dict(
            learned, rewards=10, reward_sum=26.0, learned=10, reward_sum_learned=26.0, spend=9 * COST, variant_rewards=10
        )
        assert awaiting_metrics(s.running.metrics_port, "app_home_banner") == (0, 0.0, 0.0)


@pytest.mark.parametrize("learn_at", ["reward", "window_close"])
def test_rewards_count_once_under_either_learn_at(db_url: str, learn_at: str) -> None:
    """learn_at: reward learns the first reward at once: it is a learned reward, never also one
    awaiting the close; a duplicate counts nothing more."""
    with running_server(db_url) as s, s.client() as c:
        c.apply([envs.placement(learn_at=learn_at, reward_window=600)])
        d = c.choose("app_home_banner", {"segment": "youth"})
        assert c.reward(d.event_id, 1.5) == "learned"
        assert c.reward(d.event_id, 9.0) == "duplicate"
        got = figures(c, "app_home_banner")
        assert (got["rewards"], got["reward_sum"]) == (1, 1.5)
        at_once = learn_at == "reward"
        assert (got["learned"], got["awaiting"], got["pending"]) == ((1, 0, 0) if at_once else (0, 1, 1))
