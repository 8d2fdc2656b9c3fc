"""One contract for every store: SQLite and the PostgreSQL at 127.0.0.1:5432 (database test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextbest.bandit.decision_log import Explanation, LoggedDecision, Outcome
from nextbest.bandit.features import feature
from nextbest.config.plans import plan
from nextbest.storage.base import Activation, Close, Recorded, RewardEvent, Snapshot
from nextbest.storage.sql import SqlStore, open_store
from tests import envs
from tests.harness import postgres_available

_PG = postgres_available()


def decision(event_id: str, chosen: int | None = 0, t: float = 100.0) -> LoggedDecision:
    return LoggedDecision(
        event_id=event_id,
        placement="app_home_banner",
        customer_id="c1",
        timestamp=t,
        features=(feature("customer", "segment", "youth"), feature("", "arpu", 12.5)),
        arms=(("data_5gb", 1), ("voice_300", 1)),
        pmf=(0.75, 0.25),
        chosen=chosen,
        probability=0.75 if chosen == 0 else (0.25 if chosen == 1 else 0.0),
        model_version=3,
        deadline=t + 600,
        outcome=Outcome.OPEN if chosen is not None else Outcome.NO_ARM,
    )


def test_explanations_and_reasons_round_trip(store: SqlStore) -> None:
    """What Explain reads: the explanation exactly (floats bit for bit), parts that were zero
    for every arm left out, and the reason of a decision that served no arm."""
    import dataclasses

    e = Explanation("squarecb", 31.622776601683793, 2.5, (0.1 + 0.2, -1e-300), (0.3, 0.0), (), (1 / 3, 0.0))
    scored = dataclasses.replace(decision("x1"), explanation=e, ineligible=(("roam", "rule: customer.roaming_barred missing"),))
    paced = dataclasses.replace(decision("x2", None), reason="paced: no offer", explanation=Explanation("softmax", 10.0, 1.0, (0.5, 0.25)))
    closed = dataclasses.replace(decision("x3", None), pmf=(), arms=(), reason="placement paused")
    store.write([scored, paced, closed, decision("x4")], [])
    assert store.find_decision("x1") == scored
    assert store.find_decision("x2") == paced
    assert store.find_decision("x3") == closed
    assert store.find_decision("x4").explanation is None and store.find_decision("x4").reason == ""
    assert e.values() == (((0.1 + 0.2) + 0.3) - 1 / 3, -1e-300)


def test_placements_round_trip(store: SqlStore) -> None:
    p = plan({}, [envs.placement()], 1)
    store.save_placements(p.records, p.new_arm_versions)
    [rec] = store.load_placements()
    assert rec.spec == envs.placement()
    assert rec.arm_versions == {a: 1 for a in envs.ARMS}
    assert store.arm_features()[("app_home_banner", "data_5gb", 1)] == {"category": "data"}
    changed = envs.placement(arms=[{"id": "data_5gb", "features": {"category": "data", "price": 4.99}}])
    p2 = plan({rec.spec.id: rec}, [changed], 1)
    store.save_placements(p2.records, p2.new_arm_versions)
    [rec2] = store.load_placements()
    assert rec2.arm_versions["data_5gb"] == 2
    assert [a.id for a in rec2.spec.arms if a.active] == ["data_5gb"]
    assert len(rec2.spec.arms) == len(envs.ARMS)  # retired arms keep their history


def test_decisions_closes_and_learn_order(store: SqlStore) -> None:
    r = store.write([decision("e1"), decision("e2", 1), decision("e3", None)], [])
    assert list(r.closed) == []
    got = store.find_decision("e2")
    assert got == decision("e2", 1)
    assert store.find_decision("nope") is None
    everything = 1e18  # a cutoff past every deadline: expired_open lists every open window
    assert sorted((d.event_id, d.placement, d.deadline) for d in store.expired_open(everything, 10)) == [
        ("e1", "app_home_banner", 700.0),
        ("e2", "app_home_banner", 700.0),
    ]  # e3 served no arm: no window
    assert store.expired_open(700.0, 10) == []  # a window is expired only once its deadline is before the cutoff
    assert len(store.expired_open(everything, 1)) == 1  # at most limit
    r = store.write(
        [], [Close("e2", Outcome.REWARD, 1.5, 101.0), Close("e1", Outcome.DEFAULT, 0.0, 701.0), Close("e2", Outcome.REWARD, 9.0, 102.0)]
    )
    assert list(r.closed) == [True, True, False]  # a window closes once
    assert [(store.find_decision(e).outcome, store.find_decision(e).reward) for e in ("e2", "e1")] == [
        (Outcome.REWARD, 1.5),  # the first close of the batch is the one
        (Outcome.DEFAULT, 0.0),
    ]
    assert store.learn_rows("app_home_banner", None, 0, 10) == []  # not learnable before the learner claims it
    assert store.claim("app_home_banner", 10) == 2
    assert store.claim("app_home_banner", 10) == 0  # claimed once
    rows = store.learn_rows("app_home_banner", None, 0, 10)
    s1, s2 = (x.learn_seq for x in rows)
    assert s1 > 0 and s2 == s1 + 1
    assert [(x.event_id, x.slot, x.reward, x.chosen, x.probability) for x in rows] == [
        ("e2", 0, 1.5, 1, 0.25),  # in the order the windows closed
        ("e1", 0, 0.0, 0, 0.75),
    ]
    assert all(x.arms == decision("e1").arms and x.features() == decision("e1").features for x in rows)
    assert [x.event_id for x in store.learn_rows("app_home_banner", "", s1, 10)] == ["e1"]
    assert len(store.learn_rows("app_home_banner", None, 0, 1)) == 1  # at most limit
    assert store.learn_rows("app_home_banner", "B", 0, 10) == []
    assert store.learn_rows("other", None, 0, 10) == []
    assert store.expired_open(everything, 10) == []  # no window open any more
    assert store.max_learn_seq() == s2


def test_learn_rows_of_several_placements_in_one_order(store: SqlStore) -> None:
    """A model group's learner reads its placements' rows together: one learn order across
    them, each row naming its placement, other placements' rows left out."""
    import dataclasses

    def at(event_id: str, placement: str) -> LoggedDecision:
        return dataclasses.replace(decision(event_id), placement=placement)

    store.write([at("a1", "app"), at("u1", "ussd"), at("a2", "app"), at("w1", "web")], [])
    closes = [
        Close(e, Outcome.REWARD, 1.0, 101.0 + i, placement=p)
        for i, (e, p) in enumerate([("u1", "ussd"), ("a1", "app"), ("w1", "web"), ("a2", "app")])
    ]
    assert list(store.write([], closes).closed) == [True] * 4
    for p in ("app", "ussd", "web"):
        store.claim(p, 10)
    rows = store.learn_rows(["app", "ussd"], None, 0, 10)
    assert [(r.event_id, r.placement) for r in rows] == [("a1", "app"), ("a2", "app"), ("u1", "ussd")]  # claimed app first
    assert [r.learn_seq for r in rows] == sorted(r.learn_seq for r in rows)
    assert [r.event_id for r in store.learn_rows(["app", "ussd"], None, rows[0].learn_seq, 1)] == ["a2"]  # after, at most limit
    assert [r.placement for r in store.learn_rows("web", None, 0, 10)] == ["web"]
    assert store.learn_rows(["app", "ussd"], "B", 0, 10) == []


def test_learned_count_counts_a_placements_learn_positions(store: SqlStore) -> None:
    import dataclasses

    store.write(
        [dataclasses.replace(decision(e), placement=p) for e, p in (("a1", "app"), ("u1", "ussd"), ("a2", "app"), ("a3", "app"))], []
    )
    store.write([], [Close(e, Outcome.REWARD, 1.0, 101.0, placement=p) for e, p in (("a1", "app"), ("u1", "ussd"), ("a2", "app"))])
    store.claim("ussd", 10)
    store.claim("app", 10)
    top = store.max_learn_seq()
    assert store.learned_count("app", 0, top) == 2  # a3 is open: no learn position
    assert store.learned_count("app", 0, top - 1) == 1
    assert store.learned_count("app", top - 1, top) == 1
    assert store.learned_count("ussd", 0, top) == 1
    assert store.learned_count("web", 0, top) == 0


def test_reused_event_id_does_not_fail_the_batch(store: SqlStore) -> None:
    store.write([decision("e1")], [])
    store.write([decision("e1", 1), decision("e9")], [])
    assert store.find_decision("e1").chosen == 0
    assert store.find_decision("e9") is not None


def test_snapshots_and_late_rewards_and_tally(store: SqlStore) -> None:
    assert store.load_snapshots("app_home_banner") == {}
    key = ("--cb_type dr", True, 18)
    store.save_snapshot(Snapshot("app_home_banner", "", key, 10, 12, b"model-1"))
    store.save_snapshot(Snapshot("app_home_banner", "", key, 20, 30, b"\x00model-2"))
    store.save_snapshot(Snapshot("app_home_banner", "A", ("", False, 16), 5, 31, b"a"))
    snaps = store.load_snapshots("app_home_banner")
    assert snaps[""] == Snapshot("app_home_banner", "", key, 20, 30, b"\x00model-2")
    assert snaps["A"].key == ("", False, 16)
    store.write([decision("e1"), decision("e2"), decision("e3", 1), decision("e4", None)], [])
    store.write([], [Close("e1", Outcome.REWARD, 2.0, 1.0), Close("e2", Outcome.DEFAULT, 0.0, 1.0)])
    store.write([], [], events=[RewardEvent("e2", 0, 5.0, 2.0, "late")])
    tallies, total, no_arm = store.tally("app_home_banner")
    assert no_arm == 1
    by = {t.arm_id: t for t in tallies}
    assert total == 4
    assert (by["data_5gb"].impressions, by["data_5gb"].rewards, by["data_5gb"].reward_sum) == (2, 1, 2.0)
    assert (by["data_5gb"].default_rewards, by["data_5gb"].late_rewards) == (1, 1)
    assert (by["voice_300"].impressions, by["voice_300"].pending) == (1, 1)


def test_postgres_is_really_tested_where_it_runs() -> None:
    """Guards against the PostgreSQL half of the contract silently skipping on CI machines."""
    import os

    if os.environ.get("CI") and not _PG:
        pytest.fail("CI has no PostgreSQL at 127.0.0.1:5432: the storage contract would run on SQLite only")


def test_variants_are_logged_and_tallied(store: SqlStore) -> None:
    from dataclasses import replace

    store.write(
        [replace(decision("e1"), variant="A"), replace(decision("e2"), variant="holdout"), replace(decision("e3"), variant="A")], []
    )
    store.write([], [Close("e1", Outcome.REWARD, 2.0, 1.0), Close("e2", Outcome.DEFAULT, 0.0, 1.0)])
    store.claim("app_home_banner", 10)
    assert store.find_decision("e1").variant == "A"
    by = {v.variant: v for v in store.tally_variants("app_home_banner")}
    assert (by["A"].decisions, by["A"].rewards, by["A"].reward_sum, by["A"].closed) == (2, 1, 2.0, 1)
    assert (by["holdout"].decisions, by["holdout"].rewards, by["holdout"].closed) == (1, 0, 1)
    assert [r.event_id for r in store.learn_rows("app_home_banner", "A", 0, 10)] == ["e1"]  # of variant A, closed


def test_ineligible_arms_are_tallied_by_reason(store: SqlStore) -> None:
    from dataclasses import replace

    rule = "rule: customer.plan not in [postpaid]"
    store.write(
        [
            replace(decision("e1"), ineligible=(("upgrade", rule), ("roaming", "excluded by caller"))),
            replace(decision("e2"), ineligible=(("upgrade", rule),)),
            replace(decision("e3"), ineligible=(("upgrade", "rule: customer.plan missing"),)),
            replace(decision("e3"), slot=1, ineligible=(("upgrade", rule),)),  # every slot's decision counts
            decision("e4"),  # nothing left out
            replace(decision("other"), placement="elsewhere", ineligible=(("upgrade", rule),)),
        ],
        [],
    )
    got = [(t.arm_id, t.reason, t.decisions) for t in store.tally_ineligible("app_home_banner")]
    assert got == [("upgrade", rule, 3), ("roaming", "excluded by caller", 1), ("upgrade", "rule: customer.plan missing", 1)]
    assert store.tally_ineligible("nowhere") == []


def test_slots_activation_and_aggregation_events(store: SqlStore) -> None:
    from dataclasses import replace

    k = ("arm:p/a", "total")
    store.lease(*k, 100.0, 100.0)
    deferred = [replace(decision("e1"), slot=s, activated=False, cost=1.0, reward_cost=2.0, budgets=(k,)) for s in (0, 1)]
    store.write(deferred, [])
    [acc] = store.load_accounts()
    assert (acc.spent, acc.reserved) == (0.0, 6.0)  # everything held until activation
    r = store.write([], [], activations=[Activation("e1", 5.0, 605.0, 1.0, (k,), 0), Activation("e1", 5.0, 605.0, 1.0, (k,), 0)])
    assert list(r.activated) == [True, False]  # activating twice does nothing more
    assert store.find_decision("e1", 0).activated and not store.find_decision("e1", 1).activated
    [acc] = store.load_accounts()
    assert (acc.spent, acc.reserved) == (1.0, 5.0)
    store.write([], [], events=[RewardEvent("e1", 0, 1.5, 6.0, "agg"), RewardEvent("e1", 0, 2.5, 7.0, "agg")])
    assert [(e.slot, e.reward) for e in store.open_reward_events()] == [(0, 1.5), (0, 2.5)]
    r = store.write(
        [], [Close("e1", Outcome.REWARD, 4.0, 700.0, 2.0, (k,), 0, 1.0), Close("e1", Outcome.NOT_ACTIVATED, 0.0, 700.0, 2.0, (k,), 1, 1.0)]
    )
    assert list(r.closed) == [True, True]
    assert store.claim("app_home_banner", 10) == 1  # the never-activated slot is not learned
    assert store.open_reward_events() == []
    [acc] = store.load_accounts()
    assert (acc.spent, acc.reserved) == (3.0, 0.0)  # impression 1 + reward cost 2; slot 1 released
    assert store.find_decision("e1", 1).outcome == Outcome.NOT_ACTIVATED
    assert [(r.event_id, r.slot, r.reward) for r in store.learn_rows("app_home_banner", None, 0, 10)] == [("e1", 0, 4.0)]


def test_accounts_read_by_key(store: SqlStore) -> None:
    """Pacing on the shared spend reads only the accounts a server prices, by (key, period)."""
    for key, period, grant in [("arm:p/a", "total", 5.0), ("arm:p/a", "2026-12-01", 2.0), ("arm:p/b", "2026-12-01", 3.0)]:
        assert store.lease(key, period, 100.0, grant) == grant
    got = store.load_accounts([("arm:p/a", "2026-12-01"), ("arm:p/b", "2026-12-01"), ("arm:p/c", "total")])
    assert sorted((a.key, a.period, a.leased) for a in got) == [("arm:p/a", "2026-12-01", 2.0), ("arm:p/b", "2026-12-01", 3.0)]
    assert store.load_accounts([]) == []
    assert len(store.load_accounts()) == 3


def test_the_learners_closes_get_learn_positions_in_the_same_commit(store: SqlStore) -> None:
    store.write([decision("e1"), decision("e2"), decision("e3")], [])
    store.write([], [Close("e1", Outcome.REWARD, 1.0, 1.0)])  # written by another server
    store.write([], [Close("e2", Outcome.REWARD, 1.0, 2.0), Close("e3", Outcome.DEFAULT, 0.0, 3.0)], assign=True)
    assert [r.event_id for r in store.learn_rows("app_home_banner", None, 0, 10)] == ["e2", "e3"]
    assert store.claim("app_home_banner", 10) == 1  # e1, after them
    seqs = [(r.event_id, r.learn_seq) for r in store.learn_rows("app_home_banner", None, 0, 10)]
    assert [e for e, _ in seqs] == ["e2", "e3", "e1"] and len({q for _, q in seqs}) == 3


def test_shared_contact_history_locks_reads_and_records(store: SqlStore) -> None:
    from nextbest.storage.base import ContactRow

    store.write([decision("e1", 0, t=100.0)], [])
    store.write([], [Close("e1", Outcome.REWARD, 1.0, 110.0)])
    h, seen = store.contacts_open("c1", 0.0)
    assert seen == []
    store.contacts_commit(
        h, [ContactRow("c1", 100.0, "app_home_banner", "data_5gb", "e1"), ContactRow("c1", 100.0, "app_home_banner", "voice_300", "e2", 1)]
    )
    h, seen = store.contacts_open("c1", 50.0)
    assert [(i.arm_id, i.event_id, i.outcome, i.reward) for i in seen] == [
        ("data_5gb", "e1", Outcome.REWARD, 1.0),  # its response comes from the decision's row
        ("voice_300", "e2#1", Outcome.OPEN, None),  # no row yet: still open
    ]
    store.contacts_abort(h)  # records nothing
    h, seen = store.contacts_open("c1", 100.5)
    store.contacts_commit(h, [])
    assert seen == []  # older than since
    h, seen = store.contacts_open("c2", 0.0)
    store.contacts_commit(h, [])
    assert seen == []  # per customer
    assert store.prune_contacts(100.5) == 2
    h, seen = store.contacts_open("c1", 0.0)
    store.contacts_abort(h)
    assert seen == []


def test_contact_history_is_backfilled_from_the_log(store: SqlStore, tmp_path: Path) -> None:
    """A longer horizon (a history window added) copies the log's older impressions into the
    shared history once: not those it has, not unknown customers, not unactivated or armless
    decisions, not before ``since``; servers doing it at once copy nothing twice."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from nextbest.storage.base import ContactRow

    old = [decision(f"b{i}", i % 2, t=100.0 + i) for i in range(6)]
    old[4] = dataclasses.replace(old[4], customer_id="")  # anonymous: no history
    old[5] = dataclasses.replace(old[5], activated=False)  # deferred, never shown
    store.write([*old, decision("none", None, t=103.5), decision("early", 0, t=50.0)], [])
    store.contacts_insert([ContactRow("c1", 100.0, "app_home_banner", "data_5gb", "b0")])  # recorded at its Choose
    assert store.backfill_contacts(90.0) == 3  # b1, b2, b3
    assert store.backfill_contacts(90.0) == 0
    h, seen = store.contacts_open("c1", 0.0)
    store.contacts_abort(h)
    assert [(i.event_id, i.arm_id, i.at) for i in seen] == [
        ("b0", "data_5gb", 100.0),
        ("b1", "voice_300", 101.0),
        ("b2", "data_5gb", 102.0),
        ("b3", "voice_300", 103.0),
    ]
    store.write([decision(f"n{i}", 0, t=200.0 + i) for i in range(50)], [])
    other = open_store(store.url)
    try:
        with ThreadPoolExecutor(2) as pool:
            copied = list(pool.map(lambda s: s.backfill_contacts(0.0), [store, other]))
    finally:
        other.close()
    assert sum(copied) == 51  # "early" and the fifty, once
    h, seen = store.contacts_open("c1", 0.0)
    store.contacts_abort(h)
    assert len(seen) == 4 + 51 and len({i.event_id for i in seen}) == 55


def test_open_windows_move_only_from_servers_that_stopped(store: SqlStore) -> None:
    """A window belongs to the server that wrote its decision; another takes it over only once
    that server signed off or fell silent, and a starting server takes unowned ones too."""
    store.write([decision("before")], [])  # written before owners were recorded: no owner
    store.register_server("a", now=100.0)
    store.write([decision("e1"), decision("e2", None)], [])
    store.register_server("b", now=100.0)  # the same store object now speaks for server b
    store.write([decision("e3")], [])
    assert store.adopt_open(live_since=50.0) == []  # a is alive: nothing moves
    assert sorted(d.event_id for d in store.adopt_open(live_since=50.0, unowned=True)) == ["before", "e3"]
    store.heartbeat(now=120.0)  # b beats; a stays silent since 100
    assert sorted(d.event_id for d in store.adopt_open(live_since=110.0)) == ["before", "e1", "e3"]  # e2 served no arm
    assert store.adopt_open(live_since=110.0) == []  # a is forgotten once its windows moved
    store.register_server("c", now=130.0)
    store.owner = "b"
    store.unregister_server()  # b signs off: c takes its windows at once
    store.owner = "c"
    assert sorted(d.event_id for d in store.adopt_open(live_since=125.0)) == ["before", "e1", "e3"]


def test_a_first_reward_is_kept_on_the_row_and_taken_by_the_close(store: SqlStore) -> None:
    """learn_at: window_close: a FIRST reward is set once on an open decision; a DEFAULT (or a
    later REWARD) close stores it; a closed window takes no first reward."""
    from nextbest.storage.base import FIRST

    store.write([decision("e1"), decision("e2"), decision("e3")], [])
    r = store.write([], [], events=[RewardEvent("e1", 0, 2.0, 101.0, FIRST), RewardEvent("e1", 0, 5.0, 101.5, FIRST)])
    assert list(r.recorded) == [Recorded.STORED, Recorded.DUPLICATE]  # the second is not the first
    row = store.find_decision("e1")
    assert row is not None and (row.outcome, row.reward) == (Outcome.OPEN, 2.0)
    r = store.write([], [Close("e1", Outcome.DEFAULT, 0.0, 700.0), Close("e2", Outcome.DEFAULT, -1.0, 700.0)])
    assert list(r.closed) == [True, True]
    assert [(c.outcome, c.reward) for c in r.stored if c is not None] == [(Outcome.REWARD, 2.0), (Outcome.DEFAULT, -1.0)]
    assert (store.find_decision("e1").outcome, store.find_decision("e1").reward) == (Outcome.REWARD, 2.0)  # type: ignore[union-attr]
    store.write([], [], events=[RewardEvent("e3", 0, 1.5, 102.0, FIRST)])
    r = store.write([], [Close("e3", Outcome.REWARD, 9.0, 103.0)])  # a later explicit close keeps the first
    assert [(c.outcome, c.reward) for c in r.stored if c is not None] == [(Outcome.REWARD, 1.5)]
    r = store.write([], [], events=[RewardEvent("e2", 0, 1.0, 800.0, FIRST)])
    assert list(r.recorded) == [Recorded.CLOSED]  # closed: no first reward any more
    assert store.open_reward_events() == []  # FIRST rewards are on the rows, not events


def test_a_shared_secret_is_stored_once_and_read_by_every_store(store: SqlStore) -> None:
    import threading

    assert store.shared_secret("draw_seed", "first") == "first"
    assert store.shared_secret("draw_seed", "second") == "first"  # insert if absent, then read
    other = open_store(store.url)  # another server on the same database
    try:
        assert other.shared_secret("draw_seed", "third") == "first"
    finally:
        other.close()
    # Servers starting at once on a name nobody stored yet: one value wins, and all read it.
    stores = [open_store(store.url) for _ in range(4)]
    got: list[str] = []
    start = threading.Barrier(len(stores))

    def ask(i: int) -> None:
        start.wait()
        got.append(stores[i].shared_secret("race", f"candidate-{i}"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(stores))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in stores:
        s.close()
    assert len(got) == 4 and len(set(got)) == 1 and got[0].startswith("candidate-")


def _budgeted(total: float, daily: float | None = None) -> object:
    budget: dict[str, float] = {"total": total}
    if daily is not None:
        budget["daily"] = daily
    return envs.placement(arms=[{"id": "data_5gb", "features": {"category": "data"}, "cost_per_impression": 1.0, "budget": budget}])


def test_leases_are_taken_against_the_stored_limit(store: SqlStore) -> None:
    """The limit a lease is checked against is the one stored by the last configuration (on the
    account's row, where a lease and a change meet), not the caller's copy of it."""
    from nextbest.storage.base import LeaseGrant

    key = "arm:app_home_banner/data_5gb"
    p = plan({}, [_budgeted(1000.0, daily=100.0)], 1)
    store.save_placements(p.records, p.new_arm_versions)
    assert store.take_lease(key, "total", 1000.0, 50.0) == LeaseGrant(50.0, 1000.0)
    assert store.take_lease(key, "2026-12-01", 100.0, 30.0) == LeaseGrant(30.0, 100.0)
    [rec] = store.load_placements()
    lowered = plan({rec.spec.id: rec}, [_budgeted(10.0, daily=20.0)], 1)
    store.save_placements(lowered.records, lowered.new_arm_versions)
    # A caller still holding 1000 gets nothing: 50 is leased already against a limit of 10.
    assert store.take_lease(key, "total", 1000.0, 50.0) == LeaseGrant(0.0, 10.0)
    assert store.take_lease(key, "2026-12-01", 100.0, 30.0) == LeaseGrant(0.0, 20.0)
    assert store.take_lease(key, "2026-12-02", 100.0, 30.0) == LeaseGrant(20.0, 20.0)  # a new day's account takes it too
    assert store.release(key, "total", 45.0) == 45.0
    assert store.take_lease(key, "total", 1000.0, 50.0) == LeaseGrant(5.0, 10.0)
    assert store.lease("arm:other/x", "total", 7.0, 9.0) == 7.0  # nothing stored: the caller's limit
    [acc] = store.load_accounts([(key, "total")])
    assert acc.leased == 10.0


def test_a_server_gives_back_only_its_own_lease(store: SqlStore) -> None:
    """Each server's part of an account's lease is its own; the part an open window holds moves
    with the window when another server takes it over."""
    from dataclasses import replace

    k = ("arm:p/a", "total")
    store.register_server("a", now=100.0)
    assert store.lease(*k, 100.0, 30.0) == 30.0
    store.write([replace(decision("e1"), cost=1.0, reward_cost=4.0, budgets=(k,))], [])  # a holds 4 for e1's reward
    store.register_server("b", now=100.0)
    assert store.lease(*k, 100.0, 10.0) == 10.0
    assert store.release(*k, 25.0) == 10.0  # b took 10: it gives back no more
    assert [(r.key, r.period, r.leased) for r in store.server_leases()] == [(*k, 0.0)]
    store.heartbeat(now=200.0)
    assert [d.event_id for d in store.adopt_open(live_since=150.0)] == ["e1"]  # a is silent: b takes e1
    assert [(r.key, r.leased) for r in store.server_leases()] == [(k[0], 4.0)]  # with the 4 it holds
    assert store.release(*k, 9.0) == 4.0
    store.owner = "a"
    assert store.release(*k, 100.0) == 1.0  # a's unused 25 came back with its windows; its spent 1 stays
    assert store.load_accounts([("arm:p/none", "total")]) == []
    assert store.release("arm:p/none", "total", 5.0) == 0.0


def test_a_stopped_servers_unused_lease_comes_back_with_its_windows(store: SqlStore) -> None:
    """A server killed with -9 never gives its lease back: the server taking its windows over
    gives back its unused part (leased - what its decisions spent and reserved), keeps the part
    the windows hold, and the killed server, should it beat again, hears that it was forgotten.
    After every window closes and the live server gives its own back: leased = spent + reserved."""
    from dataclasses import replace

    k = ("arm:p/a", "total")
    store.register_server("a", now=100.0)
    assert store.lease(*k, 100.0, 30.0) == 30.0
    store.write([replace(decision("e1"), cost=1.0, reward_cost=4.0, budgets=(k,)), replace(decision("e2"), cost=2.0, budgets=(k,))], [])
    store.register_server("b", now=100.0)
    assert store.heartbeat(now=200.0) is False
    assert sorted(d.event_id for d in store.adopt_open(live_since=150.0)) == ["e1", "e2"]  # a was killed
    [acc] = store.load_accounts([k])
    assert (acc.leased, acc.spent, acc.reserved) == (7.0, 3.0, 4.0)  # a's 23 unused came back; b holds e1's 4
    r = store.write([], [Close("e1", Outcome.DEFAULT, 0.0, 700.0, reward_cost=4.0, budgets=(k,), placement="app_home_banner")])
    assert list(r.closed) == [True]
    assert store.release(*k, 4.0) == 4.0  # b gives back what e1's window freed
    [acc] = store.load_accounts([k])
    assert acc.leased == acc.spent + acc.reserved == 3.0
    store.owner = "a"
    assert store.heartbeat(now=300.0) is True  # a resumes: it was forgotten, its leases went back


def test_servers_confirm_the_configuration_serial(store: SqlStore) -> None:
    """Each save_placements advances the serial; servers confirm the serial they loaded and the
    applying one asks which live servers have not; PostgreSQL notifies every listener."""
    import threading
    import time

    heard: list[int] = []
    got = threading.Event()

    def on_change(serial: int) -> None:
        heard.append(serial)
        got.set()

    stop = store.listen_config(on_change)
    try:
        assert store.config_serial() == 0
        store.register_server("a", now=100.0)
        store.register_server("b", now=100.0)
        time.sleep(0.3 if stop is not None else 0)  # the listener is listening
        p = plan({}, [envs.placement()], 1)
        store.save_placements(p.records, p.new_arm_versions)
        assert store.config_serial() == 1
        store.confirm_config(1)  # b has loaded it
        assert store.unconfirmed_servers(1, live_since=50.0) == ["a"]  # b asks: a has not
        store.owner = "a"
        assert store.unconfirmed_servers(1, live_since=50.0) == []  # a asks: b has
        store.confirm_config(1)
        store.confirm_config(0)  # never lowers it
        store.owner = "b"
        assert store.unconfirmed_servers(1, live_since=50.0) == []
        assert store.unconfirmed_servers(1, live_since=150.0) == []  # a is not live: not waited for
        if stop is None:
            assert store.engine.url.get_backend_name() == "sqlite"
        else:
            assert got.wait(5) and heard == [1]
    finally:
        if stop is not None:
            stop()


def test_a_refused_decision_reserves_nothing(store: SqlStore) -> None:
    """A decision whose (event_id, slot) is taken is not inserted, and its budgets move nothing."""
    import dataclasses

    store.lease("arm:x", "total", 100.0, 10.0)
    first = dataclasses.replace(decision("e1"), cost=1.0, reward_cost=2.0, budgets=(("arm:x", "total"),))
    r = store.write([first], [])
    assert list(r.inserted) == [True]
    again = dataclasses.replace(first, placement="other", timestamp=200.0)
    twin = dataclasses.replace(decision("e2"), cost=1.0, budgets=(("arm:x", "total"),))
    r = store.write([again, twin, twin], [])
    assert list(r.inserted) == [False, True, False]  # taken before; new; a twin in the batch
    [acc] = store.load_accounts()
    assert (acc.spent, acc.reserved) == (2.0, 2.0)  # e1 and e2 once each, nothing for the refused
    assert store.find_decision("e1").placement == "app_home_banner"  # type: ignore[union-attr]


def test_writes_are_bound_to_their_decision(store: SqlStore) -> None:
    """A close, activation, first or aggregated reward naming another placement (or another
    owner) than the row's acts on nothing; naming the row's, it acts."""
    import dataclasses

    from nextbest.storage.base import FIRST

    store.register_server("s1", now=100.0)
    store.write([decision("e1"), dataclasses.replace(decision("e2"), activated=False)], [])
    wrong = "other_placement"
    r = store.write(
        [],
        [Close("e1", Outcome.REWARD, 1e9, 101.0, placement=wrong)],
        [Activation("e2", 101.0, 900.0, placement=wrong)],
        [RewardEvent("e1", 0, 1e9, 101.0, FIRST, placement=wrong), RewardEvent("e1", 0, 1e9, 101.0, "agg", "k", placement=wrong)],
    )
    assert (list(r.closed), list(r.activated), list(r.recorded)) == ([False], [False], [Recorded.CLOSED, Recorded.CLOSED])
    r = store.write([], [Close("e1", Outcome.REWARD, 1.0, 101.0, placement="app_home_banner", owner="s2")])
    assert list(r.closed) == [False]  # held by s1, not s2
    d = store.find_decision("e1")
    assert d is not None and (d.outcome, d.reward) == (Outcome.OPEN, None) and store.open_reward_events() == []
    r = store.write(
        [],
        [Close("e1", Outcome.REWARD, 1.0, 102.0, placement="app_home_banner", owner="s1")],
        [Activation("e2", 102.0, 900.0, placement="app_home_banner", owner="s1")],
    )
    assert (list(r.closed), list(r.activated)) == ([True], [True])


def test_aggregated_rewards_of_every_server_are_folded_in_at_close(store: SqlStore) -> None:
    """ "agg" events are stored while the window is open (a key once), whoever stores them; a
    close with ``aggregation`` stores the aggregate of the row's first reward and every event."""
    from nextbest.storage.base import FIRST

    store.write([decision("e1"), decision("e2"), decision("e3")], [])
    ev = [
        RewardEvent("e1", 0, 1.0, 101.0, "agg", "a", placement="app_home_banner"),
        RewardEvent("e1", 0, 2.0, 101.0, "agg", None, placement="app_home_banner"),
        RewardEvent("e1", 0, 9.0, 101.0, "agg", "a", placement="app_home_banner"),  # a retried key
        RewardEvent("e2", 0, 4.0, 101.0, FIRST, placement="app_home_banner"),  # a first from before a switch
        RewardEvent("e2", 0, 5.0, 101.0, "agg", None, placement="app_home_banner"),
    ]
    r = store.write([], [], events=ev)
    assert list(r.recorded) == [Recorded.STORED, Recorded.STORED, Recorded.DUPLICATE, Recorded.STORED, Recorded.STORED]
    closes = [Close(e, Outcome.DEFAULT, -1.0, 700.0, placement="app_home_banner", aggregation="sum") for e in ("e1", "e2", "e3")]
    r = store.write([], closes)
    assert [(c.outcome, c.reward) for c in r.stored if c is not None] == [
        (Outcome.REWARD, 3.0),
        (Outcome.REWARD, 9.0),
        (Outcome.DEFAULT, -1.0),
    ]
    assert [(d.outcome, d.reward) for d in map(store.find_decision, ("e1", "e2", "e3")) if d is not None] == [
        (Outcome.REWARD, 3.0),
        (Outcome.REWARD, 9.0),
        (Outcome.DEFAULT, -1.0),
    ]
    r = store.write([], [], events=[RewardEvent("e1", 0, 1.0, 800.0, "agg", "b", placement="app_home_banner")])
    assert list(r.recorded) == [Recorded.CLOSED]  # closed: nothing stored, the close has it all


def test_servers_are_alive_while_they_beat(store: SqlStore) -> None:
    store.register_server("a", now=100.0)
    assert store.server_alive("a", since=90.0) and not store.server_alive("a", since=101.0)
    assert not store.server_alive("nobody", since=0.0)
    store.unregister_server()
    assert not store.server_alive("a", since=1.0)
