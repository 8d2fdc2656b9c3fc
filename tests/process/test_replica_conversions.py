"""Conversions across two servers on PostgreSQL and a kill -9 (issue #31, done when): purchases
reported to both servers, some sent again to the other one and some to both at once, while one
server is killed with SIGKILL mid-stream. Afterwards the database must show every acknowledged
conversion stored once with its credits once, each credit one reward event of its decision, and
each decision closed (the killed server's windows by the one that took them over) and learned
once. Conversions whose call died with the server may be stored or not, never doubled; sent
again to the live server they complete (DUPLICATE or ATTRIBUTED) with their credits once.

``reward_aggregation: sum`` under ``learn_at: window_close``: every credit is its own reward
event keyed ``conversion:<id>``, so each is visible (and countable) in the database, several
conversions of one decision add up, and the sum is learned once at the close, after the
survivor took the killed server's windows over. (Under ``learn_at: reward`` with ``earliest``
the first credit would close the decision and later ones would be DUPLICATE rewards, leaving
nothing per conversion to check.) Each customer saw the same offer once from each server and
``linear`` attribution splits every conversion over both decisions: each conversion's credits
lie in a window of each server."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from nextbest.bandit.attribution import Conversion
from nextbest.bandit.spec import PlacementSpec
from nextbest.client import ConversionReport, NextbestClient
from tests import envs
from tests.harness import ServerProcess, postgres_schema, sql, started_together, until

pytestmark = pytest.mark.postgres

ENV = {"NEXTBEST_REPLICA_POLL_INTERVAL": "0.3", "NEXTBEST_SWEEP_INTERVAL": "0.1", "NEXTBEST_PEER_VISIBILITY_WAIT": "0.1"}
P = "app_home_banner"
CUSTOMERS = 120
PER_CUSTOMER = 3  # conversions of each customer, all by the product of the offer it was shown
BATCH = 12
THREADS = 4
# Longer than the killed server's silence before the survivor takes its windows over (10 s,
# Settings.live_for): its windows are adopted while open, and closed at their deadline.
REWARD_WINDOW = 16.0

Key = tuple[str, int, float]  # a credit as checked: (event_id, slot, value)


def spec() -> PlacementSpec:
    return PlacementSpec.model_validate(
        {
            "id": P,
            "arms": [{"id": a, "features": {"category": envs.CATEGORY[a]}, "products": [f"SKU_{a.upper()}"]} for a in envs.ARMS],
            "attribution": {"window": "7d", "model": "linear"},
            "reward_aggregation": "sum",
            "learn_at": "window_close",
            "reward_window": REWARD_WINDOW,  # shorter than the attribution window: apply warns, on purpose
        }
    )


def credits_of(r: ConversionReport) -> list[Key]:
    return sorted((c.event_id, c.slot, c.value) for c in r.credits)


class Billing:
    """Client threads sending conversion batches to both servers: each batch to one of them (or
    to both at once), an acknowledged batch's first items again to the other. Every answer is
    kept; a conversion is acknowledged once a call answered it without an error."""

    def __init__(self, targets: dict[str, str], batches: list[list[Conversion]]) -> None:
        self.targets = targets
        self.batches = batches
        self.lock = threading.Lock()
        self.next = 0
        self.answers: dict[str, list[tuple[str, ConversionReport]]] = defaultdict(list)
        self.acked: dict[str, ConversionReport] = {}
        self.acked_batches = 0
        self.failed_calls = 0
        self.in_flight: dict[int, float] = {}  # calls to A under way: their start (monotonic)
        self.took: list[float] = []  # how long A's answered calls took

    def a_call_midway(self) -> bool:
        """A call to A has been under way for half as long as A's calls take (median): likely
        past its commit, before its rewards are all stored."""
        with self.lock:
            if not self.took or not self.in_flight:
                return False
            half = sorted(self.took)[len(self.took) // 2] / 2
            return time.monotonic() - min(self.in_flight.values()) >= half

    def send(self, clients: dict[str, NextbestClient], server: str, items: list[Conversion]) -> bool:
        call, start = object(), time.monotonic()
        if server == "a":
            with self.lock:
                self.in_flight[id(call)] = start
        try:
            reports = clients[server].report_conversions(items)
        except grpc.RpcError:
            with self.lock:
                self.failed_calls += 1
            return False
        finally:
            with self.lock:
                self.in_flight.pop(id(call), None)
        with self.lock:
            if server == "a":
                self.took.append(time.monotonic() - start)
            for c, r in zip(items, reports, strict=True):
                self.answers[c.conversion_id].append((server, r))
                if r.status != "error":
                    self.acked.setdefault(c.conversion_id, r)
        return True

    def run(self) -> None:
        clients = {name: NextbestClient(t, timeout=10) for name, t in self.targets.items()}
        pool = ThreadPoolExecutor(2)
        try:
            while True:
                with self.lock:
                    i = self.next
                    self.next += 1
                if i >= len(self.batches):
                    return
                items = self.batches[i]
                if i % 4 == 3:  # to both at once: one stores it, the other answers DUPLICATE
                    ok = [f.result() for f in [pool.submit(self.send, clients, s, items) for s in ("a", "b")]]
                    done = any(ok)
                else:
                    server, other = ("a", "b") if i % 2 == 0 else ("b", "a")
                    done = self.send(clients, server, items)
                    if done:
                        self.send(clients, other, items[:2])  # a duplicate re-sent elsewhere
                if done:
                    with self.lock:
                        self.acked_batches += 1
        finally:
            pool.shutdown()
            for c in clients.values():
                c.close()


def test_conversions_to_two_servers_and_a_kill_9_are_credited_stored_and_learned_once(pg: str) -> None:
    a, b = started_together(
        lambda: ServerProcess(pg, "--learner", "never", env=ENV),  # killed: it holds windows, not the learner
        lambda: ServerProcess(pg, env=ENV),  # the learner, and the survivor
    )
    try:
        with NextbestClient(a.target) as ca:
            ca.apply([spec()])
        until(lambda: NextbestClient(b.target).placements() != [])
        # Each customer is shown the same offer by each server.
        shown: dict[str, tuple[str, list[str]]] = {}  # customer -> (arm, [A's event, B's event])
        opened = time.monotonic()
        with NextbestClient(a.target) as ca, NextbestClient(b.target) as cb:
            for i in range(CUSTOMERS):
                customer, arm = f"c{i:04d}", envs.ARMS[i % len(envs.ARMS)]
                others = [x for x in envs.ARMS if x != arm]
                ds = [c.choose(P, {"segment": envs.SEGMENTS[i % 5]}, customer_id=customer, exclude_arms=others) for c in (ca, cb)]
                assert [d.arm_id for d in ds] == [arm, arm]
                shown[customer] = (arm, [d.event_id for d in ds])
        until(lambda: sql(pg, "SELECT count(*) FROM decisions") == [(2 * CUSTOMERS,)])  # both servers' group commits
        assert sql(pg, "SELECT count(DISTINCT owner) FROM decisions") == [(2,)]  # each server holds its windows
        at = time.time()
        conversions = [
            Conversion(f"inv-{i:04d}-{k}", customer, "", f"SKU_{arm.upper()}", 1.0 + (i + k) % 7 * 0.5, at)
            for i, (customer, (arm, _)) in enumerate(shown.items())
            for k in range(PER_CUSTOMER)
        ]
        by_id = {c.conversion_id: c for c in conversions}
        # Interleaved so that each batch holds several customers and a customer's conversions
        # go to different calls.
        ordered = conversions[0::PER_CUSTOMER] + conversions[1::PER_CUSTOMER] + conversions[2::PER_CUSTOMER]
        billing = Billing({"a": a.target, "b": b.target}, [ordered[j : j + BATCH] for j in range(0, len(ordered), BATCH)])
        threads = [threading.Thread(target=billing.run) for _ in range(THREADS)]
        for t in threads:
            t.start()
        try:
            until(lambda: billing.acked_batches >= len(billing.batches) // 3 and billing.a_call_midway(), 30, 0.002)
            a.kill()  # SIGKILL mid-stream, in the middle of a call: often after its commit
        finally:
            for t in threads:
                t.join(60)
        assert billing.failed_calls > 0 and billing.acked_batches < len(billing.batches), "the kill was not mid-stream"

        # Unacknowledged: stored or not, never doubled; a stored one has all its credits (one
        # transaction per call) and at most one reward event per credit.
        unacked = sorted(set(by_id) - set(billing.acked))
        assert unacked
        stored_unacked = _conversions(pg, unacked)
        assert all(n == 2 for n in stored_unacked.values()), stored_unacked
        events = _reward_events(pg)
        assert all(n == 1 for n in Counter((k, ev) for k, ev, _, _, _ in events).values())
        rewarded_unacked = sum(k.removeprefix("conversion:") in stored_unacked for k, *_ in events)

        # Sent again to the survivor, every one completes, its credits once.
        def retry() -> bool:
            left = [by_id[cid] for cid in unacked if cid not in billing.acked]
            with NextbestClient(b.target) as cb:
                for j in range(0, len(left), BATCH):
                    billing.send({"b": cb}, "b", left[j : j + BATCH])
            return all(cid in billing.acked for cid in unacked)

        until(retry, 20, 0.2)
        retried = {cid: billing.acked[cid] for cid in unacked}
        assert all(r.status in ("attributed", "duplicate") for r in retried.values()), retried
        assert time.monotonic() < opened + REWARD_WINDOW, "retries finished after the windows' deadline (a slow machine): LATE"
        print(
            f"\n{len(conversions)} conversions in {len(billing.batches)} batches; {billing.failed_calls} calls failed with the kill; "
            f"{len(unacked)} unacknowledged, {len(stored_unacked)} of them stored before the retry with {rewarded_unacked} "
            f"of their {2 * len(stored_unacked)} reward events "
            f"({sum(r.status == 'duplicate' for r in retried.values())} answered DUPLICATE on retry)"
        )

        # Every decision closed (the killed server's by the survivor) and learned.
        until(lambda: sql(pg, "SELECT count(*) FROM decisions WHERE outcome = 0 OR learn_seq IS NULL") == [(0,)], 60, 0.2)
        with NextbestClient(b.target) as cb:
            until(lambda: cb.stats(P).model_version == 2 * CUSTOMERS, 20, 0.2)
    finally:
        a.kill()
        b.terminate()

    expected: dict[str, list[Key]] = {}  # each conversion: half its value to each of its customer's decisions
    for cid, c in by_id.items():
        expected[cid] = sorted((ev, 0, c.value / 2) for ev in shown[c.customer_id][1])
    # Every answer without an error gave the conversion's credits; at most one stored it.
    for cid, answers in billing.answers.items():
        ok = [r for _, r in answers if r.status != "error"]
        assert all(credits_of(r) == expected[cid] for r in ok), (cid, answers)
        assert sum(r.status == "attributed" for r in ok) <= 1, (cid, answers)
    assert all(credits_of(billing.acked[cid]) == expected[cid] for cid in by_id)
    # Stored once, with its credits once.
    assert _conversions(pg, list(by_id)) == {cid: 2 for cid in by_id}
    stored: dict[str, list[Key]] = defaultdict(list)
    for cid, ev, slot, value in sql(pg, "SELECT conversion_id, event_id, slot, value FROM conversion_credits"):
        stored[cid].append((ev, slot, value))
    assert {cid: sorted(v) for cid, v in stored.items()} == expected
    # One reward event per credit, keyed by its conversion, within the window (none LATE).
    events = _reward_events(pg)
    assert sorted((key, ev, slot, value) for key, ev, slot, value, _ in events) == sorted(
        (f"conversion:{cid}", *credit) for cid, cs in expected.items() for credit in cs
    )
    assert {kind for *_, kind in events} == {"agg"}
    # Each decision closed with the sum of its credits, learned once.
    owed: dict[str, float] = defaultdict(float)
    for cs in expected.values():
        for ev, _, value in cs:
            owed[ev] += value
    rows = sql(pg, "SELECT event_id, outcome, reward, learn_seq FROM decisions")
    assert {ev: (outcome, reward) for ev, outcome, reward, _ in rows} == {ev: (1, v) for ev, v in owed.items()}
    seqs = [seq for *_, seq in rows]
    assert None not in seqs and len(set(seqs)) == len(seqs) == 2 * CUSTOMERS
    assert sql(pg, "SELECT count(DISTINCT owner) FROM decisions") == [(1,)]  # B took A's windows over and closed them


def _conversions(pg: str, ids: list[str]) -> dict[str, int]:
    """Stored conversions among ``ids``: conversion_id -> credit rows (checked against ``credited``)."""
    quoted = ", ".join(f"'{cid}'" for cid in ids)
    rows = sql(
        pg,
        "SELECT c.conversion_id, c.credited, count(k.event_id) FROM conversions c "
        f"LEFT JOIN conversion_credits k ON k.conversion_id = c.conversion_id WHERE c.conversion_id IN ({quoted}) "
        "GROUP BY c.conversion_id, c.credited",
    )
    assert all(credited == n for _, credited, n in rows), rows
    return {cid: int(n) for cid, _, n in rows}


def _reward_events(pg: str) -> list[tuple[Any, ...]]:
    return sql(pg, "SELECT reward_id, event_id, slot, reward, kind FROM reward_events WHERE reward_id LIKE 'conversion:%'")


def test_a_learner_on_another_schema_of_the_database_does_not_stop_this_one_learning(pg: str) -> None:
    """Found while running the test above beside a benchmark on another schema of database test:
    every window closed, none learned (learn_seq NULL), because the benchmark's server held the
    learner lock. Two deployments (or a test and a benchmark) on two schemas of one database
    must each have their learner."""
    with postgres_schema() as other:
        x = ServerProcess(other, env=ENV)  # another deployment's server, the learner of its schema
        try:
            y = ServerProcess(pg, env=ENV)
            try:
                with NextbestClient(y.target) as c:
                    c.apply([envs.placement(P)])  # learn_at: reward
                    assert c.reward(c.choose(P, {"segment": "youth"}).event_id, 1.0) == "learned"
                    until(lambda: sql(pg, "SELECT count(*) FROM decisions WHERE learn_seq IS NOT NULL") == [(1,)], 10)
            finally:
                y.terminate()
        finally:
            x.terminate()
