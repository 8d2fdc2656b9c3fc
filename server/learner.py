"""The learner: one task that feeds each placement's model the rewards in learn-sequence order.

Rewards are learned from the log, not from memory: the writer gives every closed window a
``learn_seq`` as it commits, and the learner reads rows above its cursor. Normal learning and
recovery after a restart (snapshot + rows after its ``learn_seq``) are one code path, and each
row is learned exactly once per model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bandit.decider import ArmView
from bandit.features import shared_line
from bandit.log import LoggedDecision
from bandit.model import CbModel
from server.storage.base import PlacementRecord, Snapshot, Store

log = logging.getLogger(__name__)

# Learn this many examples between yields to the event loop, so Choose is never held up long.
_LEARN_SLICE = 8


@dataclass(eq=False)
class PlacementState:
    """A live placement: its record, its model and where its model stands in the log."""

    record: PlacementRecord
    model: CbModel
    cursor: int  # last learn_seq this model learned
    arms: list[ArmView]  # the active arms, with their VW text
    arm_lines: dict[tuple[str, int], str]  # every version of every arm, for learning old decisions
    salt: bytes
    since_snapshot: int = 0
    last_snapshot: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.record.spec.id

    @property
    def arm_campaigns(self) -> dict[str, str | None]:
        return {a.id: a.campaign for a in self.record.spec.arms}


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
        on_learned: Callable[[str, int], None] = lambda placement, n: None,
    ) -> None:
        self._store = store
        self._states = states
        self._reader = reader
        self._writer = writer
        self._batch = batch
        self._snapshot_every = snapshot_every
        self._snapshot_interval = snapshot_interval
        self._on_learned = on_learned
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nextbest-learner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def poke(self, placement: str) -> None:
        """New rows may be learnable for this placement."""
        self._dirty.add(placement)
        self._wake.set()

    async def catch_up_all(self) -> None:
        for pid in list(self._states):
            await self.catch_up(pid)

    async def catch_up(self, pid: str) -> int:
        """Learn every learnable row of a placement; returns how many were learned."""
        loop = asyncio.get_running_loop()
        total = 0
        while True:
            ps = self._states.get(pid)
            if ps is None:
                return total
            rows = await loop.run_in_executor(self._reader, self._store.learnable, pid, ps.cursor, self._batch)
            if self._states.get(pid) is not ps:
                continue  # the placement got a new model meanwhile; read again for it
            for i, row in enumerate(rows):
                if row.learn_seq is None or row.learn_seq <= ps.cursor:
                    continue
                self._learn_one(ps, row)
                total += 1
                if i % _LEARN_SLICE == _LEARN_SLICE - 1:
                    await asyncio.sleep(0)
                    if self._states.get(pid) is not ps:
                        break
            if rows:
                self._on_learned(pid, len(rows))
            if len(rows) < self._batch:
                await self.maybe_snapshot(ps)
                return total

    def _learn_one(self, ps: PlacementState, row: LoggedDecision) -> None:
        assert row.learn_seq is not None and row.chosen is not None and row.reward is not None
        lines = [ps.arm_lines.get(a) for a in row.arms]
        if any(line is None for line in lines):
            log.error("event %s of %s names an unknown arm version; not learned", row.event_id, ps.id)
        else:
            ps.model.learn(shared_line(row.features), lines, row.chosen, row.reward, row.probability)  # type: ignore[arg-type]
            ps.since_snapshot += 1
        ps.cursor = row.learn_seq

    async def maybe_snapshot(self, ps: PlacementState, force: bool = False) -> None:
        due = ps.since_snapshot >= self._snapshot_every or (
            ps.since_snapshot > 0 and time.monotonic() - ps.last_snapshot >= self._snapshot_interval
        )
        if not (due or (force and ps.since_snapshot > 0)):
            return
        snap = Snapshot(ps.id, ps.record.generation, ps.model.learned, ps.cursor, ps.model.to_bytes())
        await asyncio.get_running_loop().run_in_executor(self._writer, self._store.save_snapshot, snap)
        ps.since_snapshot = 0
        ps.last_snapshot = time.monotonic()

    async def snapshot_all(self) -> None:
        for ps in list(self._states.values()):
            await self.maybe_snapshot(ps, force=True)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._snapshot_interval)
            except TimeoutError:
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
