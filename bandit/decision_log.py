"""The decision log as the core sees it: what was decided, with what probability, and what came of it."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nextbest.bandit.features import Feature


class Outcome(enum.IntEnum):
    """What closed a decision's reward window. Stored as an integer."""

    OPEN = 0  # waiting for a reward
    REWARD = 1  # an explicit reward, within the window
    DEFAULT = 2  # no reward within the window: the placement's default reward
    NO_ARM = 3  # nothing was eligible; nothing to learn
    NOT_ACTIVATED = 4  # a deferred decision never activated: never shown, never learned


def aggregate(how: str, rewards: Sequence[float]) -> float:
    """The learned reward of a window that gathered ``rewards`` (in the order they were stored)
    under a placement's ``reward_aggregation``: sum, max, average, or the earliest."""
    if how == "sum":
        return math.fsum(rewards)
    if how == "max":
        return max(rewards)
    if how == "average":
        return math.fsum(rewards) / len(rewards)
    return rewards[0]


@dataclass(frozen=True, slots=True)
class Explanation:
    """How a decision's probabilities came about, recorded when it was made: "why this offer"
    then reads what was true at decision time, not what today's model would say.

    The per-arm tuples follow the decision's eligible arms in scoring order; a part that was
    zero for every arm is stored as ``()``. ``policy`` names what made the pmf: an exploration
    algorithm over ``values()`` ("epsilon", "softmax", "squarecb", whose ``parameter`` is
    epsilon, lambda or gamma), or a policy without scores ("holdout: uniform", "holdout: rule",
    "baseline", "fallback"), whose tuples are empty. Softmax and SquareCB divide the values by
    ``reward_scale`` (bandit/reward_scale.py); epsilon-greedy ignores it.
    """

    policy: str
    parameter: float = 0.0
    reward_scale: float = 1.0
    expected_reward: tuple[float, ...] = ()  # the model's (VW's) estimate
    business_value: tuple[float, ...] = ()
    pacing_cost: tuple[float, ...] = ()  # the budgets' pacing price x the arm's expected cost
    fatigue_penalty: tuple[float, ...] = ()

    @property
    def scored(self) -> bool:
        """The policy explored over model scores (values are recorded)."""
        return bool(self.expected_reward)

    def part(self, values: tuple[float, ...], j: int) -> float:
        return values[j] if values else 0.0

    def value(self, j: int) -> float:
        """The adjusted value of eligible arm ``j`` that exploration saw, computed in the
        decider's own order, so it is bit for bit the figure explored over."""
        v = self.expected_reward[j] + self.part(self.business_value, j)
        return (v - self.part(self.fatigue_penalty, j)) - self.part(self.pacing_cost, j)

    def values(self) -> tuple[float, ...]:
        return tuple(self.value(j) for j in range(len(self.expected_reward)))

    def to_json(self) -> dict[str, Any]:
        """The compact form stored in the log (omits what is zero)."""
        out: dict[str, Any] = {"policy": self.policy}
        if self.scored:
            out.update(parameter=self.parameter, reward_scale=self.reward_scale, expected_reward=self.expected_reward)
        for name in ("business_value", "pacing_cost", "fatigue_penalty"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Explanation:
        def floats(name: str) -> tuple[float, ...]:
            return tuple(float(x) for x in raw.get(name) or ())

        return cls(
            str(raw.get("policy", "")),
            float(raw.get("parameter", 0.0)),
            float(raw.get("reward_scale", 1.0)),
            floats("expected_reward"),
            floats("business_value"),
            floats("pacing_cost"),
            floats("fatigue_penalty"),
        )


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """Where a decision's features came from when not all came from the request (issue #30),
    logged with it: replay, exports, learning and Explain read the values used, point in time,
    never today's profile or history.

    ``LoggedDecision.features`` holds every shared feature the model saw (the request's and the
    stored profile's merged, the request winning on a name); ``profile_keys`` names those
    (``namespace.name``) that came from the profile, whose ``as_of`` is ``profile_as_of``.
    ``arm_features`` follows ``LoggedDecision.arms``: each arm's decision-time arm-level
    features (interaction history: ``history.impressions_7d``, ...), appended to its VW line.
    """

    profile_as_of: float | None = None  # None: no stored profile was used
    profile_keys: tuple[str, ...] = ()
    arm_features: tuple[tuple[Feature, ...], ...] = ()

    @property
    def empty(self) -> bool:
        return self.profile_as_of is None and not self.profile_keys and not any(self.arm_features)

    def source_of(self, key: str) -> str:
        """ "profile" or "request", for a shared feature's ``namespace.name``."""
        return "profile" if key in self.profile_keys else "request"

    def to_json(self) -> dict[str, Any]:
        """The portable form (the DSJSON export's ``_nb.extra.context``): every arm's features as
        ``[namespace, name, value]`` rows."""
        out: dict[str, Any] = {}
        if self.profile_as_of is not None:
            out["profile_as_of"] = self.profile_as_of
        if self.profile_keys:
            out["profile_keys"] = list(self.profile_keys)
        if any(self.arm_features):
            out["arm_features"] = [[list(f) for f in fs] for fs in self.arm_features]
        return out

    def serializable(self) -> dict[str, Any]:
        """The form stored in the log's ``context`` column, for a serializer that writes tuples as
        arrays (orjson): the arms' features compacted (``compact_arms``), since at 20 arms the
        rows of ``to_json`` were ~2.7 KB of JSON per decision, nearly all an unseen arm's zeros
        repeated, which the log writer's thread paid for in the INSERT and the commit."""
        out: dict[str, Any] = {}
        if self.profile_as_of is not None:
            out["profile_as_of"] = self.profile_as_of
        if self.profile_keys:
            out["profile_keys"] = self.profile_keys
        if any(self.arm_features):
            out.update(compact_arms(self.arm_features))
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> DecisionContext | None:
        """Either form: ``to_json``'s (and rows logged before the compact one) or ``serializable``'s."""
        if not raw:
            return None
        as_of = raw.get("profile_as_of")
        return cls(
            float(as_of) if as_of is not None else None,
            tuple(str(k) for k in raw.get("profile_keys") or ()),
            tuple(tuple(_feature(ns, name, v) for ns, name, v in fs) for fs in raw.get("arm_features") or ())
            if _COMPACT not in raw
            else _expanded(raw),
        )


# The compact form of a context's arm features (DecisionContext.serializable): each distinct
# feature tuple once (an unseen arm's zeros once for all unseen arms) as its names' layout and
# its values, each distinct sequence of names once, and per arm the index of its tuple:
#   "arm_names": [[[ns, name], ...], ...]    distinct name sequences
#   "arm_rows":  [[layout, v1, v2, ...], ...] distinct feature tuples
#   "arm_row":   [row, row, ...]              per arm, following LoggedDecision.arms
_COMPACT = "arm_row"


def compact_arms(arms: Sequence[tuple[Feature, ...]]) -> dict[str, Any]:
    """Arm features in the compact form. Tuples are told apart by identity (history gives every
    unseen arm the same tuple), which is cheap on the writer's thread; equal tuples that are not
    the same object are written twice, which is still exact."""
    rows: list[tuple[Any, ...]] = []
    row_of: dict[int, int] = {}
    layouts: dict[tuple[tuple[str, str], ...], int] = {}
    out: list[int] = []
    for fs in arms:
        k = row_of.get(id(fs))
        if k is None:
            names = tuple((ns, name) for ns, name, _ in fs)
            layout = layouts.get(names)
            if layout is None:
                layout = layouts[names] = len(layouts)
            k = row_of[id(fs)] = len(rows)
            rows.append((layout, *(f[2] for f in fs)))
        out.append(k)
    return {"arm_names": tuple(layouts), "arm_rows": rows, _COMPACT: out}


def _feature(ns: Any, name: Any, v: Any) -> Feature:
    return (str(ns), str(name), v if isinstance(v, str) else float(v))


def _expanded(raw: Mapping[str, Any]) -> tuple[tuple[Feature, ...], ...]:
    """The compact form's arm features; arms that shared a row share one tuple."""
    names = raw["arm_names"]
    rows = [tuple(_feature(ns, name, v) for (ns, name), v in zip(names[r[0]], r[1:], strict=True)) for r in raw["arm_rows"]]
    return tuple(rows[k] for k in raw[_COMPACT])


def logged_arm_rows(raw: Mapping[str, Any]) -> list[Any] | None:
    """The arm features of a stored context's JSON (either form), as ``to_json`` writes them:
    per arm, ``[namespace, name, value]`` rows; None if it has none. For readers of the raw
    column (replay, DSJSON) that keep the rows as logged."""
    if _COMPACT not in raw:
        return raw.get("arm_features") or None
    names = raw["arm_names"]
    rows = [[[ns, name, v] for (ns, name), v in zip(names[r[0]], r[1:], strict=True)] for r in raw["arm_rows"]]
    return [rows[k] for k in raw[_COMPACT]] or None


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
    reason: str = ""  # why no arm, or why the fallback, was served
    variant: str = ""  # the experiment variant that served ("holdout" for the control group)
    slot: int = 0  # position in a multi-slot response; each slot is its own decision
    activated: bool = True  # False while a deferred decision waits for Activate
    explanation: Explanation | None = None  # how the pmf came about (None: not recorded, older logs)
    context: DecisionContext | None = None  # profile and history used (None: the request's features only)

    @property
    def arm_id(self) -> str | None:
        return None if self.chosen is None else self.arms[self.chosen][0]
