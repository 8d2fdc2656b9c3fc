"""The engine: the running service's parts, wired together, and their lifecycle.

Everything here runs on one asyncio event loop, which is the single owner of every VW model
and of the budget ledger: predicts (Choose) and learns (the learner task) interleave on it and
never overlap, and a reservation follows its decision with no await in between, so it is atomic.
Database work runs in two thread pools — one writer (ordered, group-committed) and readers — so
the loop never waits on the database except to lease budget.

Each part takes the collaborators it uses (the store, the writer, the budgets, the clock, ...),
never the engine; the servicers call the parts: ``chooser`` (Choose), ``windows`` (Reward,
Activate, closing windows), ``reward_batch`` (RewardBatch), ``conversions`` (ReportConversions),
``takeover`` (windows of stopped servers), ``explainer`` (Explain), ``config`` (apply,
placements), ``stats`` (GetStats).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nextbest.bandit.model import CbModel
from nextbest.bandit.reward_scale import WINDOW, RewardScale
from nextbest.engine import model_groups
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.choose_checks import ChooseChecks
from nextbest.engine.chooser import Chooser
from nextbest.engine.configure import Configurator, placement_state
from nextbest.engine.contacts import Contacts
from nextbest.engine.conversions import ConversionDesk
from nextbest.engine.explainer import Explainer
from nextbest.engine.learner import Learner, PlacementModel, PlacementState
from nextbest.engine.profiles import ProfileCache
from nextbest.engine.replication import Replication
from nextbest.engine.reward_batch import RewardBatch
from nextbest.engine.shared_contacts import SharedContacts
from nextbest.engine.stats_reader import StatsReader
from nextbest.engine.takeover import Takeover
from nextbest.engine.tasks import cancel_and_wait
from nextbest.engine.windows import RewardWindows
from nextbest.engine.writer import BatchWriter
from nextbest.settings import Settings
from nextbest.storage.base import Store
from nextbest.telemetry.metrics import EngineReading, Metrics

log = logging.getLogger(__name__)


DRAW_SEED = "draw_seed"  # server_secrets row of the draws' salt when the settings give no seed
_PRUNE_EVERY = 60.0  # seconds between deletions of expired profiles and shared impressions beyond every horizon
# Shared impressions are kept at least this long, so that a policy applied later with a longer
# horizon (up to this) sees the customers' past; migration 0002 starts the table with as much.
_KEEP_CONTACTS = 31 * 86400.0
_SWEEP_PROFILES = 10_000  # expired profiles deleted per transaction


class Engine:
    """The parts of one server over a Store, built in the order they depend on each other."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="nextbest-db-write")
        self.reader_pool = ThreadPoolExecutor(4, thread_name_prefix="nextbest-db-read")
        self.server_id = uuid.uuid4().hex[:16]  # names this run in the database (servers, decisions.owner)
        self.ready = False
        # The salt of the per-event draws: the configured seed, else the database's secret one
        # (made once, shared by every server on it), read before any call can build a placement.
        self.seed = settings.seed or store.shared_secret(DRAW_SEED, secrets.token_hex(32))
        self.states: dict[str, PlacementState] = {}  # swapped entry by entry by config, never rebound
        acceptance: dict[tuple[str, str], list[int]] = {}  # (placement, arm) -> [accepted, closed]
        self.metrics = Metrics()
        self.budgets = BudgetKeeper(store, self._writer_pool, settings.budget_lease_fraction, self.reader_pool)
        shared = SharedContacts(store, 1 if settings.db.startswith("sqlite") else 8) if settings.shares_contacts else None
        self.contacts = Contacts(store, self.reader_pool, self.states, clock, shared)
        self.writer = BatchWriter(store, self._writer_pool, settings.flush_interval, on_refused=self.metrics.refused)
        self.learner = Learner(
            store,
            self.states,
            self.reader_pool,
            self._writer_pool,
            settings.learn_batch,
            settings.snapshot_every,
            settings.snapshot_interval,
            settings.learn_cache,
        )
        self.writer.assign_learn_positions = lambda: self.learner.active
        self.windows = RewardWindows(
            states=self.states,
            writer=self.writer,
            learner=self.learner,
            budgets=self.budgets,
            contacts=self.contacts,
            metrics=self.metrics,
            acceptance=acceptance,
            store=store,
            reader_pool=self.reader_pool,
            settings=settings,
            clock=clock,
            server_id=self.server_id,
        )
        self.reward_batch = RewardBatch(windows=self.windows, max_batch=settings.max_reward_batch)
        self.conversions = ConversionDesk(
            store=store,
            reader_pool=self.reader_pool,
            writer_pool=self._writer_pool,
            states=self.states,
            windows=self.windows,
            writer=self.writer,
            settings=settings,
            clock=clock,
        )
        self.takeover = Takeover(
            windows=self.windows, states=self.states, store=store, reader_pool=self.reader_pool, settings=settings, clock=clock
        )
        self.profiles = ProfileCache(
            store=store,
            reader_pool=self.reader_pool,
            clock=clock,
            ttl=settings.profile_cache_ttl,
            size=settings.profile_cache_size,
            on_read_failed=self.metrics.profile_read_failures.inc,
        )
        self.chooser = Chooser(
            ChooseChecks(settings),
            self.states,
            self.contacts,
            self.budgets,
            self.windows,
            self.writer,
            self.learner,
            self.metrics,
            acceptance,
            clock,
            profiles=self.profiles,
        )
        self.explainer = Explainer(self.windows.find, self.states, settings.max_id_length, store.credits_of_decision)
        self.config = Configurator(
            self.states, self.budgets, self.contacts, store, self.reader_pool, self._writer_pool, self.seed, settings, clock
        )
        self.stats = StatsReader(self.states, self.writer, self.budgets, store, self.reader_pool, clock)
        self.replication = Replication(
            self.states,
            self.writer,
            self.learner,
            self.windows,
            self.config,
            self.budgets,
            store,
            self.reader_pool,
            settings,
            clock,
            takeover=self.takeover,
        )
        self.learner.config_stale = self.replication.reload_soon  # a row names an arm version not loaded here
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load placements, models, budgets and contact history; learn what was rewarded since
        the last snapshots. Health says SERVING only after this."""
        loop = asyncio.get_running_loop()
        serial = await loop.run_in_executor(self.reader_pool, self.store.config_serial)  # before: a change after it is reloaded
        records = await loop.run_in_executor(self.reader_pool, self.store.load_placements)
        features = await loop.run_in_executor(self.reader_pool, self.store.arm_features)
        built: dict[str, dict[str, PlacementModel]] = {}
        for rec in records:
            recent = await loop.run_in_executor(self.reader_pool, self.store.recent_rewards, rec.spec.id, WINDOW)
            snaps = await loop.run_in_executor(self.reader_pool, self.store.load_snapshots, rec.spec.id)
            models = built[rec.spec.id] = {}
            for name, key in rec.spec.model_keys().items():
                snap = snaps.get(name)
                if snap is not None and snap.key == key:
                    model = CbModel(rec.spec.model_spec(name), snap.model, learned=snap.learned)
                    models[name] = PlacementModel(name, key, model, snap.learn_seq)
                else:
                    models[name] = PlacementModel(name, key, CbModel(rec.spec.model_spec(name)), rec.model_since_seq)
            for pm in models.values():
                pm.scale = RewardScale(recent, ceiling=rec.spec.max_abs_reward)
        # Grouped placements share their group's model (from its snapshot), not their own.
        since = {rec.spec.id: rec.model_since_seq for rec in records}
        _, replaced = await model_groups.share(
            {rec.spec.id: rec.spec for rec in records},
            built,
            {},
            load=lambda owner: loop.run_in_executor(self.reader_pool, self.store.load_snapshots, owner),
            since=lambda pids: max(since[p] for p in pids),
        )
        for rec in records:
            ps = placement_state(rec, built[rec.spec.id], features, self.seed)
            ps.own_learned, ps.own_scale = await model_groups.own_exploration(ps, None, store=self.store, pool=self.reader_pool)
            self.states[rec.spec.id] = ps
        model_groups.close_unused(replaced, self.states)
        self.budgets.restore(
            await loop.run_in_executor(self.reader_pool, self.store.load_accounts),
            await loop.run_in_executor(self.reader_pool, self.store.load_campaigns),
        )
        await loop.run_in_executor(self.reader_pool, self.store.register_server, self.server_id, self.clock())
        await self.config.confirm(serial)
        learner = await self.replication.elect()
        # Holding the lock file beside a SQLite database no other server runs on it: whoever
        # wrote the open windows stopped (a restart after kill -9 takes them at once). Else only
        # the windows of servers silent for live_for move: never a live one's.
        await self.takeover.adopt(starting=True, alone=learner and not self.settings.may_have_peers)
        await self.contacts.rebuild()
        self.writer.start()
        self.learner.active = learner
        await self.learner.catch_up_all()
        self.learner.start()
        self.replication.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="nextbest-sweeper")
        self.ready = True
        log.info("engine ready: %d placements, %d open decisions", len(self.states), len(self.windows.open))

    async def stop(self) -> None:
        """Flush the log, learn what is learnable, snapshot every model, return unused budget."""
        self.ready = False
        await self.replication.stop()
        await cancel_and_wait(self._sweeper)
        if self.writer.running:  # else the start failed before serving: nothing to write or learn
            await self.writer.stop()
            await self.learner.stop()
            try:
                await self.learner.catch_up_all()
                await self.learner.snapshot_all()
            except Exception as e:  # the database is away: the next start replays from the log
                log.error("final learning and snapshots failed: %s", e)
        await self.budgets.release_all()
        for ps in self.states.values():
            for pm in ps.models.values():
                pm.model.close()
        self._writer_pool.shutdown(wait=True)
        try:
            self.store.unregister_server()
        except Exception as e:  # the database is away: the others see this server silent soon
            log.warning("signing off failed: %s", e)
        self.reader_pool.shutdown(wait=True)
        self.contacts.close()
        self.store.close()

    # -- telemetry ------------------------------------------------------------------------------

    def reading(self) -> EngineReading:
        """The engine's state now, for the metrics; call on the engine's loop."""
        out = EngineReading(ready=self.ready, queue_depth=self.writer.depth, unknown_arm_versions=self.learner.unknown_arm_versions)
        for pid, ps in self.states.items():
            out.model_cursor[pid] = max((s.cursor for s in ps.models.values()), default=0)
            for name, pm in ps.models.items():
                out.model_version[(pid, name)] = pm.model.learned
        for (key, period), acc in self.budgets.ledger.accounts.items():
            out.budget_remaining[(key, period)] = acc.remaining
            out.budget_limit[(key, period)] = acc.limit
        return out

    # -- background ----------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.windows.sweep()
            except Exception as e:
                log.warning("closing expired reward windows failed: %s", e)
            if time.monotonic() - pruned >= _PRUNE_EVERY:
                pruned = time.monotonic()
                await self._forget_old()

    async def _forget_old(self) -> None:
        """Delete expired profiles and shared impressions beyond every horizon (neither is used
        any more: this only keeps the tables small)."""
        loop = asyncio.get_running_loop()
        try:
            while await loop.run_in_executor(self.reader_pool, self.store.sweep_profiles, self.clock(), _SWEEP_PROFILES) == _SWEEP_PROFILES:
                await asyncio.sleep(0)
        except Exception as e:
            log.warning("deleting expired profiles failed: %s", e)
        if self.contacts.shared is not None:
            before = self.clock() - max(self.contacts.history.horizon, _KEEP_CONTACTS)
            try:
                await loop.run_in_executor(self.reader_pool, self.store.prune_contacts, before)
            except Exception as e:
                log.warning("forgetting old shared impressions failed: %s", e)
