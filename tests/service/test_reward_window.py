"""Reward windows: the default reward after the window, late rewards recorded and not learned."""

from __future__ import annotations

import time

from tests import envs
from tests.harness import FakeClock, running_server


def wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_default_reward_after_window_then_late_reward_is_not_learned(db_url: str) -> None:
    clock = FakeClock()  # the answered reward lands inside its window however slow the machine
    with running_server(db_url, clock=clock) as s, s.client() as c:
        c.apply([envs.placement(reward_window=0.3, default_reward=-0.5)])
        quiet = c.choose("app_home_banner", {"segment": "youth"})
        answered = c.choose("app_home_banner", {"segment": "youth"})
        assert c.reward(answered.event_id, 1.0) == "learned"
        ps = s.engine.states["app_home_banner"]
        clock.advance(1)
        s.call(s.engine.windows.sweep())
        wait_for(lambda: ps.model.learned == 2)  # the answered one, then the default for the quiet one
        row = s.engine.store.find_decision(quiet.event_id)
        assert (row.outcome.name, row.reward) == ("DEFAULT", -0.5)
        assert c.reward(quiet.event_id, 1.0) == "late"
        assert c.reward(answered.event_id, 1.0) == "duplicate"
        time.sleep(0.2)
        assert ps.model.learned == 2  # neither the late nor the duplicate reward was learned
        stats = c.stats("app_home_banner")
        by_arm = {a.arm_id: a for a in stats.arms}
        assert sum(a.default_rewards for a in stats.arms) == 1
        assert sum(a.late_rewards for a in stats.arms) == 1
        assert sum(a.rewards for a in stats.arms) == 1 and sum(a.reward_sum for a in stats.arms) == 1.0
        assert by_arm[quiet.arm_id].late_rewards == 1
        assert stats.pending == 0


def test_reward_after_deadline_but_before_the_sweep_is_late(db_url: str) -> None:
    with running_server(db_url, sweep_interval=30) as s, s.client() as c:
        c.apply([envs.placement(reward_window=0.1)])
        d = c.choose("app_home_banner", {"segment": "youth"})
        time.sleep(0.2)
        assert c.reward(d.event_id, 1.0) == "late"
        assert s.call(s.engine.windows.sweep()) == 1
        assert s.engine.store.find_decision(d.event_id).outcome.name == "DEFAULT"


def test_open_windows_survive_a_restart(db_url: str) -> None:
    with running_server(db_url) as s, s.client() as c:
        c.apply([envs.placement(reward_window=600)])
        d = c.choose("app_home_banner", {"segment": "youth"})
    with running_server(db_url) as s, s.client() as c:
        assert c.stats("app_home_banner").pending == 1
        assert c.reward(d.event_id, 1.0) == "learned"
        assert c.reward(d.event_id, 1.0) == "duplicate"
        wait_for(lambda: s.engine.states["app_home_banner"].model.learned == 1)
