"""The profile store's contract (issue #30; Store.put_profiles ... erase_customer in
storage/base.py), on SQLite and the PostgreSQL at 127.0.0.1:5432 (database test)."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import text

from nextbest.bandit.decision_log import DecisionContext, LoggedDecision, Outcome
from nextbest.bandit.errors import Unavailable
from nextbest.bandit.features import feature
from nextbest.storage.base import Close, ContactRow, Erased, Profile, ProfilesPut
from nextbest.storage.refusal import is_refusal
from nextbest.storage.sql import SqlStore


def profile(customer_id: str, as_of: float, plan: str = "prepaid", arpu: float = 12.5, expires_at: float | None = None) -> Profile:
    return Profile(customer_id, (feature("customer", "plan", plan), feature("customer", "arpu", arpu)), as_of, expires_at)


def many(n: int, as_of: float, plan: str = "prepaid", prefix: str = "c") -> list[Profile]:
    """Enough profiles for PostgreSQL's COPY path."""
    return [profile(f"{prefix}{i:05d}", as_of, plan, float(i)) for i in range(n)]


def count(store: SqlStore) -> int:
    with store.engine.connect() as c:
        return int(c.execute(text("SELECT count(*) FROM profiles")).scalar_one())


def test_profiles_last_writer_by_as_of_wins(store: SqlStore) -> None:
    """A profile replaces its customer's when as of the same time or later; an older one is
    stale and counted; within a batch, in order, as if put one at a time."""
    now = 1000.0
    assert store.put_profiles([profile("c1", 10.0, "prepaid", 5.0), profile("c2", 10.0)], now) == ProfilesPut(stored=2, stale=0)
    assert store.put_profiles([profile("c1", 9.0, "postpaid")], now) == ProfilesPut(stored=0, stale=1)
    got = store.get_profiles(["c1", "c2", "nobody"], now)
    assert set(got) == {"c1", "c2"}
    assert got["c1"] == Profile("c1", (("customer", "plan", "prepaid"), ("customer", "arpu", 5.0)), 10.0, None)
    # the same as_of: the new write wins
    assert store.put_profiles([profile("c1", 10.0, "hybrid", 7.25)], now) == ProfilesPut(stored=1, stale=0)
    assert store.get_profiles(["c1"], now)["c1"].features == (("customer", "plan", "hybrid"), ("customer", "arpu", 7.25))
    # a customer named several times in one batch: each against the stored one and those before it
    batch = [
        profile("c1", 11.0, "a"),  # stored (after 10)
        profile("c1", 10.5, "b"),  # stale: 11 came before it
        profile("c1", 12.0, "c"),  # stored
        profile("c1", 12.0, "d"),  # stored: the same as_of, later in the batch
        profile("c2", 5.0, "e"),  # stale: 10 is stored
        profile("c2", 20.0, "f"),  # stored
        profile("c3", 1.0, "g"),  # new
    ]
    assert store.put_profiles(batch, now) == ProfilesPut(stored=5, stale=2)
    got = store.get_profiles(["c1", "c2", "c3"], now)
    assert {k: (v.features[0][2], v.as_of) for k, v in got.items()} == {"c1": ("d", 12.0), "c2": ("f", 20.0), "c3": ("g", 1.0)}
    # big batches (PostgreSQL: COPY) count the same, duplicates included
    assert store.put_profiles(many(300, 50.0, "x"), now) == ProfilesPut(stored=300, stale=0)
    older = many(300, 49.0, "y")
    newer = many(100, 51.0, "z")
    assert store.put_profiles([*older, *newer, profile("c00007", 48.0)], now) == ProfilesPut(stored=100, stale=301)
    got = store.get_profiles([p.customer_id for p in older], now)
    assert len(got) == 300
    assert [got[f"c{i:05d}"].features[0][2] for i in (0, 99, 100, 299)] == ["z", "z", "x", "x"]
    assert got["c00150"] == Profile("c00150", (("customer", "plan", "x"), ("customer", "arpu", 150.0)), 50.0, None)
    # a batch naming every customer twice on the COPY path: the second writes
    twice = [*many(200, 60.0, "p"), *many(200, 60.0, "q")]
    assert store.put_profiles(twice, now) == ProfilesPut(stored=400, stale=0)
    assert {p.features[0][2] for p in store.get_profiles([f"c{i:05d}" for i in range(200)], now).values()} == {"q"}
    assert count(store) == 303


def test_a_profile_batch_is_all_or_nothing(store: SqlStore) -> None:
    """A batch whose last row the database refuses writes nothing, on both paths, and the
    store goes on working; the error is Unavailable whose cause says "refused"."""
    now = 1000.0
    store.put_profiles([profile("kept", 1.0, "old")], now)
    if store._postgres:
        bad_id = "bad\x00id"  # PostgreSQL refuses a NUL byte in a text
    else:
        with store.engine.begin() as c:  # SQLite keeps NUL bytes: a trigger refuses instead
            c.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON profiles WHEN NEW.customer_id = 'bad' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        bad_id = "bad"
    for batch in ([profile("kept", 2.0, "new"), profile("n1", 1.0), profile(bad_id, 1.0)], [*many(500, 1.0), profile(bad_id, 1.0)]):
        with pytest.raises(Unavailable) as e:
            store.put_profiles(batch, now)
        assert is_refusal(e.value)
        assert count(store) == 1
        assert store.get_profiles(["kept"], now)["kept"].features[0][2] == "old"
    # a text no database can store (a lone surrogate) is refused too
    with pytest.raises(Unavailable) as e:
        store.put_profiles([*many(100, 1.0), profile("s\ud800", 1.0)], now)
    assert is_refusal(e.value)
    assert count(store) == 1
    # the connections are usable afterwards
    assert store.put_profiles(many(100, 1.0), now) == ProfilesPut(stored=100, stale=0)
    assert count(store) == 101


def test_expired_profiles_are_not_read_and_are_swept(store: SqlStore) -> None:
    now = 1000.0
    store.put_profiles(
        [
            profile("gone", 1.0, expires_at=now - 1),
            profile("edge", 1.0, expires_at=now),  # expired at now exactly
            profile("soon", 1.0, expires_at=now + 60),
            profile("kept", 1.0),
        ],
        now - 100,
    )
    assert set(store.get_profiles(["gone", "edge", "soon", "kept"], now)) == {"soon", "kept"}
    assert set(store.get_profiles(["gone", "edge", "soon", "kept"], now - 10)) == {"gone", "edge", "soon", "kept"}
    assert store.get_profiles(["soon"], now)["soon"].expires_at == now + 60
    # many ids in one call
    store.put_profiles(many(1500, 1.0), now)
    assert len(store.get_profiles([f"c{i:05d}" for i in range(1500)] + ["gone", "soon"], now)) == 1501
    assert store.sweep_profiles(now, 1) == 1
    assert store.sweep_profiles(now, 10) == 1
    assert store.sweep_profiles(now, 10) == 0
    assert count(store) == 1502
    assert store.sweep_profiles(now + 60, 10) == 1
    assert set(store.get_profiles(["gone", "edge", "soon", "kept"], 0.0)) == {"kept"}
    # a newer profile without expiry replaces an expiring one
    store.put_profiles([profile("x", 1.0, expires_at=now - 1)], now)
    store.put_profiles([profile("x", 2.0)], now)
    assert store.get_profiles(["x"], now)["x"].expires_at is None


def test_profiles_can_be_deleted(store: SqlStore) -> None:
    now = 1000.0
    store.put_profiles([profile("a", 1.0), profile("b", 1.0), profile("c", 1.0)], now)
    assert store.delete_profiles(["a", "b", "nobody", "a"]) == 2
    assert store.delete_profiles(["a"]) == 0
    assert store.delete_profiles([]) == 0
    assert set(store.get_profiles(["a", "b", "c"], now)) == {"c"}
    # a deleted customer can be written again, whatever as_of
    assert store.put_profiles([profile("a", 0.5)], now) == ProfilesPut(stored=1, stale=0)


def _decision(event_id: str, customer_id: str, slot: int = 0) -> LoggedDecision:
    return LoggedDecision(
        event_id=event_id,
        placement="app_home_banner",
        customer_id=customer_id,
        timestamp=100.0,
        features=(feature("customer", "plan", "prepaid"), feature("customer", "arpu", 12.5)),
        arms=(("data_5gb", 1), ("voice_300", 1)),
        pmf=(0.75, 0.25),
        chosen=0,
        probability=0.75,
        model_version=3,
        deadline=700.0,
        outcome=Outcome.OPEN,
        slot=slot,
        context=DecisionContext(90.0, ("customer.plan",), ((feature("history", "impressions_7d", 2.0),), ())),
    )


def test_a_customer_can_be_erased(store: SqlStore) -> None:
    """The profile and contact history go; the decisions stay with their arms, probabilities
    and rewards, without customer id, features or context. Other customers are untouched."""
    now = 1000.0
    store.put_profiles([profile("c1", 1.0), profile("c2", 1.0)], now)
    store.write([_decision("e1", "c1"), _decision("e1", "c1", slot=1), _decision("e2", "c2"), _decision("e3", "")], [])
    store.write([], [Close("e1", Outcome.REWARD, 1.0, 200.0)])
    store.contacts_insert(
        [
            ContactRow("c1", 100.0, "app_home_banner", "data_5gb", "e1"),
            ContactRow("c1", 100.0, "app_home_banner", "data_5gb", "e1", 1),
            ContactRow("c2", 100.0, "app_home_banner", "data_5gb", "e2"),
        ]
    )
    from nextbest.bandit.attribution import Conversion

    bought = [Conversion("b1", "c1", "data_5gb", "", 9.5, 150.0), Conversion("b2", "c2", "data_5gb", "", 9.5, 150.0)]
    store.record_conversions([(c, ()) for c in bought], now)
    before = store.find_decision("e1")
    assert before is not None
    assert store.erase_customer("c1") == Erased(profiles=1, decisions=2, contacts=2, conversions=1)
    with store.engine.connect() as conn:
        kept = conn.execute(text("SELECT conversion_id, customer_id, value FROM conversions ORDER BY conversion_id")).all()
    assert [tuple(r) for r in kept] == [("b1", "", 9.5), ("b2", "c2", 9.5)]
    after = store.find_decision("e1")
    assert after is not None
    assert after == dataclasses.replace(before, customer_id="", features=(), context=None)
    assert after.outcome == Outcome.REWARD and after.reward == 1.0 and after.pmf == (0.75, 0.25) and after.arm_id == "data_5gb"
    slot1 = store.find_decision("e1", 1)
    assert slot1 is not None and slot1.customer_id == "" and slot1.features == () and slot1.context is None
    assert store.get_profiles(["c1", "c2"], now).keys() == {"c2"}
    assert [i.customer_id for i in store.recent_impressions(0.0)] == ["c2"]
    handle, left = store.contacts_open("c1", 0.0)
    store.contacts_abort(handle)
    assert left == []
    handle, others = store.contacts_open("c2", 0.0)
    store.contacts_abort(handle)
    assert [i.event_id for i in others] == ["e2"]
    other = store.find_decision("e2")
    assert other is not None and other.customer_id == "c2" and other.features == _decision("e2", "c2").features
    assert other.context is not None and other.context.profile_as_of == 90.0
    # again: nothing left; an empty id erases no one (the decisions of unknown customers stay)
    assert store.erase_customer("c1") == Erased()
    assert store.erase_customer("") == Erased()
    anonymous = store.find_decision("e3")
    assert anonymous is not None and anonymous.features == _decision("e3", "").features


def test_a_first_load_racing_another_put_counts_exactly(store: SqlStore) -> None:
    """PostgreSQL: a batch none of whose customers is stored goes in by a plain INSERT; a put of
    one of them by another transaction, committed after the check, sends the batch back to the
    upsert, which decides on the row as committed (test_profiles_last_writer_by_as_of_wins' rule)."""
    if not store._postgres:
        pytest.skip("the plain-INSERT path is PostgreSQL's")
    import threading

    now = 1000.0
    other = store.engine.connect()
    tx = other.begin()
    other.execute(
        text("INSERT INTO profiles (customer_id, features, as_of, expires_at, updated_at) VALUES ('c00003', '[]', 70.0, NULL, 0)")
    )
    other.execute(
        text("INSERT INTO profiles (customer_id, features, as_of, expires_at, updated_at) VALUES ('c00004', '[]', 30.0, NULL, 0)")
    )
    result: list[object] = []

    def put() -> None:
        try:
            result.append(store.put_profiles(many(100, 50.0, "new"), now))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=put)
    t.start()
    waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO profiles%'")
    while t.is_alive():  # until the put waits on the uncommitted rows' lock: its check saw none
        with store.engine.connect() as watch:  # a new transaction each time: a fresh pg_stat_activity
            if watch.execute(waiting).scalar_one():
                break
        t.join(0.01)
    tx.commit()
    other.close()
    t.join()
    assert result == [ProfilesPut(stored=99, stale=1)]
    got = store.get_profiles(["c00003", "c00004", "c00005"], now)
    assert {k: (v.as_of, v.features) for k, v in got.items()} == {
        "c00003": (70.0, ()),
        "c00004": (50.0, (("customer", "plan", "new"), ("customer", "arpu", 4.0))),
        "c00005": (50.0, (("customer", "plan", "new"), ("customer", "arpu", 5.0))),
    }
    assert count(store) == 100


def _table(profiles: list[Profile]) -> object:
    import orjson
    import pyarrow as pa

    return pa.table(
        {
            "customer_id": pa.array([p.customer_id for p in profiles], pa.string()),
            "features": pa.array([orjson.dumps(p.features).decode() for p in profiles], pa.string()),
            "as_of": pa.array([p.as_of for p in profiles], pa.float64()),
            "expires_at": pa.array([p.expires_at for p in profiles], pa.float64()),
        }
    )


def test_a_profile_table_is_put_as_its_profiles(store: SqlStore) -> None:
    """put_profile_table: the counts and rows of put_profiles with the same profiles, big
    batches (PostgreSQL: CSV into COPY) and small, customers named twice, all or nothing."""
    now = 1000.0
    odd = profile('o\td\\d\r\n"', 5.0, 'a "quoted",\ttab\nline \\ back', -0.5, expires_at=2000.0)
    assert store.put_profile_table(_table([*many(300, 50.0, "x"), odd]), now) == ProfilesPut(stored=301, stale=0)
    assert store.get_profiles([odd.customer_id], now)[odd.customer_id] == odd
    assert store.get_profiles(["c00150"], now)["c00150"] == Profile(
        "c00150", (("customer", "plan", "x"), ("customer", "arpu", 150.0)), 50.0
    )
    older, newer = many(300, 49.0, "y"), many(100, 51.0, "z")
    assert store.put_profile_table(_table([*older, *newer, profile("c00007", 48.0)]), now) == ProfilesPut(stored=100, stale=301)
    got = store.get_profiles([p.customer_id for p in older], now)
    assert [got[f"c{i:05d}"].features[0][2] for i in (0, 99, 100, 299)] == ["z", "z", "x", "x"]
    assert store.put_profile_table(_table([profile("c00001", 60.0, "s"), profile("new", 1.0)]), now) == ProfilesPut(stored=2, stale=0)
    assert store.get_profiles(["c00001"], now)["c00001"].features[0][2] == "s"
    assert store.put_profile_table(_table([]), now) == ProfilesPut()
    assert count(store) == 302
    if store._postgres:  # a row PostgreSQL refuses (a NUL byte) leaves nothing of its batch
        with pytest.raises(Unavailable) as e:
            store.put_profile_table(_table([*many(200, 70.0, "w"), profile("bad\x00id", 70.0)]), now)
        assert is_refusal(e.value)
        assert store.get_profiles(["c00000"], now)["c00000"].features[0][2] == "z"
        assert count(store) == 302
