"""Several servers on one database: one learns, all serve.

The learner is whichever server holds the learner lock (a PostgreSQL advisory lock, or a lock
file beside a SQLite database); when it dies the lock goes with it and another server takes
over within one poll interval. The learner claims and learns every server's rewards and saves
snapshots; the others load each newer snapshot and each configuration change within
``replica_poll_interval``. The learner also closes the windows that a stopped server left open.

Every server signs in (the servers table) and beats once per poll; each decision names the
server holding its window (decisions.owner). A server starting, and every server at each poll,
takes over the open windows of servers silent for longer than ``Engine.live_for``, with the
rewards they had gathered, and never those of a live server: a restarted replica used to load
and sweep every open window, also those a live replica was still gathering rewards for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from nextbest.bandit.decision_log import Outcome
from nextbest.bandit.model import CbModel
from nextbest.storage.base import Close
from nextbest.engine.tasks import cancel_and_wait

if TYPE_CHECKING:
    from nextbest.engine.engine import Engine

log = logging.getLogger(__name__)


class Replication:
    """The learner election and the replicas' polling, as one task of the engine."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self._task: asyncio.Task[None] | None = None
        self._config: tuple[float, int, float, int] | None = None

    @property
    def learning(self) -> bool:
        return self.e.learner is not None and self.e.learner.active

    async def elect(self) -> bool:
        """Try to become the learner (``always`` waits for it at start)."""
        e = self.e
        mode = e.settings.learner
        if mode == "never":
            return False
        loop = asyncio.get_running_loop()
        while True:
            if await loop.run_in_executor(e.reader_pool, e.store.try_learner_lock):
                return True
            if mode != "always":
                return False
            await asyncio.sleep(e.settings.replica_poll_interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nextbest-replication")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        e = self.e
        loop = asyncio.get_running_loop()
        self._config = await loop.run_in_executor(e.reader_pool, e.store.config_version)
        while True:
            await asyncio.sleep(e.settings.replica_poll_interval)
            try:
                await self.tick()
            except Exception as ex:  # the database may be away: try again next time
                log.warning("replication poll failed: %s", ex)

    async def tick(self) -> None:
        e = self.e
        assert e.learner is not None
        loop = asyncio.get_running_loop()
        # The configuration first: a window taken over below follows its placement's current
        # rules (reward aggregation, default reward), which this server must know by then.
        version = await loop.run_in_executor(e.reader_pool, e.store.config_version)
        if version != self._config:
            self._config = version
            await e.config.reload()
        if e.settings.may_have_peers:  # alone on its database, a server took every window at start
            await loop.run_in_executor(e.reader_pool, e.store.heartbeat, e.clock())
            taken = await e.hold_windows()
            if taken:
                log.info("took over %d open windows of a server that stopped", taken)
        if self.learning:
            if not await loop.run_in_executor(e.reader_pool, e.store.holds_learner_lock):
                log.warning("lost the learner lock: serving only")
                e.learner.active = False
            else:
                await self.close_orphans()
                return
        elif e.settings.learner != "never" and await self.elect():
            log.info("took over learning")
            await self.refresh_models()  # start from the newest snapshots, then catch up
            e.learner.active = True
            for pid in list(e.states):
                e.learner.poke(pid)
            return
        await self.refresh_models()

    async def refresh_models(self) -> int:
        """Load every snapshot newer than the model this server holds; returns how many."""
        e = self.e
        loop = asyncio.get_running_loop()
        loaded = 0
        for pid, ps in list(e.states.items()):
            versions = await loop.run_in_executor(e.reader_pool, e.store.snapshot_versions, pid)
            stale = [n for n, (learned, seq) in versions.items() if n in ps.slots and seq > ps.slots[n].cursor]
            if not stale:
                continue
            snaps = await loop.run_in_executor(e.reader_pool, e.store.load_snapshots, pid)
            for name in stale:
                slot, snap = ps.slots.get(name), snaps.get(name)
                if slot is None or snap is None or snap.key != slot.key or snap.learn_seq <= slot.cursor:
                    continue
                old = slot.model
                slot.model = CbModel(ps.record.spec.slot_spec(name), snap.model, learned=snap.learned)
                slot.cursor = snap.learn_seq
                old.close()
                loaded += 1
        return loaded

    async def close_orphans(self) -> int:
        """Close the expired windows no server holds in memory (their server stopped)."""
        e = self.e
        assert e.writer is not None
        loop = asyncio.get_running_loop()
        cutoff = e.clock() - e.settings.orphan_grace
        rows = await loop.run_in_executor(e.reader_pool, e.store.expired_open, cutoff, 1000)
        futures = []
        for d in rows:
            if (d.event_id, d.slot) in e.windows.open:
                continue
            ps = e.states.get(d.placement)
            default = ps.record.spec.default_reward if ps is not None else 0.0
            outcome = Outcome.DEFAULT if d.activated else Outcome.NOT_ACTIVATED
            close = Close(d.event_id, outcome, default, e.clock(), d.reward_cost, d.budgets, d.slot, d.cost)
            futures.append(e.writer.close_window(close))
        if futures:
            await asyncio.gather(*futures)
            for pid in {d.placement for d in rows}:
                if e.learner is not None:
                    e.learner.poke(pid)
            log.info("closed %d windows left open by a stopped server", len(futures))
        return len(futures)
