"""The bake-off: the service over gRPC learns as well as Vowpal Wabbit run directly on the same stream."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nextbest.bandit.sim import bakeoff as bk
from nextbest.client import NextbestClient
from tests.harness import ServerThread


def test_streams_and_direct_runs_are_reproducible() -> None:
    ds = bk.load("iris")
    assert ds.X.shape == (150, 4) and ds.classes == 3
    rows = bk.stream(ds, 3, 400)
    assert np.array_equal(rows, bk.stream(ds, 3, 400))
    assert not np.array_equal(rows, bk.stream(ds, 4, 400))
    assert sorted(rows[:150]) == list(range(150))  # whole passes over the data, in seeded orders
    spec = bk.placement(ds, "p")
    a, b = bk.run_direct(ds, list(rows), spec, 3), bk.run_direct(ds, list(rows), spec, 3)
    assert np.array_equal(a.rewards, b.rewards)
    assert a.mean > 0.5  # it learns: random guessing earns 1/3
    assert bk.direct_arguments(spec) == ["--cb_explore_adf", "--quiet", "--ring_size", "4", "-b", "18", "-q", "UA", "--epsilon", "0.05"]


def test_direct_run_with_lag_learns_later() -> None:
    ds = bk.load("wine")
    rows = list(bk.stream(ds, 1, 300))
    spec = bk.placement(ds, "p")
    stale = bk.run_direct(ds, rows, spec, 1, versions=[max(0, t - 50) for t in range(300)])
    assert list(stale.versions[:60:10]) == [0, 0, 0, 0, 0, 0]
    assert stale.versions[-1] == 249
    assert list(bk.run_direct(ds, rows, spec, 1).lag) == [0] * 300


def _quick(server: ServerThread, names: tuple[str, ...], seeds: int, events: int, sync: bool) -> dict[str, dict[str, float]]:
    from nextbest.engine.chooser import placement_salt, uniform_for

    results = []
    with NextbestClient(server.target) as nb:
        for name in names:
            ds = bk.load(name)
            for seed in range(1, seeds + 1):
                pid = f"bk.{name}.s{seed}.{'sync' if sync else 'async'}"
                salt = placement_salt(server.engine.seed, pid)

                def draws(t: int, salt: bytes = salt, pid: str = pid) -> float:
                    return uniform_for(salt, bk.event_id(pid, t))

                wait = None
                if sync:

                    def wait(n: int, pid: str = pid) -> None:
                        # The model's count (what GetStats reports as model_version), read in
                        # process: a GetStats a poll would compete with the learner it waits for.
                        while server.engine.states[pid].model.learned < n:
                            time.sleep(0.0005)

                results.append(bk.compare(nb, ds, seed, events, pid, wait_learned=wait, uniform=draws))
    return bk.summarize(results)


def test_quick_bakeoff_service_learns_like_vw(server: ServerThread) -> None:
    summary = _quick(server, ("iris", "breast_cancer"), seeds=1, events=300, sync=True)
    for name, s in summary.items():
        assert s["direct"] > 0.6, (name, s)  # both sides learn: chance is 1/3 and 1/2
        assert s["mean_lag"] == 0.0, (name, s)
        # Same examples, same arguments, same draws, no lag: the service is VW (exactly, today).
        assert 0.95 <= s["ratio"] <= 1.05, (name, s)


def test_quick_bakeoff_with_learning_lag(server: ServerThread) -> None:
    summary = _quick(server, ("iris",), seeds=2, events=300, sync=False)
    s = summary["iris"]
    assert s["mean_lag"] < 2.0, s  # rewards are learned within a couple of events
    # Lag may cost a little, never much. With 2 seeds x 300 events the no-lag run's own noise
    # is about +-10 %, and a lagged service beat it by 10.2 % in one clean run of four: an upper
    # bound tested that noise, not the service. What the service must match is VW given the
    # same staleness (next line), which removes the noise by replaying the same choices.
    assert s["ratio"] >= 0.9, s
    assert 0.95 <= s["ratio_same_lag"] <= 1.05, s  # VW given the same staleness matches again


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_bakeoff_ratio_at_least_097(server: ServerThread) -> None:
    summary = _quick(server, bk.DATASETS, seeds=10, events=1500, sync=True)
    for name, s in summary.items():
        assert s["ratio"] >= 0.97, (name, s)
