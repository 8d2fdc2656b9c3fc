"""The engine: placements, their models, budgets, contact history, the decision log and rewards.

Everything here runs on one asyncio event loop, which is the single owner of every VW model
and of the budget ledger: predicts (Choose) and learns (the learner task) interleave on it and
never overlap, and a reservation follows its decision with no await in between, so it is atomic.
Database work runs in two thread pools — one writer (ordered, group-committed) and readers — so
the loop never waits on the database except to lease budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bandit.budget import Account, Ledger
from bandit.contact import ContactHistory, Impression
from bandit.decider import ArmView, Candidate, Choice, decide, serve_holdout
from bandit.errors import AlreadyExists, InvalidInput, NextbestError, NotFound
from bandit.features import (
    Feature,
    feature,
    arm_line,
    check_features,
    features_from_mapping,
    shared_line,
)
from bandit.log import LoggedDecision, Outcome
from bandit.model import CbModel
from bandit.spec import CampaignSpec, PlacementSpec
from server.budgets import BudgetKeeper
from server.choose_checks import ChooseChecks
from server.configure import Configurator
from server.learner import Learner, PlacementState, Slot
from server.metrics import Metrics
from server.placements import Change
from server.replication import Replication
from server.settings import Settings
from server.shared_contacts import SharedContacts
from server.stats import BudgetView, ModelView, Stats
from server.storage.base import ArmTally, ContactRow, PlacementRecord, RecentImpression, Store
from server.tasks import cancel_and_wait
from server.windows import OpenDecision, RewardWindows
from server.writer import BatchWriter

log = logging.getLogger(__name__)


def placement_salt(seed: str, placement: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{placement}".encode(), digest_size=32).digest()


def uniform_for(salt: bytes, event_id: str) -> float:
    """A uniform draw in [0, 1) fixed by the event id: a decision can be replayed exactly."""
    h = hashlib.blake2b(event_id.encode(), key=salt, digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


_PRUNE_EVERY = 60.0  # seconds between deletions of shared impressions beyond every horizon
# Shared impressions are kept at least this long, so that a policy applied later with a longer
# horizon (up to this) sees the customers' past; migration 0002 starts the table with as much.
_KEEP_CONTACTS = 31 * 86400.0


def _shown(customer_id: str, decisions: Sequence[LoggedDecision]) -> list[ContactRow]:
    """The impressions a Choose made now (deferred decisions count when activated)."""
    return [
        ContactRow(customer_id, d.timestamp, d.placement, d.arm_id, d.event_id, d.slot)
        for d in decisions
        if d.arm_id is not None and d.activated
    ]


class Engine:
    """Choose, Reward, configuration and statistics over a Store."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="nextbest-db-write")
        self.reader_pool = ThreadPoolExecutor(4, thread_name_prefix="nextbest-db-read")
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
            scale = await loop.run_in_executor(self.reader_pool, self.store.reward_scale, rec.spec.id)
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
                slot.reward_scale = scale
            self.states[rec.spec.id] = self.make_state(rec, slots, features)
        self.budgets.restore(
            await loop.run_in_executor(self.reader_pool, self.store.load_accounts),
            await loop.run_in_executor(self.reader_pool, self.store.load_campaigns),
        )
        for d in await loop.run_in_executor(self.reader_pool, self.store.open_decisions):
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
        for ev in await loop.run_in_executor(self.reader_pool, self.store.open_reward_events):
            entry = self.windows.open.get((ev.event_id, ev.slot))
            if entry is not None:
                self.windows.counted(entry, ev.reward, ev.reward_id or "")
        await self.rebuild_history()
        self.writer = BatchWriter(self.store, self._writer_pool, self.settings.flush_interval)
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
            ps = self.states.get(r.placement)
            campaign = ps.arm_campaigns.get(r.arm_id) if ps else None
            responded = None if r.outcome == Outcome.OPEN else (r.outcome == Outcome.REWARD and (r.reward or 0) > 0)
            history.record(r.customer_id, Impression(r.at, r.arm_id, campaign, r.placement, r.event_id, responded))
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

    # -- Choose -----------------------------------------------------------------------------

    async def choose(
        self,
        placement: str,
        customer_id: str,
        event_id: str,
        features: Sequence[Feature],
        baseline_arm: str = "",
        defer: bool = False,
        slot_features: Sequence[Sequence[Feature]] = (),
    ) -> list[LoggedDecision]:
        """Decide on the loop: one decision per slot; they join the next log batch."""
        self.checks.validate(placement, customer_id, event_id, features)
        for k, sf in enumerate(slot_features):
            self.checks.validate(placement, customer_id, event_id, sf)
            check_features(sf, f"slot_features[{k}]")
        ps = self.states.get(placement)
        if ps is None:
            raise NotFound(f"placement {placement!r} does not exist")
        spec = ps.record.spec
        if baseline_arm and baseline_arm not in {a.id for a in ps.arms}:
            raise InvalidInput("baseline_arm", f"{baseline_arm!r} is not an active arm of {placement!r}")
        if spec.mode == "apprentice" and not baseline_arm:
            raise InvalidInput("baseline_arm", "required: the placement is in apprentice mode")
        shared = self.shared_contacts
        if customer_id and self.history.horizon > 0 and shared is not None and ps.record.spec.history_horizon <= 0:
            # No rule of this placement reads the history, but other placements' rules count
            # its impressions: record them, without waiting, after the decision.
            out = await self._choose(ps, customer_id, event_id, features, baseline_arm, defer, slot_features, [])
            shared.record_later(_shown(customer_id, out))
            return out
        if customer_id and self.history.horizon > 0 and shared is not None:
            since = self.clock() - self.history.horizon
            async with shared.customer(customer_id, since) as tx:
                if self.states.get(placement) is not ps:
                    raise InvalidInput("placement", "the placement changed during the decision; retry")
                history = [self._impression(r) for r in tx.history]
                out = await self._choose(ps, customer_id, event_id, features, baseline_arm, defer, slot_features, history)
                tx.new.extend(_shown(customer_id, out))
                return out
        return await self._choose(ps, customer_id, event_id, features, baseline_arm, defer, slot_features, None)

    def _impression(self, r: RecentImpression) -> Impression:
        ps = self.states.get(r.placement)
        campaign = ps.arm_campaigns.get(r.arm_id) if ps else None
        responded = None if r.outcome == Outcome.OPEN else (r.outcome == Outcome.REWARD and (r.reward or 0) > 0)
        return Impression(r.at, r.arm_id, campaign, r.placement, r.event_id, responded)

    async def _choose(
        self,
        ps: PlacementState,
        customer_id: str,
        event_id: str,
        features: Sequence[Feature],
        baseline_arm: str,
        defer: bool,
        slot_features: Sequence[Sequence[Feature]],
        shared_history: list[Impression] | None,
    ) -> list[LoggedDecision]:
        """The decisions of one Choose; ``shared_history`` is the customer's impressions from
        the database when contact history is shared, else None (this server's memory)."""
        spec = ps.record.spec
        placement = spec.id
        now = self.clock()
        closed = spec.closed(now)
        if closed:
            candidates: list[Candidate] = []
        elif ps.budgeted:
            candidates = [Candidate(a, self._accounts(placement, a, now), self._accepts(placement, a.id)) for a in ps.arms]
        else:
            candidates = ps.candidates  # shared between requests: nothing changes a Candidate
        if ps.budgeted and any(c.accounts for c in candidates):
            await self.budgets.ensure(candidates, now)  # the only await: a lease, rarely
            if self.states.get(placement) is not ps:
                raise InvalidInput("placement", "the placement changed during the decision; retry")
        # From here to the end nothing awaits: the decisions and their reservations are atomic.
        if not event_id:
            event_id = uuid.uuid4().hex
        elif self.windows.slots_of(event_id):
            raise AlreadyExists(f"event_id {event_id!r} is already used by an open decision")
        tracked = bool(customer_id) and self.history.horizon > 0
        if shared_history is not None:
            history = shared_history
        else:
            history = self.history.impressions(customer_id, now) if tracked else []
        variant = self._variant(spec, customer_id, event_id)
        out: list[LoggedDecision] = []
        taken: set[str] = set()
        for k in range(spec.slots):
            feats = tuple(features)
            if spec.slots > 1:
                feats += (feature("slot", "position", str(k)), *(slot_features[k] if k < len(slot_features) else ()))
            d = self._decide_slot(
                ps, variant, [c for c in candidates if c.arm.id not in taken] if taken else candidates, feats, customer_id,
                event_id, k, now,
                history, baseline_arm, defer, closed,
            )
            if d.arm_id is None and k > 0:
                break  # fewer arms than slots: the response is shorter
            out.append(d)
            if d.arm_id is None:
                break
            taken.add(d.arm_id)
            if tracked and not defer:
                campaign = ps.arm_campaigns.get(d.arm_id)
                ev = event_id if k == 0 else f"{event_id}#{k}"
                imp = Impression(now, d.arm_id, campaign, placement, ev)
                if shared_history is None:  # else the caller records it in the database
                    self.history.record(customer_id, imp)
                history.append(imp)
        return out

    def _decide_slot(
        self,
        ps: PlacementState,
        variant: str,
        candidates: list[Candidate],
        features: tuple[Feature, ...],
        customer_id: str,
        event_id: str,
        slot: int,
        now: float,
        history: list[Impression],
        baseline_arm: str,
        defer: bool,
        closed: str = "",
    ) -> LoggedDecision:
        spec = ps.record.spec
        salt = ps.salt
        draw_id = event_id if slot == 0 else f"{event_id}#{slot}"
        draw = lambda: uniform_for(salt, draw_id)  # noqa: E731
        shared = shared_line(features)
        model_version = 0
        if closed:
            choice = Choice(None, 0.0, (), reason=closed)
        elif baseline_arm and spec.mode in ("apprentice", "logging_only") and slot == 0:
            choice = self._baseline(ps, candidates, shared, baseline_arm)
            model_version = ps.model.learned
        elif variant == "holdout":
            assert spec.experiment is not None and spec.experiment.holdout is not None
            choice = serve_holdout(spec.experiment.holdout, spec, candidates, features, draw, now, history)
        else:
            serving = ps.slots[variant]
            choice = decide(
                serving.model, spec.variant(variant), candidates, shared, draw, now, history, serving.reward_scale,
                budgeted=ps.budgeted,
            )
            model_version = serving.model.learned
        chosen = candidates[choice.eligible[choice.arm_index]] if choice.arm_index is not None else None
        cost = reward_cost = 0.0
        keys: tuple[tuple[str, str], ...] = ()
        if chosen is not None and chosen.accounts and Ledger.can_reserve(chosen.accounts, chosen.reservation, now) == "":
            cost, reward_cost = chosen.spec.cost_per_impression, chosen.spec.cost_per_reward
            if defer:  # nothing is spent before the customer sees it: hold the impression cost too
                self.budgets.reserve(chosen.accounts, 0.0, cost + reward_cost)
            else:
                self.budgets.reserve(chosen.accounts, cost, reward_cost)
            keys = tuple((a.key, a.period) for a in chosen.accounts)
        deadline = now + (spec.activation_window if defer else spec.reward_window)
        decision = LoggedDecision(
            event_id=event_id,
            placement=spec.id,
            customer_id=customer_id,
            timestamp=now,
            features=features,
            arms=ps.arm_keys
            if candidates is ps.candidates and len(choice.eligible) == len(candidates)
            else tuple((candidates[i].arm.id, candidates[i].arm.version) for i in choice.eligible),
            pmf=choice.pmf,
            chosen=choice.arm_index,
            probability=choice.probability,
            model_version=model_version,
            deadline=deadline,
            outcome=Outcome.OPEN if chosen is not None else Outcome.NO_ARM,
            cost=cost,
            reward_cost=reward_cost,
            budgets=keys,
            ineligible=tuple(choice.ineligible.items()),
            reason=choice.reason,
            variant=variant,
            slot=slot,
            activated=not defer,
        )
        assert self.writer is not None
        self.writer.add_decision(decision)
        self.metrics.decision(spec.id, decision.arm_id)
        if chosen is not None:
            assert self.learner is not None
            self.learner.remember(event_id, slot, shared)
            self.windows.add(
                event_id,
                slot,
                OpenDecision(
                    spec.id, deadline, chosen.arm.id, customer_id, chosen.spec.campaign, cost, reward_cost, keys,
                    activated=not defer,
                ),
            )
        return decision

    def _baseline(self, ps: PlacementState, candidates: list[Candidate], shared: str, baseline: str) -> Choice:
        """Apprentice and logging-only modes serve the caller's own choice; apprentice mode
        also scores whether the model's greedy choice would have matched it."""
        ids = [c.arm.id for c in candidates]
        j = ids.index(baseline)
        if ps.record.spec.mode == "apprentice":
            slot = ps.slots[""]
            greedy = int(np.argmax(slot.model.expected_rewards(shared, [c.arm.line for c in candidates])))
            slot.scored += 1
            slot.recent.append(greedy == j)
            slot.agreed += greedy == j
        pmf = tuple(1.0 if i == j else 0.0 for i in range(len(candidates)))
        return Choice(j, 1.0, pmf, tuple(range(len(candidates))))

    @staticmethod
    def _variant(spec: PlacementSpec, customer_id: str, event_id: str) -> str:
        """Sticky per customer (a salted hash of customer_id); per event for anonymous requests."""
        exp = spec.experiment
        if exp is None:
            return ""
        salt = hashlib.blake2b(f"experiment/{spec.id}/{exp.salt}".encode(), digest_size=32).digest()
        u = uniform_for(salt, customer_id or event_id)
        edge = exp.holdout.share if exp.holdout is not None else 0.0
        if u < edge:
            return "holdout"
        for v in exp.variants:
            edge += v.share
            if u < edge:
                return v.id
        return exp.variants[-1].id if exp.variants else "holdout"

    def _accounts(self, placement: str, arm: ArmView, now: float) -> list[Account]:
        a = arm.spec
        if a is None or (a.budget is None and a.campaign is None):
            return []
        return self.budgets.accounts(placement, a, now)

    def _accepts(self, placement: str, arm: str) -> float:
        accepted, closed = self.acceptance.get((placement, arm), (0, 0))
        return (accepted + 1) / (closed + 2)

    # -- configuration -----------------------------------------------------------------------

    def placement(self, pid: str) -> PlacementRecord:
        ps = self.states.get(pid)
        if ps is None:
            raise NotFound(f"placement {pid!r} does not exist")
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
            raise NotFound(f"placement {pid!r} does not exist")
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
        results = await asyncio.gather(*(self.windows.reward(e, r, s, k) for e, r, s, k in items), return_exceptions=True)
        out: list[str | NextbestError] = []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, NextbestError):
                raise r  # a bug or a cancellation: the whole call fails (INTERNAL or CANCELLED)
            out.append(r)
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
