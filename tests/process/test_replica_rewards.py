"""Rewards across real server processes on one database (issue #29, points 1, 2, 5 and 8): two
servers on PostgreSQL, and `serve --workers 2` on SQLite. Each test checks the database after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from nextbest.bandit.spec import PlacementSpec
from nextbest.client import NextbestClient
from tests import envs
from tests.harness import (
    ADMIN_TOKEN,
    CHANNEL_TOKEN,
    LIMITED_TOKEN,
    TOKENS,
    ServerProcess,
    sql,
    started_together,
    until,
    wait_serving,
)

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"NEXTBEST_AUTH_TOKENS": TOKENS, "NEXTBEST_REPLICA_POLL_INTERVAL": "0.3", "NEXTBEST_SWEEP_INTERVAL": "0.1"}


def code(fn, *args, **kw) -> grpc.StatusCode | None:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code()
    return None


def two_placements(**kw: object) -> list[PlacementSpec]:
    return [envs.placement("app_home_banner", **kw), envs.placement("ussd_main_menu", **kw)]


def test_a_limited_token_cannot_reward_another_placements_decision_on_either_replica(pg: str) -> None:
    """Point 1: Choose(A, event_id = one of B's ids) on the server not holding B's window is
    ALREADY_EXISTS; a Reward with A's token is NOT_FOUND there and here; B's row is untouched
    and B's own reward is learned."""
    a, b = started_together(
        lambda: ServerProcess(pg, env=AUTH),
        lambda: ServerProcess(pg, "--learner", "never", env=AUTH),
    )
    try:
        with NextbestClient(a.target, token=ADMIN_TOKEN) as admin:
            admin.apply(two_placements(max_abs_reward=1.0))
        with (
            NextbestClient(a.target, token=CHANNEL_TOKEN) as app_a,
            NextbestClient(b.target, token=LIMITED_TOKEN) as ussd_b,
            NextbestClient(a.target, token=LIMITED_TOKEN) as ussd_a,
        ):
            for i in range(5):
                theirs = app_a.choose("app_home_banner", customer_id=f"c{i}").event_id
                time.sleep(0.05)  # A's group commit: the other server sees the row
                assert code(ussd_b.choose, "ussd_main_menu", event_id=theirs) == grpc.StatusCode.ALREADY_EXISTS
                assert code(ussd_b.reward, theirs, 1e9) == grpc.StatusCode.NOT_FOUND
                assert code(ussd_a.reward, theirs, 1.0) == grpc.StatusCode.NOT_FOUND
                assert app_a.reward(theirs, 1.0) == "learned"
        rows = sql(pg, "SELECT placement_id, reward, outcome FROM decisions ORDER BY created_at")
        assert [r[0] for r in rows] == ["app_home_banner"] * 5  # no attacker's decision logged
        assert [r[1] for r in rows] == [1.0] * 5  # B's rewards, not 1e9
        assert sql(pg, "SELECT count(*) FROM budget_accounts WHERE reserved <> 0 OR spent <> 0") == [(0,)]
    finally:
        a.terminate()
        b.terminate()


def test_aggregated_rewards_sent_to_both_replicas_are_all_learned(pg: str) -> None:
    """Point 2: reward_aggregation: sum with rewards to the owner and the other server: every
    reward answered RECORDED is in the learned sum; a new key after the close is LATE, stored."""
    env = {**AUTH, "NEXTBEST_AUTH_TOKENS": ""}
    a, b = started_together(
        lambda: ServerProcess(pg, env=env),
        lambda: ServerProcess(pg, "--learner", "never", env=env),
    )
    try:
        spec = envs.placement("p", reward_aggregation="sum", reward_window=6.0, learn_at="window_close")
        with NextbestClient(a.target) as ca:
            ca.apply([spec])
        with NextbestClient(a.target) as ca, NextbestClient(b.target) as cb:
            ids = [ca.choose("p", customer_id=f"c{i}").event_id for i in range(10)]
            time.sleep(0.05)
            for k, ev in enumerate(ids):
                got = [ca.reward(ev, 1.0, reward_id="a"), cb.reward(ev, 2.0, reward_id="b"), cb.reward(ev, 3.0), ca.reward(ev, 4.0)]
                assert got == ["recorded"] * 4, (k, got)
                assert cb.reward(ev, 2.0, reward_id="b") == "duplicate"
            deadline = time.monotonic() + 20
            while sql(pg, "SELECT count(*) FROM decisions WHERE outcome = 0") != [(0,)]:
                assert time.monotonic() < deadline, "windows not closed"
                time.sleep(0.1)
            assert cb.reward(ids[0], 5.0, reward_id="late") == "late"
        assert sql(pg, "SELECT DISTINCT reward FROM decisions") == [(10.0,)]  # 1 + 2 + 3 + 4, every one
        deadline = time.monotonic() + 20
        while sql(pg, "SELECT count(*) FROM decisions WHERE learn_seq IS NULL") != [(0,)]:
            assert time.monotonic() < deadline, "not learned"
            time.sleep(0.1)
        assert sql(pg, "SELECT count(DISTINCT learn_seq) FROM decisions") == [(10,)]  # each learned once
        assert sql(pg, "SELECT count(*) FROM reward_events WHERE kind = 'late'") == [(1,)]
    finally:
        a.terminate()
        b.terminate()


def test_a_reused_server_made_event_id_is_refused_and_reserves_nothing_across_a_restart(pg: str) -> None:
    """Point 5: a server-made id sent back after its window closed is ALREADY_EXISTS on every
    server, also after a restart; nothing stays in budget_accounts for it."""
    env = {**AUTH, "NEXTBEST_AUTH_TOKENS": ""}
    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "reward_window": 0.3,
            "arms": [{"id": "paid", "features": {"x": 1}, "cost_per_impression": 1.0, "budget": {"total": 100}}],
        }
    )
    a, b = started_together(
        lambda: ServerProcess(pg, env=env),
        lambda: ServerProcess(pg, "--learner", "never", env=env),
    )
    try:
        with NextbestClient(a.target) as ca:
            ca.apply([spec])
            first = ca.choose("p").event_id
        until(lambda: sql(pg, "SELECT count(*) FROM decisions WHERE outcome <> 0") == [(1,)])  # closed
        for s in (a, b):
            with NextbestClient(s.target) as c:
                assert code(c.choose, "p", event_id=first) == grpc.StatusCode.ALREADY_EXISTS
        a.terminate()
        a = ServerProcess(pg, env=env)
        with NextbestClient(a.target) as ca:
            assert code(ca.choose, "p", event_id=first) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        a.terminate()
        b.terminate()
    assert sql(pg, "SELECT count(*) FROM decisions") == [(1,)]
    assert sql(pg, "SELECT spent, reserved FROM budget_accounts") == [(1.0, 0.0)]  # the one decision's impression


def test_a_reward_to_a_replica_while_the_deciding_server_stalls_is_unavailable_then_learned(pg: str) -> None:
    """Point 8: the deciding server stopped (SIGSTOP) before its group commit: the other server
    answers UNAVAILABLE (retry), not NOT_FOUND, for an event that exists; once it runs again the
    retried reward is learned. An id of no live server stays NOT_FOUND."""
    slow = {**AUTH, "NEXTBEST_AUTH_TOKENS": "", "NEXTBEST_FLUSH_INTERVAL": "3", "NEXTBEST_PEER_VISIBILITY_WAIT": "0.1"}
    a, b = started_together(
        lambda: ServerProcess(pg, env=slow),
        lambda: ServerProcess(pg, "--learner", "never", env={**slow, "NEXTBEST_FLUSH_INTERVAL": "0.005"}),
    )
    try:
        with NextbestClient(a.target) as ca:
            ca.apply([envs.placement("p")])
        time.sleep(0.5)
        with NextbestClient(a.target) as ca, NextbestClient(b.target, timeout=5) as cb:
            ids = [ca.choose("p").event_id for _ in range(5)]
            a.proc.send_signal(signal.SIGSTOP)
            try:
                for ev in ids:
                    assert code(cb.reward, ev, 1.0) == grpc.StatusCode.UNAVAILABLE
                forged = "0123456789abcdef-" + "0" * 32  # no such server
                assert code(cb.reward, forged, 1.0) == grpc.StatusCode.NOT_FOUND
            finally:
                a.proc.send_signal(signal.SIGCONT)
            until(lambda: sql(pg, "SELECT count(*) FROM decisions") == [(5,)], 10)  # A's group commit (every 3 s)
            assert [cb.reward(ev, 1.0) for ev in ids] == ["learned"] * 5
    finally:
        a.terminate()
        b.terminate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_workers_on_sqlite_refuse_a_foreign_event_id_and_keep_the_first_decision(tmp_path: Path) -> None:
    """Point 1 on `serve --workers 2` (SQLite): whichever worker gets the Choose, another
    placement's event id is ALREADY_EXISTS, and the log keeps the first decision."""
    db = f"sqlite:///{tmp_path}/nb.db"
    port = _free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nextbest.cli.main", "serve", "--workers", "2", "--port", str(port), "--db", db]
    env = {**os.environ, "NEXTBEST_FLUSH_INTERVAL": "0.005", "NEXTBEST_AUTH_TOKENS": TOKENS}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_serving(target, timeout=60)  # two workers starting on a loaded machine
        with NextbestClient(target, token=ADMIN_TOKEN) as admin:
            admin.apply(two_placements(max_abs_reward=1.0))
        time.sleep(1.0)  # both workers have it
        refused = 0
        for i in range(20):  # new channels: spread over both workers
            with NextbestClient(target, token=CHANNEL_TOKEN) as app, NextbestClient(target, token=LIMITED_TOKEN) as ussd:
                theirs = app.choose("app_home_banner", customer_id=f"c{i}").event_id
                got = code(ussd.choose, "ussd_main_menu", event_id=theirs)
                refused += got == grpc.StatusCode.ALREADY_EXISTS
                assert code(ussd.reward, theirs, 1e9) == grpc.StatusCode.NOT_FOUND
                assert app.reward(theirs, 1.0) == "learned"
        assert refused == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    rows = sql(db, "SELECT placement_id, reward FROM decisions")
    assert len(rows) == 20 and {r[0] for r in rows} == {"app_home_banner"} and {r[1] for r in rows} == {1.0}


def test_a_second_server_on_one_sqlite_file_leaves_the_first_ones_live_windows(tmp_path: Path) -> None:
    """Two `nextbest serve` on one SQLite file (no --workers): the second took every open window
    of the first at its start; now only those of a server that stopped."""
    db = f"sqlite:///{tmp_path}/nb.db"
    env = {"NEXTBEST_REPLICA_POLL_INTERVAL": "0.3"}
    a = ServerProcess(db, env=env)
    b = None
    try:
        with NextbestClient(a.target) as ca:
            ca.apply([envs.placement("p", learn_at="window_close")])
            ids = [ca.choose("p").event_id for _ in range(5)]
        time.sleep(0.2)
        [(owner,)] = sql(db, "SELECT DISTINCT owner FROM decisions")
        b = ServerProcess(db, env=env)
        time.sleep(0.5)
        assert sql(db, "SELECT DISTINCT owner FROM decisions") == [(owner,)]  # still A's
        with NextbestClient(b.target) as cb:
            assert [cb.reward(ev, 1.0) for ev in ids] == ["learned"] * 5  # on A's rows, for A's close
    finally:
        a.terminate()
        if b is not None:
            b.terminate()
