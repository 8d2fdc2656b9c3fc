"""Contact policies across servers that share a database (contact_store "database").

Two servers in this process, each with its own engine and store, stand in for two replicas
(tests/test_replicas.py does the same with real processes on PostgreSQL). With memory-only
history each server caps a customer on its own, and the caps add up; with shared history
the cap holds across both, exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bandit.spec import PlacementSpec
from server.storage.sql import open_store
from tests.harness import ServerThread, make_settings, postgres_available, postgres_schema

CAP = 2
CUSTOMERS = [f"c{i}" for i in range(6)]
SPEC = PlacementSpec.model_validate(
    {
        "id": "p",
        "exploration": {"algorithm": "epsilon", "epsilon": 0.5},
        "contact_policies": [{"max_impressions": CAP, "per": "customer", "window": "1d"}],
        "arms": [{"id": "a"}, {"id": "b"}, {"id": "c"}],
    }
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/nb.db"
        return
    if not postgres_available():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test); shared contacts not tested on it")
    with postgres_schema() as u:
        yield u


def _hammer(servers: list[ServerThread]) -> dict[str, int]:
    """Each customer asks both servers several times at once; how many offers each got."""
    shown = {c: 0 for c in CUSTOMERS}
    lock = threading.Lock()

    def ask(server: ServerThread, customer: str) -> None:
        with server.client() as c:
            for _ in range(4):
                d = c.choose("p", {"segment": "x"}, customer_id=customer)
                with lock:
                    shown[customer] += bool(d.arm_id)

    threads = [threading.Thread(target=ask, args=(s, cust)) for s in servers for cust in CUSTOMERS for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return shown


def _pair(url: str, store: str) -> list[ServerThread]:
    a = ServerThread(make_settings(url, contact_store=store))
    with a.client() as c:
        c.apply([SPEC])
    b = ServerThread(make_settings(url, contact_store=store, learner="never"))
    return [a, b]


def test_a_contact_cap_holds_exactly_across_two_servers(url: str) -> None:
    servers = _pair(url, "database")
    try:
        shown = _hammer(servers)
    finally:
        for s in servers:
            s.stop()
    assert shown == {c: CAP for c in CUSTOMERS}  # 16 asks each, exactly CAP offers, whichever server
    store = open_store(url)
    try:  # and the log agrees: CAP shown decisions per customer
        for c in CUSTOMERS:
            h, seen = store.contacts_open(c, 0.0)
            store.contacts_abort(h)
            assert len(seen) == CAP
    finally:
        store.close()


def test_with_memory_only_history_each_server_caps_on_its_own(url: str) -> None:
    servers = _pair(url, "memory")
    try:
        shown = _hammer(servers)
    finally:
        for s in servers:
            s.stop()
    assert shown == {c: 2 * CAP for c in CUSTOMERS}  # why "database" is the default with PostgreSQL


def test_the_default_shares_history_on_postgresql_and_with_workers() -> None:
    assert make_settings("postgresql+psycopg://x/y").shares_contacts
    assert not make_settings("sqlite:///x.db").shares_contacts
    assert make_settings("sqlite:///x.db", workers=2).shares_contacts
    assert not make_settings("postgresql+psycopg://x/y", contact_store="memory").shares_contacts
    assert make_settings("sqlite:///x.db", contact_store="database").shares_contacts


def test_impressions_of_a_placement_without_rules_count_for_other_placements(url: str) -> None:
    import time

    cap_any = PlacementSpec.model_validate(
        {"id": "capped", "contact_policies": [{"max_impressions": 1, "per": "customer", "window": "1d"}], "arms": [{"id": "a"}]}
    )
    free = PlacementSpec.model_validate({"id": "free", "arms": [{"id": "z"}]})
    a = ServerThread(make_settings(url, contact_store="database"))
    try:
        with a.client() as c:
            c.apply([cap_any, free])
        b = ServerThread(make_settings(url, contact_store="database", learner="never"))
        try:
            with a.client() as ca, b.client() as cb:
                assert ca.choose("free", {}, customer_id="k").arm_id == "z"  # recorded in the background
                store = open_store(url)
                try:
                    deadline = time.monotonic() + 10
                    while True:
                        h, seen = store.contacts_open("k", 0.0)
                        store.contacts_abort(h)
                        if seen:
                            break
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                finally:
                    store.close()
                d = cb.choose("capped", {}, customer_id="k")  # the other server knows of it
                assert (d.arm_id, d.reason) == ("", "no eligible arm")
                assert cb.choose("capped", {}, customer_id="other").arm_id == "a"
        finally:
            b.stop()
    finally:
        a.stop()


def test_budgets_and_placements_without_rules_never_wait_on_a_customer_lock(url: str) -> None:
    """Regression: a held customer lock once blocked budget leases (SQLite) and, with impressions
    of rule-free placements queued on the same threads, every call (PostgreSQL)."""
    capped = PlacementSpec.model_validate(
        {
            "id": "capped",
            "contact_policies": [{"max_impressions": 10_000, "per": "customer", "window": "1d"}],
            "arms": [{"id": "paid", "cost_per_impression": 1.0, "budget": {"total": 10_000}}, {"id": "free"}],
        }
    )
    free = PlacementSpec.model_validate({"id": "free", "arms": [{"id": "a"}, {"id": "b"}]})
    s = ServerThread(make_settings(url, contact_store="database"))
    errors: list[str] = []

    def ask(pid: str, customer: str) -> None:
        with s.client() as c:
            for _ in range(10):
                try:
                    c.choose(pid, {"segment": "x"}, customer_id=customer)
                except Exception as e:  # noqa: BLE001 - any failure is the finding
                    errors.append(f"{pid}: {e}")

    try:
        with s.client() as c:
            c.apply([capped, free])
        threads = [threading.Thread(target=ask, args=(p, f"k{i % 2}")) for i in range(8) for p in ("capped", "free", "free")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        with s.client() as c:
            stats = c.stats("capped")
    finally:
        s.stop()
    assert errors == []
    assert stats.decisions == 80
