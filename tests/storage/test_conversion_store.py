"""The conversion store's contract (issue #31; Store.touches_of ... unattributed_by_product in
storage/base.py), on SQLite and the PostgreSQL at 127.0.0.1:5432 (database test)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event, text

from nextbest.bandit.attribution import Conversion, Credit, Touch
from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.errors import Unavailable
from nextbest.bandit.features import feature
from nextbest.storage.base import Activation, TouchRange, VariantConversions
from nextbest.storage.refusal import is_refusal
from nextbest.storage.sql import SqlStore, open_store

ARMS = (("data_5gb", 1), ("voice_300", 1), ("combo", 1))


def decision(
    event_id: str,
    customer_id: str,
    at: float,
    arm: int | None = 0,
    placement: str = "app",
    slot: int = 0,
    activated: bool = True,
    variant: str = "",
) -> LoggedDecision:
    return LoggedDecision(
        event_id=event_id,
        placement=placement,
        customer_id=customer_id,
        timestamp=at,
        features=(feature("customer", "plan", "prepaid"),),
        arms=ARMS,
        pmf=(0.5, 0.25, 0.25),
        chosen=arm,
        probability=0.5 if arm is not None else 1.0,
        model_version=1,
        deadline=at + 600,
        outcome=Outcome.OPEN,
        slot=slot,
        activated=activated,
        variant=variant,
    )


def conv(cid: str, customer: str = "c1", value: float = 10.0, at: float = 1000.0, product: str = "SKU-1", arm: str = "") -> Conversion:
    return Conversion(cid, customer, arm, "" if arm else product, value, at)


def touches(store: SqlStore, customer_id: str, arms: list[str], since: float, until: float) -> list[Touch]:
    """The touches of one range."""
    return store.touches_of([TouchRange(customer_id, frozenset(arms), since, until)])[0]


@contextmanager
def statements(store: SqlStore) -> Iterator[list[str]]:
    """The statements the store sends while the block runs (those that read decisions)."""
    seen: list[str] = []

    def on_execute(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "decisions d" in statement:
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", on_execute)


def count(store: SqlStore, table: str) -> int:
    with store.engine.connect() as c:
        return int(c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_touches_are_activated_impressions_in_range(store: SqlStore) -> None:
    store.write(
        [
            decision("e1", "c1", 100.0),  # data_5gb
            decision("e2", "c1", 200.0, arm=1, placement="ussd"),  # voice_300
            decision("e3", "c1", 300.0, activated=False),  # deferred, never shown
            decision("e4", "c1", 400.0, arm=None),  # no offer
            decision("e5", "c2", 150.0),  # another customer
            decision("e6", "c1", 500.0),  # at `until`: left out
            decision("e7", "c1", 99.0),  # before `since`
            decision("e8", "c1", 250.0, arm=2, slot=0),
            decision("e8", "c1", 250.0, arm=0, slot=1),
        ],
        [],
    )
    got = touches(store, "c1", ["data_5gb", "voice_300"], 100.0, 500.0)
    assert got == [
        Touch("e1", 0, "app", "data_5gb", 100.0),
        Touch("e2", 0, "ussd", "voice_300", 200.0),
        Touch("e8", 1, "app", "data_5gb", 250.0),
    ]
    assert touches(store, "c1", ["combo"], 0.0, 1000.0) == [Touch("e8", 0, "app", "combo", 250.0)]
    assert touches(store, "c1", [], 0.0, 1000.0) == []
    assert touches(store, "", ["data_5gb"], 0.0, 1000.0) == []
    assert touches(store, "nobody", ["data_5gb"], 0.0, 1000.0) == []
    assert touches(store, "c1", ["data_5gb"], 500.0, 500.0) == []
    assert store.touches_of([]) == []
    # an activated deferred decision is a touch once activated
    store.write([], [], [Activation("e3", 320.0, 920.0, placement="app")])
    assert [t.event_id for t in touches(store, "c1", ["data_5gb"], 0.0, 1000.0)] == ["e7", "e1", "e8", "e3", "e6"]


def test_touches_of_a_batch_are_read_together(store: SqlStore) -> None:
    """Each range gets its own touches, as if read alone, while the batch is read in one
    statement per 500 distinct (customer, arm) pairs: a customer named by many ranges is read once."""
    store.write(
        [
            decision("e1", "c1", 100.0),  # data_5gb
            decision("e2", "c1", 200.0, arm=1, placement="ussd"),  # voice_300
            decision("e3", "c2", 150.0),
            decision("e4", "c2", 300.0, activated=False),
            decision("e5", "c1", 400.0),
        ],
        [],
    )
    ranges = [
        TouchRange("c1", frozenset({"data_5gb"}), 100.0, 400.0),
        TouchRange("c2", frozenset({"data_5gb", "voice_300"}), 0.0, 1000.0),
        TouchRange("c1", frozenset({"data_5gb", "voice_300"}), 150.0, 1000.0),
        TouchRange("c1", frozenset({"data_5gb"}), 100.0, 400.0),  # twice: the same answer twice
        TouchRange("c3", frozenset({"data_5gb"}), 0.0, 1000.0),
        TouchRange("c1", frozenset({"data_5gb"}), 0.0, 100.0),  # e1 at `until`: left out
    ]
    want = [
        [Touch("e1", 0, "app", "data_5gb", 100.0)],
        [Touch("e3", 0, "app", "data_5gb", 150.0)],
        [Touch("e2", 0, "ussd", "voice_300", 200.0), Touch("e5", 0, "app", "data_5gb", 400.0)],
        [Touch("e1", 0, "app", "data_5gb", 100.0)],
        [],
        [],
    ]
    with statements(store) as seen:
        assert store.touches_of(ranges) == want
    assert len(seen) == 1
    # 501 distinct pairs: two statements; the same answers as one range at a time
    many = ranges + [TouchRange(f"x{i}", frozenset({"combo"}), 0.0, 1000.0) for i in range(501 - 5)]
    with statements(store) as seen:
        got = store.touches_of(many)
    assert len(seen) == 2
    assert got[: len(ranges)] == want and got[len(ranges) :] == [[]] * (len(many) - len(ranges))
    assert got == [store.touches_of([r])[0] for r in many]


def test_recording_conversions_twice_stores_them_once(store: SqlStore) -> None:
    store.write([decision("e1", "c1", 100.0), decision("e2", "c1", 200.0, placement="ussd")], [])
    credits = [Credit("e1", 0, "app", "data_5gb", 0.5, 5.0), Credit("e2", 0, "ussd", "data_5gb", 0.5, 5.0)]
    batch = [
        (conv("k1"), credits),
        (conv("k2", arm="data_5gb", value=3.0), [Credit("e2", 0, "ussd", "data_5gb", 1.0, 3.0)]),
        (conv("k3", value=7.0), []),  # unattributed
        (conv("k1", value=99.0), [Credit("e1", 0, "app", "data_5gb", 1.0, 99.0)]),  # a twin in the batch
    ]
    assert store.record_conversions(batch, now=2000.0) == [True, True, True, False]
    assert store.record_conversions(batch, now=3000.0) == [False, False, False, False]
    assert count(store, "conversions") == 3 and count(store, "conversion_credits") == 3
    with store.engine.connect() as c:
        rows = c.execute(text("SELECT conversion_id, value, received_at, credited FROM conversions ORDER BY conversion_id")).all()
    assert [tuple(r) for r in rows] == [("k1", 10.0, 2000.0, 2), ("k2", 3.0, 2000.0, 1), ("k3", 7.0, 2000.0, 0)]
    got = store.credits_of_conversions(["k1", "k2", "k3", "unknown", "k1"])
    assert got == {"k1": credits, "k2": [Credit("e2", 0, "ussd", "data_5gb", 1.0, 3.0)], "k3": []}
    assert store.credits_of_conversions([]) == {}
    assert store.record_conversions([], now=1.0) == []


def test_credits_of_a_decision(store: SqlStore) -> None:
    store.write([decision("e1", "c1", 100.0), decision("e1", "c1", 100.0, arm=1, slot=1)], [])
    store.record_conversions(
        [
            (conv("k2", at=900.0), [Credit("e1", 0, "app", "data_5gb", 1.0, 10.0)]),
            (
                conv("k1", at=500.0, value=4.0),
                [Credit("e1", 0, "app", "data_5gb", 0.25, 1.0), Credit("e1", 1, "app", "voice_300", 0.75, 3.0)],
            ),
        ],
        now=1000.0,
    )
    assert store.credits_of_decision("e1", 0) == [
        ("k1", Credit("e1", 0, "app", "data_5gb", 0.25, 1.0), 500.0),
        ("k2", Credit("e1", 0, "app", "data_5gb", 1.0, 10.0), 900.0),
    ]
    assert store.credits_of_decision("e1", 1) == [("k1", Credit("e1", 1, "app", "voice_300", 0.75, 3.0), 500.0)]
    assert store.credits_of_decision("e9", 0) == []


def test_servers_racing_on_one_conversion_store_it_once(store: SqlStore) -> None:
    """Two stores on one database record the same ids at once (each in its own batches, in
    opposite orders): every id is stored by exactly one, with its credits once."""
    store.write([decision("e1", "c1", 100.0)], [])
    other = open_store(store.url)
    try:
        ids = [f"k{i:03d}" for i in range(60)]
        results: dict[str, list[bool]] = {}
        barrier = threading.Barrier(2)

        def run(name: str, s: SqlStore, order: list[str]) -> None:
            barrier.wait()
            out: list[bool] = []
            for i in range(0, len(order), 5):
                chunk = order[i : i + 5]
                out += s.record_conversions([(conv(k), [Credit("e1", 0, "app", "data_5gb", 1.0, 10.0)]) for k in chunk], now=2000.0)
            results[name] = [k for k, ok in zip(order, out, strict=True) if ok]  # type: ignore[misc]

        threads = [
            threading.Thread(target=run, args=("a", store, ids)),
            threading.Thread(target=run, args=("b", other, ids[::-1])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = sorted([*results["a"], *results["b"]])  # type: ignore[list-item]
        assert won == ids
        assert count(store, "conversions") == 60 and count(store, "conversion_credits") == 60
    finally:
        other.close()


def test_a_refused_conversion_writes_nothing(store: SqlStore) -> None:
    store.write([decision("e1", "c1", 100.0)], [])
    store.record_conversions([(conv("kept"), [])], now=1.0)
    if store._postgres:
        bad = conv("bad\x00id")  # PostgreSQL refuses a NUL byte in a text
    else:
        with store.engine.begin() as c:  # SQLite keeps NUL bytes: a trigger refuses instead
            trigger = "CREATE TRIGGER refuse BEFORE INSERT ON conversions WHEN NEW.conversion_id = 'bad' "
            c.execute(text(trigger + "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        bad = conv("bad")
    for batch in (
        [(conv("n1"), [Credit("e1", 0, "app", "data_5gb", 1.0, 10.0)]), (bad, [])],
        [(conv(f"m{i}"), []) for i in range(700)] + [(bad, [])],  # two INSERT chunks
        [(conv("n2"), []), (conv("s\ud800"), [])],  # a lone surrogate no driver can send
    ):
        with pytest.raises(Unavailable) as e:
            store.record_conversions(batch, now=2.0)
        assert is_refusal(e.value)
        assert count(store, "conversions") == 1 and count(store, "conversion_credits") == 0
    # a credit refused (its decision twice in one conversion) takes its conversion with it
    with pytest.raises(Unavailable):
        store.record_conversions([(conv("n3"), [Credit("e1", 0, "app", "data_5gb", 0.5, 5.0)] * 2)], now=2.0)
    assert count(store, "conversions") == 1
    assert store.record_conversions([(conv("n1"), [])], now=3.0) == [True]  # the store goes on working


def test_conversion_tally_per_variant_with_a_holdout(store: SqlStore) -> None:
    """Every conversion of a decided customer counts from their first decision there on, within
    the period, attributed or not, whatever it names; customers without one count with 0."""
    store.write(
        [
            decision("a1", "c1", 100.0, variant="v1"),
            decision("a2", "c1", 300.0, variant="v1"),  # c1 again: one customer, first at 100
            decision("a3", "c2", 200.0, variant="v1"),
            decision("a4", "c3", 150.0, variant="v1"),  # never converts
            decision("h1", "h1", 100.0, arm=1, variant="holdout"),
            decision("h2", "h2", 400.0, variant="holdout"),
            decision("h3", "", 100.0, variant="holdout"),  # an unknown customer: not counted
            decision("x1", "c9", 100.0, variant="v1", placement="ussd"),  # another placement
            decision("late", "c4", 1000.0, variant="v1"),  # after the period
        ],
        [],
    )
    store.record_conversions(
        [
            (conv("k1", "c1", 10.0, 120.0), [Credit("a1", 0, "app", "data_5gb", 1.0, 10.0)]),
            (conv("k2", "c1", 5.0, 500.0, product="OTHER"), []),  # unattributed, another product: counts
            (conv("k3", "c2", 4.0, 150.0), []),  # before c2's first decision (200): not counted
            (conv("k4", "c2", 6.0, 900.0), []),  # at the period's end (until = 900): not counted
            (conv("k5", "h1", 3.0, 100.0, arm="voice_300"), []),  # at the first decision's instant: counts
            (conv("k6", "h1", 2.0, 800.0), []),
            (conv("k7", "h2", 8.0, 399.0), []),  # before h2's first decision
            (conv("k8", "c9", 1.0, 200.0), []),
        ],
        now=1000.0,
    )
    got = store.conversion_tally("app", 100.0, 900.0)
    assert got == [
        VariantConversions("holdout", customers=2, converting=1, value_sum=5.0, value_sq_sum=25.0),
        VariantConversions("v1", customers=3, converting=1, value_sum=15.0, value_sq_sum=225.0),
    ]
    assert store.conversion_tally("app", 2000.0, 3000.0) == []
    assert store.conversion_tally("nowhere", 0.0, 1e9) == []
    assert store.unattributed_by_product(0.0, 1000.0) == {"SKU-1": (5, 21.0), "OTHER": (1, 5.0), "voice_300": (1, 3.0)}
    assert store.unattributed_by_product(0.0, 200.0) == {"SKU-1": (1, 4.0), "voice_300": (1, 3.0)}
    v = got[1]
    mean = v.value_sum / v.customers
    assert math.isclose(v.value_sq_sum / v.customers - mean**2, 50.0)  # variance of (15, 0, 0)
