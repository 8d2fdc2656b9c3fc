"""Why this offer: a logged decision read out arm by arm.

Everything comes from the decision as logged: the eligible arms with the parts of their values
and their probabilities (``Explanation``, recorded at decision time), and the reason each other
arm could not be chosen. Nothing is recomputed with the model as it is today.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from nextbest.bandit.decision_log import LoggedDecision

FALLBACK_SERVED = "fallback arm: served because no other arm is eligible"
_RULED_OUT = re.compile(r"(?:^|; )fallback arm (\S+) not eligible: ")


def fallback_not_eligible(arm: str, why: str) -> str:
    """The part of a decision's reason that says its fallback arm was ruled out too (arm ids
    hold no spaces: ``fallback_of`` reads it back)."""
    return f"fallback arm {arm} not eligible: {why}"


def fallback_of(decision: LoggedDecision) -> str | None:
    """The decision's fallback arm when it mattered: the arm served as the fallback, or the one
    its reason says was ruled out too; None otherwise."""
    e = decision.explanation
    if e is not None and e.policy == "fallback" and decision.arm_id is not None:
        return decision.arm_id
    m = _RULED_OUT.search(decision.reason) if decision.arm_id is None else None
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class ArmPart:
    """One arm's part in a decision; the numbers are 0 for an arm that was not scored."""

    arm_id: str
    eligible: bool
    reason: str = ""
    expected_reward: float = 0.0
    business_value: float = 0.0
    pacing_cost: float = 0.0
    fatigue_penalty: float = 0.0
    value: float = 0.0
    probability: float = 0.0


def arm_parts(decision: LoggedDecision, earlier_slots: Mapping[str, int] | None = None) -> list[ArmPart]:
    """Every arm the decision knew of: the eligible ones in scoring order, then the ineligible
    ones with their logged reasons (the fallback arm says it is the fallback, served or ruled
    out), then (``earlier_slots``: arm id -> slot) the arms an earlier
    slot of the same Choose had already taken, which this slot could not repeat."""
    e = decision.explanation
    scored = e is not None and e.scored and len(e.expected_reward) == len(decision.arms)
    fallback = fallback_of(decision)
    bypassed = dict(decision.ineligible)
    out: list[ArmPart] = []
    for j, (arm, _version) in enumerate(decision.arms):
        p = decision.pmf[j] if j < len(decision.pmf) else 0.0
        if arm == fallback:  # served as the fallback: it may have bypassed a contact policy
            why = bypassed.get(arm)
            out.append(ArmPart(arm, True, FALLBACK_SERVED + (f" (it bypassed: {why})" if why else ""), probability=p))
            continue
        if scored:
            assert e is not None
            out.append(
                ArmPart(
                    arm,
                    True,
                    "",
                    e.expected_reward[j],
                    e.part(e.business_value, j),
                    e.part(e.pacing_cost, j),
                    e.part(e.fatigue_penalty, j),
                    e.value(j),
                    p,
                )
            )
        else:
            out.append(ArmPart(arm, True, probability=p))
    known = {a.arm_id for a in out}
    for arm, why in decision.ineligible:
        if arm not in known:
            out.append(ArmPart(arm, False, fallback_not_eligible(arm, why) if arm == fallback else why))
            known.add(arm)
    for arm, slot in (earlier_slots or {}).items():
        if arm not in known:
            out.append(ArmPart(arm, False, f"shown in slot {slot} of the same response"))
            known.add(arm)
    return out


def no_offer_probability(decision: LoggedDecision) -> float:
    """The probability pacing gave to making no offer (its last pmf entry), else 0."""
    return decision.pmf[-1] if len(decision.pmf) == len(decision.arms) + 1 else 0.0
