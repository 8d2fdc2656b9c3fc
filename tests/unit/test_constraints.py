"""Properties of the decision pipeline under budgets, contact policies and fatigue."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nextbest.bandit.budget import Account, Ledger
from nextbest.bandit.contact import Impression, blocked, penalty
from nextbest.bandit.decider import ArmView, Candidate, decide, explore
from nextbest.bandit.spec import ArmSpec, ContactRule, ExplorationSpec, FatigueSpec, PlacementSpec


class FixedModel:
    """Stands in for a VW model: fixed expected rewards per arm."""

    def __init__(self, values: dict[str, float], learned: int = 100) -> None:
        self.values = values
        self.learned = learned

    def expected_rewards(self, shared: str, lines: list[str]) -> np.ndarray:
        return np.array([self.values[line.split()[1].removeprefix("arm=")] for line in lines], dtype=np.float64)


algorithms = st.sampled_from(
    [
        ExplorationSpec(algorithm="epsilon", epsilon=0.2),
        ExplorationSpec(algorithm="softmax", lam=3.0),
        ExplorationSpec(algorithm="squarecb"),
    ]
)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[PlacementSpec, list[Candidate], FixedModel, list[Impression]]:
    n = draw(st.integers(1, 8))
    arms = []
    candidates = []
    values = {}
    for i in range(n):
        cost = draw(st.sampled_from([0.0, 1.0, 2.5]))
        spec = ArmSpec(id=f"a{i}", cost_per_impression=cost, cost_per_reward=draw(st.sampled_from([0.0, 3.0])))
        arms.append(spec)
        accounts = []
        if cost and draw(st.booleans()):
            limit = draw(st.floats(1.0, 20.0))
            used = draw(st.floats(0.0, limit))
            accounts.append(Account(f"arm:p/a{i}", "total", limit, 0.0, None, available=limit - used, spent=used))
        candidates.append(Candidate(ArmView.of(spec, 1), accounts, acceptance=0.3))
        values[spec.id] = draw(st.floats(-1, 2))
    rules = [ContactRule(max_impressions=draw(st.integers(1, 3)), per="customer_arm", window=86400.0)]
    placement = PlacementSpec(id="p", arms=arms, exploration=draw(algorithms), contact_policies=rules, fatigue=FatigueSpec(strength=0.3))
    history = [
        Impression(
            1000.0 - draw(st.floats(0, 5000)),
            f"a{draw(st.integers(0, n - 1))}",
            None,
            "p",
            f"e{j}",
            draw(st.sampled_from([None, False, True])),
        )
        for j in range(draw(st.integers(0, 10)))
    ]
    return placement, candidates, FixedModel(values), history


@settings(max_examples=300, deadline=None)
@given(scenario(), st.floats(0, 1, exclude_max=True))
def test_probabilities_sum_to_one_and_ineligible_arms_are_never_drawn(s, u: float) -> None:  # type: ignore[no-untyped-def]
    placement, candidates, model, history = s
    choice = decide(model, placement, candidates, "shared |U x=1", lambda: u, 1000.0, history)
    ineligible = set(choice.ineligible)
    if choice.eligible:
        assert math.isclose(sum(choice.pmf), 1.0, rel_tol=1e-9)
        assert all(p >= 0 for p in choice.pmf)
        assert len(choice.pmf) in (len(choice.eligible), len(choice.eligible) + 1)
    assert {candidates[i].arm.id for i in choice.eligible}.isdisjoint(ineligible)
    assert len(choice.eligible) + len(ineligible) == len(candidates)
    if choice.arm_index is not None:
        drawn = candidates[choice.eligible[choice.arm_index]]
        assert drawn.arm.id not in ineligible
        assert choice.probability == choice.pmf[choice.arm_index] > 0
        for a in drawn.accounts:
            assert Ledger.can_reserve([a], drawn.reservation, 1000.0) == ""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=10), st.data(), algorithms, st.floats(0.001, 5))
def test_a_penalty_never_raises_the_penalised_arms_probability(
    values: list[float], data: st.DataObject, spec: ExplorationSpec, pen: float
) -> None:
    v = np.array(values)
    k = data.draw(st.integers(0, len(values) - 1))
    before = explore(v, spec, 100)
    w = v.copy()
    w[k] -= pen
    after = explore(w, spec, 100)
    assert after[k] <= before[k] + 1e-12


def test_fatigue_penalty_by_hand() -> None:
    spec = FatigueSpec(strength=0.2, campaign_strength=0.1, half_life=86400.0)
    history = [
        Impression(0.0, "a", "c", "p", "e1", responded=False),  # one half-life old
        Impression(86400.0, "b", "c", "p", "e2", responded=None),  # fresh, unanswered
        Impression(86400.0, "a", "c", "p", "e3", responded=True),  # answered: no penalty
    ]
    assert math.isclose(penalty(spec, history, "a", "c", 86400.0), 0.2 * 0.5 + 0.1 * 0.5 + 0.1 * 1.0)


def test_contact_rules_by_hand() -> None:
    cap = [ContactRule(max_impressions=2, per="customer_arm", window=100.0)]
    h = [Impression(10.0, "a", None, "p", "1"), Impression(50.0, "a", None, "p", "2")]
    assert blocked(cap, None, "p", h, "a", None, 100.0).startswith("contact policy: 2 impressions")
    assert blocked(cap, None, "p", h, "a", None, 111.0) == ""  # the first left the window
    assert blocked(cap, None, "p", h, "b", None, 100.0) == ""
    sup = [ContactRule(suppress_after_ignored=2, suppress_for=1000.0)]
    ignored = [Impression(10.0, "a", None, "p", "1", False), Impression(20.0, "a", None, "p", "2", False)]
    assert "suppressed" in blocked(sup, None, "p", ignored, "a", None, 500.0)
    assert blocked(sup, None, "p", ignored, "a", None, 1021.0) == ""
    assert blocked(sup, None, "p", [*ignored, Impression(30.0, "a", None, "p", "3", True)], "a", None, 500.0) == ""
    assert blocked([], 60.0, "p", ignored, "b", None, 70.0).startswith("cooldown")
    assert blocked([], 60.0, "q", ignored, "b", None, 70.0) == ""


class LeaseStore:
    """The store's lease semantics, in memory: grants never pass the limit."""

    def __init__(self, limit: float) -> None:
        self.limit, self.leased = limit, 0.0

    def lease(self, amount: float) -> float:
        grant = max(0.0, min(amount, self.limit - self.leased))
        self.leased += grant
        return grant


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1, 100),
    st.lists(st.tuples(st.integers(0, 2), st.floats(0, 5), st.floats(0, 5), st.booleans()), max_size=200),
)
def test_spend_never_exceeds_the_budget_across_processes(limit: float, ops: list[tuple[int, float, float, bool]]) -> None:
    store = LeaseStore(limit)
    procs = [Account("b", "total", limit, None, None) for _ in range(3)]
    open_: list[tuple[int, float]] = []
    true_spend = 0.0
    for p, cpi, cpr, incurred in ops:
        a = procs[p]
        need = cpi + cpr
        if a.available < need:
            a.available += store.lease(max(need - a.available, limit * 0.05))
        if Ledger.can_reserve([a], need, 0.0) == "":
            Ledger.reserve([a], cpi, cpr)
            true_spend += cpi
            open_.append((p, cpr))
        if open_ and incurred:
            q, c = open_.pop(0)
            Ledger.settle([procs[q]], c, incurred=bool(len(open_) % 2))
            true_spend += c if len(open_) % 2 else 0.0
        held = sum(c for _, c in open_)
        assert true_spend + held <= limit + 1e-9
        assert store.leased <= limit + 1e-9


def test_a_scaling_fatigue_penalty_cuts_a_share_of_the_value() -> None:
    spec = PlacementSpec(
        id="p",
        arms=[ArmSpec(id="a0"), ArmSpec(id="a1")],
        exploration={"algorithm": "epsilon", "epsilon": 0.0},
        fatigue=FatigueSpec(kind="scale", strength=math.log(2), half_life=1e9),
    )
    model = FixedModel({"a0": 1.0, "a1": 0.6})
    cands = [Candidate(ArmView.of(a, 1)) for a in spec.arms]
    fresh = decide(model, spec, cands, "shared |U x=1", lambda: 0.5, 0.0, [])
    assert cands[fresh.eligible[fresh.arm_index]].arm.id == "a0"
    # one ignored impression of a0 halves its value: 0.5 < 0.6, so a1 is now the greedy arm
    tired = decide(model, spec, cands, "shared |U x=1", lambda: 0.5, 0.0, [Impression(0.0, "a0", None, "p", "e", False)])
    assert cands[tired.eligible[tired.arm_index]].arm.id == "a1"


def test_a_variant_with_its_own_rules_is_never_taken_for_unconstrained() -> None:
    """The decider skips per-arm checks for unconstrained specs (a cached property); a variant
    is a copy with overrides, and must not inherit the placement's cached answer."""
    from nextbest.bandit.spec import PlacementSpec

    spec = PlacementSpec.model_validate(
        {
            "id": "p",
            "arms": [{"id": "x"}, {"id": "y"}],
            "experiment": {
                "variants": [
                    {"id": "A", "share": 0.4},
                    {"id": "B", "share": 0.3, "fatigue": {"strength": 0.5}},
                    {"id": "C", "share": 0.3, "contact_policies": [{"max_impressions": 1, "window": "1d"}]},
                ]
            },
        }
    )
    assert spec.unconstrained  # computed and cached first
    assert spec.variant("A").unconstrained
    assert not spec.variant("B").unconstrained
    assert not spec.variant("C").unconstrained
    assert not spec.model_copy(update={"cooldown": 60.0}).unconstrained
