"""The decision log as the core sees it: what was decided, with what probability, and what came of it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nextbest.bandit.features import Feature


class Outcome(enum.IntEnum):
    """What closed a decision's reward window. Stored as an integer."""

    OPEN = 0  # waiting for a reward
    REWARD = 1  # an explicit reward, within the window
    DEFAULT = 2  # no reward within the window: the placement's default reward
    NO_ARM = 3  # nothing was eligible; nothing to learn
    NOT_ACTIVATED = 4  # a deferred decision never activated: never shown, never learned


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One logged decision: exactly what a learner or an estimator needs to reuse it."""

    event_id: str
    placement: str
    customer_id: str
    timestamp: float
    features: tuple[Feature, ...]
    arms: tuple[tuple[str, int], ...]  # (arm id, arm version) of each eligible arm, in scoring order
    pmf: tuple[float, ...]  # over arms, plus a last entry for "no offer" when pacing offered it
    chosen: int | None  # index into arms
    probability: float
    model_version: int
    deadline: float  # end of the reward window
    outcome: Outcome = Outcome.OPEN
    reward: float | None = None
    learn_seq: int | None = None
    cost: float = 0.0  # impression cost, spent at the decision
    reward_cost: float = 0.0  # reserved; spent if the reward is positive
    budgets: tuple[tuple[str, str], ...] = ()  # (budget key, period) of every account spent from
    ineligible: tuple[tuple[str, str], ...] = ()  # (arm id, reason) of arms that could not be chosen
    reason: str = ""  # why no arm, or why the fallback, was served (not stored)
    variant: str = ""  # the experiment variant that served ("holdout" for the control group)
    slot: int = 0  # position in a multi-slot response; each slot is its own decision
    activated: bool = True  # False while a deferred decision waits for Activate

    @property
    def arm_id(self) -> str | None:
        return None if self.chosen is None else self.arms[self.chosen][0]
