"""Experiments: a sticky split by customer, a holdout, variants with their own models, shadows, promotion."""

from __future__ import annotations

import time

import numpy as np

from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.chooser import variant_of
from tests import envs
from tests.harness import ServerThread, make_settings, running_server

EXPERIMENT = {
    "holdout": {"share": 0.1, "policy": "uniform"},
    "variants": [
        {"id": "A", "share": 0.45, "exploration": {"algorithm": "squarecb"}},
        {"id": "B", "share": 0.45, "exploration": {"algorithm": "epsilon", "epsilon": 0.2}},
    ],
}


def experiment_placement(**kw: object) -> PlacementSpec:
    return envs.placement(experiment=EXPERIMENT, **kw)


def test_split_matches_the_shares_and_is_sticky() -> None:
    spec = experiment_placement()
    counts = {"holdout": 0, "A": 0, "B": 0}
    for i in range(20_000):
        v = variant_of(spec, f"cust-{i}", f"e{i}")
        counts[v] += 1
        assert variant_of(spec, f"cust-{i}", f"other-event-{i}") == v  # sticky per customer
    for name, share in (("holdout", 0.1), ("A", 0.45), ("B", 0.45)):
        sd = (20_000 * share * (1 - share)) ** 0.5
        assert abs(counts[name] - 20_000 * share) < 4 * sd, counts
    salted = envs.placement(experiment={**EXPERIMENT, "salt": "v2"})
    moved = sum(variant_of(spec, f"cust-{i}", "") != variant_of(salted, f"cust-{i}", "") for i in range(2000))
    assert moved > 600  # a new salt reshuffles customers


def wait_learned(s: ServerThread, placement: str, slot: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while s.engine.states[placement].models[slot].model.learned < n:
        assert time.monotonic() < deadline, f"slot {slot!r} did not learn {n}"
        time.sleep(0.02)


def test_variants_serve_with_their_own_models_and_the_holdout_uniformly(db_url: str) -> None:
    rng = np.random.default_rng(3)
    with running_server(db_url) as s, s.client() as c:
        c.apply([experiment_placement()])
        seen: dict[str, int] = {}
        for i in range(600):
            seg = int(rng.integers(5))
            d = c.choose("app_home_banner", {"segment": envs.SEGMENTS[seg]}, customer_id=f"c{i % 200}")
            seen[d.variant] = seen.get(d.variant, 0) + 1
            if d.variant == "holdout":
                assert d.probability == 1 / len(envs.ARMS) and d.model_version == 0
            c.reward(d.event_id, float(rng.random() < envs.P[seg, envs.ARMS.index(d.arm_id)]))
        assert set(seen) == {"holdout", "A", "B"}
        wait_learned(s, "app_home_banner", "A", seen["A"])
        wait_learned(s, "app_home_banner", "B", seen["B"])
        st = c.stats("app_home_banner")
        models = {m.name: m.learned for m in st.models}
        assert models == {"": 0, "A": seen["A"], "B": seen["B"]}  # each learns only its own traffic
        variants = {v.variant: v for v in st.variants}
        assert {k: v.decisions for k, v in variants.items()} == seen
        assert 0 < variants["holdout"].mean_reward < variants["A"].mean_reward + 0.3


def test_stopping_an_experiment_promotes_the_winner_with_its_model(db_url: str) -> None:
    s = ServerThread(make_settings(db_url))
    try:
        with s.client() as c:
            c.apply([experiment_placement()])
            served = {"A": 0, "B": 0, "holdout": 0}
            for i in range(300):
                d = c.choose("app_home_banner", {"segment": "youth"}, customer_id=f"c{i}")
                served[d.variant] += 1
                c.reward(d.event_id, 1.0 if d.arm_id == "data_5gb" else 0.0)
            wait_learned(s, "app_home_banner", "A", served["A"])
            a_learned = s.engine.states["app_home_banner"].models["A"].model.learned
            assert a_learned > 50
            winner = envs.placement(exploration={"algorithm": "squarecb"}, promote="A")
            changes = c.apply([winner])
            assert any("experiment" in " ".join(ch.details) for ch in changes)
            assert s.engine.states["app_home_banner"].models[""].model.learned == a_learned
            d = c.choose("app_home_banner", {"segment": "youth"}, customer_id="c1")
            assert d.variant == "" and d.model_version == a_learned
            assert c.apply([winner]) == []  # applying it again changes nothing
    finally:
        s.stop()
    with running_server(db_url) as s2:
        assert s2.engine.states["app_home_banner"].models[""].model.learned == a_learned  # survives a restart


def test_a_shadow_learns_to_agree_with_a_deterministic_serving_policy(db_url: str) -> None:
    rules = [{"when": {"customer.segment": seg}, "arm": envs.ARMS[int(np.argmax(envs.P[i]))]} for i, seg in enumerate(envs.SEGMENTS)]
    spec = envs.placement(
        experiment={"holdout": {"share": 1.0, "policy": "rules", "rules": rules, "arm": "loyalty_pts"}},
        shadows=[{"id": "candidate"}],
    )
    rng = np.random.default_rng(5)
    with running_server(db_url) as s, s.client() as c:
        c.apply([spec])
        for i in range(1500):
            seg = int(rng.integers(5))
            d = c.choose("app_home_banner", {"customer": {"segment": envs.SEGMENTS[seg]}}, customer_id=f"c{i}")
            assert d.variant == "holdout" and d.probability == 1.0
            assert d.arm_id == rules[seg]["arm"]
            c.reward(d.event_id, float(rng.random() < envs.P[seg, envs.ARMS.index(d.arm_id)]))
        wait_learned(s, "app_home_banner", "shadow:candidate", 1500)
        shadow = next(m for m in c.stats("app_home_banner").models if m.name == "shadow:candidate")
        assert shadow.scored == 1500
        assert shadow.agreement > 0.9, shadow
        assert 0.3 < shadow.estimated_value < 0.8  # IPS value of its greedy policy (truth about 0.54)
