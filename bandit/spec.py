"""Validated placement and arm specifications: the core trusts these, the edges build them.

The same models validate an apply file, an admin request and a stored row, so a value that
is invalid in one place is invalid everywhere.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from nextbest.bandit.eligibility import EligibilityRule, check_shape
from nextbest.bandit.features import Feature, features_from_mapping
from nextbest.bandit.text import first_unstorable
from nextbest.bandit.vw_options import split_vw_args

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a text like "90s", "10m", "7d"."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 600, '10m' or '7d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError("must be a duration such as 600, '10m' or '7d'")
    if not seconds > 0:
        raise ValueError("must be positive")
    return seconds


def check_vw_args(v: str) -> str:
    """VW arguments a placement may add: only the learning options of ``nextbest.bandit.vw_options``
    (an allow list), each with a checked value; options that name files, or that nextbest
    sets itself, are refused."""
    return " ".join(split_vw_args(v))


VwArgs = Annotated[str, AfterValidator(check_vw_args)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _storable_document(data: Any) -> Any:
    """A whole placement or campaign document, refused if any of its texts cannot be stored
    (a NUL or a lone surrogate: PostgreSQL refuses them, see bandit/text.py)."""
    where = first_unstorable(data)
    if where is not None:
        raise ValueError(f"{where}: contains a NUL character or a lone surrogate, which cannot be stored")
    return data


MAX_ABS_REWARD_LIMIT = 1e12  # VW computes in float32; far below its overflow, far above any reward in money
# Active arms of one placement: every Choose scores and logs them all (10,000 took 101 ms a
# Choose and 249 KB a log row). Retired arms, kept for their history, do not count: a stored
# placement gathers them over the years, and it must still load.
MAX_ARMS = 1000
MAX_PRODUCTS = 1000  # billing product codes per arm
MAX_ATTRIBUTION_WINDOW = 90 * 86400.0


class ExplorationSpec(_Spec):
    """How a placement turns model scores into probabilities."""

    algorithm: Literal["epsilon", "softmax", "squarecb"] = "squarecb"
    epsilon: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.05
    # Named lambda in files and the API; "lambda" is a Python keyword.
    lam: Annotated[float, Field(gt=0.0, le=1e6, alias="lambda", allow_inf_nan=False)] = 10.0
    gamma_scale: Annotated[float, Field(gt=0.0, le=1e6, allow_inf_nan=False)] = 10.0
    gamma_exponent: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.5

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


Money = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
# An eligibility rule (bandit/eligibility.py): the limits are checked before the rule is parsed.
Eligible = Annotated[EligibilityRule | None, BeforeValidator(check_shape)]


def _utc(v: datetime | None, name: str = "") -> datetime | None:
    """A time with its zone (UTC when it has none); one that is not a UTC time between
    0001-01-01 and 9999-12-31 (protobuf's Timestamp range, e.g. 9999-12-31T23:00:00-05:00) is
    refused here rather than failing when it is sent or stored."""
    if v is None:
        return v
    if v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    try:
        v.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"{name + ': ' if name else ''}must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z") from None
    return v


class BudgetSpec(_Spec):
    """Spend limits in budget units: a lifetime total and/or a daily cap (UTC days),
    optionally only between start and end; outside them the budgeted arms are not served."""

    total: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    daily: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    start: datetime | None = None
    end: datetime | None = None

    @model_validator(mode="after")
    def _check(self) -> BudgetSpec:
        if self.total is None and self.daily is None:
            raise ValueError("set total, daily or both")
        start, end = _utc(self.start, "start"), _utc(self.end, "end")
        if start and end and start >= end:
            raise ValueError("start must be before end")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        return self


class CampaignSpec(_Spec):
    """A named budget that several arms share, across placements."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    description: str = ""
    budget: BudgetSpec

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        return _storable_document(data)


class ArmSpec(_Spec):
    """One offer. ``features`` are the VW action features besides the arm id."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    features: dict[str, float | str | bool] = Field(default_factory=dict)
    active: bool = True
    cost_per_impression: Money = 0.0
    cost_per_reward: Money = 0.0  # spent when the reward is positive (an acceptance)
    budget: BudgetSpec | None = None
    campaign: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    business_value: Annotated[float, Field(allow_inf_nan=False)] = 0.0  # added to the expected reward
    start: datetime | None = None
    end: datetime | None = None
    eligible: Eligible = None  # the arm is shown only to requests whose features satisfy this rule
    # Billing product codes whose purchase is a conversion of this offer (issue #31); a
    # conversion naming the arm's id (arm_id) matches it too.
    products: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(default_factory=list)

    @field_validator("start", "end")
    @classmethod
    def _tz(cls, v: datetime | None) -> datetime | None:
        return _utc(v)

    @field_validator("products")
    @classmethod
    def _unique_products(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_PRODUCTS:
            raise ValueError(f"at most {MAX_PRODUCTS} products per arm")
        seen: set[str] = set()
        for code in v:
            if code in seen:
                raise ValueError(f"duplicate product {code!r}")
            seen.add(code)
        return v

    @field_validator("features")
    @classmethod
    def _finite_features(cls, v: dict[str, float | str | bool]) -> dict[str, float | str | bool]:
        for name, value in v.items():
            if not name or len(name) > 128:
                raise ValueError("feature names must have 1 to 128 characters")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
            if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > 1e12:
                raise ValueError(f"{name} must be at most 1e12 in magnitude (VW computes in float32)")
            if isinstance(value, str) and len(value) > 256:
                raise ValueError(f"{name} must have at most 256 characters")
        return v

    def vw_features(self) -> tuple[Feature, ...]:
        return features_from_mapping(self.features)


class ContactRule(_Spec):
    """A hard contact policy. Either ``max_impressions`` per key within ``window``, or
    ``suppress_after_ignored`` consecutive ignored impressions of an arm, suppressing it ``for``."""

    max_impressions: Annotated[int, Field(ge=1)] | None = None
    per: Literal["customer_arm", "customer_campaign", "customer"] = "customer_arm"
    window: Duration | None = None
    suppress_after_ignored: Annotated[int, Field(ge=1)] | None = None
    suppress_for: Duration | None = Field(default=None, alias="for")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_kind(self) -> ContactRule:
        if self.max_impressions is not None:
            if self.window is None:
                raise ValueError("max_impressions needs a window, e.g. window: 7d")
            if self.suppress_after_ignored is not None or self.suppress_for is not None:
                raise ValueError("a rule is either max_impressions/per/window or suppress_after_ignored/for")
        elif self.suppress_after_ignored is not None:
            if self.suppress_for is None:
                raise ValueError("suppress_after_ignored needs for, e.g. for: 14d")
        else:
            raise ValueError("set max_impressions (with per and window) or suppress_after_ignored (with for)")
        return self

    @property
    def horizon(self) -> float:
        return float(self.window or 0.0) + float(self.suppress_for or 0.0)


class FatigueSpec(_Spec):
    """Soft penalty on the score of offers a customer saw recently without responding:
    each ignored impression weighs exp(-ln 2 * age / half_life) (or 1 - age / (2 * half_life)
    for ``shape: linear``) times the strength of its level; the sum P is subtracted from the
    expected reward (``kind: subtract``, in reward units), or scales it by exp(-P) (``kind: scale``:
    each ignored impression cuts the value by a share, as response fatigue usually does)."""

    kind: Literal["subtract", "scale"] = "subtract"
    shape: Literal["exponential", "linear"] = "exponential"
    strength: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.1  # per ignored impression of the same arm
    campaign_strength: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0  # of the same campaign
    customer_strength: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0  # of any offer
    half_life: Duration = 3 * 86400.0

    @property
    def horizon(self) -> float:
        return 4 * self.half_life if self.shape == "linear" else 10 * self.half_life


class RuleSpec(_Spec):
    """One row of a rules table: when every listed context feature has the given value, serve ``arm``."""

    when: dict[str, float | str | bool] = Field(default_factory=dict)
    arm: str


class HoldoutSpec(_Spec):
    """The control group: served without a model, so the bandit can be compared with it.

    ``uniform``: uniformly at random among eligible arms; ``fixed``: always ``arm``; ``rules``:
    the first matching rule's arm (else ``arm``) — e.g. the rules the operator used before.
    """

    share: Annotated[float, Field(ge=0.0, le=1.0)]
    policy: Literal["uniform", "fixed", "rules"] = "uniform"
    arm: str | None = None
    rules: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> HoldoutSpec:
        if self.policy == "fixed" and self.arm is None:
            raise ValueError("a fixed holdout policy needs arm")
        if self.policy == "rules" and not self.rules:
            raise ValueError("a rules holdout policy needs rules")
        return self


class VariantSpec(_Spec):
    """An experiment arm of the placement: its own model and settings (unset ones are the placement's)."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")]
    share: Annotated[float, Field(gt=0.0, le=1.0)]
    exploration: ExplorationSpec | None = None
    vw_args: VwArgs | None = None
    interactions: bool | None = None
    bits: Annotated[int, Field(ge=10, le=28)] | None = None
    fatigue: FatigueSpec | None = None
    contact_policies: list[ContactRule] | None = None

    @field_validator("id")
    @classmethod
    def _reserved(cls, v: str) -> str:
        if v == "holdout":
            raise ValueError("'holdout' names the control group")
        return v


class ExperimentSpec(_Spec):
    """Traffic split by a salted hash of customer_id (sticky per customer)."""

    salt: str = ""  # change it to reshuffle customers; defaults to the placement id
    holdout: HoldoutSpec | None = None
    variants: list[VariantSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shares(self) -> ExperimentSpec:
        ids = [v.id for v in self.variants]
        if len(set(ids)) != len(ids):
            raise ValueError("variant ids must be unique")
        total = sum(v.share for v in self.variants) + (self.holdout.share if self.holdout else 0.0)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"shares of holdout and variants must add up to 1, not {total:g}")
        return self


class ShadowSpec(_Spec):
    """A candidate model that learns from the served decisions without serving."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")]
    vw_args: VwArgs = ""
    interactions: bool = True
    bits: Annotated[int, Field(ge=10, le=28)] = 18


def window_label(seconds: float) -> str:
    """A history window's name in feature names: 7 days is "7d", 12 hours "12h", 90 minutes "90m"."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"


MAX_HISTORY_WINDOWS = 4
MAX_HISTORY_WINDOW = 400 * 86400.0


class ContextSpec(_Spec):
    """What a Choose adds to the request's features (issue #30).

    ``profile``: the stored profile of the request's customer (the request wins where both name a
    feature). ``history``: for every arm, this customer's impressions and accepts (rewards > 0)
    of that offer within each window (``history.impressions_7d``, ``history.accepts_7d``), and
    ``history.days_since_impression`` / ``history.days_since_accept`` (absent when never)."""

    profile: bool = False
    history: list[Duration] = Field(default_factory=list)  # windows: [7d, 30d]

    @field_validator("history")
    @classmethod
    def _windows(cls, v: list[float]) -> list[float]:
        out = sorted(set(v))
        if len(out) > MAX_HISTORY_WINDOWS:
            raise ValueError(f"at most {MAX_HISTORY_WINDOWS} windows")
        if out and out[-1] > MAX_HISTORY_WINDOW:
            raise ValueError(f"at most {MAX_HISTORY_WINDOW / 86400:g} days")
        if len({window_label(x) for x in out}) != len(out):
            raise ValueError("two windows with the same name")
        return out

    @property
    def windows(self) -> list[tuple[str, float]]:
        """(label, seconds) of each history window, shortest first."""
        return [(window_label(x), x) for x in self.history]


class AttributionSpec(_Spec):
    """How a conversion from billing (issue #31: a purchase keyed by customer and product, no
    event id) is credited to this placement's decisions: to the customer's activated impressions
    of the matching arm within ``window`` before the purchase; ``last_touch`` credits the latest
    of them, ``linear`` splits the value equally (bandit/attribution.py)."""

    window: Duration = 7 * 86400.0
    model: Literal["last_touch", "linear"] = "last_touch"

    @field_validator("window")
    @classmethod
    def _window(cls, v: float) -> float:
        if v > MAX_ATTRIBUTION_WINDOW:
            raise ValueError(f"at most {MAX_ATTRIBUTION_WINDOW / 86400:g} days")
        return v


class PlacementSpec(_Spec):
    """A placement: its arms and how its model learns and explores."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    description: str = ""
    arms: list[ArmSpec] = Field(default_factory=list)  # at most MAX_ARMS active ones
    exploration: ExplorationSpec = Field(default_factory=ExplorationSpec)
    reward_window: Annotated[float, Field(gt=0.0, le=90 * 86400.0)] = 600.0
    default_reward: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    # Rewards above this magnitude are refused: one Reward(1e13) used to ruin a model for good.
    max_abs_reward: Annotated[float, Field(gt=0.0, le=MAX_ABS_REWARD_LIMIT, allow_inf_nan=False)] = 1e6
    # The range of one decision's reward, e.g. (0, 15) for margins up to 15: softmax and SquareCB
    # divide value gaps by its width instead of the estimate from recent rewards (reward_scale.py).
    reward_range: tuple[Annotated[float, Field(allow_inf_nan=False)], Annotated[float, Field(allow_inf_nan=False)]] | None = None
    vw_args: VwArgs = ""
    interactions: bool = True
    bits: Annotated[int, Field(ge=10, le=28)] = 18
    contact_policies: list[ContactRule] = Field(default_factory=list)
    fatigue: FatigueSpec | None = None
    fallback_arm: str | None = None  # served when nothing else is eligible, bypassing constraints
    cooldown: Duration | None = None  # after an impression here, the customer gets no offer here for this long
    active: bool = True  # false pauses the placement: Choose answers no arm ("placement paused")
    start: datetime | None = None  # the placement serves from then on
    end: datetime | None = None  # and until then
    slots: Annotated[int, Field(ge=1, le=10)] = 1  # arms returned per Choose, distinct, in order
    activation_window: Duration = 3600.0  # a deferred decision not activated within this is dropped
    reward_aggregation: Literal["earliest", "sum", "max", "average"] = "earliest"
    # When a decision is learned: once its window closes, in decision order, with its first reward
    # (or the aggregate, or the default reward); or at its first reward, at once. Closing first
    # is what keeps channels that report only successes from teaching the model fresh successes
    # without their failures (docs/configuration.md, "Learning order and weighting").
    learn_at: Literal["window_close", "reward"] = "window_close"
    mode: Literal["online", "apprentice", "logging_only"] = "online"
    experiment: ExperimentSpec | None = None
    shadows: list[ShadowSpec] = Field(default_factory=list)
    promote: str | None = None  # on stopping an experiment: the variant whose model becomes the placement's
    eligible: Eligible = None  # every arm of the placement must also satisfy this rule
    context: ContextSpec = Field(default_factory=ContextSpec)  # stored profile and history features
    attribution: AttributionSpec = Field(default_factory=AttributionSpec)  # conversions from billing (#31)
    # Placements naming one group learn one VW model, the placement id a feature of every
    # decision (issue #33); each keeps its own arms, rules, budgets, exploration and log.
    model_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        return _storable_document(data)

    @field_validator("reward_window", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float:
        return parse_duration(v)

    @field_validator("arms")
    @classmethod
    def _at_most_max_arms(cls, v: list[ArmSpec]) -> list[ArmSpec]:
        active = sum(a.active for a in v)
        if active > MAX_ARMS:
            raise ValueError(f"at most {MAX_ARMS:,} active arms per placement, got {active:,}")
        return v

    @model_validator(mode="after")
    def _unique_arms(self) -> PlacementSpec:
        if abs(self.default_reward) > self.max_abs_reward:
            raise ValueError(f"default_reward: magnitude above max_abs_reward ({self.max_abs_reward:g})")
        if self.reward_range is not None:
            lo, hi = self.reward_range
            if not lo < hi:
                raise ValueError(f"reward_range: the low end must be below the high end, got [{lo:g}, {hi:g}]")
            if max(abs(lo), abs(hi)) > self.max_abs_reward:
                raise ValueError(f"reward_range: [{lo:g}, {hi:g}] reaches beyond max_abs_reward ({self.max_abs_reward:g})")
        seen: set[str] = set()
        for i, arm in enumerate(self.arms):
            if arm.id in seen:
                raise ValueError(f"arms[{i}].id: duplicate arm id {arm.id!r}")
            seen.add(arm.id)
        products: dict[str, int] = {}
        for i, arm in enumerate(self.arms):
            for code in arm.products:
                if code in products:
                    raise ValueError(f"arms[{i}].products: product {code!r} is also a product of arm {self.arms[products[code]].id!r}")
                products[code] = i
        if self.fallback_arm is not None and self.fallback_arm not in seen:
            raise ValueError(f"fallback_arm: {self.fallback_arm!r} is not an arm of this placement")
        h = self.experiment.holdout if self.experiment else None
        named: list[str | None] = [h.arm, *(r.arm for r in h.rules)] if h else []
        for name in named:
            if name is not None and name not in seen:
                raise ValueError(f"experiment: holdout arm {name!r} is not an arm of this placement")
        if len({s.id for s in self.shadows}) != len(self.shadows):
            raise ValueError("shadows: shadow ids must be unique")
        if self.promote is not None and self.experiment is not None:
            raise ValueError("promote: promote a variant when stopping the experiment (remove experiment)")
        return self

    def warnings(self) -> list[str]:
        """What ``nextbest apply`` points out but accepts: settings that work, though likely not
        as meant. A placement that learns from conversions (an arm lists products, or
        ``attribution`` is set) with a reward window shorter than its attribution window learns a
        conversion credited after the window closed as LATE (recorded, not learned)."""
        out: list[str] = []
        converts = "attribution" in self.model_fields_set or any(a.products for a in self.arms)
        if converts and self.reward_window < self.attribution.window:
            out.append(
                f"placement {self.id}: reward_window ({window_label(self.reward_window)}) is shorter than attribution.window "
                f"({window_label(self.attribution.window)}): conversions credited after a decision's reward window closed are "
                "recorded as LATE and not learned"
            )
        return out

    def variant(self, vid: str) -> PlacementSpec:
        """The effective spec a variant serves with: the placement's, overridden by the variant's."""
        if not vid or self.experiment is None:
            return self
        v = next(x for x in self.experiment.variants if x.id == vid)
        update = {
            k: getattr(v, k)
            for k in ("exploration", "vw_args", "interactions", "bits", "fatigue", "contact_policies")
            if getattr(v, k) is not None
        }
        return self.model_copy(update=update)

    def model_spec(self, name: str) -> PlacementSpec:
        """The spec a model (by its name) is built and explores with: a variant's, a shadow's or the placement's."""
        if name.startswith("shadow:"):
            s = next(x for x in self.shadows if f"shadow:{x.id}" == name)
            return self.model_copy(update={"vw_args": s.vw_args, "interactions": s.interactions, "bits": s.bits})
        return self.variant(name)

    def model_keys(self) -> dict[str, tuple[str, bool, int]]:
        """Every model this placement keeps, by its name, with its model key."""
        out = {"": self.model_key()}
        if self.experiment is not None:
            for v in self.experiment.variants:
                out[v.id] = self.variant(v.id).model_key()
        for s in self.shadows:
            out[f"shadow:{s.id}"] = (s.vw_args, s.interactions, s.bits)
        return out

    @field_validator("start", "end")
    @classmethod
    def _tz(cls, v: datetime | None) -> datetime | None:
        return _utc(v)

    def closed(self, now: float) -> str:
        """Why the placement serves nothing now ("" when it serves)."""
        if not self.active:
            return "placement paused"
        if self.start is not None and now < self.start.timestamp():
            return "placement not started"
        if self.end is not None and now >= self.end.timestamp():
            return "placement ended"
        return ""

    @property
    def history_horizon(self) -> float:
        """How far back contact policies, fatigue and history features look, in seconds."""
        spans = [r.horizon for r in self.contact_policies] + [self.cooldown or 0.0] + list(self.context.history)
        if self.fatigue is not None:
            spans.append(self.fatigue.horizon)
        return max(spans, default=0.0)

    def active_arms(self) -> list[ArmSpec]:
        return [a for a in self.arms if a.active]

    def __copy__(self) -> PlacementSpec:
        # model_copy(update=...) (variants, shadows) starts from a copy of __dict__: a cached
        # property of the original must not survive into a spec whose fields differ.
        out = super().__copy__()
        out.__dict__.pop("unconstrained", None)
        out.__dict__.pop("has_rules", None)
        return out

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> PlacementSpec:
        out = super().__deepcopy__(memo)
        out.__dict__.pop("unconstrained", None)
        out.__dict__.pop("has_rules", None)
        return out

    @cached_property
    def has_rules(self) -> bool:
        """The placement or one of its arms has an eligibility rule: a Choose reads its features by name."""
        return self.eligible is not None or any(a.eligible is not None for a in self.arms)

    @cached_property
    def unconstrained(self) -> bool:
        """No contact policy, cooldown, fatigue, arm dates, paused arm or business value: every
        active arm is eligible unless a budget, an eligibility rule or the caller's exclusions say
        otherwise (``has_rules``), and scores are VW's own. The
        decider then skips its per-arm checks (a third of a 20-arm Choose, measured)."""
        return (
            not self.contact_policies
            and not self.cooldown
            and self.fatigue is None
            and all(a.active and a.start is None and a.end is None and not a.business_value for a in self.arms)
        )

    def model_key(self) -> tuple[str, bool, int]:
        """What the VW model depends on; a change of it starts a new model."""
        return (self.vw_args, self.interactions, self.bits)


def error_location(loc: tuple[str | int, ...], msg: str) -> tuple[tuple[str | int, ...], str]:
    """A pydantic error's field path and message; a model-level check that names its own
    field in the message ("arms[1].id: duplicate ...") gets that field added to the path."""
    msg = msg.removeprefix("Value error, ")
    m = re.match(r"^([A-Za-z_]+)\[(\d+)\]\.([A-Za-z_]+): (.*)$", msg, re.S)
    if m:
        return (*loc, m.group(1), int(m.group(2)), m.group(3)), m.group(4)
    m = re.match(r"^([a-z_]+): (.*)$", msg, re.S)
    if m:
        return (*loc, m.group(1)), m.group(2)
    return loc, msg
