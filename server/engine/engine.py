"""The engine: placements, their models, budgets, contact history, the decision log and rewards.

Everything here runs on one asyncio event loop, which is the single owner of every VW model
and of the budget ledger: predicts (Choose) and learns (the learner task) interleave on it and
never overlap, and a reservation follows its decision with no await in between, so it is atomic.
Database work runs in two thread pools — one writer (ordered, group-committed) and readers — so
the loop never waits on the database except to lease budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit import access
from nextbest.bandit.contact import ContactHistory
from nextbest.bandit.decider import ArmView
from nextbest.bandit.errors import InvalidInput, NextbestError, NotFound
from nextbest.bandit.features import arm_line, features_from_mapping
from nextbest.bandit.model import CbModel
from nextbest.bandit.reward_scale import WINDOW, RewardScale
from nextbest.bandit.spec import CampaignSpec, PlacementSpec
from nextbest.bandit.text import quote
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.chooser import Chooser, placement_salt
from nextbest.engine.choose_checks import ChooseChecks
from nextbest.engine.configure import Configurator
from nextbest.engine.learner import Learner, PlacementState, Slot
from nextbest.telemetry.metrics import Metrics
from nextbest.config.plans import Change
from nextbest.engine.replication import Replication
from nextbest.settings import Settings
from nextbest.engine.shared_contacts import SharedContacts
from nextbest.engine.placement_stats import BudgetView, ModelView, Stats
from nextbest.storage.base import ArmTally, PlacementRecord, Store
from nextbest.engine.tasks import cancel_and_wait
from nextbest.engine.windows import OpenDecision, RewardWindows, batch_quiet
from nextbest.engine.writer import BatchWriter

log = logging.getLogger(__name__)


_PRUNE_EVERY = 60.0  # seconds between deletions of shared impressions beyond every horizon
# Shared impressions are kept at least this long, so that a policy applied later with a longer
# horizon (up to this) sees the customers' past; migration 0002 starts the table with as much.
_KEEP_CONTACTS = 31 * 86400.0


class Engine:
    """Choose, Reward, configuration and statistics over a Store."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="nextbest-db-write")
        self.reader_pool = ThreadPoolExecutor(4, thread_name_prefix="nextbest-db-read")
        self.server_id = uuid.uuid4().hex[:16]  # names this run in the database (servers, decisions.owner)
        self.states: dict[str, PlacementState] = {}
        self.windows = RewardWindows(self)
        self.acceptance: dict[tuple[str, str], list[int]] = {}  # (placement, arm) -> [accepted, closed]
        self.budgets = BudgetKeeper(store, self._writer_pool, settings.budget_lease_fraction)
        self.history = ContactHistory(0.0)
        self.shared_contacts = SharedContacts(store, 1 if settings.db.startswith("sqlite") else 8) if settings.shares_contacts else None
        self.checks = ChooseChecks(settings)
        self.writer: BatchWriter | None = None
        self.learner: Learner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.config = Configurator(self)
        self.chooser = Chooser(self)
        self.choose = self.chooser.choose  # the Choose path: server/engine/chooser.py
        self.replication = Replication(self)
        self.ready = False
        self.metrics = Metrics()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load placements, models, budgets and contact history; learn what was rewarded since
        the last snapshots. Health says SERVING only after this."""
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self.reader_pool, self.store.load_placements)
        features = await loop.run_in_executor(self.reader_pool, self.store.arm_features)
        for rec in records:
            recent = await loop.run_in_executor(self.reader_pool, self.store.recent_rewards, rec.spec.id, WINDOW)
            snaps = await loop.run_in_executor(self.reader_pool, self.store.load_snapshots, rec.spec.id)
            slots = {}
            for name, key in rec.spec.model_slots().items():
                snap = snaps.get(name)
                if snap is not None and snap.key == key:
                    model = CbModel(rec.spec.slot_spec(name), snap.model, learned=snap.learned)
                    slots[name] = Slot(name, key, model, snap.learn_seq)
                else:
                    slots[name] = Slot(name, key, CbModel(rec.spec.slot_spec(name)), rec.model_since_seq)
            for slot in slots.values():
                slot.scale = RewardScale(recent, ceiling=rec.spec.max_abs_reward)
            self.states[rec.spec.id] = self.make_state(rec, slots, features)
        self.budgets.restore(
            await loop.run_in_executor(self.reader_pool, self.store.load_accounts),
            await loop.run_in_executor(self.reader_pool, self.store.load_campaigns),
        )
        await loop.run_in_executor(self.reader_pool, self.store.register_server, self.server_id, self.clock())
        await self.hold_windows(starting=True)
        await self.rebuild_history()
        self.writer = BatchWriter(self.store, self._writer_pool, self.settings.flush_interval, on_refused=self.metrics.refused)
        self.writer.start()
        self.learner = Learner(
            self.store,
            self.states,
            self.reader_pool,
            self._writer_pool,
            self.settings.learn_batch,
            self.settings.snapshot_every,
            self.settings.snapshot_interval,
            self.settings.learn_cache,
        )
        self.learner.active = await self.replication.elect()
        learner = self.learner
        self.writer.assign_learn_positions = lambda: learner.active
        await self.learner.catch_up_all()
        self.learner.start()
        self.replication.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="nextbest-sweeper")
        self.ready = True
        log.info("engine ready: %d placements, %d open decisions", len(self.states), len(self.windows.open))

    @property
    def live_for(self) -> float:
        """How long a server's last heartbeat (one per replica poll) keeps it counted alive."""
        return max(10.0, 5 * self.settings.replica_poll_interval)

    async def hold_windows(self, starting: bool = False) -> int:
        """Take over the open windows of servers that stopped (at start: also this server's own
        before a restart), with the rewards they had gathered; a live server's stay with it.
        Returns how many windows were taken over."""
        loop = asyncio.get_running_loop()
        live_since = self.clock() - self.live_for if self.settings.may_have_peers else None
        taken = [
            d for d in await loop.run_in_executor(self.reader_pool, self.store.adopt_open, live_since, starting)
            if (d.event_id, d.slot) not in self.windows.open
        ]
        for d in taken:
            ps = self.states.get(d.placement)
            campaign = ps.arm_campaigns.get(d.arm_id or "") if ps else None
            self.windows.add(
                d.event_id,
                d.slot,
                OpenDecision(
                    d.placement, d.deadline, d.arm_id or "", d.customer_id, campaign, d.cost, d.reward_cost,
                    d.budgets, d.activated,
                ),
            )
        if taken:
            keys = {(d.event_id, d.slot) for d in taken}
            for ev in await loop.run_in_executor(self.reader_pool, self.store.open_reward_events):
                entry = self.windows.open.get((ev.event_id, ev.slot))
                if entry is not None and (ev.event_id, ev.slot) in keys:
                    self.windows.counted(entry, ev.reward, ev.reward_id or "")
        return len(taken)

    async def rebuild_history(self) -> None:
        """Contact history as far back as any placement's policies look (after start or a change)."""
        horizon = max((ps.record.spec.history_horizon for ps in self.states.values()), default=0.0)
        if horizon <= self.history.horizon or self.shared_contacts is not None:  # shared: read per Choose
            self.history.horizon = horizon
            return
        now = self.clock()
        rows = await asyncio.get_running_loop().run_in_executor(
            self.reader_pool, self.store.recent_impressions, now - horizon
        )
        history = ContactHistory(horizon)
        for r in rows:
            history.record(r.customer_id, self.chooser.impression(r))
        self.history = history

    async def stop(self) -> None:
        """Flush the log, learn what is learnable, snapshot every model, return unused budget."""
        self.ready = False
        await self.replication.stop()
        await cancel_and_wait(self._sweeper)
        if self.writer is not None:
            await self.writer.stop()
        if self.learner is not None:
            await self.learner.stop()
            try:
                await self.learner.catch_up_all()
                await self.learner.snapshot_all()
            except Exception as e:  # the database is away: the next start replays from the log
                log.error("final learning and snapshots failed: %s", e)
        await self.budgets.release_all()
        for ps in self.states.values():
            for slot in ps.slots.values():
                slot.model.close()
        self._writer_pool.shutdown(wait=True)
        try:
            self.store.unregister_server()
        except Exception as e:  # the database is away: the others see this server silent soon
            log.warning("signing off failed: %s", e)
        self.reader_pool.shutdown(wait=True)
        if self.shared_contacts is not None:
            self.shared_contacts.close()
        self.store.close()

    def make_state(
        self,
        rec: PlacementRecord,
        slots: dict[str, Slot],
        features: dict[tuple[str, str, int], dict[str, float | str | bool]],
    ) -> PlacementState:
        pid = rec.spec.id
        lines = {
            (arm, version): arm_line(arm, features_from_mapping(f))
            for (p, arm, version), f in features.items()
            if p == pid
        }
        arms = [ArmView.of(a, rec.arm_versions[a.id]) for a in rec.spec.active_arms()]
        return PlacementState(rec, slots, arms, lines, placement_salt(self.settings.seed, pid))

    # -- configuration -----------------------------------------------------------------------

    def placement(self, pid: str) -> PlacementRecord:
        ps = self.states.get(pid)
        if ps is None:
            raise NotFound(f"placement {quote(pid)} does not exist")
        return ps.record

    def placements(self) -> list[PlacementRecord]:
        return [self.states[k].record for k in sorted(self.states)]

    async def apply(
        self, specs: Sequence[PlacementSpec], dry_run: bool = False, campaigns: Sequence[CampaignSpec] = ()
    ) -> list[Change]:
        """Make the given placements and campaigns live, atomically; returns the changes."""
        return await self.config.apply(specs, campaigns, dry_run)

    # -- statistics ---------------------------------------------------------------------------

    async def stats(self, pid: str) -> Stats:
        ps = self.states.get(pid)
        if ps is None:
            raise NotFound(f"placement {quote(pid)} does not exist")
        assert self.writer is not None
        await asyncio.wait_for(self.writer.flush(), timeout=10)
        loop = asyncio.get_running_loop()
        tallies, total, no_arm = await loop.run_in_executor(self.reader_pool, self.store.tally, pid)
        by_arm = {t.arm_id: t for t in tallies}
        rows = [(by_arm.pop(a.id, ArmTally(a.id)), a.active) for a in ps.record.spec.arms]
        rows += [(t, False) for t in by_arm.values()]
        pending = sum(t.pending for t, _ in rows)
        variants = await loop.run_in_executor(self.reader_pool, self.store.tally_variants, pid)
        now = self.clock()
        seen: set[tuple[str, str]] = set()
        budgets = []
        for a in ps.record.spec.arms:
            for acc in self.budgets.accounts(pid, a, now):
                if (acc.key, acc.period) not in seen:
                    seen.add((acc.key, acc.period))
                    budgets.append(BudgetView.of(acc, now))
        models = [ModelView.of(s) for s in ps.slots.values()]
        return Stats(pid, rows, total, ps.model.learned, pending, budgets, no_arm, variants, models)

    async def placement_of(self, event_id: str) -> str | None:
        """The placement of an event (None: unknown), for placement-limited tokens."""
        for slot in self.windows.slots_of(event_id)[:1]:
            return self.windows.open[(event_id, slot)].placement
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(self.reader_pool, self.store.find_decision, event_id, 0)
        return None if d is None else d.placement

    async def reward(self, event_id: str, reward: float, slot: int = 0, reward_id: str = "") -> str:
        return await self.windows.reward(event_id, reward, slot, reward_id)

    async def reward_batch(self, items: Sequence[tuple[str, float, int, str]]) -> list[str | NextbestError]:
        """Several rewards at once: all are checked before any is stored (InvalidInput naming
        ``rewards[i]``), then each is handled as its own Reward; their writes share group
        commits. Per item: its status, or the domain error it failed with."""
        if len(items) > self.settings.max_reward_batch:
            raise InvalidInput("rewards", f"more than {self.settings.max_reward_batch} rewards in one call")
        for i, (event_id, reward, slot, reward_id) in enumerate(items):
            self.windows.check(event_id, reward, slot, f"rewards[{i}].", reward_id)
        if access.current.get() is not None:
            # One event of a placement the caller may not use denies the whole call, before any
            # is stored; each reward checks again on the read it acts on (bandit/access.py).
            for event_id in dict.fromkeys(e for e, _, _, _ in items):
                placement = await self.placement_of(event_id)
                if placement is not None:
                    access.require(placement)
        quiet = batch_quiet.set(True)
        try:
            results = await asyncio.gather(*(self.windows.reward(e, r, s, k) for e, r, s, k in items), return_exceptions=True)
        finally:
            batch_quiet.reset(quiet)
        out: list[str | NextbestError] = []
        unknown: list[str] = []
        for (event_id, _, _, _), r in zip(items, results, strict=True):
            if isinstance(r, BaseException) and not isinstance(r, NextbestError):
                raise r  # a bug or a cancellation: the whole call fails (INTERNAL or CANCELLED)
            if isinstance(r, NotFound):
                unknown.append(event_id)
            out.append(r)
        if unknown:  # one line for the call, not one per unknown event
            log.warning(
                "reward batch of %d named %d unknown events, e.g. %s", len(items), len(unknown), quote(unknown[0]),
                extra={"event": "reward_unknown_event", "event_id": unknown[0][:128], "unknown": len(unknown)},
            )
        return out

    async def activate(self, event_id: str) -> str:
        return await self.windows.activate(event_id)

    async def sweep(self) -> int:
        return await self.windows.sweep()

    async def _sweep_forever(self) -> None:
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.windows.sweep()
            except Exception as e:
                log.warning("closing expired reward windows failed: %s", e)
            if self.shared_contacts is not None and time.monotonic() - pruned >= _PRUNE_EVERY:
                pruned = time.monotonic()
                before = self.clock() - max(self.history.horizon, _KEEP_CONTACTS)
                try:
                    await asyncio.get_running_loop().run_in_executor(self.reader_pool, self.store.prune_contacts, before)
                except Exception as e:
                    log.warning("forgetting old shared impressions failed: %s", e)

    @property
    def queue_depth(self) -> int:
        return self.writer.depth if self.writer else 0
