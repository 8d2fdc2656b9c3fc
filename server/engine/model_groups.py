"""Model groups (issue #33): placements naming one ``model_group`` learn one VW model.

A customer's answers in the app then teach the USSD menu too. The group's model is one
``PlacementModel``, the ``""`` model of every member's state (Choose scores with it as with any
placement's own), with the placement id a shared feature of every member's decisions
(``placement.id``, logged with the decision like any feature, so replay and exports see it).
Each member keeps its own arms, rules, budgets, exploration, variants, shadows and log.

One cursor for the group: the learner reads the members' closed decisions together in
learn-sequence order (learn_seq is one sequence for the whole database), so each row is learned
once whichever member it came from, and a restart or a replica resumes the model from its
snapshot, stored under ``group:<name>`` where a placement's are stored under its id.

Switching is explicit (``model_group`` in the placement's configuration) and loses nothing: the
group learns a joining placement's decisions from then on; its own model's last snapshot stays
in place, and when it leaves the group it resumes its own model from that snapshot and learns
its own rows since: both the group's and the placement's models can still be replayed
(``snapshot:<name>``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import Executor

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.features import Feature
from nextbest.bandit.model import CbModel
from nextbest.bandit.reward_scale import WINDOW, RewardScale
from nextbest.bandit.spec import PlacementSpec
from nextbest.engine.learner import PlacementModel, PlacementState, group_snapshot_id
from nextbest.storage.base import Snapshot, Store

FEATURE_NAMESPACE = "placement"  # the member's id, a shared feature of its decisions: placement.id

LoadSnapshots = Callable[[str], Awaitable[Mapping[str, Snapshot]]]


def placement_feature(spec: PlacementSpec) -> Feature | None:
    """The feature a grouped placement adds to its decisions: which member decided."""
    return (FEATURE_NAMESPACE, "id", spec.id) if spec.model_group else None


def with_placement(features: Sequence[Feature], spec: PlacementSpec) -> Sequence[Feature]:
    """The decision's features with ``placement.id`` for a grouped placement. The placement's
    value replaces one the request sent under that name: the model must know the member."""
    own = placement_feature(spec)
    if own is None:
        return features
    return (*(f for f in features if not (f[0] == FEATURE_NAMESPACE and f[1] == "id")), own)


def members(specs: Mapping[str, PlacementSpec]) -> dict[str, list[str]]:
    """Each group's placements, sorted."""
    out: dict[str, list[str]] = {}
    for pid in sorted(specs):
        g = specs[pid].model_group
        if g:
            out.setdefault(g, []).append(pid)
    return out


def check(specs: Mapping[str, PlacementSpec], where: Mapping[str, str]) -> None:
    """Every placement of a group builds the same model: the same vw_args, interactions and bits
    (INVALID_ARGUMENT naming the placement's ``model_group``; ``where`` maps a placement of the
    request to its field path, e.g. ``placements[2]``)."""
    for g, pids in members(specs).items():
        first = specs[pids[0]]
        for pid in pids[1:]:
            if specs[pid].model_key() != first.model_key():
                field = f"{where.get(pid, where.get(pids[0], 'placements'))}.model_group"
                raise InvalidInput(
                    field,
                    f"placements {pids[0]!r} and {pid!r} share model group {g!r} but differ in vw_args, interactions or bits;"
                    " a group learns one model: give them the same settings",
                )


async def share(
    specs: Mapping[str, PlacementSpec],
    models: MutableMapping[str, dict[str, PlacementModel]],
    current: Mapping[str, PlacementModel],
    *,
    load: LoadSnapshots,
    since: Callable[[list[str]], int],
) -> tuple[list[PlacementModel], list[PlacementModel]]:
    """Give each grouped placement of ``models`` (the models of the placements being set up, by
    id) its group's model as its ``""`` model, and each placement there that left a group its
    own model back (``specs``: every placement after the change); returns the models made here
    (to snapshot with the configuration, or close when it is not applied) and the ones they
    replaced in ``models`` (to close, after the change, unless still in use: ``close_unused``).

    A group's model is kept while its settings are unchanged; else it comes from the group's
    snapshot when that was built with the same settings, else it is new and learns the
    members' rows after ``since(members)``. A placement's own model after leaving comes from its
    snapshot likewise, else it is new after ``since([pid])``."""
    made: list[PlacementModel] = []
    replaced: list[PlacementModel] = []
    for g, pids in members(specs).items():
        spec = specs[pids[0]]
        key = spec.model_key()
        gm = current.get(g)
        if gm is None or gm.key != key:
            snap = (await load(group_snapshot_id(g))).get("")
            if snap is not None and snap.key == key:
                gm = PlacementModel("", key, CbModel(spec.model_spec(""), snap.model, learned=snap.learned), snap.learn_seq, group=g)
            else:
                gm = PlacementModel("", key, CbModel(spec.model_spec("")), since(pids), group=g)
            made.append(gm)
        for pid in pids:
            own = models.get(pid)
            if own is not None and own.get("") is not gm:
                if "" in own:
                    replaced.append(own[""])
                own[""] = gm
    for pid, own in models.items():
        pm = own.get("")
        if pm is None or pm.group is None or specs[pid].model_group:
            continue
        spec = specs[pid]
        key = spec.model_key()
        snap = (await load(pid)).get("")
        if snap is not None and snap.key == key:
            fresh = PlacementModel("", key, CbModel(spec.model_spec(""), snap.model, learned=snap.learned), snap.learn_seq)
        else:
            fresh = PlacementModel("", key, CbModel(spec.model_spec("")), since([pid]))
        own[""] = fresh
        made.append(fresh)
    return made, replaced


async def own_exploration(ps: PlacementState, old: PlacementState | None, *, store: Store, pool: Executor) -> tuple[int, RewardScale]:
    """What a grouped placement explores by (PlacementState.exploration): kept from ``old`` while
    it stays with the same model, else its decisions the group's model learned (after it joined,
    up to the model's cursor; stored, so a restart explores as before) and its recent rewards."""
    gm = ps.models.get("")
    if old is not None and gm is not None and old.models.get("") is gm:
        return old.own_learned, old.own_scale
    if gm is None or gm.group is None:
        return 0, RewardScale()
    loop = asyncio.get_running_loop()
    learned = await loop.run_in_executor(pool, store.learned_count, ps.id, ps.record.model_since_seq, gm.cursor)
    recent = await loop.run_in_executor(pool, store.recent_rewards, ps.id, WINDOW)
    return learned, RewardScale(recent, ceiling=ps.record.spec.max_abs_reward)


def carry_over(ps: PlacementState, old: PlacementState | None) -> None:
    """At the swap of ``old`` for ``ps``: a member staying with its group's model keeps counting
    where it was (the learner may have counted on ``old`` since own_exploration read it)."""
    gm = ps.models.get("")
    if old is not None and gm is not None and gm.group is not None and old.models.get("") is gm:
        ps.own_learned, ps.own_scale = old.own_learned, old.own_scale


def current(states: Mapping[str, PlacementState]) -> dict[str, PlacementModel]:
    """The groups' models in use, by group."""
    return {pm.group: pm for ps in states.values() if (pm := ps.models.get("")) is not None and pm.group is not None}


def close_unused(models: Sequence[PlacementModel], states: Mapping[str, PlacementState]) -> None:
    """Close the VW models of these that no placement uses any more."""
    used = {id(pm.model) for ps in states.values() for pm in ps.models.values()}
    for pm in {id(m.model): m for m in models}.values():
        if id(pm.model) not in used:
            pm.model.close()
