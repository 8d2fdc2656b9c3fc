"""What a Reward and an Activate answer, and how a placement learns its rewards.

The statuses are enums end to end: the engine returns them, the servicer maps them to the
protobuf enums (rpc/decision.py), the metrics label by their value.
"""

from __future__ import annotations

import enum

from nextbest.bandit.spec import PlacementSpec


class RewardStatus(enum.Enum):
    """A Reward's answer; every one but LATE is about the decision's learned reward."""

    LEARNED = "learned"  # durable; the window's reward: learned once (at once, or at the close)
    RECORDED = "recorded"  # durable; one of the rewards aggregated when the window closes
    DUPLICATE = "duplicate"  # the window has its reward already, or this key was counted
    LATE = "late"  # durable, after the window: kept beside the log, never learned


class ActivateStatus(enum.Enum):
    ACTIVATED = "activated"
    ALREADY_ACTIVE = "already_active"
    EXPIRED = "expired"


class Policy(enum.Enum):
    """How a placement's window turns rewards into the one it learns (``reward_aggregation``
    x ``learn_at``); see the table in engine/windows.py."""

    AT_REWARD = "earliest, learn_at: reward"  # the first reward closes the window; learned at once
    FIRST_AT_CLOSE = "earliest, learn_at: window_close"  # the first reward waits on the row for the close
    AGGREGATE = "sum | max | average"  # every reward is kept; their aggregate is learned at the close


def policy_of(spec: PlacementSpec | None) -> Policy:
    """The placement's policy (a placement gone meanwhile: the default's)."""
    if spec is None:
        return Policy.FIRST_AT_CLOSE
    if spec.reward_aggregation != "earliest":
        return Policy.AGGREGATE
    return Policy.AT_REWARD if spec.learn_at == "reward" else Policy.FIRST_AT_CLOSE


def aggregation_of(spec: PlacementSpec | None) -> str:
    """How a close folds the rewards gathered on the row (after a change of policy, a window
    keeps what was recorded under the old one and folds it under the new)."""
    return spec.reward_aggregation if spec is not None else "earliest"
