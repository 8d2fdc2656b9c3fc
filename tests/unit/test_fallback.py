"""The fallback arm: served when nothing else is eligible, bypassing budgets and contact policies
only. The caller's exclusions, the arm's dates and eligibility rules (the placement's and its
own, false or unknown) rule it out like any other arm, and Explain says what it was."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from nextbest.bandit.contact import Impression
from nextbest.bandit.decider import EXCLUDED, ArmView, Candidate, Choice, context_of, decide, serve_holdout
from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.eligibility import Value
from nextbest.bandit.explain import arm_parts
from nextbest.bandit.features import feature
from nextbest.bandit.spec import HoldoutSpec, PlacementSpec

NOW = 1_800_000_000.0


class FixedModel:
    """Stands in for a VW model (never reached when nothing is eligible)."""

    learned = 0

    def expected_rewards(self, shared: str, lines: list[str]) -> np.ndarray:
        return np.zeros(len(lines))


def spec(fallback_rule: dict[str, Any] | None = None, placement_rule: dict[str, Any] | None = None, **fallback: Any) -> PlacementSpec:
    """Two arms for postpaid customers only, and the fallback ``tips``."""
    postpaid = {"feature": "customer.plan", "eq": "postpaid"}
    tips: dict[str, Any] = {"id": "tips", **fallback, **({"eligible": fallback_rule} if fallback_rule else {})}
    doc: dict[str, Any] = {
        "id": "p",
        "fallback_arm": "tips",
        "contact_policies": [{"max_impressions": 1, "per": "customer_arm", "window": "1d"}],
        "arms": [{"id": "upgrade", "eligible": postpaid}, {"id": "bundle", "eligible": postpaid}, tips],
    }
    if placement_rule:
        doc["eligible"] = placement_rule
    return PlacementSpec.model_validate(doc)


def choose(s: PlacementSpec, ctx: dict[str, Value], excluded: tuple[str, ...] = (), history: list[Impression] | None = None) -> Choice:
    cands = [Candidate(ArmView.of(a, 1)) for a in s.arms]
    return decide(FixedModel(), s, cands, "", lambda: 0.5, NOW, history, context=ctx, excluded=frozenset(excluded))  # type: ignore[arg-type]


def logged(s: PlacementSpec, choice: Choice) -> LoggedDecision:
    """The decision as the chooser logs it."""
    arms = tuple((s.arms[i].id, 1) for i in choice.eligible)
    return LoggedDecision(
        "e1",
        "p",
        "c1",
        NOW,
        (),
        arms,
        choice.pmf,
        choice.arm_index,
        choice.probability,
        0,
        NOW + 600,
        Outcome.OPEN if choice.arm_index is not None else Outcome.NO_ARM,
        ineligible=tuple(choice.ineligible.items()),
        reason=choice.reason,
        explanation=choice.explanation,
    )


PREPAID = context_of([feature("customer", "plan", "prepaid"), feature("customer", "age", 30.0)])
# The fallback is an arm like the others: it is served as the fallback only when the normal pass
# finds it ineligible too, here because the customer saw it today (max 1 per customer and arm a day).
SEEN = [Impression(NOW - 60, "tips", None, "p", "e0")]


def test_a_fallback_the_caller_excluded_is_not_served() -> None:
    s = spec()
    served = choose(s, PREPAID, history=SEEN)
    assert served.fallback and served.arm_index == 0 and served.probability == 1.0  # nothing else is eligible
    c = choose(s, PREPAID, excluded=("tips",), history=SEEN)
    assert c.arm_index is None and not c.fallback and c.probability == 0.0 and c.pmf == ()
    assert c.ineligible["tips"] == EXCLUDED
    assert c.reason == "no eligible arm; fallback arm tips not eligible: excluded by caller"


def test_a_fallback_whose_own_rule_is_false_or_unknown_is_not_served() -> None:
    s = spec(fallback_rule={"feature": "customer.age", "gte": 18})
    assert choose(s, PREPAID, history=SEEN).fallback  # the rule holds: served
    minor = context_of([feature("customer", "plan", "prepaid"), feature("customer", "age", 15.0)])
    c = choose(s, minor, history=SEEN)
    assert c.arm_index is None and c.ineligible["tips"] == "rule: customer.age < 18"
    unknown = context_of([feature("customer", "plan", "prepaid")])  # no age: unknown fails closed
    c = choose(s, unknown, history=SEEN)
    assert c.arm_index is None and c.ineligible["tips"] == "rule: customer.age missing"
    assert c.reason.endswith("fallback arm tips not eligible: rule: customer.age missing")


def test_the_placements_rule_and_the_arms_dates_rule_out_the_fallback_too() -> None:
    s = spec(placement_rule={"exists": "customer.plan"})
    c = choose(s, context_of([feature("customer", "age", 30.0)]), history=SEEN)
    assert c.arm_index is None and c.ineligible["tips"] == "rule: customer.plan missing"
    ended = spec(end=datetime.fromtimestamp(NOW - 1, UTC))
    c = choose(ended, PREPAID, history=SEEN)
    assert c.arm_index is None and c.ineligible["tips"] == "ended"


def test_the_fallback_still_bypasses_contact_policies_but_not_its_rule() -> None:
    """README: the fallback bypasses budgets and contact policies; an exclusion still wins."""
    s = spec()
    c = choose(s, PREPAID, history=SEEN)
    assert c.fallback and c.arm_index == 0 and c.ineligible["tips"].startswith("contact policy: ")
    c = choose(s, PREPAID, excluded=("tips",), history=SEEN)
    assert c.arm_index is None and c.ineligible["tips"] == EXCLUDED


def test_the_holdout_does_not_serve_an_ineligible_fallback() -> None:
    s = spec(fallback_rule={"feature": "customer.age", "gte": 18})
    cands = [Candidate(ArmView.of(a, 1)) for a in s.arms]
    fixed = HoldoutSpec(share=1.0, policy="fixed", arm="upgrade")
    minor = context_of([feature("customer", "plan", "prepaid"), feature("customer", "age", 15.0)])
    c = serve_holdout(fixed, s, cands, [], lambda: 0.5, NOW, list(SEEN), context=minor)
    assert c.arm_index is None and not c.fallback and "fallback arm tips not eligible" in c.reason
    c = serve_holdout(fixed, s, cands, [], lambda: 0.5, NOW, list(SEEN), context=PREPAID, excluded=frozenset({"tips"}))
    assert c.arm_index is None and c.ineligible["tips"] == EXCLUDED


def test_explain_shows_the_fallback_as_the_fallback_served_or_ruled_out() -> None:
    s = spec(fallback_rule={"feature": "customer.age", "gte": 18})
    ruled = logged(s, choose(s, PREPAID, excluded=("tips",), history=SEEN))
    parts = {a.arm_id: a for a in arm_parts(ruled)}
    assert not parts["tips"].eligible and parts["tips"].probability == 0.0
    assert parts["tips"].reason == "fallback arm tips not eligible: excluded by caller"
    assert parts["upgrade"].reason == "rule: customer.plan != postpaid"  # the others as logged

    served = logged(s, choose(s, PREPAID, history=SEEN))
    (tips,) = [a for a in arm_parts(served) if a.arm_id == "tips"]  # listed once
    assert tips.eligible and tips.probability == 1.0
    assert tips.reason.startswith("fallback arm: served because no other arm is eligible (it bypassed: contact policy: ")
