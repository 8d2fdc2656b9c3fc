"""Budgets and contact policies through real gRPC: concurrency, a simulated month, no-offer answers."""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.storage import tables as t
from tests.harness import FakeClock, running_server

# Chooses per caller (16 callers at once). The budgets are used up within the first ~160 of all
# chooses (about 85 paid impressions; measured twice with 500 each): the rest is concurrent
# traffic against spent budgets. 150 each keep the same boundary and 15 times as many after it.
CALLS = 150


def test_concurrent_chooses_never_overspend_and_use_the_budgets_up(db_url: str) -> None:
    placement = PlacementSpec.model_validate(
        {
            "id": "app_home_banner",
            "exploration": {"algorithm": "epsilon", "epsilon": 0.3},
            "arms": [
                {"id": "bonus_1gb", "cost_per_impression": 1.0, "cost_per_reward": 2.0, "budget": {"total": 60}},
                {"id": "bonus_2gb", "cost_per_impression": 1.5, "budget": {"total": 45}, "campaign": "xmas"},
                {"id": "device_deal", "cost_per_impression": 0.5, "campaign": "xmas"},
                {"id": "info_free"},
            ],
        }
    )
    campaign = CampaignSpec.model_validate({"id": "xmas", "budget": {"total": 50}})
    with running_server(db_url, budget_lease_fraction=0.1) as s, s.client() as c:
        c.apply([placement], campaigns=[campaign])
        served: dict[str, int] = defaultdict(int)
        lock = threading.Lock()

        def worker(k: int) -> None:
            from nextbest.client import NextbestClient

            with NextbestClient(s.target) as cc:
                for i in range(CALLS):
                    d = cc.choose("app_home_banner", {"segment": f"s{i % 3}"}, customer_id=f"c{k}")
                    with lock:
                        served[d.arm_id] += 1
                    if d.arm_id == "bonus_1gb" and i % 4 == 0:
                        assert cc.reward(d.event_id, 1.0) == "learned"  # incurs cost_per_reward

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(worker, range(16)))
        stats = c.stats("app_home_banner")
        budgets = {b.budget: b for b in stats.budgets}
        spend = {a.arm_id: a.spend for a in stats.arms}
    # Check the log itself, not only what the server reports.
    from nextbest.storage.sql import open_store

    store = open_store(db_url)
    with store.engine.connect() as conn:
        rows = conn.execute(t.decisions.select()).all()
    store.close()
    logged: dict[str, float] = defaultdict(float)
    for r in rows:
        if r.arm_id:
            # A positive reward spends its cost once acknowledged (stored on the row), closed or not.
            logged[r.arm_id] += r.cost + (r.reward_cost if r.reward is not None and r.reward > 0 else 0.0)
    assert sum(served.values()) == 16 * CALLS
    # Arm budgets: spend (and what is held for open windows) within the limit, and used up.
    b1 = budgets["arm:app_home_banner/bonus_1gb"]
    assert b1.spent + b1.reserved <= 60 + 1e-9 and logged["bonus_1gb"] <= 60 + 1e-9
    assert b1.remaining < 3.0  # less than one more reservation: the budget was used up
    b2 = budgets["arm:app_home_banner/bonus_2gb"]
    assert b2.spent <= 45 + 1e-9
    xmas = budgets["campaign:xmas"]
    assert logged["bonus_2gb"] + logged["device_deal"] <= 50 + 1e-9
    assert xmas.spent <= 50 + 1e-9 and xmas.remaining < 1.5  # the shared campaign was used up
    assert abs(spend["bonus_1gb"] - logged["bonus_1gb"]) < 1e-9
    assert served["info_free"] > 0  # the free arm keeps serving after the budgets are gone


def test_contact_policies_hold_over_a_simulated_month(db_url: str) -> None:
    clock = FakeClock()
    start = clock.t
    placement = PlacementSpec.model_validate(
        {
            "id": "app_home_banner",
            "exploration": {"algorithm": "epsilon", "epsilon": 0.5},
            "reward_window": "1h",
            "contact_policies": [
                {"max_impressions": 3, "per": "customer_arm", "window": "7d"},
                {"max_impressions": 4, "per": "customer", "window": "1d"},
                {"suppress_after_ignored": 2, "for": "14d"},
            ],
            "arms": [{"id": f"offer_{i}"} for i in range(5)],
        }
    )
    with running_server(db_url, clock=clock, sweep_interval=60) as s, s.client() as c:
        c.apply([placement])
        reasons: dict[str, int] = defaultdict(int)
        for hour in range(30 * 24 // 3):  # every 3 hours for a month
            for k in range(6):
                d = c.choose("app_home_banner", {"segment": "x"}, customer_id=f"c{k}")
                if d.arm_id and (hour + k) % 5 == 0:
                    c.reward(d.event_id, 1.0)
                reasons[d.reason.split(":")[0]] += 1
            clock.advance(3 * 3600)
            s.call(s.engine.windows.sweep())
        s.call(s.engine.writer.flush())
    from nextbest.storage.sql import open_store

    store = open_store(db_url)
    with store.engine.connect() as conn:
        rows = conn.execute(t.decisions.select().where(t.decisions.c.arm_id.is_not(None))).all()
    store.close()
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_customer: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_pair[(r.customer_id, r.arm_id)].append(r.created_at)
        by_customer[r.customer_id].append(r.created_at)
    for times in by_pair.values():
        times.sort()
        for i, ti in enumerate(times):
            assert sum(1 for tj in times[i:] if tj < ti + 7 * 86400) <= 3
    for times in by_customer.values():
        times.sort()
        for i, ti in enumerate(times):
            assert sum(1 for tj in times[i:] if tj < ti + 86400) <= 4
    assert len(rows) > 6 * 30  # customers were still served most days
    assert reasons["no eligible arm"] > 0  # and the policies did bite
    assert clock.t - start >= 30 * 86400


def test_nothing_eligible_answers_with_a_reason_or_the_fallback(db_url: str) -> None:
    with running_server(db_url) as s, s.client() as c:
        spec = {
            "id": "ussd_menu",
            "arms": [{"id": "paid", "cost_per_impression": 1.0, "budget": {"total": 2}}, {"id": "free"}],
            "contact_policies": [{"max_impressions": 1, "per": "customer_arm", "window": "1d"}],
        }
        c.apply([PlacementSpec.model_validate({**spec, "fallback_arm": "free"})])
        first = [c.choose("ussd_menu", customer_id="c1").arm_id for _ in range(2)]
        assert sorted(first) == ["free", "paid"]
        fb = c.choose("ussd_menu", customer_id="c1")
        assert (fb.arm_id, fb.probability, fb.reason) == ("free", 1.0, "fallback: no eligible arm")
        c.apply([PlacementSpec.model_validate(spec)])
        none = c.choose("ussd_menu", customer_id="c1")
        assert none.arm_id == "" and none.reason == "no eligible arm" and none.probability == 0.0
        st = c.stats("ussd_menu")
        assert st.no_offer == 1
