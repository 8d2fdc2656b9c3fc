"""The clients' typed results: a frozen dataclass or a status enum (a StrEnum, equal to its
text: ``nb.reward(...) == "learned"``) for every call. Explain and GetStats keep their message
as ``raw``; any field the dataclass does not name reads through to it (``stats.budgets``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from nextbest.bandit.attribution import Credit
from nextbest.client_errors import ServiceError
from nextbest.v1 import admin_pb2, decision_pb2


class RewardStatus(StrEnum):
    """What became of a reward (equal to its text: ``status == "learned"``). FAILED only in a
    batch result: the item failed, see its ``error``."""

    LEARNED = "learned"
    DUPLICATE = "duplicate"
    LATE = "late"
    RECORDED = "recorded"
    UNSPECIFIED = "unspecified"
    FAILED = "failed"


class ActivateStatus(StrEnum):
    ACTIVATED = "activated"
    ALREADY_ACTIVE = "already_active"
    EXPIRED = "expired"
    UNSPECIFIED = "unspecified"


class ConversionStatus(StrEnum):
    ATTRIBUTED = "attributed"
    UNATTRIBUTED = "unattributed"
    DUPLICATE = "duplicate"
    ERROR = "error"


REWARD_STATUS = {
    decision_pb2.REWARD_STATUS_LEARNED: RewardStatus.LEARNED,
    decision_pb2.REWARD_STATUS_DUPLICATE: RewardStatus.DUPLICATE,
    decision_pb2.REWARD_STATUS_LATE: RewardStatus.LATE,
    decision_pb2.REWARD_STATUS_RECORDED: RewardStatus.RECORDED,
}
ACTIVATE_STATUS = {
    decision_pb2.ACTIVATE_STATUS_ACTIVATED: ActivateStatus.ACTIVATED,
    decision_pb2.ACTIVATE_STATUS_ALREADY_ACTIVE: ActivateStatus.ALREADY_ACTIVE,
    decision_pb2.ACTIVATE_STATUS_EXPIRED: ActivateStatus.EXPIRED,
}
CONVERSION_STATUS = {
    decision_pb2.CONVERSION_STATUS_ATTRIBUTED: ConversionStatus.ATTRIBUTED,
    decision_pb2.CONVERSION_STATUS_UNATTRIBUTED: ConversionStatus.UNATTRIBUTED,
    decision_pb2.CONVERSION_STATUS_DUPLICATE: ConversionStatus.DUPLICATE,
}


class _ReadThrough:
    """A typed view of a response message; fields it does not name read through to ``raw``."""

    __slots__ = ()
    raw: Any

    def __getattr__(self, name: str) -> Any:
        if name == "raw":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.raw, name)


@dataclass(frozen=True, slots=True)
class ChooseResult:
    event_id: str
    arm_id: str
    probability: float
    model_version: int
    reason: str
    variant: str = ""
    slots: tuple[tuple[str, float], ...] = ()  # (arm id, probability) per slot, slot 0 first
    raw: decision_pb2.ChooseResponse | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RewardOutcome:
    """One reward of a batch: its status, or FAILED with the ``error`` a Reward call would have
    raised (``error.retryable``: send it again, with this ``reward_id``, later)."""

    event_id: str
    status: RewardStatus
    reward_id: str
    error: ServiceError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class ConversionReport:
    """What became of one reported conversion: ATTRIBUTED (with the decisions credited),
    UNATTRIBUTED, DUPLICATE (with the credits it got when first reported), or ERROR with the
    ``error`` (its text "<CODE>: <message>"; send the conversion again when ``error.retryable``)."""

    status: ConversionStatus
    credits: tuple[Credit, ...] = ()
    error: ServiceError | None = None


@dataclass(frozen=True, slots=True)
class ArmExplanation(_ReadThrough):
    """One arm of an explained decision (``raw``: its ArmExplanation message, for the rest)."""

    arm_id: str
    eligible: bool
    reason: str
    probability: float
    value: float
    raw: decision_pb2.ArmExplanation = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Explanation(_ReadThrough):
    """Why a decision served what it served. Other fields (``features``, ``decided_at``,
    ``conversions``, ``policy`` parameters) read through to ``raw``, the ExplainResponse."""

    event_id: str
    placement: str
    slot: int
    arm_id: str
    probability: float
    reason: str
    variant: str
    model_version: int
    policy: str
    scored: bool
    arms: tuple[ArmExplanation, ...]
    raw: decision_pb2.ExplainResponse = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ArmStats(_ReadThrough):
    """One arm's figures (``raw``: its ArmStats message, with the reward and spend detail)."""

    arm_id: str
    active: bool
    impressions: int
    rewards: int
    reward_sum: float
    ineligible: int
    raw: admin_pb2.ArmStats = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Stats(_ReadThrough):
    """A placement's statistics. Budgets, variants, models and conversions read through to
    ``raw``, the GetStatsResponse."""

    placement: str
    decisions: int
    model_version: int
    pending: int
    no_offer: int
    arms: tuple[ArmStats, ...]
    raw: admin_pb2.GetStatsResponse = field(repr=False, compare=False)


def choose_result(r: decision_pb2.ChooseResponse) -> ChooseResult:
    slots = tuple((s.arm_id, s.probability) for s in r.slots)
    return ChooseResult(r.event_id, r.arm_id, r.probability, r.model_version, r.reason, r.variant, slots, r)


def explanation(r: decision_pb2.ExplainResponse) -> Explanation:
    arms = tuple(ArmExplanation(a.arm_id, a.eligible, a.reason, a.probability, a.value, a) for a in r.arms)
    return Explanation(
        r.event_id, r.placement, r.slot, r.arm_id, r.probability, r.reason, r.variant, r.model_version, r.policy, r.scored, arms, r
    )


def stats(r: admin_pb2.GetStatsResponse) -> Stats:
    arms = tuple(ArmStats(a.arm_id, a.active, a.impressions, a.rewards, a.reward_sum, a.ineligible, a) for a in r.arms)
    return Stats(r.placement, r.decisions, r.model_version, r.pending, r.no_offer, arms, r)
