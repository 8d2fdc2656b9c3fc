"""The storage contract. Every method is synchronous and transactional; the engine calls
them from worker threads so that the event loop never waits on the database."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from nextbest.bandit.features import Feature, feature
from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.spec import CampaignSpec, PlacementSpec


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """A placement as stored: its spec, arm versions and which model generation serves it."""

    spec: PlacementSpec
    arm_versions: dict[str, int]
    generation: int = 1
    model_since_seq: int = 0  # a model without snapshot learns rewards with learn_seq above this


@dataclass(frozen=True, slots=True)
class Close:
    """Closes a decision's reward window with an explicit or the default reward."""

    event_id: str
    outcome: Outcome
    reward: float
    at: float
    reward_cost: float = 0.0
    budgets: tuple[tuple[str, str], ...] = ()
    slot: int = 0
    cost: float = 0.0  # the impression cost, still held when a deferred decision was never activated

    @property
    def incurred(self) -> bool:
        """A positive explicit reward spends the reserved reward cost."""
        return self.outcome == Outcome.REWARD and self.reward > 0

    @property
    def learnable(self) -> bool:
        return self.outcome in (Outcome.REWARD, Outcome.DEFAULT)


@dataclass(frozen=True, slots=True)
class Activation:
    """A deferred decision was shown: its impression counts and its reward window starts."""

    event_id: str
    at: float
    deadline: float
    cost: float = 0.0  # impression cost moved from held to spent
    budgets: tuple[tuple[str, str], ...] = ()
    slot: int = 0


@dataclass(frozen=True, slots=True)
class RewardEvent:
    """A reward kept beside the learned one: "late" or one of several to aggregate ("agg")."""

    event_id: str
    slot: int
    reward: float
    at: float
    kind: str
    reward_id: str | None = None  # the caller's key: one row per (event, slot, key)

@dataclass(frozen=True, slots=True)
class Snapshot:
    """A saved model of one slot, the settings it was built with, and the position in the
    learn sequence it includes. A model is snapshotted when it is created, so a restart
    always finds where each model starts."""

    placement: str
    slot: str
    key: tuple[str, bool, int]
    learned: int
    learn_seq: int
    model: bytes


@dataclass(slots=True)
class ArmTally:
    """Counts of one arm's decisions by outcome."""

    arm_id: str
    impressions: int = 0
    rewards: int = 0
    reward_sum: float = 0.0
    default_rewards: int = 0
    late_rewards: int = 0
    pending: int = 0
    spend: float = 0.0


@dataclass(slots=True)
class VariantTally:
    """Counts of one experiment variant's decisions."""

    variant: str
    decisions: int = 0
    impressions: int = 0
    rewards: int = 0
    reward_sum: float = 0.0
    learned_sum: float = 0.0  # explicit and default rewards of closed decisions
    closed: int = 0


@dataclass(frozen=True, slots=True)
class AccountRow:
    """A budget account as stored."""

    key: str
    period: str
    leased: float
    spent: float
    reserved: float


@dataclass(frozen=True, slots=True)
class RecentImpression:
    """An impression for rebuilding contact history after a restart."""

    customer_id: str
    arm_id: str
    placement: str
    event_id: str
    at: float
    outcome: Outcome
    reward: float | None


@dataclass(frozen=True, slots=True)
class LearnRow:
    """What the learner needs of a closed decision. The features stay JSON text: the learner
    usually has the example's VW text from the Choose still in memory and never parses them."""

    event_id: str
    slot: int
    learn_seq: int
    arms: tuple[tuple[str, int], ...]
    chosen: int
    probability: float
    reward: float
    features_json: str

    def features(self) -> tuple[Feature, ...]:
        return features_of(orjson.loads(self.features_json))


def features_of(triples: Sequence[Sequence[Any]]) -> tuple[Feature, ...]:
    """Features as the decision log keeps them: ``[[namespace, name, value], ...]``."""
    return tuple(feature(ns, name, v if isinstance(v, str) else float(v)) for ns, name, v in triples)


@dataclass(frozen=True, slots=True)
class ContactRow:
    """One impression to record in the shared contact history."""

    customer_id: str
    at: float
    placement: str
    arm_id: str
    event_id: str
    slot: int = 0


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Per close in a batch: whether it closed an open window; per activation: whether it
    activated an open decision."""

    closed: Sequence[bool] = field(default_factory=tuple)
    activated: Sequence[bool] = field(default_factory=tuple)


class Store(Protocol):
    """What the engine needs from storage."""

    def load_placements(self) -> list[PlacementRecord]: ...

    def arm_features(self) -> dict[tuple[str, str, int], dict[str, float | str | bool]]: ...

    def save_placements(
        self,
        records: Sequence[PlacementRecord],
        new_arm_versions: Sequence[tuple[str, str, int, dict[str, float | str | bool]]],
        campaigns: Sequence[CampaignSpec] = (),
        snapshots: Sequence[Snapshot] = (),
    ) -> None: ...

    def load_campaigns(self) -> list[CampaignSpec]: ...

    def lease(self, key: str, period: str, limit: float, amount: float) -> float: ...

    def release(self, key: str, period: str, amount: float) -> None: ...

    def load_accounts(self) -> list[AccountRow]: ...

    def recent_impressions(self, since: float) -> list[RecentImpression]: ...

    def write(
        self,
        decisions: Sequence[LoggedDecision],
        closes: Sequence[Close],
        activations: Sequence[Activation] = (),
        events: Sequence[RewardEvent] = (),
        assign: bool = False,
    ) -> WriteResult: ...

    def find_decision(self, event_id: str, slot: int = 0) -> LoggedDecision | None: ...

    def open_reward_events(self) -> list[RewardEvent]: ...

    def open_decisions(self) -> list[LoggedDecision]: ...

    def learnable(self, placement: str, variant: str | None, after_seq: int, limit: int) -> list[LoggedDecision]: ...

    def learn_rows(self, placement: str, variant: str | None, after_seq: int, limit: int) -> list[LearnRow]: ...

    def max_learn_seq(self) -> int: ...

    def contacts_open(self, customer_id: str, since: float) -> tuple[Any, list[RecentImpression]]: ...

    def contacts_commit(self, handle: Any, rows: Sequence[ContactRow]) -> None: ...

    def contacts_abort(self, handle: Any) -> None: ...

    def contacts_insert(self, rows: Sequence[ContactRow]) -> None: ...

    def prune_contacts(self, before: float) -> int: ...

    def claim(self, placement: str, limit: int) -> int: ...

    def recent_rewards(self, placement: str, limit: int) -> list[float]: ...

    def config_version(self) -> tuple[float, int, float, int]: ...

    def snapshot_versions(self, placement: str) -> dict[str, tuple[int, int]]: ...

    def expired_open(self, cutoff: float, limit: int) -> list[LoggedDecision]: ...

    def register_server(self, server_id: str, now: float) -> None: ...

    def heartbeat(self, now: float) -> None: ...

    def unregister_server(self) -> None: ...

    def adopt_open(self, live_since: float | None, unowned: bool = False) -> list[LoggedDecision]: ...

    def try_learner_lock(self) -> bool: ...

    def holds_learner_lock(self) -> bool: ...

    def save_snapshot(self, snapshot: Snapshot) -> None: ...

    def load_snapshots(self, placement: str) -> dict[str, Snapshot]: ...

    def tally(self, placement: str) -> tuple[list[ArmTally], int, int]: ...

    def tally_variants(self, placement: str) -> list[VariantTally]: ...

    def close(self) -> None: ...
