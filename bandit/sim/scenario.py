"""Telecom CVM scenarios: customers, offers, channels and the true response model, as YAML.

A scenario is the whole simulated world, so that experiments differ by file, not by code.
Every cross-reference (an offer a channel lists, a feature an effect reads) is checked on
load, and errors name the file, line and field, as apply files do.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.spec import ID_PATTERN, ExplorationSpec, FatigueSpec

CHANNELS = ("app", "web", "chatbot", "ivr", "ussd")
PLANS = ("prepaid", "postpaid")
# Features every customer has besides the scenario's own attributes and bands.
BUILTIN_CATEGORICAL = ("plan", "preferred_channel", "channel")
BUILTIN_NUMERIC = ("days_since_recharge",)

Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dist(_Model):
    """A numeric distribution; draws are clipped to [min, max]."""

    dist: Literal["lognormal", "normal", "uniform", "constant"]
    median: Positive | None = None  # lognormal
    sigma: NonNegative | None = None  # lognormal
    mean: Finite | None = None  # normal
    sd: NonNegative | None = None  # normal
    low: Finite | None = None  # uniform
    high: Finite | None = None  # uniform
    value: Finite | None = None  # constant
    min: Finite | None = None
    max: Finite | None = None

    @model_validator(mode="after")
    def _params(self) -> Dist:
        need = {"lognormal": ("median", "sigma"), "normal": ("mean", "sd"), "uniform": ("low", "high"), "constant": ("value",)}
        missing = [p for p in need[self.dist] if getattr(self, p) is None]
        if missing:
            raise ValueError(f"a {self.dist} distribution needs {', '.join(missing)}")
        if self.dist == "uniform" and self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError("low must not exceed high")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


Number = Finite | Dist
Weights = dict[str, Positive]  # category -> relative weight


class Segment(_Model):
    """A group of similar customers; the segment itself is hidden from the service."""

    name: Name
    share: Positive
    plan: Literal["prepaid", "postpaid"]
    numeric: dict[Name, Number] = Field(default_factory=dict)
    categorical: dict[Name, Weights | str] = Field(default_factory=dict)
    channels: Weights
    visits_per_week: Number
    recharge_every_days: Number | None = None  # prepaid top-up cycle

    @model_validator(mode="after")
    def _check(self) -> Segment:
        for ch in self.channels:
            if ch not in CHANNELS:
                raise ValueError(f"channels: unknown channel {ch!r} (expected one of {list(CHANNELS)})")
        if self.plan == "prepaid" and self.recharge_every_days is None:
            raise ValueError("recharge_every_days: a prepaid segment needs a top-up cycle")
        return self


class Customers(_Model):
    count: Annotated[int, Field(ge=1, le=1_000_000)]
    # Share of visits through the customer's preferred channel; the rest follow the segment mix.
    preferred_channel_share: Annotated[float, Field(ge=0, le=1)] = 0.6
    segments: Annotated[list[Segment], Field(min_length=1)]


class Band(_Model):
    """A categorical band of a numeric attribute (e.g. ARPU low/mid/high), as CVM teams use."""

    of: Name
    edges: Annotated[list[Finite], Field(min_length=1)]
    labels: list[str]

    @model_validator(mode="after")
    def _check(self) -> Band:
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must increase")
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"needs {len(self.edges) + 1} labels for {len(self.edges)} edges")
        return self


class Offer(_Model):
    """An offer; accepting it earns its price as revenue and price - cost as margin."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    category: Literal["data", "voice", "combo", "device", "loyalty"]
    price: NonNegative
    cost: NonNegative
    features: dict[str, float | str] = Field(default_factory=dict)

    @property
    def margin(self) -> float:
        return self.price - self.cost


class Channel(_Model):
    """A channel and the placement that shows offers in it."""

    placement: Annotated[str, Field(pattern=ID_PATTERN)]
    description: str = ""
    offers: Annotated[list[str], Field(min_length=2, max_length=32)]
    logit: Finite = 0.0  # how receptive customers are in this channel
    exploration: ExplorationSpec = Field(default_factory=ExplorationSpec)
    vw_args: str = ""
    fatigue: FatigueSpec | None = None  # the service's fatigue penalty on this placement


Condition = dict[str, str | list[str]]


class Effect(_Model):
    """Adds ``logit`` when every condition holds, plus ``slope * (of - center)`` capped at ±cap."""

    when: Condition = Field(default_factory=dict)
    logit: Finite = 0.0
    of: Name | None = None
    slope: Finite = 0.0
    center: Finite = 0.0
    cap: Positive | None = None

    @model_validator(mode="after")
    def _check(self) -> Effect:
        if (self.of is None) != (self.slope == 0.0):
            raise ValueError("give both 'of' and a non-zero 'slope', or neither")
        return self


class OfferResponse(_Model):
    base: Finite  # acceptance log-odds before effects
    effects: list[Effect] = Field(default_factory=list)


class Fatigue(_Model):
    """Acceptance is multiplied by same_offer^n (n earlier impressions of this offer to this
    customer within the window) and any_offer^m (m impressions of any offer)."""

    same_offer: Probability = 0.6
    any_offer: Probability = 1.0
    window_days: Positive = 14.0


class Response(_Model):
    reward: Literal["margin", "revenue", "acceptance"] = "margin"
    fatigue: Fatigue = Field(default_factory=Fatigue)
    offers: dict[str, OfferResponse]


class PromotionEffect(_Model):
    offers: Annotated[list[str], Field(min_length=1)]
    logit: Finite


class Promotion(_Model):
    """A market event (e.g. a competitor's promotion) that shifts responses for a while."""

    name: Name
    start_day: NonNegative
    days: Positive
    when: Condition = Field(default_factory=dict)
    effects: Annotated[list[PromotionEffect], Field(min_length=1)]


class Scenario(_Model):
    """A whole simulated market. ``visits_per_day`` sets the simulated clock."""

    name: str
    description: str = ""
    visits_per_day: Positive = 500.0
    customers: Customers
    bands: dict[Name, Band] = Field(default_factory=dict)
    offers: Annotated[list[Offer], Field(min_length=2)]
    channels: dict[str, Channel]
    response: Response
    promotions: list[Promotion] = Field(default_factory=list)

    def numeric_features(self) -> tuple[str, ...]:
        return (*self.customers.segments[0].numeric, *BUILTIN_NUMERIC)

    def categorical_features(self) -> tuple[str, ...]:
        return (*self.customers.segments[0].categorical, *self.bands, *BUILTIN_CATEGORICAL)

    def offer(self, offer_id: str) -> Offer:
        return next(o for o in self.offers if o.id == offer_id)

    @model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        segs = self.customers.segments
        for i, s in enumerate(segs):
            if set(s.numeric) != set(segs[0].numeric) or set(s.categorical) != set(segs[0].categorical):
                raise ValueError(f"customers.segments[{i}]: every segment must define the same numeric and categorical attributes")
        numeric, categorical = set(self.numeric_features()), set(self.categorical_features())
        if clash := numeric & categorical:
            raise ValueError(f"feature {min(clash)!r} is both numeric and categorical")
        for name, band in self.bands.items():
            if band.of not in numeric:
                raise ValueError(f"bands.{name}.of: {band.of!r} is not a numeric attribute")
        ids = [o.id for o in self.offers]
        if len(set(ids)) != len(ids):
            raise ValueError("offers: offer ids must be unique")
        for ch, c in self.channels.items():
            if ch not in CHANNELS:
                raise ValueError(f"channels.{ch}: unknown channel (expected one of {list(CHANNELS)})")
            for o in c.offers:
                if o not in ids:
                    raise ValueError(f"channels.{ch}.offers: unknown offer {o!r}")
            if len(set(c.offers)) != len(c.offers):
                raise ValueError(f"channels.{ch}.offers: listed twice")
        placements = [c.placement for c in self.channels.values()]
        if len(set(placements)) != len(placements):
            raise ValueError("channels: two channels share a placement id")
        for i, s in enumerate(segs):
            for ch in s.channels:
                if ch not in self.channels:
                    raise ValueError(f"customers.segments[{i}].channels.{ch}: the scenario has no such channel")
        for o in ids:
            if o not in self.response.offers:
                raise ValueError(f"response.offers: offer {o!r} has no response model")
        for o, r in self.response.offers.items():
            if o not in ids:
                raise ValueError(f"response.offers.{o}: not an offer")
            for j, e in enumerate(r.effects):
                self._check_effect(e.when, e.of, f"response.offers.{o}.effects[{j}]")
        for i, p in enumerate(self.promotions):
            self._check_effect(p.when, None, f"promotions[{i}]")
            for pe in p.effects:
                for o in pe.offers:
                    if o not in ids:
                        raise ValueError(f"promotions[{i}].effects: unknown offer {o!r}")
        return self

    def _check_effect(self, when: Condition, of: str | None, where: str) -> None:
        categorical = set(self.categorical_features())
        for feat in when:
            if feat not in categorical:
                raise ValueError(f"{where}.when.{feat}: not a categorical feature (one of {sorted(categorical)})")
        if of is not None and of not in self.numeric_features():
            raise ValueError(f"{where}.of: {of!r} is not a numeric feature (one of {sorted(self.numeric_features())})")


class ScenarioError(InvalidInput):
    """An invalid scenario file; the message names file, line and field."""

    def __init__(self, where: str, field: str, message: str) -> None:
        super().__init__(field, message)
        self.args = (f"{where}: {field}: {message}" if field else f"{where}: {message}",)


def _lines(text: str) -> dict[tuple[str | int, ...], int]:
    """The 1-based line of every node, by path, for error messages."""
    out: dict[tuple[str | int, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[str | int, ...]) -> None:
        out[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                walk(v, (*path, str(k.value)))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, (*path, i))

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        walk(node, ())
    return out


def parse_scenario(text: str, file: str = "<scenario>") -> Scenario:
    """Validate scenario YAML, or raise ScenarioError naming where it is wrong."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ScenarioError(f"{file}:{mark.line + 1}" if mark else file, "", f"not valid YAML: {e.problem}") from None
    if not isinstance(data, dict):
        raise ScenarioError(file, "", "expected a mapping with customers, offers, channels and response")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        err = _most_specific(e.errors())
        loc = _data_path(data, err)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc and (m := re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg)):
            # a cross-check names its own field: "channels.app.offers: unknown offer 'x'"
            loc = tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", m.group(1)))
            msg = m.group(2)
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        lines = _lines(text)
        path = loc
        while path and path not in lines:
            path = path[:-1]
        line = lines.get(path, 0)
        raise ScenarioError(f"{file}:{line}" if line else file, field, msg) from None


def _most_specific(errors: list[Any]) -> Any:
    """For a union (a number or a distribution) pydantic reports every branch: prefer the
    error that is not a mere type mismatch, since it says what is wrong inside the value."""
    for err in errors:
        if err["type"] == "extra_forbidden":  # a misspelt key: say which, not what is missing
            return err
    for err in errors:
        if not str(err["type"]).endswith(("_type", "_parsing")):
            return err
    return errors[0]


def _data_path(data: Any, err: Any) -> tuple[str | int, ...]:
    """The error location without pydantic's union tags: only steps that exist in the data
    (and, for a missing field, its name)."""
    loc: tuple[int | str, ...] = err["loc"]
    out: list[str | int] = []
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif not (err["type"] == "missing" and i == len(loc) - 1):
            continue
        out.append(part)
    return tuple(out)


def load_scenario(path: str | Path | None = None) -> Scenario:
    """A scenario file, or the default one shipped with nextbest when path is None."""
    if path is None:
        text = resources.files("nextbest.bandit.sim").joinpath("default_scenario.yaml").read_text()
        return parse_scenario(text, "default_scenario.yaml")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ScenarioError(str(path), "", f"cannot read: {e.strerror}") from None
    return parse_scenario(text, str(path))
