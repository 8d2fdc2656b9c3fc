"""Several servers on one database: one learns, all serve.

The learner is whichever server holds the learner lock (a PostgreSQL advisory lock, or a lock
file beside a SQLite database); when it dies the lock goes with it and another server takes
over within one poll interval. The learner claims and learns every server's rewards and saves
snapshots; the others load each newer snapshot and each configuration change within
``replica_poll_interval``. The learner also closes the windows that a stopped server left open.
At each poll every server also reads the spend of the budgets it uses, so pacing follows the
spend of all servers (nextbest.bandit.budget).

Every server signs in (the servers table) and beats once per poll; each decision names the
server holding its window (decisions.owner). A server starting, and every server at each poll,
takes over the open windows of servers silent for longer than ``Settings.live_for``, with the
rewards they had gathered, and never those of a live server: a restarted replica used to load
and sweep every open window, also those a live replica was still gathering rewards for.

A configuration change reaches every server at once, not at its next poll: on PostgreSQL the
store's notification (LISTEN/NOTIFY) wakes this task, elsewhere it looks at the configuration
serial every ``config_poll_interval``. A server that hears of a change holds its budgets until
it has reloaded, then confirms the serial (the applying server waits for that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.decision_log import Outcome
from nextbest.bandit.model import CbModel
from nextbest.engine import model_groups
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.configure import Configurator
from nextbest.engine.learner import Learner, PlacementState, group_snapshot_id, members_of
from nextbest.engine.takeover import Takeover
from nextbest.engine.tasks import cancel_and_wait, wait_event
from nextbest.engine.windows import RewardWindows
from nextbest.engine.writer import BatchWriter
from nextbest.settings import Settings
from nextbest.storage.base import Close, Store

log = logging.getLogger(__name__)

# A process whose loop did not run for this long was stalled (SIGSTOP, a blocked loop) and may
# have missed a configuration change: it spends no budget until it has looked at the serial again.
_STALL = 3.0
_PULSE = 0.25  # how often the loop marks itself alive


class Replication:
    """The learner election and the replicas' polling, as one task of the engine."""

    def __init__(
        self,
        states: dict[str, PlacementState],
        writer: BatchWriter,
        learner: Learner,
        windows: RewardWindows,
        config: Configurator,
        budgets: BudgetKeeper,
        store: Store,
        reader_pool: ThreadPoolExecutor,
        settings: Settings,
        clock: Callable[[], float],
        takeover: Takeover | None = None,
    ) -> None:
        self._takeover = takeover
        self._states = states
        self._writer = writer
        self._learner = learner
        self._windows = windows
        self._config = config
        self._budgets = budgets
        self._store = store
        self._reader_pool = reader_pool
        self._settings = settings
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stop_listening: Callable[[], None] | None = None
        self._pulse_task: asyncio.Task[None] | None = None
        self.listening = False  # the store notifies configuration changes (PostgreSQL)
        config.request_reload = self.reload_soon
        budgets.on_stale = self.reload_soon

    @property
    def learning(self) -> bool:
        return self._learner.active

    async def elect(self) -> bool:
        """Try to become the learner (``always`` waits for it at start)."""
        mode = self._settings.learner
        if mode == "never":
            return False
        loop = asyncio.get_running_loop()
        while True:
            if await loop.run_in_executor(self._reader_pool, self._store.try_learner_lock):
                return True
            if mode != "always":
                return False
            await asyncio.sleep(self._settings.replica_poll_interval)

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def heard(serial: int) -> None:  # on the listening thread
            loop.call_soon_threadsafe(self._heard, serial)

        if self._settings.may_have_peers:
            self._stop_listening = self._store.listen_config(heard)
            self.listening = self._stop_listening is not None
            self._budgets.stale_after = _PULSE + _STALL
            self._budgets.looked_at = time.monotonic()
            self._pulse_task = asyncio.create_task(self._pulse(), name="nextbest-stall-watch")
        self._task = asyncio.create_task(self._run(), name="nextbest-replication")

    async def _pulse(self) -> None:
        """Mark this process alive every _PULSE seconds, unless it finds it was not (a stall of
        _STALL or more: SIGSTOP, a blocked loop): then the budgets hold (BudgetKeeper.accounts
        sees the same) and the configuration is looked at at once, which releases them."""
        budgets = self._budgets
        while True:
            await asyncio.sleep(_PULSE)
            if budgets.stale_after is not None and time.monotonic() - budgets.looked_at > budgets.stale_after:
                budgets.accounts_check()
            budgets.looked_at = time.monotonic()

    async def stop(self) -> None:
        await cancel_and_wait(self._pulse_task)
        if self._stop_listening is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._stop_listening)
            self._stop_listening = None
        await cancel_and_wait(self._task)

    def _heard(self, serial: int) -> None:
        if serial > self._config.serial:
            self._budgets.hold()  # spend nothing under limits that may be gone until reloaded
            self._wake.set()

    def reload_soon(self) -> None:
        """Look at the configuration serial now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        poll = self._settings.replica_poll_interval
        # Without notifications, where others may write, the serial is looked at more often than the
        # rest (one small read); a server alone stores every change itself.
        look = poll if self.listening or not self._settings.may_have_peers else min(poll, self._settings.config_poll_interval)
        next_tick = time.monotonic() + poll
        while True:
            await wait_event(self._wake, max(0.0, min(look, next_tick - time.monotonic())))
            self._wake.clear()
            try:
                await self.check_config()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + poll
                    await self.tick()
            except Exception as ex:  # the database may be away: try again next time
                log.warning("replication poll failed: %s", ex)

    async def check_config(self) -> bool:
        """Reload the configuration if another server stored a newer one; whether it did."""
        loop = asyncio.get_running_loop()
        serial = await loop.run_in_executor(self._reader_pool, self._store.config_serial)
        if self._budgets.stale:  # held (a stall among the reasons): still signed in, with its leases?
            await self.beat()
        if serial <= self._config.serial:
            if self._budgets.stale:  # held on a notification of its own apply, or by a lease
                await self._config.reload(serial)
            return False
        self._budgets.hold()
        await self._config.reload(serial)
        return True

    async def beat(self) -> None:
        """This server's sign of life. If another server had taken it for stopped (a stall past
        ``live_for``), that server took its windows and its unused leases: forget them."""
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._reader_pool, self._store.heartbeat, self._clock()):
            log.warning("this server was taken for stopped: its open windows and unused leases went to another server")
            self._budgets.forfeit()  # its windows' rows are bound to their new owner: its writes to them are refused

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        # The configuration first: a window taken over below follows its placement's current
        # rules (reward aggregation, default reward), which this server must know by then.
        await self.check_config()
        # Every server beats, also one that thinks it is alone: another started on the same
        # SQLite file by mistake then leaves its live windows to it (it took them at its start).
        await self.beat()
        taken = await self._takeover.adopt() if self._takeover is not None else 0
        if taken:
            log.info("took over %d open windows of a server that stopped", taken)
        if self._settings.may_have_peers:
            await self._budgets.share(self._clock())  # pace on every server's spend
        if self.learning:
            if not await loop.run_in_executor(self._reader_pool, self._store.holds_learner_lock):
                log.warning("lost the learner lock: serving only")
                self._learner.active = False
            else:
                await self.close_orphans()
                return
        elif self._settings.learner != "never" and await self.elect():
            log.info("took over learning")
            await self.refresh_models()  # start from the newest snapshots, then catch up
            self._learner.active = True
            for pid in list(self._states):
                self._learner.poke(pid)
            return
        await self.refresh_models()

    async def refresh_models(self) -> int:
        """Load every snapshot newer than the model this server holds; returns how many."""
        loop = asyncio.get_running_loop()
        loaded = 0
        owners = [(pid, ps, {n: pm for n, pm in ps.models.items() if pm.group is None}) for pid, ps in self._states.items()]
        # A model group's model is snapshotted under the group, not under its placements.
        for g, gm in model_groups.current(self._states).items():
            owners += [(group_snapshot_id(g), ps, {"": gm}) for ps in list(members_of(self._states, gm).values())[:1]]
        for owner, ps, models in owners:
            versions = await loop.run_in_executor(self._reader_pool, self._store.snapshot_versions, owner)
            stale = [n for n, (learned, seq) in versions.items() if n in models and seq > models[n].cursor]
            if not stale:
                continue
            snaps = await loop.run_in_executor(self._reader_pool, self._store.load_snapshots, owner)
            for name in stale:
                pm, snap = models.get(name), snaps.get(name)
                if pm is None or snap is None or snap.key != pm.key or snap.learn_seq <= pm.cursor:
                    continue
                old = pm.model
                pm.model = CbModel(ps.record.spec.model_spec(name), snap.model, learned=snap.learned)
                pm.cursor = snap.learn_seq
                old.close()
                loaded += 1
                if pm.group is not None:  # its members explore by their own decisions it learned
                    for member in members_of(self._states, pm).values():
                        member.own_learned = await loop.run_in_executor(
                            self._reader_pool, self._store.learned_count, member.id, member.record.model_since_seq, pm.cursor
                        )
        return loaded

    async def close_orphans(self) -> int:
        """Close the expired windows no server holds in memory (their server stopped)."""
        loop = asyncio.get_running_loop()
        cutoff = self._clock() - self._settings.orphan_grace
        rows = await loop.run_in_executor(self._reader_pool, self._store.expired_open, cutoff, 1000)
        futures = []
        for d in rows:
            if (d.event_id, d.slot) in self._windows.open:
                continue
            ps = self._states.get(d.placement)
            default = ps.record.spec.default_reward if ps is not None else 0.0
            outcome = Outcome.DEFAULT if d.activated else Outcome.NOT_ACTIVATED
            # Bound to the row's placement; what it gathered (a first reward, other servers'
            # aggregated rewards) is folded in by the close itself.
            spec = ps.record.spec if ps is not None else None
            close = Close(
                d.event_id,
                outcome,
                default,
                self._clock(),
                d.reward_cost,
                d.budgets,
                d.slot,
                d.cost,
                placement=d.placement,
                aggregation=spec.reward_aggregation if spec is not None and d.activated else None,
            )
            futures.append(self._writer.close_window(close))
        if futures:
            await asyncio.gather(*futures)
            for pid in {d.placement for d in rows}:
                self._learner.poke(pid)
            log.info("closed %d windows left open by a stopped server", len(futures))
        return len(futures)
