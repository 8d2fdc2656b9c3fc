"""Contact policies across servers that share a database (contact_store "database").

Two servers in this process, each with its own engine and store, stand in for two replicas
(tests/process/test_replicas.py does the same with real processes on PostgreSQL). With memory-only
history each server caps a customer on its own, and the caps add up; with shared history
the cap holds across both, exactly.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nextbest.bandit.errors import Unavailable
from nextbest.bandit.spec import PlacementSpec
from nextbest.storage.sql import open_store
from tests.harness import ServerThread, make_settings

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


@pytest.fixture
def url(any_db: str) -> str:
    return any_db


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


def wait_recorded(url: str, customer: str, n: int, timeout: float = 10.0) -> None:
    """Wait until the database holds n impressions of the customer (recorded in the background)."""
    store = open_store(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            h, seen = store.contacts_open(customer, 0.0)
            store.contacts_abort(h)
            if len(seen) >= n:
                assert len(seen) == n, seen
                return
            assert time.monotonic() < deadline, f"{len(seen)} of {n} impressions of {customer} recorded"
            time.sleep(0.02)
    finally:
        store.close()


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
                wait_recorded(url, "k", 1)
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
                except Exception as e:
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


def test_a_decision_whose_impression_commit_failed_is_still_answered(url: str) -> None:
    """The commit of the customer's new impression fails after the decision was made and
    logged: the call still answers it (an error would leave a logged offer the customer never
    sees), and its impression is recorded again under a fresh lock, so the cap holds at once."""
    s = ServerThread(make_settings(url, contact_store="database"))
    try:
        store = s.engine.store
        real_commit = store.contacts_commit
        failures = []

        def commit_fails_once(handle: Any, rows: Any) -> None:
            if not failures:
                failures.append(rows)
                store.contacts_abort(handle)  # the lock goes, as with a connection lost at commit
                raise Unavailable("database unavailable: OperationalError")
            real_commit(handle, rows)

        store.contacts_commit = commit_fails_once
        with s.client() as c:
            c.apply([SPEC])
            first = c.choose("p", {"segment": "x"}, customer_id="k")
            assert first.arm_id and len(failures) == 1
            # no wait: the impression was recorded again, under the lock, before the answer
            assert c.choose("p", {"segment": "x"}, customer_id="k").arm_id  # the second of CAP
            third = c.choose("p", {"segment": "x"}, customer_id="k")
            assert (third.arm_id, third.reason) == ("", "no eligible arm")
            assert c.stats("p").decisions == 3
        wait_recorded(url, "k", 2)
    finally:
        s.stop()


def test_activate_answers_even_when_the_customer_cannot_be_locked(url: str) -> None:
    """Activation is durable before the impression is recorded: if the customer's lock cannot
    be taken then, Activate still says "activated" and the impression is recorded later."""
    s = ServerThread(make_settings(url, contact_store="database"))
    try:
        store = s.engine.store
        with s.client() as c:
            c.apply([SPEC])
            d = c.choose("p", {"segment": "x"}, customer_id="k", defer_activation=True)
            time.sleep(0.2)
            wait_recorded(url, "k", 0)  # a deferred decision is no impression yet

            def cannot_lock(customer_id: str, since: float) -> Any:
                raise Unavailable("database unavailable: OperationalError")

            real_open = store.contacts_open
            store.contacts_open = cannot_lock
            try:
                assert c.activate(d.event_id) == "activated"
            finally:
                store.contacts_open = real_open
            wait_recorded(url, "k", 1)
            assert c.activate(d.event_id) == "already_active"
    finally:
        s.stop()


def test_record_now_with_no_rows_does_nothing(tmp_path: Path) -> None:
    s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb.db", contact_store="database"))
    try:
        assert s.engine.contacts.shared is not None
        s.call(s.engine.contacts.shared.record_now("k", []))
        wait_recorded(f"sqlite:///{tmp_path}/nb.db", "k", 0)
    finally:
        s.stop()
