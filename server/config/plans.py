"""Placement configuration changes: planning (a diff, field by field) and the new records.

Apply is declarative: the given placements become the live ones. An arm missing from a
placement is retired (kept, inactive) so its history stays; changing an arm's features makes
a new arm version; changing what the VW model depends on starts a new model generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nextbest.bandit.spec import ArmSpec, CampaignSpec, PlacementSpec
from nextbest.storage.base import PlacementRecord


@dataclass(frozen=True, slots=True)
class Change:
    """One planned change, for people: CREATE, UPDATE or RETIRE with field-level details."""

    placement: str
    arm_id: str
    action: str
    details: tuple[str, ...] = ()
    campaign: str = ""


@dataclass(slots=True)
class Plan:
    """What applying a configuration will do, and the records to store if it is applied."""

    changes: list[Change] = field(default_factory=list)
    records: list[PlacementRecord] = field(default_factory=list)
    new_arm_versions: list[tuple[str, str, int, dict[str, float | str | bool]]] = field(default_factory=list)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, ...]:
    a, b = _flatten(old), _flatten(new)
    return tuple(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def _settings(spec: PlacementSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True, exclude={"id", "arms"})


def plan_campaigns(current: Mapping[str, CampaignSpec], desired: Sequence[CampaignSpec]) -> list[Change]:
    """Campaigns are created or updated; one left out of a file is kept (arms may still use it)."""
    out = []
    for c in desired:
        old = current.get(c.id)
        new = c.model_dump(mode="json", exclude={"id"})
        if old is None:
            created = c.model_dump(mode="json", exclude={"id"}, exclude_defaults=True)
            out.append(Change("", "", "CREATE", _diff({}, created), campaign=c.id))
        elif old != c:
            out.append(Change("", "", "UPDATE", _diff(old.model_dump(mode="json", exclude={"id"}), new), campaign=c.id))
    return out


def plan(current: Mapping[str, PlacementRecord], desired: Sequence[PlacementSpec], next_seq: int) -> Plan:
    """Compare desired placements with the live ones. ``next_seq`` starts a new model's log position."""
    out = Plan()
    for spec in desired:
        old = current.get(spec.id)
        if old is None:
            created = spec.model_dump(mode="json", by_alias=True, exclude={"id", "arms"}, exclude_defaults=True)
            out.changes.append(Change(spec.id, "", "CREATE", _diff({}, created)))
            versions = {a.id: 1 for a in spec.arms}
            for a in spec.arms:
                out.changes.append(
                    Change(
                        spec.id, a.id, "CREATE", _diff({}, a.model_dump(mode="json", by_alias=True, exclude={"id"}, exclude_defaults=True))
                    )
                )
                out.new_arm_versions.append((spec.id, a.id, 1, dict(a.features)))
            out.records.append(PlacementRecord(spec, versions, 1, next_seq - 1))
            continue
        changed = False
        details = _diff(_settings(old.spec), _settings(spec))
        if details:
            out.changes.append(Change(spec.id, "", "UPDATE", details))
            changed = True
        old_arms = {a.id: a for a in old.spec.arms}
        versions = dict(old.arm_versions)
        arms: list[ArmSpec] = []
        for a in spec.arms:
            prev = old_arms.get(a.id)
            if prev is None:
                versions[a.id] = versions.get(a.id, 0) + 1
                out.new_arm_versions.append((spec.id, a.id, versions[a.id], dict(a.features)))
                out.changes.append(
                    Change(
                        spec.id, a.id, "CREATE", _diff({}, a.model_dump(mode="json", by_alias=True, exclude={"id"}, exclude_defaults=True))
                    )
                )
                changed = True
            elif prev != a:
                if prev.features != a.features:
                    versions[a.id] += 1
                    out.new_arm_versions.append((spec.id, a.id, versions[a.id], dict(a.features)))
                out.changes.append(
                    Change(
                        spec.id,
                        a.id,
                        "UPDATE",
                        _diff(
                            prev.model_dump(mode="json", by_alias=True, exclude={"id"}),
                            a.model_dump(mode="json", by_alias=True, exclude={"id"}),
                        ),
                    )
                )
                changed = True
            arms.append(a)
        listed = {a.id for a in spec.arms}
        for prev in old.spec.arms:
            if prev.id in listed:
                continue
            if prev.active:
                out.changes.append(Change(spec.id, prev.id, "RETIRE", ("active: True -> False",)))
                changed = True
            arms.append(prev.model_copy(update={"active": False}))
        if not changed:
            continue
        stored = spec.model_copy(update={"arms": arms})
        # Joining or leaving a model group starts a new model too: the group learns a placement's
        # decisions from then on (its earlier ones were its own model's).
        new_model = old.spec.model_key() != spec.model_key() or old.spec.model_group != spec.model_group
        out.records.append(
            PlacementRecord(
                stored,
                versions,
                old.generation + 1 if new_model else old.generation,
                next_seq - 1 if new_model else old.model_since_seq,
            )
        )
    return out
