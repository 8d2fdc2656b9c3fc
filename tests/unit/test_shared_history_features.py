"""History features on a contact history shared between servers (issue #30), on SQLite and
PostgreSQL: a placement whose only use of the history is its features takes no customer lock
and opens no transaction of its own per Choose; concurrent Chooses read in one query, their
impressions join one group commit; this server sees its own at once, and counts agree across
servers once committed. Engines in this process (no gRPC), a fake clock."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.engine import Engine
from nextbest.engine.shared_contacts import SharedContacts
from tests import envs
from tests.harness import FakeClock, engine_on, run_async

DAY = 86400.0


def placement() -> PlacementSpec:
    return envs.placement("p", learn_at="reward", context={"history": ["7d", "30d"]})


def history_of(d: Any) -> dict[str, dict[str, float | str]]:
    assert d.context is not None
    return {a: {name: v for _, name, v in fs} for (a, _), fs in zip(d.arms, d.context.arm_features, strict=True)}


def shared(e: Engine) -> SharedContacts:
    assert e.contacts.shared is not None
    return e.contacts.shared


def no_locks(e: Engine) -> list[str]:
    """Fails the test's last check if anything takes a customer's lock: the calls made."""
    taken: list[str] = []
    real = e.store.contacts_open

    def spy(customer_id: str, since: float) -> Any:
        taken.append(customer_id)
        return real(customer_id, since)

    e.store.contacts_open = spy  # type: ignore[method-assign]
    return taken


def test_concurrent_chooses_read_together_and_record_in_one_commit(any_db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(any_db, clock, contact_store="database") as e:
            await e.config.apply([placement()])
            taken = no_locks(e)
            sc = shared(e)
            reads, commits = sc.reads, sc.commits
            out = await asyncio.gather(*(e.chooser.choose("p", f"c{i}", "", []) for i in range(40)))
            assert all(ds[0].arm_id for ds in out)
            assert sc.reads == reads + 1  # one query for the forty
            await sc.flush()
            assert 1 <= sc.commits - commits <= 2  # forty impressions, one commit (and one that joined late)
            assert taken == []
            for i, ds in enumerate(out):  # and all forty are in the database
                h, rows = await asyncio.get_running_loop().run_in_executor(None, e.store.contacts_open, f"c{i}", 0.0)
                e.store.contacts_abort(h)
                assert [r.arm_id for r in rows] == [ds[0].arm_id]

    run_async(body)


def test_a_server_sees_its_own_impressions_before_they_are_committed(any_db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(any_db, clock, contact_store="database") as e:
            await e.config.apply([placement()])
            gate = threading.Event()
            real = e.store.contacts_insert

            def slow_insert(rows: Any) -> None:
                gate.wait(30)
                real(rows)

            e.store.contacts_insert = slow_insert  # type: ignore[method-assign]
            try:
                served: list[str] = []
                taken: list[str] = []
                for i in range(3):
                    d = (await e.chooser.choose("p", "k", "", []))[0]
                    assert d.arm_id is not None
                    seen, accepted = Counter(served), Counter(taken)
                    for arm, h in history_of(d).items():
                        assert (h["impressions_7d"], h["accepts_7d"]) == (seen[arm], accepted[arm]), (arm, h, served)
                    served.append(d.arm_id)
                    if i == 0:  # a response this server heard counts before the impression is committed
                        await e.windows.reward(d.event_id, 1.0)
                        taken.append(d.arm_id)
                    clock.advance(60)
            finally:
                gate.set()
            await shared(e).flush()
            d = (await e.chooser.choose("p", "k", "", []))[0]
            assert sum(float(h["impressions_30d"]) for h in history_of(d).values()) == 3.0  # committed now: read back

    run_async(body)


def test_history_counts_agree_across_servers_without_a_lock(any_db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(any_db, clock, contact_store="database") as a:
            await a.config.apply([placement()])
            async with engine_on(any_db, clock, contact_store="database", learner="never") as b:
                locks = no_locks(a) + no_locks(b)
                served: list[tuple[str, bool]] = []
                for i in range(12):
                    maker = a if i % 2 else b
                    d = (await maker.chooser.choose("p", "tel:7", "", []))[0]
                    shown = Counter(arm for arm, _ in served)
                    accepted = Counter(arm for arm, ok in served if ok)
                    for arm, h in history_of(d).items():
                        assert (h["impressions_7d"], h["accepts_30d"]) == (shown[arm], accepted[arm]), (i, arm, h)
                    assert d.arm_id is not None
                    ok = i % 3 == 0
                    await maker.windows.reward(d.event_id, 1.0 if ok else 0.0)
                    served.append((d.arm_id, ok))
                    await maker.writer.flush()  # the decision and its reward, then its impression
                    await shared(maker).flush()
                    clock.advance(3600)
                assert locks == []

    run_async(body)


def test_a_placement_with_a_cap_still_takes_the_customers_lock(any_db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        capped = envs.placement(
            "capped",
            context={"history": ["7d"]},
            contact_policies=[{"max_impressions": 1, "per": "customer", "window": "1d"}],
        )
        async with engine_on(any_db, clock, contact_store="database") as e:
            await e.config.apply([capped])
            taken = no_locks(e)
            first = (await e.chooser.choose("capped", "k", "", []))[0]
            second = (await e.chooser.choose("capped", "k", "", []))[0]
            assert first.arm_id is not None and second.arm_id is None
            assert taken == ["k", "k"]

    run_async(body)


def test_contacts_read_gives_each_customer_their_impressions_in_one_read(any_db: str) -> None:
    """Store.contacts_read: as contacts_open reads one customer's (oldest first, each slot apart,
    the response from the decision's row, OPEN without one), for many customers, without a lock."""
    from nextbest.storage.base import ContactRow
    from nextbest.storage.sql import open_store

    store = open_store(any_db)
    try:
        store.contacts_insert(
            [
                ContactRow("c1", 120.0, "p", "b", "e2", 1),
                ContactRow("c1", 100.0, "p", "a", "e1"),
                ContactRow("c2", 130.0, "q", "a", "e3"),
                ContactRow("c1", 10.0, "p", "a", "e0"),  # older than since
            ]
        )
        got = store.contacts_read(["c1", "c2", "c3"], 50.0)
        assert {c: [(r.arm_id, r.placement, r.event_id, r.at, r.reward) for r in rs] for c, rs in got.items()} == {
            "c1": [("a", "p", "e1", 100.0, None), ("b", "p", "e2#1", 120.0, None)],
            "c2": [("a", "q", "e3", 130.0, None)],
            "c3": [],
        }
        h, one = store.contacts_open("c1", 50.0)  # the same as the locked read
        store.contacts_abort(h)
        assert one == got["c1"]
    finally:
        store.close()


def test_reads_asked_while_one_is_out_go_together_after_it(any_db: str) -> None:
    async def body() -> None:
        clock = FakeClock()
        async with engine_on(any_db, clock, contact_store="database") as e:
            await e.config.apply([placement()])
            sc = shared(e)
            gate = threading.Event()
            real = e.store.contacts_read

            def held(ids: Any, since: float) -> Any:
                gate.wait(30)
                return real(ids, since)

            e.store.contacts_read = held  # type: ignore[method-assign]
            reads = sc.reads
            first = asyncio.ensure_future(e.chooser.choose("p", "k0", "", []))
            while sc.reads == reads:
                await asyncio.sleep(0)
            later = []
            for i in range(1, 11):  # each on a turn of its own, while the first read is out
                later.append(asyncio.ensure_future(e.chooser.choose("p", f"k{i}", "", [])))
                await asyncio.sleep(0)
            gate.set()
            out = await asyncio.gather(first, *later)
            assert all(ds[0].arm_id for ds in out)
            assert sc.reads == reads + 2

    run_async(body)
