"""Statistics values shared by the engine and the adapters."""

from __future__ import annotations

from dataclasses import dataclass

from bandit.budget import Account
from server.storage.base import ArmTally


@dataclass(frozen=True, slots=True)
class BudgetView:
    """One budget account as reported."""

    key: str
    period: str
    limit: float
    spent: float
    reserved: float
    remaining: float
    paced: bool
    multiplier: float
    projected_exhaustion: float | None

    @classmethod
    def of(cls, a: Account, now: float) -> BudgetView:
        return cls(
            a.key, a.period, a.limit, a.spent, a.reserved, a.remaining, a.pacer is not None,
            a.pacer.price if a.pacer is not None else 0.0, a.projected_exhaustion(now),
        )


@dataclass(frozen=True, slots=True)
class Stats:
    """A placement's statistics, per arm in configuration order."""

    placement: str
    arms: list[tuple[ArmTally, bool]]  # (tally, active)
    decisions: int
    model_version: int
    pending: int
    budgets: list[BudgetView]
    no_offer: int = 0
