"""Profiles and interaction history across two real server processes on PostgreSQL (issue #30):
a profile put through one server is used by the other within profile_cache_ttl, and history
counts computed on either server agree with the shared log."""

from __future__ import annotations

import time
from collections import Counter

from nextbest.client import NextbestClient
from nextbest.storage.base import Profile
from tests import envs
from tests.harness import ServerProcess, sql, until

TTL = 1.0
ENV = {"NEXTBEST_PROFILE_CACHE_TTL": str(TTL), "NEXTBEST_REPLICA_POLL_INTERVAL": "0.3", "NEXTBEST_SEED": "replica-profiles"}
PLACEMENT = envs.placement("ivr_menu", context={"profile": True, "history": ["7d", "30d"]})


def plan_used(nb: NextbestClient, customer: str) -> str:
    explained = nb.explain(nb.choose("ivr_menu", customer_id=customer).event_id)
    return next(f.feature.text for f in explained.features if f.feature.name == "plan")


def test_a_profile_put_through_one_server_is_used_by_the_other_within_the_ttl(pg: str) -> None:
    a = ServerProcess(pg, env=ENV)
    b = ServerProcess(pg, "--learner", "never", env=ENV)
    try:
        with NextbestClient(a.target) as na, NextbestClient(b.target) as nb:
            na.apply([PLACEMENT])
            until(lambda: nb.placement("ivr_menu").context.profile, timeout=10)
            na.put_profiles([Profile("tel:1", (("customer", "plan", "prepaid"),), time.time())])
            assert plan_used(nb, "tel:1") == "prepaid"  # now cached on b
            na.put_profiles([Profile("tel:1", (("customer", "plan", "postpaid"),), time.time())])
            assert plan_used(na, "tel:1") == "postpaid"  # the writer's own cache: at once
            written = time.monotonic()
            while plan_used(nb, "tel:1") != "postpaid":
                assert time.monotonic() - written < TTL + 2.0, "b still decides on the old profile"
                time.sleep(0.05)
            # Deleted through b: b stops at once, a within the TTL.
            nb.delete_profile("tel:1")
            assert not [f for f in nb.explain(nb.choose("ivr_menu", customer_id="tel:1").event_id).features]
            gone = time.monotonic()
            while na.explain(na.choose("ivr_menu", customer_id="tel:1").event_id).features:
                assert time.monotonic() - gone < TTL + 2.0, "a still decides on the deleted profile"
                time.sleep(0.05)
    finally:
        a.terminate()
        b.terminate()


def test_history_counts_agree_on_both_servers(pg: str) -> None:
    a = ServerProcess(pg, env=ENV)
    b = ServerProcess(pg, "--learner", "never", env=ENV)
    try:
        with NextbestClient(a.target) as na, NextbestClient(b.target) as nb:
            na.apply([PLACEMENT])
            until(lambda: nb.placement("ivr_menu").context.history, timeout=10)
            for i in range(24):  # alternate servers; reward some on the other server
                maker, other = (na, nb) if i % 2 else (nb, na)
                d = maker.choose("ivr_menu", customer_id="tel:7")
                (other if i % 3 else maker).reward(d.event_id, 1.0 if i % 4 == 0 else 0.0)
            time.sleep(0.3)  # both servers' group commits
            for server in (na, nb):
                d = server.choose("ivr_menu", customer_id="tel:7")
                explained = server.explain(d.event_id)
                query = "SELECT arm_id, reward FROM decisions WHERE customer_id = 'tel:7' AND arm_id IS NOT NULL AND event_id <> '{}'"
                rows = sql(pg, query.format(d.event_id))
                shown = Counter(arm for arm, _ in rows)
                taken = Counter(arm for arm, r in rows if r is not None and r > 0)
                for arm in explained.arms:
                    h = {f.name: f.number for f in arm.history}
                    assert h["impressions_7d"] == h["impressions_30d"] == shown[arm.arm_id], (arm.arm_id, h, shown)
                    assert h["accepts_7d"] == h["accepts_30d"] == taken[arm.arm_id], (arm.arm_id, h, taken)
                server.reward(d.event_id, 0.0)
                time.sleep(0.3)
    finally:
        a.terminate()
        b.terminate()
