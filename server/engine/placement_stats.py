"""A placement's live statistics (GetStats, ``nextbest stats``) as values: what the engine
reads (``stats_reader``) and the adapters show. Light on purpose: the client converts them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nextbest.bandit.budget import Account
from nextbest.bandit.offline.uplift import VariantUplift
from nextbest.storage.base import AccountRow, ArmTally, VariantTally

if TYPE_CHECKING:
    from nextbest.engine.learner import PlacementModel


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model of a placement: its name, examples learned and, for a shadow, how it scores."""

    name: str  # "" | variant id | "shadow:<id>"
    learned: int
    scored: int
    agreement: float
    estimated_value: float

    @classmethod
    def of(cls, pm: PlacementModel) -> ModelView:
        n, recent = pm.scored, pm.recent
        agreement = sum(recent) / len(recent) if recent else 0.0
        return cls(pm.name, pm.model.learned, n, agreement, pm.ips_sum / n if n else 0.0)


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

    leased_unused: float = 0.0  # leased by servers, neither spent nor reserved (or lost in a crash)

    @classmethod
    def of(cls, a: Account, now: float, row: AccountRow | None = None) -> BudgetView:
        """The account as the database has it (``row``: every server's figures), else as this
        process knows it (nothing stored yet)."""
        spent, reserved = (row.spent, row.reserved) if row is not None else (a.spent, a.reserved)
        return cls(
            a.key,
            a.period,
            a.limit,
            spent,
            reserved,
            max(0.0, a.limit - spent - reserved),
            a.pacer is not None,
            a.pacer.price if a.pacer is not None else 0.0,
            a.projected_exhaustion(now),
            max(0.0, row.leased - spent - reserved) if row is not None else a.available,
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
    variants: list[VariantTally] = field(default_factory=list)
    models: list[ModelView] = field(default_factory=list)
    # Why arms were left out: per arm, the decisions that found it ineligible, by reason, most
    # frequent first ("why does X never show").
    ineligible: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    # Uplift on real purchases in the period asked for: per variant, every
    # conversion of the customers it decided; conversions that credited no decision, by product.
    conversions: list[VariantUplift] = field(default_factory=list)
    unattributed: dict[str, tuple[int, float]] = field(default_factory=dict)
