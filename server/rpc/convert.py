"""The one place that knows both protobuf and domain types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from google.protobuf import timestamp_pb2
from pydantic import ValidationError

from nextbest.bandit.attribution import Conversion, Credit
from nextbest.bandit.eligibility import EligibilityRule
from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature, feature_key
from nextbest.bandit.spec import (
    ArmSpec,
    BudgetSpec,
    CampaignSpec,
    ContactRule,
    ExperimentSpec,
    ExplorationSpec,
    FatigueSpec,
    PlacementSpec,
    error_location,
)
from nextbest.config.plans import Change
from nextbest.engine.conversion_result import ConversionResult, ConversionStatus
from nextbest.storage.base import PlacementRecord, Profile
from nextbest.v1 import admin_pb2, common_pb2, decision_pb2, profile_pb2

if TYPE_CHECKING:  # numpy's modules: the client (which converts too) installs without numpy
    from nextbest.bandit.offline.experiment_stats import Interval
    from nextbest.bandit.offline.uplift import VariantUplift
    from nextbest.engine.placement_stats import Stats

_ALGORITHMS = {
    admin_pb2.EXPLORATION_ALGORITHM_EPSILON: "epsilon",
    admin_pb2.EXPLORATION_ALGORITHM_SOFTMAX: "softmax",
    admin_pb2.EXPLORATION_ALGORITHM_SQUARECB: "squarecb",
}
_ALGORITHM_PB = {v: k for k, v in _ALGORITHMS.items()}
_ACTIONS = {
    "CREATE": admin_pb2.CHANGE_ACTION_CREATE,
    "UPDATE": admin_pb2.CHANGE_ACTION_UPDATE,
    "RETIRE": admin_pb2.CHANGE_ACTION_RETIRE,
}
_ACTION_NAMES = {v: k for k, v in _ACTIONS.items()}


def validation_error(e: ValidationError, prefix: str) -> InvalidInput:
    """The first pydantic error as InvalidInput naming the field, e.g. placement.arms[1].id."""
    err = e.errors()[0]
    loc, msg = error_location(tuple(err["loc"]), str(err["msg"]))
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return InvalidInput(path, msg)


def features(items: Iterable[common_pb2.Feature], field: str = "features") -> tuple[Feature, ...]:
    out: list[Feature] = []
    append = out.append  # a Choose converts 30 or so of these: the loop is kept tight
    for f in items:
        text = f.text  # most features are categories: one field read tells most of them
        if text:
            append((f.namespace, f.name, text))
            continue
        kind = f.WhichOneof("value")
        if kind == "number":
            append((f.namespace, f.name, f.number))
        elif kind == "text":
            append((f.namespace, f.name, text))
        else:
            raise InvalidInput(f"{field}[{len(out)}].value", "set number or text")
    return tuple(out)


def features_pb(values: dict[str, float | str | bool]) -> list[common_pb2.Feature]:
    out = []
    for name, v in values.items():
        if isinstance(v, bool):
            out.append(common_pb2.Feature(name=name, text="true" if v else "false"))
        elif isinstance(v, str):
            out.append(common_pb2.Feature(name=name, text=v))
        else:
            out.append(common_pb2.Feature(name=name, number=float(v)))
    return out


def feature_pb(f: Feature) -> common_pb2.Feature:
    """One logged feature as the API writes it."""
    ns, name, v = f
    if isinstance(v, str):
        return common_pb2.Feature(namespace=ns, name=name, text=v)
    return common_pb2.Feature(namespace=ns, name=name, number=v)


_SCOPES = {
    admin_pb2.CONTACT_SCOPE_UNSPECIFIED: "customer_arm",
    admin_pb2.CONTACT_SCOPE_CUSTOMER_ARM: "customer_arm",
    admin_pb2.CONTACT_SCOPE_CUSTOMER_CAMPAIGN: "customer_campaign",
    admin_pb2.CONTACT_SCOPE_CUSTOMER: "customer",
}
_SCOPE_PB = {v: k for k, v in _SCOPES.items() if k != admin_pb2.CONTACT_SCOPE_UNSPECIFIED}
_SHAPES = {admin_pb2.FATIGUE_SHAPE_LINEAR: "linear"}


def _time(ts: timestamp_pb2.Timestamp, has: bool, field: str) -> datetime | None:
    """A set Timestamp as a UTC datetime; one outside protobuf's range (0001-01-01 to
    9999-12-31) is INVALID_ARGUMENT naming ``field``, as ToDatetime's ValueError was INTERNAL."""
    if not has:
        return None
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidInput(
            field, f"outside the Timestamp range 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z (seconds {ts.seconds}, nanos {ts.nanos})"
        ) from None


def _ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


_MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z, the end of protobuf's Timestamp range


def _epoch_ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """A projected time as a Timestamp; None when there is none or it lies beyond the
    Timestamp range (a slow spend of a large budget: "not before 9999" reads as never)."""
    if not seconds or not 0.0 <= seconds <= _MAX_EPOCH:
        return None
    return _ts(datetime.fromtimestamp(seconds, UTC))


def _budget_dict(b: admin_pb2.Budget, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if b.HasField("total"):
        out["total"] = b.total
    if b.HasField("daily"):
        out["daily"] = b.daily
    out["start"] = _time(b.start_time, b.HasField("start_time"), f"{field}.start_time")
    out["end"] = _time(b.end_time, b.HasField("end_time"), f"{field}.end_time")
    return out


def budget_pb(b: BudgetSpec | None) -> admin_pb2.Budget | None:
    if b is None:
        return None
    return admin_pb2.Budget(total=b.total, daily=b.daily, start_time=_ts(b.start), end_time=_ts(b.end))


def _arm_dict(arm: admin_pb2.Arm, field: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in features(arm.features, f"{field}.features"):
        values[feature_key(f)] = f[2]
    return {
        "id": arm.id,
        "features": values,
        "active": arm.active if arm.HasField("active") else True,
        "cost_per_impression": arm.cost_per_impression,
        "cost_per_reward": arm.cost_per_reward,
        "budget": _budget_dict(arm.budget, f"{field}.budget") if arm.HasField("budget") else None,
        "campaign": arm.campaign or None,
        "business_value": arm.business_value,
        "start": _time(arm.start_time, arm.HasField("start_time"), f"{field}.start_time"),
        "end": _time(arm.end_time, arm.HasField("end_time"), f"{field}.end_time"),
        "eligible": _rule_json(arm.eligible, f"{field}.eligible"),
        "products": list(arm.products),
    }


def _rule_json(text: str, field: str) -> Any:
    """An eligibility rule sent as JSON text (the apply file's form); empty: none."""
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(field, f"not a JSON rule: {str(e)[:200]}") from None


def _rule_text(rule: EligibilityRule | None) -> str:
    return "" if rule is None else orjson.dumps(rule.model_dump(by_alias=True, exclude_none=True)).decode()


def campaign_spec(c: admin_pb2.Campaign, field: str = "campaign") -> CampaignSpec:
    try:
        return CampaignSpec.model_validate({"id": c.id, "description": c.description, "budget": _budget_dict(c.budget, f"{field}.budget")})
    except ValidationError as e:
        raise validation_error(e, field) from None


def campaign_pb(c: CampaignSpec) -> admin_pb2.Campaign:
    return admin_pb2.Campaign(id=c.id, description=c.description, budget=budget_pb(c.budget))


def _rule_dict(r: admin_pb2.ContactPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"per": _SCOPES.get(r.per, "customer_arm")}
    if r.HasField("max_impressions"):
        out["max_impressions"] = r.max_impressions
    if r.HasField("window_seconds"):
        out["window"] = r.window_seconds
    if r.HasField("suppress_after_ignored"):
        out["suppress_after_ignored"] = r.suppress_after_ignored
    if r.HasField("suppress_seconds"):
        out["for"] = r.suppress_seconds
    return out


def _fatigue_dict(f: admin_pb2.Fatigue) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "scale" if f.kind == admin_pb2.FATIGUE_KIND_SCALE else "subtract",
        "shape": _SHAPES.get(f.shape, "exponential"),
        "campaign_strength": f.campaign_strength,
        "customer_strength": f.customer_strength,
    }
    if f.HasField("strength"):
        out["strength"] = f.strength
    if f.HasField("half_life_seconds"):
        out["half_life"] = f.half_life_seconds
    return out


def arm_spec(arm: admin_pb2.Arm, field: str = "arm") -> ArmSpec:
    try:
        return ArmSpec.model_validate(_arm_dict(arm, field))
    except ValidationError as e:
        raise validation_error(e, field) from None


_AGGREGATION = {
    admin_pb2.REWARD_AGGREGATION_EARLIEST: "earliest",
    admin_pb2.REWARD_AGGREGATION_SUM: "sum",
    admin_pb2.REWARD_AGGREGATION_MAX: "max",
    admin_pb2.REWARD_AGGREGATION_AVERAGE: "average",
}
_AGGREGATION_PB = {v: k for k, v in _AGGREGATION.items()}
_LEARN_AT = {admin_pb2.LEARN_AT_WINDOW_CLOSE: "window_close", admin_pb2.LEARN_AT_REWARD: "reward"}
_LEARN_AT_PB = {v: k for k, v in _LEARN_AT.items()}
_ATTRIBUTION = {admin_pb2.ATTRIBUTION_MODEL_LAST_TOUCH: "last_touch", admin_pb2.ATTRIBUTION_MODEL_LINEAR: "linear"}
_ATTRIBUTION_PB = {v: k for k, v in _ATTRIBUTION.items()}
_MODES = {
    admin_pb2.LEARNING_MODE_ONLINE: "online",
    admin_pb2.LEARNING_MODE_APPRENTICE: "apprentice",
    admin_pb2.LEARNING_MODE_LOGGING_ONLY: "logging_only",
}
_MODES_PB = {v: k for k, v in _MODES.items()}
_HOLDOUT = {admin_pb2.HOLDOUT_POLICY_FIXED: "fixed", admin_pb2.HOLDOUT_POLICY_RULES: "rules"}
_HOLDOUT_PB = {
    "uniform": admin_pb2.HOLDOUT_POLICY_UNIFORM,
    "fixed": admin_pb2.HOLDOUT_POLICY_FIXED,
    "rules": admin_pb2.HOLDOUT_POLICY_RULES,
}


def _exploration_dict(ex: admin_pb2.Exploration, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ex.algorithm != admin_pb2.EXPLORATION_ALGORITHM_UNSPECIFIED:
        if ex.algorithm not in _ALGORITHMS:
            raise InvalidInput(f"{field}.algorithm", f"unknown algorithm {ex.algorithm}")
        out["algorithm"] = _ALGORITHMS[ex.algorithm]
    for name in ("epsilon", "lambda", "gamma_scale", "gamma_exponent"):
        if ex.HasField(name):
            out[name] = getattr(ex, name)
    return out


def _experiment_dict(e: admin_pb2.Experiment, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {"salt": e.salt, "variants": []}
    if e.HasField("holdout"):
        h = e.holdout
        out["holdout"] = {
            "share": h.share,
            "policy": _HOLDOUT.get(h.policy, "uniform"),
            "arm": h.arm or None,
            "rules": [
                {"when": {feature_key(f): f[2] for f in features(r.when, f"{field}.holdout.rules[{i}].when")}, "arm": r.arm}
                for i, r in enumerate(h.rules)
            ],
        }
    for i, v in enumerate(e.variants):
        d: dict[str, Any] = {"id": v.id, "share": v.share}
        if v.HasField("exploration"):
            d["exploration"] = _exploration_dict(v.exploration, f"{field}.variants[{i}].exploration")
        if v.HasField("vw_args"):
            d["vw_args"] = v.vw_args
        if v.HasField("interactions"):
            d["interactions"] = v.interactions
        if v.HasField("bits"):
            d["bits"] = v.bits
        if v.HasField("fatigue"):
            d["fatigue"] = _fatigue_dict(v.fatigue)
        if v.HasField("contact_policies"):
            d["contact_policies"] = [_rule_dict(r) for r in v.contact_policies.policies]
        out["variants"].append(d)
    return out


def _shadow_dict(s: admin_pb2.Shadow) -> dict[str, Any]:
    d: dict[str, Any] = {"id": s.id, "vw_args": s.vw_args}
    if s.HasField("interactions"):
        d["interactions"] = s.interactions
    if s.HasField("bits"):
        d["bits"] = s.bits
    return d


def placement_spec(p: admin_pb2.Placement, field: str = "placement") -> PlacementSpec:
    """Validate a protobuf placement into a spec; errors name the field."""
    data: dict[str, Any] = {
        "id": p.id,
        "description": p.description,
        "arms": [_arm_dict(a, f"{field}.arms[{i}]") for i, a in enumerate(p.arms)],
        "vw_args": p.vw_args,
    }
    data["exploration"] = _exploration_dict(p.exploration, f"{field}.exploration")
    if p.HasField("reward_window_seconds"):
        data["reward_window"] = p.reward_window_seconds
    if p.HasField("default_reward"):
        data["default_reward"] = p.default_reward
    if p.HasField("max_abs_reward"):
        data["max_abs_reward"] = p.max_abs_reward
    if p.HasField("reward_range"):
        data["reward_range"] = (p.reward_range.low, p.reward_range.high)
    if p.model_group:
        data["model_group"] = p.model_group
    if p.eligible:
        data["eligible"] = _rule_json(p.eligible, f"{field}.eligible")
    if p.HasField("interactions"):
        data["interactions"] = p.interactions
    if p.HasField("bits"):
        data["bits"] = p.bits
    data["contact_policies"] = [_rule_dict(r) for r in p.contact_policies]
    if p.HasField("fatigue"):
        data["fatigue"] = _fatigue_dict(p.fatigue)
    if p.fallback_arm:
        data["fallback_arm"] = p.fallback_arm
    if p.HasField("cooldown_seconds"):
        data["cooldown"] = p.cooldown_seconds
    if p.HasField("experiment"):
        data["experiment"] = _experiment_dict(p.experiment, f"{field}.experiment")
    data["shadows"] = [_shadow_dict(s) for s in p.shadows]
    if p.HasField("slots"):
        data["slots"] = p.slots
    if p.HasField("activation_window_seconds"):
        data["activation_window"] = p.activation_window_seconds
    if p.reward_aggregation in _AGGREGATION:
        data["reward_aggregation"] = _AGGREGATION[p.reward_aggregation]
    if p.learn_at in _LEARN_AT:
        data["learn_at"] = _LEARN_AT[p.learn_at]
    if p.HasField("context"):
        data["context"] = {"profile": p.context.profile, "history": list(p.context.history_seconds)}
    if p.HasField("attribution"):
        a: dict[str, Any] = {}
        if p.attribution.window_seconds:
            a["window"] = p.attribution.window_seconds
        if p.attribution.model in _ATTRIBUTION:
            a["model"] = _ATTRIBUTION[p.attribution.model]
        data["attribution"] = a
    if p.mode in _MODES:
        data["mode"] = _MODES[p.mode]
    if p.HasField("active"):
        data["active"] = p.active
    data["start"] = _time(p.start_time, p.HasField("start_time"), f"{field}.start_time")
    data["end"] = _time(p.end_time, p.HasField("end_time"), f"{field}.end_time")
    if p.promote:
        data["promote"] = p.promote
    try:
        return PlacementSpec.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, field) from None


def arm_pb(arm: ArmSpec, version: int) -> admin_pb2.Arm:
    return admin_pb2.Arm(
        id=arm.id,
        features=features_pb(arm.features),
        active=arm.active,
        version=version,
        cost_per_impression=arm.cost_per_impression,
        cost_per_reward=arm.cost_per_reward,
        budget=budget_pb(arm.budget),
        campaign=arm.campaign or "",
        business_value=arm.business_value,
        start_time=_ts(arm.start),
        end_time=_ts(arm.end),
        eligible=_rule_text(arm.eligible),
        products=arm.products,
    )


def _rule_pb(r: ContactRule) -> admin_pb2.ContactPolicy:
    return admin_pb2.ContactPolicy(
        max_impressions=r.max_impressions,
        per=_SCOPE_PB[r.per],
        window_seconds=r.window,
        suppress_after_ignored=r.suppress_after_ignored,
        suppress_seconds=r.suppress_for,
    )


def _fatigue_pb(f: FatigueSpec | None) -> admin_pb2.Fatigue | None:
    if f is None:
        return None
    return admin_pb2.Fatigue(
        kind=admin_pb2.FATIGUE_KIND_SCALE if f.kind == "scale" else admin_pb2.FATIGUE_KIND_SUBTRACT,
        shape=admin_pb2.FATIGUE_SHAPE_LINEAR if f.shape == "linear" else admin_pb2.FATIGUE_SHAPE_EXPONENTIAL,
        strength=f.strength,
        campaign_strength=f.campaign_strength,
        customer_strength=f.customer_strength,
        half_life_seconds=f.half_life,
    )


def _exploration_pb(e: ExplorationSpec) -> admin_pb2.Exploration:
    return admin_pb2.Exploration(
        algorithm=_ALGORITHM_PB[e.algorithm],
        epsilon=e.epsilon,
        gamma_scale=e.gamma_scale,
        gamma_exponent=e.gamma_exponent,
        **{"lambda": e.lam},
    )


def _experiment_pb(x: ExperimentSpec | None) -> admin_pb2.Experiment | None:
    if x is None:
        return None
    h = x.holdout
    return admin_pb2.Experiment(
        salt=x.salt,
        holdout=None
        if h is None
        else admin_pb2.Holdout(
            share=h.share,
            policy=_HOLDOUT_PB[h.policy],
            arm=h.arm or "",
            rules=[admin_pb2.Rule(when=features_pb(r.when), arm=r.arm) for r in h.rules],
        ),
        variants=[
            admin_pb2.Variant(
                id=v.id,
                share=v.share,
                exploration=_exploration_pb(v.exploration) if v.exploration else None,
                vw_args=v.vw_args,
                interactions=v.interactions,
                bits=v.bits,
                fatigue=_fatigue_pb(v.fatigue),
                contact_policies=None
                if v.contact_policies is None
                else admin_pb2.ContactPolicyList(policies=[_rule_pb(r) for r in v.contact_policies]),
            )
            for v in x.variants
        ],
    )


def placement_pb(rec: PlacementRecord) -> admin_pb2.Placement:
    s = rec.spec
    return admin_pb2.Placement(
        id=s.id,
        description=s.description,
        arms=[arm_pb(a, rec.arm_versions.get(a.id, 0)) for a in s.arms],
        exploration=_exploration_pb(s.exploration),
        reward_window_seconds=s.reward_window,
        default_reward=s.default_reward,
        max_abs_reward=s.max_abs_reward,
        reward_range=None if s.reward_range is None else admin_pb2.RewardRange(low=s.reward_range[0], high=s.reward_range[1]),
        model_group=s.model_group or "",
        eligible=_rule_text(s.eligible),
        vw_args=s.vw_args,
        interactions=s.interactions,
        bits=s.bits,
        contact_policies=[_rule_pb(r) for r in s.contact_policies],
        fatigue=_fatigue_pb(s.fatigue),
        fallback_arm=s.fallback_arm or "",
        cooldown_seconds=s.cooldown,
        experiment=_experiment_pb(s.experiment),
        shadows=[admin_pb2.Shadow(id=x.id, vw_args=x.vw_args, interactions=x.interactions, bits=x.bits) for x in s.shadows],
        promote=s.promote or "",
        slots=s.slots,
        activation_window_seconds=s.activation_window,
        reward_aggregation=_AGGREGATION_PB[s.reward_aggregation],
        learn_at=_LEARN_AT_PB[s.learn_at],
        context=admin_pb2.PlacementContext(profile=s.context.profile, history_seconds=s.context.history),
        attribution=admin_pb2.Attribution(window_seconds=s.attribution.window, model=_ATTRIBUTION_PB[s.attribution.model]),
        mode=_MODES_PB[s.mode],
        active=s.active,
        start_time=_ts(s.start),
        end_time=_ts(s.end),
    )


def changes_pb(changes: Sequence[Change]) -> list[admin_pb2.ConfigChange]:
    return [
        admin_pb2.ConfigChange(placement=c.placement, arm_id=c.arm_id, action=_ACTIONS[c.action], details=c.details, campaign=c.campaign)
        for c in changes
    ]


def change(c: admin_pb2.ConfigChange) -> Change:
    return Change(c.placement, c.arm_id, _ACTION_NAMES.get(c.action, "UNSPECIFIED"), tuple(c.details), c.campaign)


TOP_REASONS = 5  # reasons per arm in GetStats, most frequent first


def stats_period(r: admin_pb2.GetStatsRequest) -> tuple[float | None, float | None]:
    """The period of the conversion figures asked for (None: the default)."""
    since = _seconds(r.start_time, "start_time") if r.HasField("start_time") else None
    until = _seconds(r.end_time, "end_time") if r.HasField("end_time") else None
    return since, until


def _interval_pb(i: Interval) -> admin_pb2.EstimateInterval:
    return admin_pb2.EstimateInterval(estimate=i.estimate, low=i.low, high=i.high)


def variant_conversions_pb(u: VariantUplift) -> admin_pb2.VariantConversionStats:
    out = admin_pb2.VariantConversionStats(
        variant=u.variant,
        customers=u.customers,
        converting_customers=u.converting,
        conversion_rate=_interval_pb(u.rate),
        value_per_customer=_interval_pb(u.value),
    )
    if u.rate_difference is not None and u.value_difference is not None:
        out.difference_to_holdout.CopyFrom(
            admin_pb2.ConversionDifference(
                conversion_rate=_interval_pb(u.rate_difference), value_per_customer=_interval_pb(u.value_difference)
            )
        )
    return out


def stats_pb(s: Stats) -> admin_pb2.GetStatsResponse:
    return admin_pb2.GetStatsResponse(
        placement=s.placement,
        arms=[
            admin_pb2.ArmStats(
                arm_id=t.arm_id,
                impressions=t.impressions,
                rewards=t.rewards,
                reward_sum=t.reward_sum,
                default_rewards=t.default_rewards,
                late_rewards=t.late_rewards,
                active=active,
                spend=t.spend,
                ineligible=sum(n for _, n in s.ineligible.get(t.arm_id, ())),
                ineligible_reasons=[
                    admin_pb2.IneligibleReason(reason=r, decisions=n) for r, n in s.ineligible.get(t.arm_id, ())[:TOP_REASONS]
                ],
                rewards_learned=t.rewards_learned,
                reward_sum_learned=t.reward_sum_learned,
                rewards_awaiting_close=t.rewards_awaiting_close,
                reward_sum_awaiting_close=t.reward_sum_awaiting_close,
                spend_awaiting_close=t.spend_awaiting_close,
            )
            for t, active in s.arms
        ],
        decisions=s.decisions,
        model_version=s.model_version,
        pending=s.pending,
        budgets=[
            admin_pb2.BudgetStats(
                budget=b.key,
                period=b.period,
                limit=b.limit,
                spent=b.spent,
                reserved=b.reserved,
                remaining=b.remaining,
                paced=b.paced,
                pacing_multiplier=b.multiplier,
                projected_exhaustion=_epoch_ts(b.projected_exhaustion),
                leased_unused=b.leased_unused,
            )
            for b in s.budgets
        ],
        no_offer=s.no_offer,
        variants=[
            admin_pb2.VariantStats(
                variant=v.variant,
                decisions=v.decisions,
                impressions=v.impressions,
                rewards=v.rewards,
                reward_sum=v.reward_sum,
                closed=v.closed,
                mean_reward=v.learned_sum / v.closed if v.closed else 0.0,
                rewards_awaiting_close=v.rewards_awaiting_close,
                reward_sum_awaiting_close=v.reward_sum_awaiting_close,
            )
            for v in s.variants
        ],
        models=[
            admin_pb2.ModelStats(name=m.name, learned=m.learned, scored=m.scored, agreement=m.agreement, estimated_value=m.estimated_value)
            for m in s.models
        ],
        conversions=[variant_conversions_pb(u) for u in s.conversions],
        unattributed=[admin_pb2.UnattributedConversions(product=k, conversions=n, value=v) for k, (n, v) in s.unattributed.items()],
    )


def _seconds(ts: timestamp_pb2.Timestamp, field: str) -> float:
    """A set Timestamp as epoch seconds (INVALID_ARGUMENT naming ``field`` outside its range)."""
    _time(ts, True, field)
    return ts.seconds + ts.nanos / 1e9


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    """Epoch seconds as a Timestamp; None outside its range."""
    if not -62135596800.0 <= seconds <= _MAX_EPOCH:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def profile(p: profile_pb2.Profile, now: float, field: str = "profile") -> Profile:
    """A profile to store; ``as_of`` unset is ``now`` (the server's time)."""
    return Profile(
        p.customer_id,
        features(p.features, f"{field}.features"),
        _seconds(p.as_of, f"{field}.as_of") if p.HasField("as_of") else now,
        _seconds(p.expire_time, f"{field}.expire_time") if p.HasField("expire_time") else None,
    )


def profile_pb(p: Profile) -> profile_pb2.Profile:
    out = profile_pb2.Profile(
        customer_id=p.customer_id,
        features=[
            common_pb2.Feature(namespace=ns, name=name, text=v)
            if isinstance(v, str)
            else common_pb2.Feature(namespace=ns, name=name, number=v)
            for ns, name, v in p.features
        ],
        as_of=_timestamp(p.as_of),
    )
    if p.expires_at is not None:
        expire = _timestamp(p.expires_at)
        if expire is not None:
            out.expire_time.CopyFrom(expire)
    return out


# -- conversions (issue #31) ----------------------------------------------------------------------

_CONVERSION_STATUS = {
    ConversionStatus.ATTRIBUTED: decision_pb2.CONVERSION_STATUS_ATTRIBUTED,
    ConversionStatus.UNATTRIBUTED: decision_pb2.CONVERSION_STATUS_UNATTRIBUTED,
    ConversionStatus.DUPLICATE: decision_pb2.CONVERSION_STATUS_DUPLICATE,
}


def conversion(c: decision_pb2.Conversion, field: str = "conversion") -> Conversion:
    """A conversion to report; ``occurred_at`` is required (INVALID_ARGUMENT naming it)."""
    if not c.HasField("occurred_at"):
        raise InvalidInput(f"{field}.occurred_at", "required: when the purchase happened")
    return Conversion(c.conversion_id, c.customer_id, c.arm_id, c.product, c.value, _seconds(c.occurred_at, f"{field}.occurred_at"))


def conversion_pb(c: Conversion) -> decision_pb2.Conversion:
    return decision_pb2.Conversion(
        conversion_id=c.conversion_id,
        customer_id=c.customer_id,
        arm_id=c.arm_id,
        product=c.product,
        value=c.value,
        occurred_at=_timestamp(c.occurred_at),
    )


def credit_pb(c: Credit) -> decision_pb2.ConversionCredit:
    return decision_pb2.ConversionCredit(
        event_id=c.event_id, slot=c.slot, placement=c.placement, arm_id=c.arm_id, share=c.share, value=c.value
    )


def credit(c: decision_pb2.ConversionCredit) -> Credit:
    return Credit(c.event_id, c.slot, c.placement, c.arm_id, c.share, c.value)


def conversion_result_pb(r: ConversionResult) -> decision_pb2.ConversionResult:
    """A result's status and credits; the servicer adds the code and message of a failed one
    (the error catalog is the server's, not the client's)."""
    status = _CONVERSION_STATUS[r.status] if r.status is not None else decision_pb2.CONVERSION_STATUS_UNSPECIFIED
    return decision_pb2.ConversionResult(status=status, credits=[credit_pb(c) for c in r.credits])


def explained_conversion_pb(conversion_id: str, c: Credit, occurred_at: float) -> decision_pb2.ExplainedConversion:
    return decision_pb2.ExplainedConversion(conversion_id=conversion_id, share=c.share, value=c.value, occurred_at=_timestamp(occurred_at))
