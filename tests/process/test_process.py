"""`nextbest serve` as a real process: SIGTERM drains and exits 0; state survives; the CLI works."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from nextbest.client import NextbestClient
from tests.harness import ROOT, ServerProcess, until

APPLY = """placements:
  - id: app_home_banner
    exploration: {algorithm: squarecb}
    learn_at: reward
    arms:
      - {id: data_5gb_7d, features: {category: data, price: 4.99, validity_days: 7}}
      - {id: data_20gb_30d, features: {category: data, price: 14.99, validity_days: 30}}
      - {id: voice_300min, features: {category: voice, price: 5.99}}
      - {id: combo_10gb, features: {category: combo, price: 19.99}}
      - {id: loyalty_pts, features: {category: loyalty, price: 0}}
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nextbest.cli.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_sigterm_exits_zero_and_everything_survives_a_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/nb.db"
    cfg = tmp_path / "placements.yaml"
    cfg.write_text(APPLY)
    p = ServerProcess(db)
    try:
        plan = cli("apply", str(cfg), "--dry-run", "--target", p.target)
        assert plan.returncode == 0, plan.stderr
        assert "would create placement app_home_banner" in plan.stdout and "nothing applied" in plan.stdout
        applied = cli("apply", str(cfg), "--target", p.target)
        assert "6 change(s) applied" in applied.stdout, applied.stdout
        assert "no changes" in cli("apply", str(cfg), "--target", p.target).stdout
        with NextbestClient(p.target) as c:
            events = [c.choose("app_home_banner", {"segment": "youth"}, event_id=f"e{i}") for i in range(50)]
            for d in events[:20]:
                assert c.reward(d.event_id, 1.0) == "learned"
            deadline = time.monotonic() + 20
            while (before := c.stats("app_home_banner")).model_version < 20:  # the learner is a little behind
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        code = p.terminate()
    assert code == 0
    p = ServerProcess(db)
    try:
        with NextbestClient(p.target) as c:
            after = c.stats("app_home_banner")
            assert after == before
            assert after.decisions == 50 and sum(a.rewards for a in after.arms) == 20
            assert after.model_version == 20
            assert c.reward("e0", 1.0) == "duplicate"
            assert c.reward("e30", 1.0) == "learned"
        out = cli("stats", "app_home_banner", "--json", "--target", p.target)
        assert json.loads(out.stdout)["decisions"] == "50"
    finally:
        assert p.terminate() == 0


def test_invalid_apply_file_names_line_and_field_and_applies_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(APPLY.replace("price: 5.99", "price: .nan"))
    p = ServerProcess(f"sqlite:///{tmp_path}/nb.db")
    try:
        r = cli("apply", str(bad), "--target", p.target)
        assert r.returncode == 2
        assert f"{bad}:8: placements[0].arms[2].features: price must be a finite number" in r.stderr
        with NextbestClient(p.target) as c:
            assert c.placements() == []
    finally:
        p.terminate()


def test_serve_loads_init_config_only_into_an_empty_database(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/nb.db"
    p = ServerProcess(db, "--init-config", str(ROOT / "scripts" / "demo.yaml"))
    try:
        with NextbestClient(p.target) as c:
            assert {x.id for x in c.placements()} == {"app_home_banner", "ussd_main_menu"}
    finally:
        p.terminate()


def test_kill_9_mid_traffic_loses_no_acknowledged_reward_and_learns_none_twice(tmp_path: Path) -> None:
    import threading

    import grpc

    from tests import envs

    db = f"sqlite:///{tmp_path}/nb.db"
    p = ServerProcess(db, env={"NEXTBEST_SNAPSHOT_EVERY": "50"})
    acked: list[str] = []
    with NextbestClient(p.target) as c:
        c.apply([envs.placement(reward_window=3600)])

    def load() -> None:
        with NextbestClient(p.target, timeout=2) as c:
            for i in range(100_000):
                try:
                    d = c.choose("app_home_banner", {"segment": envs.SEGMENTS[i % 5]})
                    if c.reward(d.event_id, float(i % 2)) == "learned":
                        acked.append(d.event_id)
                except grpc.RpcError:
                    return

    t = threading.Thread(target=load)
    t.start()
    until(lambda: len(acked) > 150 or not t.is_alive())  # three snapshots' worth, and the log past them
    p.kill()  # SIGKILL: no flush, no snapshot
    t.join(10)
    assert len(acked) > 50
    p = ServerProcess(db)
    try:
        with NextbestClient(p.target) as c:
            for e in acked:
                assert c.reward(e, 1.0) == "duplicate"  # every acknowledged reward survived
            s = c.stats("app_home_banner")
            assert s.model_version == sum(a.rewards for a in s.arms) >= len(acked)  # snapshot + log, once each
    finally:
        p.terminate()


def test_kill_9_under_learn_at_window_close_keeps_every_first_reward_for_the_close(tmp_path: Path) -> None:
    """The default learn_at: an acknowledged first reward waits for its window's close; after a
    kill -9 the restarted server takes the windows over with their stored rewards and learns
    each decision once, with that reward, in decision order."""
    import threading

    import grpc
    from sqlalchemy import create_engine, text

    from tests import envs

    db = f"sqlite:///{tmp_path}/nb.db"
    p = ServerProcess(db, env={"NEXTBEST_SWEEP_INTERVAL": "0.1"})
    acked: dict[str, float] = {}
    with NextbestClient(p.target) as c:
        c.apply([envs.placement(reward_window=4, learn_at="window_close")])

    def load() -> None:
        with NextbestClient(p.target, timeout=2) as c:
            for i in range(100_000):
                try:
                    d = c.choose("app_home_banner", {"segment": envs.SEGMENTS[i % 5]})
                    if i % 3 and c.reward(d.event_id, float(i % 3 == 1)) == "learned":
                        acked[d.event_id] = float(i % 3 == 1)
                except grpc.RpcError:
                    return

    t = threading.Thread(target=load)
    t.start()
    until(lambda: len(acked) > 90 or not t.is_alive())  # mid-traffic, windows of 4 s all open
    p.kill()  # SIGKILL: no flush, no snapshot
    t.join(10)
    assert len(acked) > 30
    p = ServerProcess(db, env={"NEXTBEST_SWEEP_INTERVAL": "0.1"})
    try:
        with NextbestClient(p.target) as c:
            deadline = time.monotonic() + 30
            while c.stats("app_home_banner").pending and time.monotonic() < deadline:
                time.sleep(0.2)
            s = c.stats("app_home_banner")
            assert s.pending == 0
            for e in list(acked)[:20]:
                assert c.reward(e, 5.0) == "duplicate"
    finally:
        p.terminate()
    eng = create_engine(db)
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT event_id, outcome, reward, learn_seq, created_at FROM decisions")).all()
    eng.dispose()
    by_id = {r[0]: r for r in rows}
    assert all(by_id[e][1] == 1 and by_id[e][2] == r for e, r in acked.items())  # REWARD, the acknowledged value
    seqs = [r[3] for r in rows if r[1] in (1, 2)]
    assert None not in seqs and len(seqs) == len(set(seqs))  # each learned once
    assert s.model_version == len(seqs)


def test_workers_share_one_port(tmp_path: Path) -> None:
    import socket

    from tests import envs
    from tests.harness import postgres_available, postgres_schema, sql, wait_serving

    if not postgres_available():
        import pytest

        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432; --workers not run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with postgres_schema() as url:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nextbest.cli.main", "serve", "--port", str(port), "--db", url, "--workers", "2"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            target = f"127.0.0.1:{port}"
            wait_serving(target)
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(children) == 2
            # Both workers live (each registers at its start): ApplyConfig then answers once both
            # have loaded the change (was a fixed 3 s sleep after it).
            until(lambda: sql(url, "SELECT count(*) FROM servers") == [(2,)])
            with NextbestClient(target) as c:
                c.apply([envs.placement()])
                arms = {c.choose("app_home_banner", {"segment": "youth"}).arm_id for _ in range(40)}
                assert arms <= set(envs.ARMS) and arms
        finally:
            proc.send_signal(2)
            assert proc.wait(30) == 0
