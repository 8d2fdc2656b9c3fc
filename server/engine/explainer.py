"""Explain: a logged decision read out arm by arm ("why did this customer get that offer?").

It reads the decision as the log kept it (this server's unflushed decisions are flushed first,
and another server's are waited for briefly, as for a Reward), checks the caller's placement
scope on that same read, and adds what only the whole response knows: the arms that earlier
slots of a multi-slot response had taken, and the conversions credited to the decision
(ReportConversions, issue #31), read from the audit table in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from nextbest.bandit import access
from nextbest.bandit.attribution import Credit
from nextbest.bandit.decision_log import LoggedDecision
from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.explain import ArmPart, arm_parts, no_offer_probability
from nextbest.bandit.text import check_text, quote
from nextbest.engine.learner import PlacementState

Find = Callable[[str, int], Awaitable[LoggedDecision | None]]
# Store.credits_of_decision: (conversion id, credit, occurred_at) per conversion credited.
CreditsOf = Callable[[str, int], Sequence[tuple[str, Credit, float]]]
MAX_SLOTS = 10  # as Reward: slots 0 to 9


@dataclass(frozen=True, slots=True)
class Explained:
    """A decision and its arms' parts (bandit/explain.py)."""

    decision: LoggedDecision
    arms: list[ArmPart]
    no_offer_probability: float
    conversions: Sequence[tuple[str, Credit, float]] = field(default=())  # (conversion id, credit, occurred_at)


class Explainer:
    """Reads decisions back for Explain; ``find`` is RewardWindows.find."""

    def __init__(self, find: Find, states: dict[str, PlacementState], max_id_length: int, credits_of: CreditsOf | None = None) -> None:
        self._find = find
        self._states = states
        self._max_id_length = max_id_length
        self._credits_of = credits_of

    async def explain(self, event_id: str, slot: int = 0) -> Explained:
        if not event_id:
            raise InvalidInput("event_id", "must not be empty")
        check_text(event_id, "event_id", self._max_id_length)
        if not 0 <= slot < MAX_SLOTS:
            raise InvalidInput("slot", f"must be between 0 and {MAX_SLOTS - 1}, got {slot}")
        d = await self._find(event_id, slot)
        if d is None or not access.allows(d.placement):  # another placement's: as if unknown
            raise NotFound(f"no decision with event_id {quote(event_id)}" + (f" and slot {slot}" if slot else ""))
        earlier: dict[str, int] = {}
        for k in range(slot):
            prev = await self._find(event_id, k)
            if prev is not None and prev.arm_id is not None:
                earlier[prev.arm_id] = k
        arms = arm_parts(d, earlier)
        if not d.arms and not d.ineligible:
            # Nothing was a candidate (the placement was closed, or had no active arm): every
            # arm it has now is listed with that reason.
            ps = self._states.get(d.placement)
            listed = {a.arm_id for a in arms}
            arms += [ArmPart(a.id, False, d.reason or "not a candidate") for a in (ps.arms if ps else ()) if a.id not in listed]
        conversions = await asyncio.to_thread(self._credits_of, event_id, slot) if self._credits_of is not None else ()
        return Explained(d, arms, no_offer_probability(d), conversions)
