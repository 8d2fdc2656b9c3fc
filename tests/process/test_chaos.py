"""Chaos on two servers sharing PostgreSQL (issue #29, done when): rewards racing to both, the
window owner stopped (SIGSTOP) and killed (kill -9) mid-traffic, a budget lowered mid-traffic.
Afterwards the database must show every acknowledged reward stored once and learned once, every
aggregate complete, no spend above its limit and the ledger balanced (leased = spent + reserved,
the killed server's unused lease given back by the server that took its windows over)."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from nextbest.bandit.spec import PlacementSpec
from nextbest.client import NextbestClient
from tests.harness import ServerProcess, sql

pytestmark = pytest.mark.postgres

ENV = {
    "NEXTBEST_REPLICA_POLL_INTERVAL": "0.3",
    "NEXTBEST_SWEEP_INTERVAL": "0.1",
    "NEXTBEST_SNAPSHOT_INTERVAL": "0.3",
    "NEXTBEST_ORPHAN_GRACE": "1",
    "NEXTBEST_PEER_VISIBILITY_WAIT": "0.1",
}
KEY = "arm:first/paid"
ARMS: list[dict[str, Any]] = [
    {"id": "paid", "features": {"kind": "paid"}, "cost_per_impression": 1.0},
    {"id": "a", "features": {"kind": "a"}},
]


def specs(total: float) -> list[PlacementSpec]:
    paid = {**ARMS[0], "budget": {"total": total}}
    return [
        PlacementSpec.model_validate({"id": "first", "reward_window": 2.0, "arms": [paid, ARMS[1]]}),
        PlacementSpec.model_validate({"id": "agg", "reward_window": 2.0, "reward_aggregation": "sum", "arms": ARMS[1:] + [{"id": "b"}]}),
    ]


class Traffic:
    """Choose and Reward from several threads, each call to a server picked at random; records
    what was acknowledged. A call that fails is retried on the other server (with its key)."""

    def __init__(self, servers: list[ServerProcess], seed: int) -> None:
        self.servers = servers
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.learned: dict[str, list[float]] = defaultdict(list)  # "first": values answered LEARNED
        self.recorded: dict[str, dict[str, float]] = defaultdict(dict)  # "agg": key -> value RECORDED
        self.chosen = 0
        self.errors = 0

    def target(self) -> str:
        with self.lock:
            return self.rng.choice(self.servers).target

    def call(self, fn_name: str, *args: object, **kw: object) -> object:
        for _ in range(4):
            try:
                with NextbestClient(self.target(), timeout=3) as c:
                    return getattr(c, fn_name)(*args, **kw)
            except grpc.RpcError:
                with self.lock:
                    self.errors += 1
                time.sleep(0.05)
        return None

    def run(self, worker: int) -> None:
        n = 0
        pool = ThreadPoolExecutor(2)
        while not self.stop.is_set():
            n += 1
            placement = "first" if n % 2 else "agg"
            d = self.call("choose", placement, {"segment": "x"}, customer_id=f"w{worker}-{n}")
            if d is None or not d.arm_id:  # type: ignore[attr-defined]
                continue
            ev = d.event_id  # type: ignore[attr-defined]
            with self.lock:
                self.chosen += 1
            if placement == "first":
                value = float(n % 3)
                both = [pool.submit(self.call, "reward", ev, value) for _ in range(2)]  # racing to both servers
                for f in both:
                    if f.result() == "learned":
                        with self.lock:
                            self.learned[ev].append(value)
            else:
                for k in range(3):
                    key, value = f"k{k}", float(k + 1)
                    if self.call("reward", ev, value, reward_id=key) in ("recorded", "duplicate"):
                        with self.lock:
                            self.recorded[ev][key] = value
        pool.shutdown()


def test_two_servers_under_races_kill_9_sigstop_and_a_budget_change_keep_every_acknowledged_reward(pg: str) -> None:
    a = ServerProcess(pg, env=ENV)
    b = ServerProcess(pg, env=ENV)
    servers = [a, b]
    with NextbestClient(a.target) as c:
        c.apply(specs(10_000.0))
    time.sleep(0.5)
    first_servers = {i for (i,) in sql(pg, "SELECT id FROM servers")}
    assert len(first_servers) == 2
    traffic = Traffic(servers, seed=29)
    threads = [threading.Thread(target=traffic.run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        b.proc.send_signal(signal.SIGSTOP)  # the owner of half the windows stalls
        time.sleep(1.5)
        b.proc.send_signal(signal.SIGCONT)
        time.sleep(1.5)
        a.proc.kill()  # the learner and owner of the other half dies
        a.proc.wait(10)
        a2 = ServerProcess(pg, env=ENV)
        with traffic.lock:
            servers[0] = a2
        time.sleep(1.5)
        [(spent_before,)] = sql(pg, f"SELECT spent FROM budget_accounts WHERE key = '{KEY}'")
        limit = float(spent_before) + 20.0
        with NextbestClient(b.target) as c:
            c.apply(specs(limit))  # lowered mid-traffic; binds both servers when it returns
        time.sleep(2.5)
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(60)
    assert servers[0].terminate() == 0 and b.terminate() == 0
    # A server alone closes what the others left open (taken over at start, or as orphans).
    last = ServerProcess(pg, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while sql(pg, "SELECT count(*) FROM decisions WHERE outcome = 0 OR (outcome IN (1, 2) AND learn_seq IS NULL)") != [(0,)]:
            assert time.monotonic() < deadline, "windows not closed and learned"
            time.sleep(0.2)
        # The killed server's unused lease comes back when a server takes it over, once it has been
        # silent for the liveness time (10 s): until then its windows are closed as orphans, and a
        # quick run ended here before that (this test failed whenever the machine was fast). Wait
        # until both first servers were taken over (a server taken over is forgotten).
        while {i for (i,) in sql(pg, "SELECT id FROM servers")} & first_servers:
            assert time.monotonic() < deadline, "the killed server was never taken over"
            time.sleep(0.2)
        with NextbestClient(last.target) as c:
            versions = {p: c.stats(p).model_version for p in ("first", "agg")}
    finally:
        assert last.terminate() == 0

    assert traffic.chosen > 100 and len(traffic.learned) > 40 and len(traffic.recorded) > 40, traffic.chosen
    rows = {e: (p, o, r, s) for e, p, o, r, s in sql(pg, "SELECT event_id, placement_id, outcome, reward, learn_seq FROM decisions")}
    # Every acknowledged first reward is the one stored and learned; never two answered LEARNED.
    assert traffic.learned and all(len(v) == 1 for v in traffic.learned.values())
    for ev, (value,) in traffic.learned.items():
        _, outcome, reward, seq = rows[ev]
        assert (outcome, reward) == (1, value) and seq is not None, ev
    # Every aggregate is complete: the row holds the sum of every stored reward, acknowledged ones included.
    stored: dict[str, dict[str, float]] = defaultdict(dict)
    for ev, key, value in sql(pg, "SELECT event_id, reward_id, reward FROM reward_events WHERE kind = 'agg'"):
        stored[ev][key] = float(value)
    assert traffic.recorded
    for ev, keys in traffic.recorded.items():
        assert keys.items() <= stored[ev].items(), ev
    for ev, keys in stored.items():
        _, outcome, reward, seq = rows[ev]
        assert (outcome, reward) == (1, sum(keys.values())) and seq is not None, ev
    # Learned once: one learn position each, and each model learned exactly as many.
    seqs = [s for _, o, _, s in rows.values() if o in (1, 2)]
    assert None not in seqs and len(seqs) == len(set(seqs))
    for p in ("first", "agg"):
        assert versions[p] == sum(1 for pp, o, _, _ in rows.values() if pp == p and o in (1, 2)), p
    # The budget: no spend above the lowered limit (plus the calls in flight), nothing reserved,
    # every lease accounted for.
    [(leased, spent, reserved)] = sql(pg, f"SELECT leased, spent, reserved FROM budget_accounts WHERE key = '{KEY}'")
    [(own,)] = sql(pg, f"SELECT coalesce(sum(leased), 0) FROM budget_leases WHERE key = '{KEY}'")
    assert spent <= limit + 3 and reserved == 0.0
    assert spent == sql(pg, "SELECT count(*) FROM decisions WHERE arm_id = 'paid'")[0][0]
    # Balanced: every lease is spent or given back, the killed server's unused part by the server
    # that took its windows over (before: 481 of 539 leased stayed with the dead server).
    assert own == leased and abs(leased - (spent + reserved)) < 1e-6, (leased, spent, reserved)
