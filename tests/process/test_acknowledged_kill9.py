"""Acknowledged means visible, also across a kill -9 (issue #29 point 9): under the default
``learn_at: window_close`` and its 10-minute window, every acknowledged reward is in GetStats
and ``nextbest stats`` at once, awaiting the close, and the restarted server shows the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nextbest.client import NextbestClient
from nextbest.v1 import admin_pb2
from tests import envs
from tests.harness import ROOT, ServerProcess

ROUNDS = 300


def test_acknowledged_rewards_are_in_get_stats_before_and_after_a_kill_9(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/nb.db"
    p = ServerProcess(db)
    try:
        total = 0.0
        with NextbestClient(p.target) as c:
            c.apply([envs.placement(learn_at="window_close")])  # the default 10-minute window
            for i in range(ROUNDS):
                d = c.choose("app_home_banner", {"segment": envs.SEGMENTS[i % 5]})
                assert c.reward(d.event_id, float(i % 2)) == "learned"
                total += float(i % 2)
            before = c.stats("app_home_banner")
        p.kill()  # SIGKILL: no flush, no snapshot
    except BaseException:
        p.kill()
        raise

    def figures(s: admin_pb2.GetStatsResponse) -> tuple[float, ...]:
        arms = s.arms
        return (
            sum(a.rewards for a in arms),
            sum(a.reward_sum for a in arms),
            sum(a.rewards_awaiting_close for a in arms),
            sum(a.reward_sum_awaiting_close for a in arms),
            sum(a.rewards_learned for a in arms),
            s.pending,
        )

    assert figures(before) == (ROUNDS, total, ROUNDS, total, 0, ROUNDS)
    p = ServerProcess(db)
    try:
        with NextbestClient(p.target) as c:
            assert figures(c.stats("app_home_banner")) == figures(before)
        out = subprocess.run(
            [sys.executable, "-m", "nextbest.cli.main", "stats", "app_home_banner", "--target", p.target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert f"{ROUNDS} of them, sum {total:.2f}, await their window's close" in out.stdout, out.stdout
    finally:
        p.terminate()
