"""learn_at: a decision is learned once its window closes, in decision order (the default), or at
its first reward; channels that report only successes then learn as well as those that report
every outcome."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nextbest.bandit.spec import PlacementSpec
from tests.harness import ROOT, FakeClock, running_server

SEGMENTS = ("s0", "s1", "s2")
ARMS = ("a0", "a1", "a2", "a3", "a4")
P = np.full((3, 5), 0.2)  # the oracle earns 0.7, a uniform policy 0.3
P[0, 0] = P[1, 2] = P[2, 4] = 0.7


def wait_for(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def spec(pid: str, **kw: object) -> PlacementSpec:
    return PlacementSpec.model_validate({"id": pid, "arms": [{"id": a} for a in ARMS], **kw})


def test_window_close_learns_each_decision_once_at_its_close_in_decision_order(db_url: str) -> None:
    clock = FakeClock()
    with running_server(db_url, clock=clock, sweep_interval=60) as s, s.client() as c:
        c.apply([spec("p", reward_window=10, default_reward=0)])
        ps = s.engine.states["p"]
        ids = [c.choose("p", {"customer": {"segment": "s0"}}).event_id for _ in range(4)]
        assert c.reward(ids[2], 1.0) == "learned"  # durable, and it will be learned exactly once
        assert c.reward(ids[2], 5.0) == "duplicate"  # the first reward is the one learned
        assert c.reward(ids[0], 0.5) == "learned"
        time.sleep(0.2)
        assert ps.model.learned == 0  # nothing is learned before the windows close
        assert c.stats("p").pending == 4
        clock.advance(11)
        assert s.call(s.engine.windows.sweep()) == 4
        wait_for(lambda: ps.model.learned == 4)
        rows = [s.engine.store.find_decision(e) for e in ids]
        assert [(r.outcome.name, r.reward) for r in rows] == [("REWARD", 0.5), ("DEFAULT", 0.0), ("REWARD", 1.0), ("DEFAULT", 0.0)]
        seqs = [r.learn_seq for r in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4  # learned in the order decided
        assert c.reward(ids[1], 1.0) == "late"


def test_window_close_keeps_a_first_reward_over_a_restart_and_a_change_of_learn_at(db_url: str) -> None:
    clock = FakeClock()
    with running_server(db_url, clock=clock, sweep_interval=60) as s, s.client() as c:
        c.apply([spec("p", reward_window=10)])
        d = c.choose("p", {"customer": {"segment": "s1"}})
        assert c.reward(d.event_id, 2.0) == "learned"
    with running_server(db_url, clock=clock, sweep_interval=60) as s, s.client() as c:
        model = s.engine.states["p"].model
        c.apply([spec("p", reward_window=10, learn_at="reward")])
        assert s.engine.states["p"].model is model  # changing learn_at keeps the model
        assert c.reward(d.event_id, 3.0) == "duplicate"  # the stored first reward still holds
        fresh = c.choose("p", {"customer": {"segment": "s1"}})
        assert c.reward(fresh.event_id, 1.0) == "learned"
        wait_for(lambda: s.engine.states["p"].model.learned == 1)  # learn_at: reward learns at once
        clock.advance(11)
        s.call(s.engine.windows.sweep())
        wait_for(lambda: s.engine.states["p"].model.learned == 2)
        assert s.engine.store.find_decision(d.event_id).reward == 2.0


# Rounds of a run. With 2,500 (was 4,000: the test took 39 s on a quiet machine), seed 3, three
# runs of each (its own server secret each time) on the shared machine: every outcome at once
# 0.695, 0.685, 0.700 over rounds 1001-2500, successes only at the close 0.695, 0.690, 0.695
# (ratios 0.99-1.01): learning is done by round 1000 (nextbest.bandit.sim.delayed, seeds 1-12:
# 2,500 rounds give the same ratio of the two as 4,000, 0.995 at worst), so the bounds below
# keep their margin (0.09 above 0.6; the ratio 0.04 above 0.95).
ROUNDS = 2500


def run(s, c, pid: str, successes_only: bool, clock: FakeClock, seed: int, rounds: int = ROUNDS) -> float:  # type: ignore[no-untyped-def]
    """Rounds of one customer each; 1 ms of the fake clock per round, windows of 150 rounds,
    swept every 10 rounds. Returns the mean reward over rounds 1001 to the end."""
    rng = np.random.default_rng(seed)
    earned = []
    for i in range(rounds):
        seg = int(rng.integers(3))
        d = c.choose(pid, {"customer": {"segment": SEGMENTS[seg]}})
        r = float(rng.random() < P[seg, ARMS.index(d.arm_id)])
        earned.append(r)
        if r > 0 or not successes_only:
            c.reward(d.event_id, r)
        clock.advance(0.001)
        if i % 10 == 9:
            s.call(s.engine.windows.sweep())
    return float(np.mean(earned[1000:]))


def one_run(db: str, successes_only: bool, seed: int = 3) -> float:
    """One run on its own in-process server and fake clock."""
    clock = FakeClock()
    with running_server(db, clock=clock, sweep_interval=60) as s, s.client() as c:
        kw = {} if successes_only else {"learn_at": "reward"}
        c.apply([spec("p", reward_window=0.15, **kw)])
        return run(s, c, "p", successes_only, clock, seed)


def test_success_only_reporting_learns_as_well_as_reporting_every_outcome_at_once(tmp_path: Path) -> None:
    """Through gRPC, SquareCB (the default): reporting only successes with the default settings
    (learn_at: window_close) against every outcome learned at its reward. Before, learning each
    success at once and each failure at the close (and every update weighted by 1/probability)
    reached about 0.64 in these rounds. The every-outcome run goes in a second process, so the
    two use both cores (each is one process's client and server sharing its GIL)."""
    other = subprocess.Popen(
        [sys.executable, "-m", "tests.service.test_learn_order", f"sqlite:///{tmp_path / 'every.db'}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    successes = one_run(f"sqlite:///{tmp_path / 'successes.db'}", successes_only=True)
    out, _ = other.communicate(timeout=240)
    assert other.returncode == 0
    every = float(out.strip().splitlines()[-1])
    print(f"mean reward, rounds 1001-{ROUNDS}: every outcome at once {every:.3f}, successes only at the close {successes:.3f}")
    assert every > 0.6 and successes > 0.6  # both learned (uniform 0.3, oracle 0.7)
    assert successes >= 0.95 * every


def test_a_first_reward_still_being_stored_at_the_deadline_is_the_one_learned(db_url: str) -> None:
    """The sweep used to close a window whose accepted reward was still being written with the
    default reward: acknowledged, stored, and never learned. Now it waits for the write."""
    import sqlite3
    import threading

    clock = FakeClock()
    with running_server(db_url, clock=clock, sweep_interval=60) as s, s.client() as c:
        c.apply([spec("p", reward_window=10, default_reward=0)])
        d = c.choose("p", {"customer": {"segment": "s0"}})
        time.sleep(0.1)  # the decision is committed
        lock = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # the reward's write waits for this
        answers: list[str] = []
        t = threading.Thread(target=lambda: answers.append(c.reward(d.event_id, 1.0)))
        t.start()
        wait_for(lambda: bool(s.engine.windows.open[(d.event_id, 0)].writing))
        clock.advance(11)  # the deadline passes while the reward is being stored
        assert s.call(s.engine.windows.sweep()) == 0  # not closed under it
        lock.execute("ROLLBACK")
        lock.close()
        t.join(10)
        assert answers == ["learned"]
        assert s.call(s.engine.windows.sweep()) == 1
        wait_for(lambda: s.engine.states["p"].model.learned == 1)
        row = s.engine.store.find_decision(d.event_id)
        assert (row.outcome.name, row.reward) == ("REWARD", 1.0)


if __name__ == "__main__":  # the every-outcome run of the test above, in its own process
    print(one_run(sys.argv[1], successes_only=False))


@pytest.mark.postgres
def test_across_replicas_the_first_reward_is_the_one_learned_whichever_server_gets_it() -> None:
    """Under window_close the first reward is on the decision's row: a reward to the server that
    did not decide used to close the window at once with its own value (the owner's stored first
    reward replaced), or was acknowledged and then lost to the owner's close."""
    from tests.harness import ServerThread, make_settings, postgres_available, postgres_schema

    if not postgres_available():
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    with postgres_schema() as url:
        a = ServerThread(make_settings(url))
        b = ServerThread(make_settings(url, learner="never"))
        try:
            with a.client() as ca, b.client() as cb:
                arms = [{"id": x, "cost_per_reward": 1.0, "budget": {"total": 100}} for x in ARMS]
                ca.apply([PlacementSpec.model_validate({"id": "p", "arms": arms, "reward_window": 1.0})])
                b.call(b.engine.config.reload())
                one, two = (ca.choose("p", {"customer": {"segment": "s0"}}) for _ in range(2))
                time.sleep(0.1)  # both committed, so the other server finds them
                assert ca.reward(one.event_id, 1.0) == "learned"  # the owner first
                assert cb.reward(one.event_id, 0.0) == "duplicate"
                assert cb.reward(two.event_id, 1.0) == "learned"  # the other server first
                assert ca.reward(two.event_id, 0.0) == "duplicate"
                wait_for(lambda: ca.stats("p").pending == 0)
                rows = [a.engine.store.find_decision(d.event_id) for d in (one, two)]
                assert [(r.outcome.name, r.reward) for r in rows] == [("REWARD", 1.0), ("REWARD", 1.0)]
                wait_for(lambda: a.engine.states["p"].model.learned == 2)
                held = [acc.reserved for acc in a.engine.budgets.ledger.accounts.values()]
                assert held and all(h == 0.0 for h in held)  # both reward costs settled on the owner
                spent = sum(v.spent for v in ca.stats("p").budgets)
                assert spent == 2.0  # each positive reward spent its cost once
        finally:
            a.stop()
            b.stop()
