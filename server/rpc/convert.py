"""The one place that knows both protobuf and domain types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

from bandit.errors import InvalidInput
from bandit.features import Feature
from bandit.spec import ArmSpec, PlacementSpec, error_location
from server.pb.nextbest.v1 import admin_pb2, common_pb2
from server.placements import Change
from server.stats import Stats
from server.storage.base import PlacementRecord

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
    out = []
    for i, f in enumerate(items):
        kind = f.WhichOneof("value")
        if kind == "number":
            out.append(Feature(f.namespace, f.name, f.number))
        elif kind == "text":
            out.append(Feature(f.namespace, f.name, f.text))
        else:
            raise InvalidInput(f"{field}[{i}].value", "set number or text")
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


def _arm_dict(arm: admin_pb2.Arm, field: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in features(arm.features, f"{field}.features"):
        values[f.key] = f.value
    return {"id": arm.id, "features": values, "active": arm.active if arm.HasField("active") else True}


def arm_spec(arm: admin_pb2.Arm, field: str = "arm") -> ArmSpec:
    try:
        return ArmSpec.model_validate(_arm_dict(arm, field))
    except ValidationError as e:
        raise validation_error(e, field) from None


def placement_spec(p: admin_pb2.Placement, field: str = "placement") -> PlacementSpec:
    """Validate a protobuf placement into a spec; errors name the field."""
    data: dict[str, Any] = {
        "id": p.id,
        "description": p.description,
        "arms": [_arm_dict(a, f"{field}.arms[{i}]") for i, a in enumerate(p.arms)],
        "vw_args": p.vw_args,
    }
    ex = p.exploration
    exploration: dict[str, Any] = {}
    if ex.algorithm != admin_pb2.EXPLORATION_ALGORITHM_UNSPECIFIED:
        if ex.algorithm not in _ALGORITHMS:
            raise InvalidInput(f"{field}.exploration.algorithm", f"unknown algorithm {ex.algorithm}")
        exploration["algorithm"] = _ALGORITHMS[ex.algorithm]
    for name in ("epsilon", "lambda", "gamma_scale", "gamma_exponent"):
        if ex.HasField(name):
            exploration[name] = getattr(ex, name)
    data["exploration"] = exploration
    if p.HasField("reward_window_seconds"):
        data["reward_window"] = p.reward_window_seconds
    if p.HasField("default_reward"):
        data["default_reward"] = p.default_reward
    if p.HasField("interactions"):
        data["interactions"] = p.interactions
    if p.HasField("bits"):
        data["bits"] = p.bits
    try:
        return PlacementSpec.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, field) from None


def arm_pb(arm: ArmSpec, version: int) -> admin_pb2.Arm:
    return admin_pb2.Arm(id=arm.id, features=features_pb(arm.features), active=arm.active, version=version)


def placement_pb(rec: PlacementRecord) -> admin_pb2.Placement:
    s = rec.spec
    e = s.exploration
    return admin_pb2.Placement(
        id=s.id,
        description=s.description,
        arms=[arm_pb(a, rec.arm_versions.get(a.id, 0)) for a in s.arms],
        exploration=admin_pb2.Exploration(
            algorithm=_ALGORITHM_PB[e.algorithm],
            epsilon=e.epsilon,
            gamma_scale=e.gamma_scale,
            gamma_exponent=e.gamma_exponent,
            **{"lambda": e.lam},
        ),
        reward_window_seconds=s.reward_window,
        default_reward=s.default_reward,
        vw_args=s.vw_args,
        interactions=s.interactions,
        bits=s.bits,
    )


def changes_pb(changes: Sequence[Change]) -> list[admin_pb2.ConfigChange]:
    return [
        admin_pb2.ConfigChange(placement=c.placement, arm_id=c.arm_id, action=_ACTIONS[c.action], details=c.details)
        for c in changes
    ]


def change(c: admin_pb2.ConfigChange) -> Change:
    return Change(c.placement, c.arm_id, _ACTION_NAMES.get(c.action, "UNSPECIFIED"), tuple(c.details))


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
            )
            for t, active in s.arms
        ],
        decisions=s.decisions,
        model_version=s.model_version,
        pending=s.pending,
    )
