"""A poison batch never wedges the writer: a record the database refuses (a NUL byte in text
on PostgreSQL, a trigger's RAISE on SQLite and PostgreSQL) is found by splitting its batch; it
alone is dropped (a decision: logged and counted) or failed (a reward, close or activation:
RecordRefused, INTERNAL), everything else in the batch is stored and acknowledged, and the
writer goes on. A database that is away still keeps decisions and retries them.

Each test here fails on the writer before this change: that writer retried any failed batch
forever and failed every waiting caller with Unavailable (and had no refusal classification,
no ``on_refused`` hook and no RecordRefused to import).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.errors import Unavailable
from nextbest.bandit.features import feature
from nextbest.engine.writer import BatchWriter
from nextbest.rpc.errors import status_for
from nextbest.storage.base import Activation, Close, Recorded, RewardEvent, WriteResult
from nextbest.storage.refusal import RecordRefused, is_refusal, refusal_reason
from nextbest.storage.sql import SqlStore, open_store
from nextbest.telemetry.metrics import Metrics
from tests import envs
from tests.harness import postgres_available, postgres_schema, running_server

_PG = postgres_available()
NUL = "\x00"
POISON_REWARD = 0.625  # a close with this reward is refused by the trigger both databases get


@dataclass
class Db:
    """A real store with a refusing trigger installed; ``postgres`` says which database."""

    store: SqlStore
    postgres: bool

    def poisoned(self, d: LoggedDecision) -> LoggedDecision:
        """The decision, made one the database refuses: on PostgreSQL a NUL byte in a text
        column (DataError from the driver), on SQLite the trigger on ``poison`` event ids."""
        return replace(d, customer_id=f"c{NUL}1") if self.postgres else d

    def poisoned_key(self) -> str:
        """A reward_id the database refuses (NUL on PostgreSQL, a trigger on SQLite)."""
        return f"poison{NUL}" if self.postgres else "poison"


_SQLITE_TRIGGERS = (
    (
        "CREATE TRIGGER poison_decision BEFORE INSERT ON decisions WHEN NEW.event_id LIKE 'poison%' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned decision'); END"
    ),
    (
        "CREATE TRIGGER poison_event BEFORE INSERT ON reward_events WHEN NEW.reward_id = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned reward'); END"
    ),
    (
        f"CREATE TRIGGER poison_close BEFORE UPDATE ON decisions WHEN NEW.reward = {POISON_REWARD} "
        "BEGIN SELECT RAISE(ABORT, 'poisoned close'); END"
    ),
)
# PostgreSQL refuses decisions and reward rows by itself (NUL bytes); closes by this trigger.
_PG_TRIGGERS = (
    (
        "CREATE FUNCTION poison_close() RETURNS trigger AS $$ BEGIN "
        f"IF NEW.reward = {POISON_REWARD} THEN RAISE EXCEPTION 'poisoned close'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
    ),
    "CREATE TRIGGER poison_close BEFORE UPDATE ON decisions FOR EACH ROW EXECUTE FUNCTION poison_close()",
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/nb.db")
        with s.engine.begin() as c:
            for sql in _SQLITE_TRIGGERS:
                c.execute(text(sql))
        yield Db(s, postgres=False)
        s.close()
        return
    if not _PG:
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (database test)")
    with postgres_schema() as url:
        s = open_store(url)
        with s.engine.begin() as c:
            for sql in _PG_TRIGGERS:
                c.exec_driver_sql(sql)
        yield Db(s, postgres=True)
        s.close()


def decision(event_id: str, activated: bool = True) -> LoggedDecision:
    return LoggedDecision(
        event_id=event_id,
        placement="app_home_banner",
        customer_id="c1",
        timestamp=100.0,
        features=(feature("customer", "segment", "youth"),),
        arms=(("data_5gb", 1), ("voice_300", 1)),
        pmf=(0.75, 0.25),
        chosen=0,
        probability=0.75,
        model_version=1,
        deadline=700.0,
        outcome=Outcome.OPEN,
        activated=activated,
    )


def close(event_id: str, reward: float = 1.0) -> Close:
    return Close(event_id, Outcome.REWARD, reward, 101.0)


class Kinds:
    """Collects the writer's on_refused calls, and counts them in a real Metrics."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.metrics = Metrics()

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)
        self.metrics.refused(kind)

    def counted(self, kind: str) -> float:
        return self.metrics.registry.get_sample_value("nextbest_refused_records_total", {"kind": kind}) or 0.0


async def settle(futs: Sequence[asyncio.Future[Any]], timeout: float = 20.0) -> list[Any]:
    """Each future's result or exception (the writer must answer all of them, never hang)."""
    return list(await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), timeout))


def with_writer(
    store: Any, body: Callable[[BatchWriter], Any], on_refused: Callable[[str], None] | None = None, assign: bool = False
) -> Any:
    async def main() -> Any:
        with ThreadPoolExecutor(1) as pool:
            w = BatchWriter(store, pool, flush_interval=0.01, on_refused=on_refused)
            w.assign_learn_positions = lambda: assign
            w.start()
            try:
                return await body(w)
            finally:
                await w.stop(timeout=20)

    return asyncio.run(main())


def test_a_poisoned_decision_and_reward_are_refused_and_the_rest_of_the_batch_is_stored(db: Db, caplog: pytest.LogCaptureFixture) -> None:
    """One batch from many callers, holding one decision and one reward row the database
    refuses: the others' closes, activation and rewards are acknowledged and stored; the
    refused reward's caller hears RecordRefused; the decision is logged by event id, counted
    and dropped. (The old writer failed every future with Unavailable, and retried forever.)"""
    kinds = Kinds()
    good = [decision(f"good-{i}") for i in range(10)]
    deferred = decision("deferred", activated=False)
    poison = db.poisoned(decision("poison-1"))

    async def body(w: BatchWriter) -> dict[str, Any]:
        # All queued without yielding to the loop: the writer takes them as one batch.
        for d in good[:5] + [poison] + good[5:] + [deferred]:
            w.add_decision(d)
        acted = w.activate(Activation("deferred", 100.0, 900.0))
        kept = w.record(RewardEvent("good-5", 0, 2.0, 100.5, "agg", "k1"))
        refused = w.record(RewardEvent("good-6", 0, 3.0, 100.5, "agg", db.poisoned_key()))
        closes = [w.close_window(close(f"good-{i}", float(i))) for i in range(5)]
        closes.append(w.close_window(close("poison-1")))  # its decision is refused: nothing to close
        closes.append(w.close_window(close("good-0", 9.0)))  # a second close of a window closes nothing
        done = await settle([acted, kept, refused, *closes])
        await w.flush()
        return {"acted": done[0], "kept": done[1], "refused": done[2], "closes": done[3:], "depth": w.depth}

    with caplog.at_level(logging.ERROR, logger="nextbest.engine.writer"):
        out = with_writer(db.store, body, kinds)
    assert out["acted"] is True
    assert out["kept"] is Recorded.STORED
    assert isinstance(out["refused"], RecordRefused)
    assert "the database refused this record" in str(out["refused"])
    assert [c is not None for c in out["closes"]] == [True, True, True, True, True, False, False]  # closes as stored, or None
    assert out["depth"] == 0
    s = db.store
    for i, d in enumerate(good):
        row = s.find_decision(d.event_id)
        assert row is not None
        if i < 5:
            assert (row.outcome, row.reward) == (Outcome.REWARD, float(i))
        else:
            assert row.outcome == Outcome.OPEN
    row = s.find_decision("deferred")
    assert row is not None and row.activated and row.deadline == 900.0
    assert s.find_decision("poison-1") is None
    assert [(e.event_id, e.reward_id) for e in s.open_reward_events()] == [("good-5", "k1")]
    assert sorted(kinds.kinds) == ["decision", "reward"]
    assert kinds.counted("decision") == 1 and kinds.counted("reward") == 1 and kinds.counted("close") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("poison-1" in m and "app_home_banner" in m and "dropped" in m for m in errors), errors
    assert all(len(m) < 600 for m in errors)


def test_the_writer_keeps_going_after_a_refusal(db: Db) -> None:
    """After a batch with a refused decision, the next batches are normal: a later decision
    and its reward are stored and acknowledged, and the refused decision is not retried.
    (The old writer put the refused decision back in every later batch: all of them failed.)"""
    kinds = Kinds()

    async def body(w: BatchWriter) -> tuple[Any, Any, int]:
        w.add_decision(db.poisoned(decision("poison-2")))
        w.add_decision(decision("first"))
        await asyncio.wait_for(w.flush(), 20)
        w.add_decision(decision("later"))
        [ok] = await settle([w.close_window(close("later", 0.5))])
        w.add_decision(decision("last"))
        [ok2] = await settle([w.close_window(close("first", 0.25))])
        return ok, ok2, w.depth

    ok, ok2, depth = with_writer(db.store, body, kinds)
    assert (ok is not None, ok2 is not None, depth) == (True, True, 0)
    assert db.store.find_decision("poison-2") is None
    for eid, reward in (("first", 0.25), ("later", 0.5)):
        row = db.store.find_decision(eid)
        assert row is not None and (row.outcome, row.reward) == (Outcome.REWARD, reward)
    assert db.store.find_decision("last") is not None
    assert kinds.kinds == ["decision"]


def test_a_refused_close_fails_only_its_caller_and_results_map_to_the_right_futures(db: Db) -> None:
    """Closes split across transactions still answer each caller its own result (closed,
    not closed: a second close of a window), the learner's learn positions are given to every
    stored close, and the refused close fails its caller with RecordRefused (INTERNAL), its
    window left open. (The old writer answered all of them Unavailable.)"""
    kinds = Kinds()
    ids = [f"d{i}" for i in range(8)]
    db.store.write([decision(e) for e in ids], [])

    async def body(w: BatchWriter) -> list[Any]:
        futs = [w.close_window(close(e, POISON_REWARD if e == "d3" else 1.0 + i)) for i, e in enumerate(ids)]
        futs.append(w.close_window(close("d5", 7.0)))  # second close of d5: False
        futs.append(w.close_window(close("nope")))  # no such decision: False
        return await settle(futs)

    out = with_writer(db.store, body, kinds, assign=True)
    assert isinstance(out[3], RecordRefused)
    assert status_for(out[3]) == grpc.StatusCode.INTERNAL
    assert [c is not None for c in out[:3] + out[4:]] == [True] * 7 + [False, False]
    assert kinds.kinds == ["close"] and kinds.counted("close") == 1
    rows = {e: db.store.find_decision(e) for e in ids}
    assert rows["d3"] is not None and rows["d3"].outcome == Outcome.OPEN
    seqs = []
    for i, e in enumerate(ids):
        r = rows[e]
        assert r is not None
        if e != "d3":
            assert (r.outcome, r.reward) == (Outcome.REWARD, 1.0 + i)
            seqs.append(r.learn_seq)
    assert sorted(s for s in seqs if s is not None) == list(range(1, 8))  # in write order, none twice


class FlakyStore:
    """The real store behind a write that fails the first calls with the given errors."""

    def __init__(self, store: SqlStore, errors: list[Exception]) -> None:
        self.store = store
        self.errors = errors
        self.calls: list[int] = []  # records per write call

    def write(
        self,
        decisions: Sequence[LoggedDecision],
        closes: Sequence[Close],
        activations: Sequence[Activation] = (),
        events: Sequence[RewardEvent] = (),
        assign: bool = False,
    ) -> WriteResult:
        self.calls.append(len(decisions) + len(closes) + len(activations) + len(events))
        if self.errors:
            raise self.errors.pop(0)
        return self.store.write(decisions, closes, activations, events, assign)


def wrapped(e: Exception) -> Unavailable:
    """What the store raises for a database error: Unavailable from it (server/storage/sqlcore.py)."""
    u = Unavailable(f"database error: {e.__class__.__name__}")
    u.__cause__ = e
    return u


def away() -> Unavailable:
    """What the store raises when the database is locked or its connection lost."""
    return wrapped(OperationalError("INSERT INTO decisions ...", {}, sqlite3.OperationalError("database is locked")))


def refused() -> Unavailable:
    return wrapped(IntegrityError("INSERT INTO decisions ...", {}, sqlite3.IntegrityError("poison")))


def test_a_database_that_is_away_still_keeps_and_retries_decisions(tmp_path: Path) -> None:
    """The database away (a connection error, our own Unavailable) is not a refusal: the whole
    batch is kept and retried, nothing is split or dropped, and waiting callers hear
    Unavailable (retry). (This behaviour is the old writer's; the test fails on it only at the
    import of nextbest.storage.refusal and the on_refused hook it checks is never called.)"""
    store = open_store(f"sqlite:///{tmp_path}/nb.db")
    flaky = FlakyStore(store, [away(), Unavailable("cannot store now"), away()])
    kinds = Kinds()
    assert not is_refusal(flaky.errors[0]) and not is_refusal(flaky.errors[1])

    async def body(w: BatchWriter) -> tuple[Any, Any]:
        for i in range(6):
            w.add_decision(decision(f"a{i}"))
        [first] = await settle([w.close_window(close("a0"))])
        await asyncio.wait_for(w.flush(), 20)  # the decisions are retried until stored
        [second] = await settle([w.close_window(close("a0"))])  # the caller's retry
        return first, second

    try:
        first, second = with_writer(flaky, body, kinds)
        assert isinstance(first, Unavailable) and not isinstance(first, RecordRefused)
        assert second is not None and second.event_id == "a0"  # the close as stored
        assert kinds.kinds == []
        assert flaky.calls[:4] == [7, 6, 6, 6]  # the whole batch each time, never split
        for i in range(6):
            assert store.find_decision(f"a{i}") is not None
    finally:
        store.close()


def test_the_database_going_away_while_a_batch_is_split_drops_nothing(tmp_path: Path) -> None:
    """A refusal starts a split; the database then goes away: what was not written yet is
    kept (decisions) or failed with Unavailable (callers retry), never dropped as refused.
    (The old writer never split, and answered every caller Unavailable.)"""
    store = open_store(f"sqlite:///{tmp_path}/nb.db")
    flaky = FlakyStore(store, [refused(), away()])
    kinds = Kinds()

    async def body(w: BatchWriter) -> list[Any]:
        for i in range(2):
            w.add_decision(decision(f"b{i}"))
        futs = [w.record(RewardEvent(f"b{i % 2}", 0, 1.0, 100.0, "late", f"r{i}")) for i in range(6)]
        out = await settle(futs)
        await asyncio.wait_for(w.flush(), 20)
        return out

    try:
        out = with_writer(flaky, body, kinds)
        # Refused (8 records), split: the first half (2 decisions, 2 rewards) fails "away":
        # the decisions are kept and retried alone (2), every reward's caller hears Unavailable.
        # (The old writer retried the 2 decisions at once: [8, 2, 2].)
        assert flaky.calls[:3] == [8, 4, 2]
        assert all(isinstance(r, Unavailable) and not isinstance(r, RecordRefused) for r in out), out
        assert kinds.kinds == []
        for i in range(2):
            assert store.find_decision(f"b{i}") is not None
    finally:
        store.close()


def test_refusals_are_told_from_a_database_that_is_away() -> None:
    """The classification the writer relies on (server/storage/refusal.py)."""

    class Orig(Exception):
        def __init__(self, msg: str, sqlstate: str | None = None) -> None:
            super().__init__(msg)
            self.sqlstate = sqlstate

    assert is_refusal(wrapped(DataError("s", {}, Orig("PostgreSQL text fields cannot contain NUL (0x00) bytes"))))
    assert is_refusal(wrapped(IntegrityError("s", {}, sqlite3.IntegrityError("poison"))))
    assert is_refusal(wrapped(ProgrammingError("s", {}, Orig("poisoned", "P0001"))))  # a trigger's RAISE
    assert is_refusal(wrapped(ProgrammingError("s", {}, sqlite3.ProgrammingError("Error binding parameter 1"))))
    assert is_refusal(wrapped(TypeError("Type is not JSON serializable: object")))
    assert is_refusal(RecordRefused("x"))
    assert not is_refusal(Unavailable("cannot store now"))
    assert not is_refusal(wrapped(OperationalError("s", {}, Orig("server closed the connection", "08006"))))
    assert not is_refusal(wrapped(OperationalError("s", {}, sqlite3.OperationalError("database is locked"))))
    assert not is_refusal(wrapped(ProgrammingError("s", {}, Orig('relation "decisions" does not exist', "42P01"))))
    assert not is_refusal(wrapped(DBAPIError("s", {}, Orig("gone"), connection_invalidated=True)))
    assert not is_refusal(wrapped(RuntimeError("something else")))
    reason = refusal_reason(wrapped(DataError("INSERT ... secret params", {"p": "x"}, Orig("bad value\nDETAIL: " + "y" * 500))))
    assert reason == "Orig: bad value"
    assert len(refusal_reason(wrapped(DataError("s", {}, Orig("z" * 1000))))) == 200


def test_end_to_end_a_refused_reward_answers_internal_and_the_others_are_learned(tmp_path: Path) -> None:
    """Through a real gRPC server on SQLite: rewards sent together with one the database
    refuses are acknowledged ("learned") and stored; the refused one answers INTERNAL (not
    UNAVAILABLE: retrying the same value fails again), is counted, and its window stays open
    so that a corrected reward is learned. (The old writer answered them all UNAVAILABLE.)"""
    url = f"sqlite:///{tmp_path}/nb.db"
    with running_server(url) as s, s.client() as c:
        c.apply([envs.placement(reward_window=600)])
        with s.engine.store.engine.begin() as conn:
            conn.execute(text(_SQLITE_TRIGGERS[2]))
        events = [c.choose("app_home_banner", {"segment": "youth"}, customer_id=f"cust-{i}").event_id for i in range(6)]
        values = [POISON_REWARD if i == 2 else 1.0 for i in range(6)]

        def send(i: int) -> Any:
            try:
                return c.reward(events[i], values[i])
            except grpc.RpcError as e:
                return e

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, range(6)))
        bad = answers[2]
        assert isinstance(bad, grpc.RpcError)
        assert bad.code() == grpc.StatusCode.INTERNAL, bad
        assert "the database refused this record" in (bad.details() or "")
        assert [a for i, a in enumerate(answers) if i != 2] == ["learned"] * 5
        for i in range(6):
            row = s.engine.store.find_decision(events[i])
            assert row is not None
            assert row.outcome == (Outcome.OPEN if i == 2 else Outcome.REWARD)
        assert s.engine.metrics.registry.get_sample_value("nextbest_refused_records_total", {"kind": "close"}) == 1
        assert c.reward(events[2], 0.5) == "learned"  # the writer goes on; the window was kept
        row = s.engine.store.find_decision(events[2])
        assert row is not None and (row.outcome, row.reward) == (Outcome.REWARD, 0.5)
        later = c.choose("app_home_banner", {"segment": "youth"}, event_id=f"later-{uuid.uuid4().hex[:8]}")
        assert c.reward(later.event_id, 1.0) == "learned"


def test_a_window_whose_close_is_refused_is_dropped_once_not_retried_forever(tmp_path: Path) -> None:
    """The sweeper put a refused close back and retried it at every sweep, each time splitting
    a batch and counting a refusal; now the window is given up once and its budget hold freed."""
    url = f"sqlite:///{tmp_path}/nb.db"
    spec = envs.placement(
        reward_window=0.2,
        default_reward=POISON_REWARD,
        arms=[{"id": "a", "cost_per_reward": 1.0, "budget": {"total": 10}}],
    )
    with running_server(url) as s, s.client() as c:
        c.apply([spec])
        with s.engine.store.engine.begin() as conn:
            conn.execute(text(_SQLITE_TRIGGERS[2]))
        d = c.choose("app_home_banner")
        assert d.arm_id == "a"
        deadline = time.monotonic() + 10
        while (d.event_id, 0) in s.engine.windows.open and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # several more sweeps
        assert (d.event_id, 0) not in s.engine.windows.open
        assert s.engine.metrics.registry.get_sample_value("nextbest_refused_records_total", {"kind": "close"}) == 1
        # Freed in this server's ledger; the database, which refused the close, still holds it
        # (GetStats reports the database's figures).
        acc = s.engine.budgets.ledger.accounts[("arm:app_home_banner/a", "total")]
        assert acc.reserved == 0.0 and acc.available >= 1.0
        [b] = [x for x in c.stats("app_home_banner").budgets]
        assert b.reserved == 1.0


def test_a_flush_whose_caller_gave_up_leaves_the_writer_running(db: Db) -> None:
    """A GetStats cancelled by its deadline (a channel may send 1 µs) cancels its flush barrier;
    with nothing queued the writer set a result on that cancelled future, died of the
    InvalidStateError, and every later write and flush hung (seen once in the suite: the next
    GetStats DEADLINE_EXCEEDED, the server's stop "the database did not answer")."""

    async def body(w: BatchWriter) -> tuple[bool, bool]:
        gave_up = asyncio.ensure_future(w.flush())
        await asyncio.sleep(0)  # its barrier is queued
        gave_up.cancel()
        await asyncio.sleep(0.05)  # the writer's next round answers the barriers
        await asyncio.wait_for(w.flush(), 5)  # hung before the fix
        w.add_decision(decision("after"))
        await asyncio.wait_for(w.flush(), 5)
        return gave_up.cancelled(), db.store.find_decision("after") is not None

    assert with_writer(db.store, body) == (True, True)
