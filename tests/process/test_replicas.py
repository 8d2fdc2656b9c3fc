"""Several real server processes sharing the local PostgreSQL: budgets, kills, take-over, models."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from nextbest.bandit.spec import PlacementSpec
from nextbest.client import NextbestClient
from tests import envs
from tests.harness import ServerProcess, sql, started_together, until

pytestmark = pytest.mark.postgres

FAST = {
    "NEXTBEST_SNAPSHOT_INTERVAL": "0.3",
    "NEXTBEST_REPLICA_POLL_INTERVAL": "0.3",
    "NEXTBEST_ORPHAN_GRACE": "0.5",
    "NEXTBEST_SWEEP_INTERVAL": "0.1",
}


def together(fn: Callable[..., None], arg_sets: Sequence[tuple[Any, ...]]) -> None:
    """Run fn once per argument tuple, all at once, each in its own thread; wait for all."""
    threads = [threading.Thread(target=fn, args=args) for args in arg_sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_two_replicas_never_overspend_a_small_budget(pg: str) -> None:
    a, b = started_together(
        lambda: ServerProcess(pg, env=FAST),
        lambda: ServerProcess(pg, "--learner", "never", env=FAST),
    )
    try:
        spec = PlacementSpec.model_validate(
            {
                "id": "p",
                "exploration": {"algorithm": "epsilon", "epsilon": 0.5},
                "arms": [
                    {"id": "paid", "cost_per_impression": 1.0, "budget": {"total": 40}},
                    {"id": "free"},
                ],
            }
        )
        with NextbestClient(a.target) as c:
            c.apply([spec])
        until(lambda: NextbestClient(b.target).placements() != [])  # the replica picked the placement up
        served = {"paid": 0}
        lock = threading.Lock()

        def load(target: str) -> None:
            with NextbestClient(target) as c:
                for _ in range(150):
                    d = c.choose("p", {"segment": "x"})
                    with lock:
                        served["paid"] += d.arm_id == "paid"

        together(load, [(t,) for t in (a.target, b.target) for _ in range(3)])
    finally:
        a.terminate()
        b.terminate()
    [(spent, leased)] = sql(pg, "SELECT spent, leased FROM budget_accounts WHERE key = 'arm:p/paid'")
    [(logged,)] = sql(pg, "SELECT count(*) FROM decisions WHERE arm_id = 'paid'")
    assert logged == served["paid"] <= 40
    assert spent == logged and leased <= 40
    assert logged >= 30  # the budget was used (leases not returned by a crash are the only loss)


def test_two_replicas_hold_a_contact_cap_exactly(pg: str) -> None:
    """Default settings on PostgreSQL share contact history: a per-customer cap of 3 a day
    holds across both processes under concurrent load for the same customers."""
    a, b = started_together(
        lambda: ServerProcess(pg, env=FAST),
        lambda: ServerProcess(pg, "--learner", "never", env=FAST),
    )
    customers = [f"cust{i}" for i in range(5)]
    try:
        spec = PlacementSpec.model_validate(
            {
                "id": "p",
                "contact_policies": [{"max_impressions": 3, "per": "customer", "window": "1d"}],
                "arms": [{"id": "x"}, {"id": "y"}],
            }
        )
        with NextbestClient(a.target) as c:
            c.apply([spec])
        until(lambda: NextbestClient(b.target).placements() != [])
        shown = {c: 0 for c in customers}
        lock = threading.Lock()

        def load(target: str, customer: str) -> None:
            with NextbestClient(target) as c:
                for _ in range(6):
                    d = c.choose("p", {"segment": "x"}, customer_id=customer)
                    with lock:
                        shown[customer] += bool(d.arm_id)

        together(load, [(t, cu) for t in (a.target, b.target) for cu in customers])
    finally:
        a.terminate()
        b.terminate()
    assert shown == {c: 3 for c in customers}  # 12 asks each over two servers, 3 offers each
    logged = dict(sql(pg, "SELECT customer_id, count(*) FROM decisions WHERE arm_id IS NOT NULL GROUP BY customer_id"))
    assert logged == shown


def test_a_killed_replica_loses_no_acknowledged_reward_and_its_learner_is_replaced(pg: str) -> None:
    a = ServerProcess(pg, "--learner", "always", env=FAST)  # the learner
    b = ServerProcess(pg, env=FAST)  # a replica that can take over
    acked: list[str] = []
    try:
        with NextbestClient(a.target) as c:
            c.apply([envs.placement(reward_window=1.0)])
        until(lambda: NextbestClient(b.target).placements() != [])
        stop = threading.Event()

        def load(target: str, n: int) -> None:
            with NextbestClient(target, timeout=2) as c:
                for i in range(n):
                    if stop.is_set():
                        return
                    try:
                        d = c.choose("app_home_banner", {"segment": envs.SEGMENTS[i % 5]})
                        if c.reward(d.event_id, float(i % 3 == 0)) == "learned":
                            acked.append(d.event_id)
                    except grpc.RpcError:
                        return  # the server went away mid-call: that call was not acknowledged

        ta = threading.Thread(target=load, args=(a.target, 10_000))
        ta.start()
        time.sleep(1.5)
        a.kill()  # SIGKILL the learner mid-load
        ta.join(10)
        killed_acks = len(acked)
        assert killed_acks > 20
        load(b.target, 200)  # the replica keeps serving and takes over learning
        with NextbestClient(b.target) as c:
            learnable = lambda: sql(pg, "SELECT count(*) FROM decisions WHERE outcome IN (1, 2)")[0][0]  # noqa: E731
            until(lambda: c.stats("app_home_banner").model_version == learnable() and learnable() >= len(acked), 60)
    finally:
        b.terminate()
    rows = dict(sql(pg, "SELECT event_id, outcome FROM decisions WHERE outcome IN (1, 2)"))
    assert all(rows.get(e) == 1 for e in acked)  # every acknowledged reward is stored as a reward
    seqs = [r[0] for r in sql(pg, "SELECT learn_seq FROM decisions WHERE outcome IN (1, 2)")]
    assert None not in seqs and len(seqs) == len(set(seqs))  # each claimed once: learned exactly once


def test_a_replica_loads_the_learners_new_model_within_the_interval(pg: str) -> None:
    a, b = started_together(
        lambda: ServerProcess(pg, "--learner", "always", env=FAST),
        lambda: ServerProcess(pg, "--learner", "never", env=FAST),
    )
    try:
        with NextbestClient(a.target) as c:
            c.apply([envs.placement()])
            until(lambda: NextbestClient(b.target).placements() != [])
            for _ in range(50):
                d = c.choose("app_home_banner", {"segment": "youth"})
                c.reward(d.event_id, 1.0)
            until(lambda: c.stats("app_home_banner").model_version == 50)
            t0 = time.monotonic()
        with NextbestClient(b.target) as r:
            until(lambda: r.choose("app_home_banner", {"segment": "youth"}).model_version == 50, 10, 0.02)
        assert time.monotonic() - t0 < 0.3 + 0.3 + 2.0  # snapshot interval + poll interval + slack
    finally:
        a.terminate()
        b.terminate()


def test_two_replicas_pace_a_total_budget_like_one_and_report_the_databases_figures(pg: str) -> None:
    """Each server prices the spend of both (re-read every poll), so a paced budget follows one
    even schedule; before, each paced against its own spend and together they spent ~2x. Then
    GetStats on either server reports the database's spent and remaining."""
    from datetime import UTC, datetime, timedelta

    a, b = started_together(
        lambda: ServerProcess(pg, env=FAST),
        lambda: ServerProcess(pg, "--learner", "never", env=FAST),
    )
    limit, period = 150.0, 16.0
    samples: list[tuple[float, float]] = []  # (share of the period elapsed, share of the limit spent)
    try:
        start = datetime.now(UTC) + timedelta(seconds=2)
        spec = PlacementSpec.model_validate(
            {
                "id": "p",
                "exploration": {"algorithm": "epsilon", "epsilon": 0.05},
                "arms": [
                    {
                        "id": "paid",
                        "business_value": 1.0,
                        "cost_per_impression": 1.0,
                        "budget": {"total": limit, "start": start, "end": start + timedelta(seconds=period)},
                    },
                    {"id": "free"},
                ],
            }
        )
        with NextbestClient(a.target) as c:
            c.apply([spec])
        until(lambda: NextbestClient(b.target).placements() != [])
        stop = threading.Event()

        def load(target: str) -> None:  # ~40 Choose/s per thread: far above the schedule's 9.4/s
            with NextbestClient(target) as c:
                while not stop.is_set():
                    c.choose("p", {"segment": "x"})
                    time.sleep(0.025)

        threads = [threading.Thread(target=load, args=(t,)) for t in (a.target, b.target) for _ in range(2)]
        for t in threads:
            t.start()
        t0 = start.timestamp()
        try:
            for share in (0.25, 0.5, 0.75):
                time.sleep(max(0.0, t0 + share * period - time.time()))
                [(spent,)] = sql(pg, "SELECT coalesce(sum(spent), 0) FROM budget_accounts WHERE key = 'arm:p/paid'")
                samples.append((share, spent / limit))
        finally:
            stop.set()
            for t in threads:
                t.join()
        [(spent, reserved)] = sql(pg, "SELECT spent, reserved FROM budget_accounts WHERE key = 'arm:p/paid'")
        for target in (a.target, b.target):
            with NextbestClient(target) as c:
                [view] = [v for v in c.stats("p").budgets if v.budget == "arm:p/paid"]
            assert abs(view.spent - spent) <= 0.01 * limit and abs(view.remaining - (limit - spent - reserved)) <= 0.01 * limit
            assert 0.0 <= view.leased_unused <= limit - spent
    finally:
        a.terminate()
        b.terminate()
    print("paced spend (share of period, share of limit):", samples)
    for share, used in samples:
        assert used <= 1.3 * share, samples  # within 1.3x of the even schedule at every sample
    assert samples[-1][1] >= 0.5 * samples[-1][0], samples  # and it does spend: paced, not starved
