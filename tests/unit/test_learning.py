"""The service learns context-dependent choices through real gRPC, and keeps them over a restart."""

from __future__ import annotations

import time

import numpy as np

from tests import envs
from tests.harness import ServerThread, make_settings


def drive(client, rng: np.random.Generator, n: int, placement: str = "app_home_banner", model=None) -> list[float]:
    """Choose, then reward; with ``model``, keep in step with the learner so a run is reproducible
    whatever the machine's load (the learner learns asynchronously, a few ms behind)."""
    rewards = []
    for i in range(n):
        seg = int(rng.integers(len(envs.SEGMENTS)))
        # Server-made ids: a caller-chosen one waits for its insert (the store decides it is new).
        d = client.choose(placement, {"customer": {"segment": envs.SEGMENTS[seg]}})
        r = float(rng.random() < envs.P[seg, envs.ARMS.index(d.arm_id)])
        assert client.reward(d.event_id, r) == "learned"
        rewards.append(r)
        while model is not None and model.learned < i + 1:
            time.sleep(0.0005)
    return rewards


# 1,800 rounds (was 2,500; the test took 33 s on a quiet machine): the last 1,000 earn within
# 0.01 of what the last 1,000 of 2,500 did, and the worst seed is as far above the bound (below).
ROUNDS = 1800


def test_learns_best_arm_per_segment_and_keeps_it_after_restart(db_url: str) -> None:
    rng = np.random.default_rng(7)
    # A fixed secret: the server's exploration draws repeat too (one unseeded run of many, on a
    # loaded machine, earned 0.393; kept as a lead in the notes, not reproduced in 8 reruns).
    s = ServerThread(make_settings(db_url, seed="learning-test"))
    try:
        with s.client() as c:
            c.apply([envs.placement()])
            rewards = drive(c, rng, ROUNDS, model=s.engine.states["app_home_banner"].model)
            before = c.stats("app_home_banner")
    finally:
        s.stop()
    last = float(np.mean(rewards[-1000:]))
    # Best possible 0.56, uniform 0.20. The model (CbModel, squarecb exploration as the server
    # draws it, learned in step) on this environment, 20 seeds of the environment and of the
    # draws: the last 1,000 of 2,500 rounds earn 0.52 on average (sd 0.016, 0.49 at worst); of
    # 4,000 rounds, 0.53 (sd 0.014, 0.51 at worst). Rerun with 20 other seeds: of 1,800 rounds
    # 0.514 (sd 0.029, 0.468 at worst), of 2,000 0.518 (0.470), of 2,500 0.520 (0.466): 1,800
    # keep the worst seed as far above the bound as 2,500 did.
    assert last > 0.42, last
    assert last > 2 * envs.uniform_mean()
    assert sum(a.impressions for a in before.arms) == ROUNDS
    s = ServerThread(make_settings(db_url, seed="learning-test"))
    try:
        with s.client() as c:
            after = c.stats("app_home_banner")
            assert [(a.arm_id, a.impressions, a.rewards, a.reward_sum) for a in after.arms] == [
                (a.arm_id, a.impressions, a.rewards, a.reward_sum) for a in before.arms
            ]
            assert after.model_version == before.model_version == ROUNDS
            # The restored model picks each segment's best arm from the first requests.
            hits = 0
            for seg, name in enumerate(envs.SEGMENTS):
                for _ in range(10):
                    d = c.choose("app_home_banner", {"customer": {"segment": name}})
                    hits += d.arm_id == envs.ARMS[int(np.argmax(envs.P[seg]))]
            # 50 draws; squarecb after 2,500 examples is nearly greedy (46 of 50 at worst, 20 seeds); after
            # 1,800, 46 of 50 expected on average (38.5 for the worst of 20 other seeds)
            assert hits >= 35, hits
    finally:
        s.stop()


def test_learning_from_the_cache_equals_learning_from_the_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The learner reuses each Choose's VW text when it has it (learn_cache); without it, it
    rebuilds the text from the log. Same traffic, same seed: the same model either way."""
    from nextbest.bandit.features import feature, shared_line

    models = []
    for cache in (0, 20_000):
        s = ServerThread(make_settings(f"sqlite:///{tmp_path}/nb{cache}.db", seed="same", learn_cache=cache))
        try:
            with s.client() as c:
                c.apply([envs.placement()])
                ps = s.engine.states["app_home_banner"]
                for i in range(60):
                    seg = ("youth", "family", "business")[i % 3]
                    d = c.choose("app_home_banner", {"customer": {"segment": seg, "arpu": 10.0 + i}}, event_id=f"e{i}")
                    c.reward(d.event_id, float(d.arm_id.endswith(seg[0])))
                    deadline = time.monotonic() + 20
                    while ps.model.learned < i + 1:  # each Choose sees the same model in both runs
                        assert time.monotonic() < deadline
                        time.sleep(0.002)
            probe = shared_line([feature("customer", "segment", "family"), feature("customer", "arpu", 15.0)])
            models.append(ps.model.expected_rewards(probe, [a.line for a in ps.arms]))
            assert s.engine.learner.cache_misses == (60 if cache == 0 else 0)
        finally:
            s.stop()
    assert np.any(models[0] != 0.0)
    np.testing.assert_array_equal(models[0], models[1])
