"""The learner: one task that feeds each model the rewards in learn-sequence order.

Rewards are learned from the log, not from memory. The learner (one process at a time, when
several servers share a database) gives closed windows their ``learn_seq`` (a durable claim),
then reads rows above each model's cursor. Normal learning and recovery after a restart or a
take-over (snapshot + rows after its ``learn_seq``) are one code path, and each row is learned
exactly once per model, whichever server wrote its reward.

A placement keeps its models by name: "" (its own), one per experiment variant (learning only
that variant's decisions) and one per shadow (learning every served decision, and scored on
each before learning it: how often its greedy choice agrees with the served arm, and the IPS
estimate of its value).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from nextbest.bandit.decider import ArmView, Candidate
from nextbest.bandit.features import arm_line, features_from_mapping, shared_line, with_arm_features
from nextbest.bandit.model import CbModel
from nextbest.bandit.reward_scale import RewardScale
from nextbest.engine.tasks import cancel_and_wait, wait_event
from nextbest.storage.base import LearnRow, PlacementRecord, Snapshot, Store

log = logging.getLogger(__name__)

# Learn this many examples between yields to the event loop, so Choose is never held up long.
_LEARN_SLICE = 8


@dataclass(eq=False)
class PlacementModel:
    """One model of a placement and where it stands in the log."""

    name: str  # "" | variant id | "shadow:<id>"
    key: tuple[str, bool, int]
    model: CbModel
    cursor: int  # last learn_seq this model learned
    since_snapshot: int = 0
    last_snapshot: float = field(default_factory=time.monotonic)
    scale: RewardScale = field(default_factory=RewardScale)  # of recent rewards: scales exploration
    scored: int = 0  # shadow only: decisions scored before learning them
    agreed: int = 0
    ips_sum: float = 0.0
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=500))  # agreement of the last 500
    group: str | None = None  # the model group whose model this is: the "" model of each of its placements

    @property
    def reward_scale(self) -> float:
        return self.scale.value

    @property
    def shadow(self) -> bool:
        return self.name.startswith("shadow:")

    @property
    def variant_filter(self) -> str | None:
        """Which decisions this model learns: a shadow learns all, others their own variant's."""
        return None if self.shadow else self.name

    def snapshot(self, placement: str) -> Snapshot:
        """Stored under the placement, or under ``group:<name>`` for a group's model."""
        owner = placement if self.group is None else group_snapshot_id(self.group)
        return Snapshot(owner, self.name, self.key, self.model.learned, self.cursor, self.model.to_bytes())


def members_of(states: Mapping[str, PlacementState], gm: PlacementModel) -> dict[str, PlacementState]:
    """The placements whose model ``gm`` is (a model group's), by id."""
    return {pid: ps for pid, ps in states.items() if ps.models.get("") is gm}


def group_snapshot_id(group: str) -> str:
    """Where a model group's model is snapshotted (the snapshots table's placement column)."""
    return f"group:{group}"


@dataclass(eq=False)
class PlacementState:
    """A live placement: its record, its models and its arms' VW text."""

    record: PlacementRecord
    models: dict[str, PlacementModel]
    arms: list[ArmView]  # the active arms, with their VW text
    arm_lines: dict[tuple[str, int], str]  # every version of every arm, for learning old decisions
    salt: bytes
    # A model group's member explores by its own learned decisions and rewards, not the group's:
    # see exploration().
    own_learned: int = 0
    own_scale: RewardScale = field(default_factory=RewardScale)
    budgeted: bool = field(init=False)  # some active arm spends from a budget or campaign
    candidates: list[Candidate] = field(init=False)  # the active arms, when none is budgeted
    arm_keys: tuple[tuple[str, int], ...] = field(init=False)  # (id, version) of the active arms
    arm_campaigns: dict[str, str | None] = field(init=False)  # every arm's campaign

    def __post_init__(self) -> None:
        self.budgeted = any(a.spec is not None and (a.spec.budget is not None or a.spec.campaign is not None) for a in self.arms)
        self.candidates = [Candidate(a) for a in self.arms]
        self.arm_keys = tuple((a.id, a.version) for a in self.arms)
        self.arm_campaigns = {a.id: a.campaign for a in self.record.spec.arms}

    @property
    def id(self) -> str:
        return self.record.spec.id

    @property
    def model(self) -> CbModel:
        return self.models[""].model

    def exploration(self, pm: PlacementModel) -> tuple[int, float]:
        """The examples learned and the reward scale this placement explores by with model ``pm``.
        A model group's model learned every member's decisions; were its count used, a small
        placement in a large group would explore as if it were trained (SquareCB's gamma grows
        with the count), and arms only it offers would hardly be tried: it explores by its own."""
        if pm.group is None:
            return pm.model.learned, pm.reward_scale
        return self.own_learned, self.own_scale.value


class Learner:
    """Owns learning and snapshots for all placements, on the event loop that serves them."""

    def __init__(
        self,
        store: Store,
        states: MutableMapping[str, PlacementState],
        reader: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        batch: int,
        snapshot_every: int,
        snapshot_interval: float,
        cache_size: int = 0,
    ) -> None:
        self._store = store
        self._lines: dict[tuple[str, int], str] = {}  # (event, slot) -> shared VW text, oldest first
        self._cache_size = cache_size
        self.cache_misses = 0  # examples whose VW text was rebuilt from the log
        self._states = states
        self._reader = reader
        self._writer = writer
        self._batch = batch
        self._snapshot_every = snapshot_every
        self._snapshot_interval = snapshot_interval
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.active = True  # False on a replica that serves only; it loads the learner's snapshots
        self.unknown_arm_versions = 0  # rows naming an arm version the database does not have: not learned
        self.config_stale: Callable[[], None] | None = None  # asks for a configuration reload

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nextbest-learner")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def remember(self, event_id: str, slot: int, shared: str) -> None:
        """Keep a new decision's shared VW text, so that learning its reward needs neither to
        parse its features from the log nor to build the text again (measured: 150-200 µs a
        row at 30 features). The oldest entry goes when full; a miss reads the log as always."""
        if self._cache_size <= 0 or not self.active:  # a serving replica never learns them
            return
        lines = self._lines
        if (event_id, slot) in lines:
            return  # a reused event id: the log keeps the first decision, and so does this
        lines[(event_id, slot)] = shared
        if len(lines) > self._cache_size:
            del lines[next(iter(lines))]

    def forget(self, event_id: str, slot: int) -> None:
        """Drop a decision's cached text (its Choose was refused; a miss reads the log)."""
        self._lines.pop((event_id, slot), None)

    def poke(self, placement: str) -> None:
        """New rows may be learnable for this placement."""
        self._dirty.add(placement)
        self._wake.set()

    async def catch_up_all(self) -> None:
        for pid in list(self._states):
            await self.catch_up(pid)

    async def catch_up(self, pid: str) -> int:
        """Learn every learnable row of every model of a placement; returns how many were learned."""
        if not self.active:
            return 0
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(self._writer, self._store.claim, pid, self._batch) == self._batch:
            pass
        total = 0
        ps = self._states.get(pid)
        for name, pm in list(ps.models.items()) if ps else []:
            total += await (self._catch_up_group(pm) if pm.group is not None else self._catch_up_model(pid, name))
        return total

    async def _catch_up_group(self, gm: PlacementModel) -> int:
        """Learn a model group's rows: its placements' closed decisions together, in learn order
        (one cursor: each row once, whichever placement it is of), each with its own
        placement's arms and mode. Each placement claims its own rows (catch_up)."""
        loop = asyncio.get_running_loop()
        total = 0
        while True:
            members = members_of(self._states, gm)
            if not members:
                return total
            ids = sorted(members)
            rows = await loop.run_in_executor(self._reader, self._store.learn_rows, ids, gm.variant_filter, gm.cursor, self._batch)
            if members_of(self._states, gm) != members:
                continue  # a placement joined or left meanwhile: read again
            unknown = {row.placement for row in rows if any(a not in members[row.placement].arm_lines for a in row.arms)}
            for pid in sorted(unknown):
                await self._load_arm_versions(members[pid])
            if members_of(self._states, gm) != members:
                continue
            for i, row in enumerate(rows):
                ps = members[row.placement]
                if row.learn_seq <= gm.cursor:
                    continue
                if row.learn_seq > ps.record.model_since_seq:  # else decided before it joined: its own model's
                    learned = gm.model.learned
                    self._learn_one(ps, gm, row)
                    if gm.model.learned > learned:
                        ps.own_learned += 1
                        ps.own_scale.add(row.reward)
                    total += 1
                else:
                    gm.cursor = row.learn_seq
                if i % _LEARN_SLICE == _LEARN_SLICE - 1:
                    await asyncio.sleep(0)
                    if members_of(self._states, gm) != members:
                        break
            if len(rows) < self._batch:
                await self.maybe_snapshot(next(iter(members)), gm)
                return total

    def _model_of(self, pid: str, name: str) -> tuple[PlacementState, PlacementModel] | None:
        ps = self._states.get(pid)
        pm = ps.models.get(name) if ps else None
        return (ps, pm) if ps is not None and pm is not None else None

    async def _catch_up_model(self, pid: str, name: str) -> int:
        loop = asyncio.get_running_loop()
        total = 0
        while True:
            found = self._model_of(pid, name)
            if found is None:
                return total
            ps, pm = found
            rows = await loop.run_in_executor(self._reader, self._store.learn_rows, pid, pm.variant_filter, pm.cursor, self._batch)
            if self._model_of(pid, name) != (ps, pm):
                continue  # the model was replaced meanwhile; read again for the new one
            if any(a not in ps.arm_lines for row in rows for a in row.arms):
                await self._load_arm_versions(ps)
                if self._model_of(pid, name) != (ps, pm):
                    continue
            for i, row in enumerate(rows):
                if row.learn_seq <= pm.cursor:
                    continue
                self._learn_one(ps, pm, row)
                total += 1
                if i % _LEARN_SLICE == _LEARN_SLICE - 1:
                    await asyncio.sleep(0)
                    if self._model_of(pid, name) != (ps, pm):
                        break
            if len(rows) < self._batch:
                await self.maybe_snapshot(pid, pm)
                return total

    async def _load_arm_versions(self, ps: PlacementState) -> None:
        """Rows name an arm version this server has not loaded: another server applied a change
        that this one has not reloaded yet. Read the stored arm versions of the placement (and
        ask for the whole configuration to be reloaded), so that the rows are learned."""
        stored = await asyncio.get_running_loop().run_in_executor(self._reader, self._store.arm_features)
        for (placement, arm, version), features in stored.items():
            if placement == ps.id and (arm, version) not in ps.arm_lines:
                ps.arm_lines[(arm, version)] = arm_line(arm, features_from_mapping(features))
        if self.config_stale is not None:
            self.config_stale()

    def _shared(self, ps: PlacementState, row: LearnRow) -> str:
        """The example's shared VW text: from memory when the Choose was recent, else the log's."""
        shared = self._lines.get((row.event_id, row.slot))
        if shared is None:
            self.cache_misses += 1
            shared = shared_line(row.features())
        elif len(ps.models) == 1:
            del self._lines[(row.event_id, row.slot)]  # no other model of the placement will want it
        return shared

    def _learn_one(self, ps: PlacementState, pm: PlacementModel, row: LearnRow) -> None:
        found = [ps.arm_lines.get(a) for a in row.arms]
        lines = [x for x in found if x is not None]
        if row.context_json is not None and len(lines) == len(found) and (extra := row.arm_features()):
            # The arms' features of that decision (history), as the Choose scored them.
            lines = [with_arm_features(x, fs) for x, fs in zip(lines, extra, strict=True)]
        if len(lines) != len(found):
            self.unknown_arm_versions += 1
            unknown = [f"{a}@{v}" for (a, v), x in zip(row.arms, found, strict=True) if x is None]
            log.error(
                "event %s of %s names arm versions the database does not have (%s); not learned", row.event_id, ps.id, ", ".join(unknown)
            )
        elif ps.record.spec.mode == "logging_only" and not pm.shadow:
            pass  # logged, deliberately not learned
        else:
            shared = self._shared(ps, row)
            if pm.shadow:  # progressive validation: score before learning
                greedy = int(np.argmax(pm.model.expected_rewards(shared, lines)))
                pm.scored += 1
                pm.recent.append(greedy == row.chosen)
                if greedy == row.chosen:
                    pm.agreed += 1
                    pm.ips_sum += row.reward / row.probability
            # Apprentice mode learns to imitate the baseline (the caller's choice); the rewards
            # it earned are in the log and the statistics, which evaluate it.
            imitate = ps.record.spec.mode == "apprentice" and not pm.shadow
            pm.model.learn(shared, lines, row.chosen, 1.0 if imitate else row.reward)  # unweighted: model.learn_label
            pm.scale.add(row.reward)
            pm.since_snapshot += 1
        pm.cursor = row.learn_seq

    async def maybe_snapshot(self, pid: str, pm: PlacementModel, force: bool = False) -> None:
        due = pm.since_snapshot >= self._snapshot_every or (
            pm.since_snapshot > 0 and time.monotonic() - pm.last_snapshot >= self._snapshot_interval
        )
        if not (due or (force and pm.since_snapshot > 0)):
            return
        snap = pm.snapshot(pid)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._store.save_snapshot, snap)
        pm.since_snapshot = 0
        pm.last_snapshot = time.monotonic()

    async def snapshot_all(self) -> None:
        if not self.active:
            return
        for pid, ps in list(self._states.items()):
            for pm in list(ps.models.values()):
                await self.maybe_snapshot(pid, pm, force=True)

    async def _run(self) -> None:
        while True:
            if not await wait_event(self._wake, self._snapshot_interval):
                self._dirty.update(self._states)  # periodic pass: snapshots of idle models
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            for pid in dirty:
                try:
                    await self.catch_up(pid)
                except Exception as e:  # the database may be away; try again on the next pass
                    log.warning("learning %s failed, will retry: %s", pid, e)
                    self._dirty.add(pid)
                    await asyncio.sleep(0.5)
                    self._wake.set()
