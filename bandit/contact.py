"""Contact history: who saw which offer when, and whether they responded.

Contact policies (hard: an arm that breaks one is ineligible) and fatigue (soft: a penalty on
the score) both read it. Counts are per customer across all placements and channels; an offer
is known by its arm id, so the same id in two placements is the same offer.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nextbest.bandit.spec import ContactRule, FatigueSpec


@dataclass(slots=True)
class Impression:
    """One shown offer; ``responded`` is None until its reward window closes or a reward comes."""

    at: float
    arm: str
    campaign: str | None
    placement: str
    event_id: str
    responded: bool | None = None

    @property
    def ignored(self) -> bool:
        return self.responded is False


@dataclass(slots=True)
class _Customer:
    impressions: deque[Impression] = field(default_factory=deque)


class ContactHistory:
    """Impressions per customer within a horizon, oldest first."""

    def __init__(self, horizon: float = 30 * 86400.0) -> None:
        self.horizon = horizon
        self._customers: dict[str, _Customer] = defaultdict(_Customer)
        self._by_event: dict[str, Impression] = {}

    def record(self, customer: str, imp: Impression) -> None:
        if not customer:
            return  # anonymous decisions cannot be capped per customer
        c = self._customers[customer]
        c.impressions.append(imp)
        self._by_event[imp.event_id] = imp
        self._prune(c, imp.at)

    def respond(self, event_id: str, responded: bool) -> None:
        """The event's outcome: a positive reward is a response; a default or non-positive one is not."""
        imp = self._by_event.pop(event_id, None)
        if imp is not None:
            imp.responded = responded

    def _prune(self, c: _Customer, now: float) -> None:
        while c.impressions and c.impressions[0].at < now - self.horizon:
            old = c.impressions.popleft()
            self._by_event.pop(old.event_id, None)

    def impressions(self, customer: str, now: float) -> list[Impression]:
        c = self._customers.get(customer)
        if c is None:
            return []
        self._prune(c, now)
        return list(c.impressions)

    def __len__(self) -> int:
        return sum(len(c.impressions) for c in self._customers.values())


def _key(per: str, imp: Impression) -> str | None:
    if per == "customer_arm":
        return imp.arm
    if per == "customer_campaign":
        return imp.campaign
    return "*"


def blocked(
    rules: Iterable[ContactRule],
    cooldown: float | None,
    placement: str,
    history: list[Impression],
    arm: str,
    campaign: str | None,
    now: float,
) -> str:
    """Why a contact policy forbids showing ``arm`` now ("" if none does)."""
    if cooldown and any(i.placement == placement and i.at > now - cooldown for i in history):
        return f"cooldown: an offer was shown in this placement less than {cooldown:g}s ago"
    for r in rules:
        if r.max_impressions is not None and r.window is not None:
            key = {"customer_arm": arm, "customer_campaign": campaign, "customer": "*"}[r.per]
            if key is None:
                continue  # a per-campaign rule does not apply to an arm without campaign
            n = sum(1 for i in history if i.at > now - r.window and _key(r.per, i) == key)
            if n >= r.max_impressions:
                return f"contact policy: {n} impressions per {r.per} within {r.window:g}s (max {r.max_impressions})"
        elif r.suppress_after_ignored is not None and r.suppress_for is not None:
            streak, last = 0, None
            for i in reversed([i for i in history if i.arm == arm and i.responded is not None]):
                if not i.ignored:
                    break
                streak += 1
                last = i.at if last is None else last
            if streak >= r.suppress_after_ignored and last is not None and now - last < r.suppress_for:
                return f"contact policy: {streak} ignored impressions, suppressed for {r.suppress_for:g}s"
    return ""


def _decay(spec: FatigueSpec, age: float) -> float:
    if spec.shape == "linear":
        return max(0.0, 1.0 - age / (2 * spec.half_life))
    return math.exp(-math.log(2) * age / spec.half_life)


def penalty(spec: FatigueSpec, history: list[Impression], arm: str, campaign: str | None, now: float) -> float:
    """Fatigue penalty of ``arm``: ignored (and still unanswered) impressions, decayed by age.

    Unanswered impressions count too: a customer who was just shown an offer should not be
    shown it again at once merely because the window has not closed yet.
    """
    total = 0.0
    for i in history:
        if i.responded:
            continue
        w = _decay(spec, now - i.at)
        if i.arm == arm:
            total += spec.strength * w
        if campaign is not None and i.campaign == campaign:
            total += spec.campaign_strength * w
        total += spec.customer_strength * w
    return total
