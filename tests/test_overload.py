"""Overload, deadlines, message size and graceful drain, through real gRPC."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bandit.spec import PlacementSpec
from server.client import NextbestClient
from server.overload import OverloadInterceptor
from server.pb.nextbest.v1 import common_pb2, decision_pb2
from tests import envs
from tests.harness import ServerProcess, ServerThread, make_settings


def _code(e: BaseException) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.RpcError) else None  # type: ignore[attr-defined, no-any-return]


def outcomes(futures: list[Any]) -> list[grpc.StatusCode]:
    out = []
    for f in futures:
        try:
            f.result()
            out.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            out.append(_code(e))
    return out


def first_done(futures: list[Any], n: int, timeout: float = 5.0) -> list[Any]:
    """The calls that have finished once n have (the rest are still in flight)."""
    deadline = time.monotonic() + timeout
    while sum(f.done() for f in futures) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return [f for f in futures if f.done()]


@contextmanager
def sqlite_locked(db_url: str) -> Iterator[sqlite3.Connection]:
    """Another connection holds the write lock of the database file until the block ends."""
    conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
def small(db_url: str) -> Iterator[ServerThread]:
    s = ServerThread(make_settings(db_url, max_inflight=3))
    with s.client() as c:
        c.apply([envs.placement()])
    yield s
    s.stop()


def test_a_saturated_method_answers_resource_exhausted_at_once(small: ServerThread) -> None:
    engine = small.engine
    original = engine.choose
    gate = asyncio.Event()

    async def stuck_choose(*args: Any, **kw: Any) -> Any:
        await gate.wait()
        return await original(*args, **kw)

    engine.choose = stuck_choose
    req = decision_pb2.ChooseRequest(placement="app_home_banner")
    with small.client() as c:
        t0 = time.monotonic()
        futures = [c.decision.Choose.future(req, timeout=10) for _ in range(10)]
        refused = first_done(futures, 7)
        waited = time.monotonic() - t0
        time.sleep(0.2)
        assert sum(f.done() for f in futures) == 7
        assert len(refused) == 7 and waited < 2.0  # answered while three calls are still stuck
        assert {_code(f.exception()) for f in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "retry with backoff" in refused[0].exception().details()
        with grpc.insecure_channel(small.target) as ch:  # health is never limited
            check = health_pb2.HealthCheckRequest(service="nextbest.v1.DecisionService")
            assert health_pb2_grpc.HealthStub(ch).Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert c.stats("app_home_banner").decisions == 0  # another method is not limited by Choose's calls
        small.loop.call_soon_threadsafe(gate.set)
        assert outcomes(futures).count(grpc.StatusCode.OK) == 3
        assert c.choose("app_home_banner").arm_id in envs.ARMS  # and service resumes by itself
        assert c.stats("app_home_banner").decisions == 4
    overload = small.running.overload
    assert overload is not None and overload.refused == 7 and overload.inflight == 0


def test_rewards_stuck_on_a_locked_database_do_not_starve_choose(small: ServerThread, db_url: str) -> None:
    with small.client() as c:
        events = [c.choose("app_home_banner", {"segment": "youth"}) for _ in range(5)]
        with sqlite_locked(db_url):
            futures = [c.decision.Reward.future(decision_pb2.RewardRequest(event_id=d.event_id, reward=1.0), timeout=20) for d in events]
            refused = first_done(futures, 2)
            assert [_code(f.exception()) for f in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            t0 = time.monotonic()
            for _ in range(20):
                assert c.choose("app_home_banner").arm_id in envs.ARMS
            assert time.monotonic() - t0 < 2.0
            time.sleep(0.5)
        assert outcomes(futures).count(grpc.StatusCode.OK) == 3  # the lock went away within the busy timeout
        for d in events:  # the refused ones can simply be retried
            assert c.reward(d.event_id, 1.0) in ("learned", "duplicate")
        s = c.stats("app_home_banner")
        assert sum(a.rewards for a in s.arms) == 5 and s.decisions == 25


def test_a_choose_whose_deadline_passes_while_leasing_budget_leaves_no_trace(db_url: str) -> None:
    spec = PlacementSpec.model_validate(
        {"id": "p", "arms": [{"id": "paid", "cost_per_impression": 1.0, "budget": {"total": 10}}]}
    )
    s = ServerThread(make_settings(db_url))
    try:
        with s.client() as c:
            c.apply([spec])
            with sqlite_locked(db_url):  # the budget lease waits for the database
                with pytest.raises(grpc.RpcError) as e:
                    c.decision.Choose(decision_pb2.ChooseRequest(placement="p", event_id="slow-1"), timeout=0.5)
                assert _code(e.value) == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.5)  # the lease finishes in its thread after the caller gave up
            served = [c.choose("p").arm_id for _ in range(12)]
            s.call(s.engine.writer.flush())
            assert s.engine.store.find_decision("slow-1") is None  # no decision, no reservation
            assert served == ["paid"] * 10 + [""] * 2  # and the whole budget is still there to spend
            b = c.stats("p").budgets[0]
            assert (b.spent, b.remaining) == (10.0, 0.0)
    finally:
        s.stop()


class _Context:
    """The little of a ServicerContext the overload guard uses."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_the_guard_drops_a_call_that_reaches_it_after_its_deadline() -> None:
    """gRPC usually cancels such calls itself; the guard is the backstop when it has not yet."""
    guard = OverloadInterceptor(2)
    ran: list[str] = []

    async def work(request: str, context: Any) -> str:
        ran.append(request)
        return request

    behavior = guard._guarded(work, "/nextbest.v1.DecisionService/Choose")

    async def run() -> None:
        assert await behavior("in time", _Context(1.0)) == "in time"
        assert await behavior("no deadline", _Context(None)) == "no deadline"
        late = _Context(0.0)
        with pytest.raises(grpc.aio.AbortError):
            await behavior("too late", late)
        assert late.aborted is not None and late.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(run())
    assert ran == ["in time", "no deadline"] and guard.expired == 1 and guard.inflight == 0


def test_oversized_messages_are_refused_and_the_server_carries_on(db_url: str) -> None:
    s = ServerThread(make_settings(db_url, max_message_bytes=64 * 1024))
    try:
        with s.client() as c:
            c.apply([envs.placement()])
            big = [common_pb2.Feature(name=f"f{i}", text="x" * 1000) for i in range(100)]
            with pytest.raises(grpc.RpcError) as e:
                c.decision.Choose(decision_pb2.ChooseRequest(placement="app_home_banner", features=big), timeout=5)
            assert _code(e.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.choose("app_home_banner").arm_id in envs.ARMS
            assert c.stats("app_home_banner").decisions == 1
    finally:
        s.stop()


def test_sigterm_drains_an_in_flight_reward_then_exits_zero(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/nb.db"
    p = ServerProcess(db)
    try:
        with NextbestClient(p.target) as c:
            c.apply([envs.placement()])
            d = c.choose("app_home_banner", {"segment": "youth"})
            with sqlite_locked(db):  # the reward will wait for the database, in flight
                fut = c.decision.Reward.future(decision_pb2.RewardRequest(event_id=d.event_id, reward=1.0), timeout=20)
                time.sleep(0.3)
                p.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                assert p.proc.poll() is None  # still draining
                with NextbestClient(p.target, timeout=2) as late:
                    with pytest.raises(grpc.RpcError) as e:
                        late.choose("app_home_banner")
                    assert _code(e.value) == grpc.StatusCode.UNAVAILABLE  # no new calls once stopping
                assert not fut.done()
            assert fut.result().status == decision_pb2.REWARD_STATUS_LEARNED
        assert p.proc.wait(30) == 0
    finally:
        if p.proc.poll() is None:
            p.kill()
    p = ServerProcess(db)
    try:
        with NextbestClient(p.target) as c:
            s = c.stats("app_home_banner")
            assert sum(a.rewards for a in s.arms) == 1 and s.model_version == 1
            assert c.reward(d.event_id, 1.0) == "duplicate"
    finally:
        assert p.terminate() == 0
