"""Database faults under load, for real: PostgreSQL connections killed and the server's role
locked out, and a SQLite file locked by another connection. Choose keeps serving from memory,
Reward answers UNAVAILABLE rather than acknowledging what it cannot store, and everything
recovers by itself: every acknowledged reward ends stored and learned exactly once."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from nextbest.bandit.decision_log import Outcome
from nextbest.bandit.errors import Unavailable
from nextbest.bandit.spec import PlacementSpec
from nextbest.client import NO_RETRY, NextbestClient
from nextbest.storage import tables as t
from nextbest.v1 import decision_pb2
from tests import envs
from tests.harness import ServerThread, make_settings, postgres_available

ADMIN_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
pg = pytest.mark.skipif(not postgres_available(), reason="needs the PostgreSQL at 127.0.0.1:5432")


@contextmanager
def pg_role_schema() -> Iterator[tuple[str, str]]:
    """A login role owning a fresh schema; yields (role, URL naming it as application_name).

    Locking the role out (NOLOGIN) and killing its connections cuts the server off from the
    database without touching anyone else; the role and schema are dropped at the end.
    """
    import psycopg

    role = f"nbfault_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    url = f"postgresql+psycopg://{role}@127.0.0.1:5432/test?options=-csearch_path%3D{role}&application_name={role}"
    try:
        yield role, url
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
            c.execute(f"ALTER ROLE {role} LOGIN")
            kill_connections(role)
            c.execute(f"DROP SCHEMA {role} CASCADE")
            c.execute(f"DROP ROLE {role}")


def kill_connections(app_name: str) -> int:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
        rows = c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = 'test' AND pid <> pg_backend_pid() AND application_name = %s",
            (app_name,),
        ).fetchall()
    return len(rows)


def set_login(role: str, allowed: bool) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
        c.execute(f"ALTER ROLE {role} {'LOGIN' if allowed else 'NOLOGIN'}")


class Load:
    """Channel traffic from a few threads: Choose, then Reward with a value fixed per event;
    a reward that fails is retried later with the same value (what a channel should do)."""

    def __init__(self, target: str, threads: int = 3, reward_timeout: float = 2.0) -> None:
        self.target = target
        self.values: dict[str, float] = {}
        self.acked: dict[str, str] = {}
        self.pending: set[str] = set()
        self.chosen = 0
        self.choose_errors: list[grpc.StatusCode] = []
        self.choose_times: list[tuple[float, float]] = []  # (start, end) of the Choose-only thread's calls
        self.reward_ok: list[tuple[float, float]] = []  # (start, end) of acknowledged attempts
        self.reward_errors: list[tuple[float, float, grpc.StatusCode]] = []
        self._timeout = reward_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self._threads.append(threading.Thread(target=self._choose_only, daemon=True))

    def __enter__(self) -> Load:
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(30)

    def _reward(self, c: NextbestClient, eid: str) -> None:
        start = time.monotonic()
        try:
            status = c.reward(eid, self.values[eid])
        except grpc.RpcError as e:
            with self._lock:
                self.reward_errors.append((start, time.monotonic(), e.code()))  # type: ignore[attr-defined]
                self.pending.add(eid)
            return
        with self._lock:
            self.acked[eid] = status
            self.pending.discard(eid)
            self.reward_ok.append((start, time.monotonic()))

    def _run(self, i: int) -> None:
        with NextbestClient(self.target, timeout=self._timeout, retry_policy=NO_RETRY) as c:  # the server's answers, as they come
            n = 0
            while not self._stop.is_set():
                n += 1
                eid = f"w{i}-{n}"
                try:
                    c.choose("app_home_banner", {"segment": envs.SEGMENTS[n % 5]}, event_id=eid)
                except grpc.RpcError as e:
                    self.choose_errors.append(e.code())  # type: ignore[attr-defined]
                    continue
                with self._lock:
                    self.chosen += 1
                    self.values[eid] = (n % 3) / 2
                self._reward(c, eid)
                with self._lock:
                    retry = next(iter(self.pending), None) if n % 4 == 0 else None
                if retry is not None:
                    self._reward(c, retry)
                time.sleep(0.003)

    def _choose_only(self) -> None:
        """Choose without Reward: shows that decisions are served whatever the database does."""
        with NextbestClient(self.target, timeout=2) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                start = time.monotonic()
                try:
                    c.choose("app_home_banner", {"segment": envs.SEGMENTS[n % 5]}, event_id=f"c-{n}")
                except grpc.RpcError as e:
                    self.choose_errors.append(e.code())  # type: ignore[attr-defined]
                    continue
                with self._lock:
                    self.chosen += 1
                    self.choose_times.append((start, time.monotonic()))
                time.sleep(0.005)

    def served_between(self, t0: float, t1: float) -> list[float]:
        """Latencies of the Choose-only calls made within [t0, t1]."""
        return [e - s for s, e in self.choose_times if s >= t0 and e <= t1]

    def errors_ending_between(self, t0: float, t1: float) -> list[grpc.StatusCode]:
        return [code for _, end, code in self.reward_errors if t0 <= end <= t1]

    def settle(self, timeout: float = 30) -> None:
        """Retry every unacknowledged reward until it is acknowledged."""
        deadline = time.monotonic() + timeout
        with NextbestClient(self.target, timeout=5) as c:
            while self.pending:
                assert time.monotonic() < deadline, f"{len(self.pending)} rewards never acknowledged"
                for eid in list(self.pending):
                    self._reward(c, eid)
                time.sleep(0.1)

    def acked_between(self, t0: float, t1: float) -> int:
        return sum(1 for s, e in self.reward_ok if s >= t0 and e <= t1)


def wait_learned(s: ServerThread, timeout: float = 20) -> int:
    """Once the log is written and the learner caught up: the examples the model learned."""
    deadline = time.monotonic() + timeout
    store = s.engine.store
    while True:
        s.call(s.engine.writer.flush())
        d = t.decisions.c
        with store.engine.connect() as c:
            closed = select(func.count()).where(d.outcome.in_([int(Outcome.REWARD), int(Outcome.DEFAULT)]))
            rows = int(c.execute(closed).scalar_one())
            claimed = int(c.execute(closed.where(d.learn_seq.is_not(None))).scalar_one())
        learned = int(s.call(_learned(s)))
        if learned == claimed == rows or time.monotonic() > deadline:
            assert learned == claimed == rows, f"model learned {learned}, {claimed} of {rows} closed windows in sequence"
            return learned
        time.sleep(0.1)


async def _learned(s: ServerThread) -> int:
    return int(s.engine.states["app_home_banner"].model.learned)


def check_everything_acknowledged_is_stored_once(s: ServerThread, load: Load) -> None:
    learned = wait_learned(s)
    store = s.engine.store
    for eid in load.acked:
        d = store.find_decision(eid)
        assert d is not None and d.reward == load.values[eid] and d.learn_seq is not None, eid
    with store.engine.connect() as c:
        decisions = int(c.execute(select(func.count()).select_from(t.decisions)).scalar_one())
        seqs = c.execute(select(t.decisions.c.learn_seq).where(t.decisions.c.learn_seq.is_not(None))).scalars().all()
    assert decisions == load.chosen  # every decision served was logged, the outage's too
    assert learned == len(seqs) == len(set(seqs)) == len(load.acked)  # each reward learned once
    assert load.choose_errors == []  # Choose never failed


@pg
def test_postgres_cut_off_during_load_loses_no_acknowledged_reward() -> None:
    with pg_role_schema() as (role, url):
        s = ServerThread(make_settings(url, flush_interval=0.01))
        try:
            with s.client() as c:
                c.apply([envs.placement()])
            with Load(s.target) as load:
                time.sleep(1.0)
                cut = time.monotonic()
                set_login(role, False)
                assert kill_connections(role) > 0
                time.sleep(3.0)
                restored = time.monotonic()
                set_login(role, True)
                time.sleep(2.0)
            load.settle()
            outage = load.errors_ending_between(cut + 0.5, restored + 0.5)
            assert outage and set(outage) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
            assert grpc.StatusCode.UNAVAILABLE in outage
            assert load.acked_between(cut + 0.5, restored) == 0  # nothing acknowledged while cut off
            served = load.served_between(cut + 0.5, restored)
            assert len(served) > 50 and max(served) < 1.0  # Choose served from memory throughout
            check_everything_acknowledged_is_stored_once(s, load)
            with s.client() as c:  # and the service is whole again, without a restart
                d = c.choose("app_home_banner")
                assert c.reward(d.event_id, 1.0) == "learned"
        finally:
            s.stop()


@pg
def test_postgres_connections_killed_repeatedly_during_load() -> None:
    with pg_role_schema() as (role, url):
        s = ServerThread(make_settings(url, flush_interval=0.01))
        try:
            with s.client() as c:
                c.apply([envs.placement()])
            killed = 0
            with Load(s.target) as load:
                for _ in range(8):
                    time.sleep(0.4)
                    killed += kill_connections(role)
            load.settle()
            assert killed >= 8 and len(load.acked) > 50
            check_everything_acknowledged_is_stored_once(s, load)
        finally:
            s.stop()


def test_sqlite_locked_file_during_load(db_url: str) -> None:
    s = ServerThread(make_settings(db_url, flush_interval=0.01))
    try:
        with s.client() as c:
            c.apply([envs.placement()])
        with Load(s.target, reward_timeout=15.0) as load:
            time.sleep(0.5)
            lock = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            locked = time.monotonic()
            # Longer than three 5 s busy timeouts (the learner's claim and the replication poll
            # share the writer's thread, and a Choose waiting for its insert puts its decision in
            # a batch before its reward's): writes fail rather than wait, rewards hear UNAVAILABLE.
            time.sleep(16.0)
            lock.execute("ROLLBACK")
            lock.close()
            released = time.monotonic()
            time.sleep(1.0)
        load.settle()
        assert grpc.StatusCode.UNAVAILABLE in load.errors_ending_between(locked, released + 0.5)
        assert load.acked_between(locked + 0.5, released) == 0
        served = load.served_between(locked + 0.5, released)
        assert len(served) > 100 and max(served) < 1.0
        check_everything_acknowledged_is_stored_once(s, load)
    finally:
        s.stop()


def test_a_commit_whose_answer_was_lost_does_not_wedge_the_writer(db_url: str) -> None:
    """The connection dies after COMMIT reached the database: the write raised, yet it is stored.

    Rewards then answer UNAVAILABLE once, a retry says "duplicate", and later rewards are learned.
    """
    s = ServerThread(make_settings(db_url))
    try:
        store = s.engine.store
        real_write, real_begin = store.write, store._begin
        armed, lost = threading.Event(), threading.Event()

        class CommitThenFail:
            """A transaction whose COMMIT lands, after which the connection fails."""

            def __init__(self) -> None:
                self.tx = real_begin()

            def __enter__(self) -> Any:
                return self.tx.__enter__()

            def __exit__(self, *exc: object) -> None:
                self.tx.__exit__(*exc)
                if exc[0] is None and armed.is_set() and not lost.is_set():
                    lost.set()
                    raise Unavailable("database unavailable: OperationalError")

        def write(decisions: Any, closes: Any, *more: Any) -> Any:
            if closes:
                armed.set()
            try:
                return real_write(decisions, closes, *more)
            finally:
                armed.clear()

        store.write = write
        store._begin = CommitThenFail
        with s.client() as c:
            c.apply([envs.placement()])
            first = c.choose("app_home_banner", event_id="first")
            with pytest.raises(grpc.RpcError) as e:
                c.reward(first.event_id, 1.0, reward_id="r1", retry=False)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert c.reward(first.event_id, 1.0, reward_id="r1") == "duplicate"  # it was stored after all
            for i in range(5):
                d = c.choose("app_home_banner", event_id=f"next-{i}")
                assert c.reward(d.event_id, 0.5) == "learned"
        load = Load(s.target)
        load.values = {"first": 1.0, **{f"next-{i}": 0.5 for i in range(5)}}
        load.acked = {k: "learned" for k in load.values}
        load.chosen = 6
        check_everything_acknowledged_is_stored_once(s, load)
    finally:
        s.stop()


def test_a_reward_whose_caller_gave_up_during_an_outage_still_settles_its_budget(db_url: str) -> None:
    """The close was queued when the caller's deadline passed: it lands later, and the window's
    held reward cost must be settled then, not stay reserved in memory until a restart."""
    spec = PlacementSpec.model_validate(
        {"id": "p", "learn_at": "reward", "arms": [{"id": "paid", "cost_per_reward": 1.0, "budget": {"total": 100}}]}
    )
    s = ServerThread(make_settings(db_url))
    try:
        with s.client() as c:
            c.apply([spec])
            d = c.choose("p")
            assert c.stats("p").budgets[0].reserved == 1.0
            lock = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            with pytest.raises(grpc.RpcError) as e:
                c.decision.Reward(decision_pb2.RewardRequest(event_id=d.event_id, reward=1.0), timeout=0.5)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            lock.execute("ROLLBACK")
            lock.close()
            assert c.reward(d.event_id, 1.0) == "duplicate"  # the first attempt landed after all
            b = c.stats("p").budgets[0]
            assert (b.spent, b.reserved, b.remaining) == (1.0, 0.0, 99.0)
    finally:
        s.stop()
