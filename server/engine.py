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
import heapq
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bandit.budget import Account
from bandit.contact import ContactHistory, Impression
from bandit.decider import ArmView, Candidate, decide, serve_holdout
from bandit.errors import AlreadyExists, InvalidInput, NotFound
from bandit.features import Feature, arm_line, check_features, features_from_mapping, shared_line
from bandit.log import LoggedDecision, Outcome
from bandit.model import CbModel
from bandit.spec import CampaignSpec, PlacementSpec
from server.budgets import BudgetKeeper
from server.configure import Configurator
from server.learner import Learner, PlacementState, Slot
from server.placements import Change
from server.settings import Settings
from server.stats import BudgetView, ModelView, Stats
from server.storage.base import ArmTally, Close, PlacementRecord, Store
from server.writer import BatchWriter

log = logging.getLogger(__name__)


class RewardStatus:
    LEARNED = "learned"
    DUPLICATE = "duplicate"
    LATE = "late"


@dataclass(slots=True)
class OpenDecision:
    """What closing a decision's window needs, kept in memory while it is open."""

    placement: str
    deadline: float
    arm_id: str
    reward_cost: float = 0.0
    budgets: tuple[tuple[str, str], ...] = ()


def placement_salt(seed: str, placement: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{placement}".encode(), digest_size=32).digest()


def uniform_for(salt: bytes, event_id: str) -> float:
    """A uniform draw in [0, 1) fixed by the event id: a decision can be replayed exactly."""
    h = hashlib.blake2b(event_id.encode(), key=salt, digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


class Engine:
    """Choose, Reward, configuration and statistics over a Store."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="nextbest-db-write")
        self._reader_pool = ThreadPoolExecutor(4, thread_name_prefix="nextbest-db-read")
        self.states: dict[str, PlacementState] = {}
        self._open: dict[str, OpenDecision] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap of open windows
        self._acceptance: dict[tuple[str, str], list[int]] = {}  # (placement, arm) -> [accepted, closed]
        self.budgets = BudgetKeeper(store, self._writer_pool, settings.budget_lease_fraction)
        self.history = ContactHistory(0.0)
        self.writer: BatchWriter | None = None
        self.learner: Learner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.config = Configurator(self)
        self.ready = False

    # -- lifecycle ------------------------------------------------------------------------

    def _read(self, fn: Callable[..., object], *args: object) -> asyncio.Future[object]:
        return asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, *args)

    async def start(self) -> None:
        """Load placements, models, budgets and contact history; learn what was rewarded since
        the last snapshots. Health says SERVING only after this."""
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self._reader_pool, self.store.load_placements)
        features = await loop.run_in_executor(self._reader_pool, self.store.arm_features)
        for rec in records:
            snaps = await loop.run_in_executor(self._reader_pool, self.store.load_snapshots, rec.spec.id)
            slots = {}
            for name, key in rec.spec.slots().items():
                snap = snaps.get(name)
                if snap is not None and snap.key == key:
                    model = CbModel(rec.spec.slot_spec(name), snap.model, learned=snap.learned)
                    slots[name] = Slot(name, key, model, snap.learn_seq)
                else:
                    slots[name] = Slot(name, key, CbModel(rec.spec.slot_spec(name)), rec.model_since_seq)
            self.states[rec.spec.id] = self.make_state(rec, slots, features)
        self.budgets.restore(
            await loop.run_in_executor(self._reader_pool, self.store.load_accounts),
            await loop.run_in_executor(self._reader_pool, self.store.load_campaigns),
        )
        for d in await loop.run_in_executor(self._reader_pool, self.store.open_decisions):
            self._open[d.event_id] = OpenDecision(d.placement, d.deadline, d.arm_id or "", d.reward_cost, d.budgets)
            self._deadlines.append((d.deadline, d.event_id))
        heapq.heapify(self._deadlines)
        await self.rebuild_history()
        self.writer = BatchWriter(self.store, self._writer_pool, self.settings.flush_interval)
        self.writer.start()
        self.learner = Learner(
            self.store,
            self.states,
            self._reader_pool,
            self._writer_pool,
            self.settings.learn_batch,
            self.settings.snapshot_every,
            self.settings.snapshot_interval,
        )
        await self.learner.catch_up_all()
        self.learner.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="nextbest-sweeper")
        self.ready = True
        log.info("engine ready: %d placements, %d open decisions", len(self.states), len(self._open))

    async def rebuild_history(self) -> None:
        """Contact history as far back as any placement's policies look (after start or a change)."""
        horizon = max((ps.record.spec.history_horizon for ps in self.states.values()), default=0.0)
        if horizon <= self.history.horizon:
            self.history.horizon = horizon
            return
        now = self.clock()
        rows = await asyncio.get_running_loop().run_in_executor(
            self._reader_pool, self.store.recent_impressions, now - horizon
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
        if self._sweeper is not None:
            self._sweeper.cancel()
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
        self._reader_pool.shutdown(wait=True)
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

    def _validate_choose(self, placement: str, customer_id: str, event_id: str, features: Sequence[Feature]) -> None:
        s = self.settings
        if not placement:
            raise InvalidInput("placement", "must not be empty")
        if len(customer_id) > s.max_id_length:
            raise InvalidInput("customer_id", f"longer than {s.max_id_length} characters")
        if len(event_id) > s.max_id_length:
            raise InvalidInput("event_id", f"longer than {s.max_id_length} characters")
        if len(features) > s.max_features:
            raise InvalidInput("features", f"more than {s.max_features} features")
        check_features(features)

    async def choose(self, placement: str, customer_id: str, event_id: str, features: Sequence[Feature]) -> LoggedDecision:
        """Decide on the loop; the decision joins the next log batch."""
        self._validate_choose(placement, customer_id, event_id, features)
        ps = self.states.get(placement)
        if ps is None:
            raise NotFound(f"placement {placement!r} does not exist")
        spec = ps.record.spec
        now = self.clock()
        candidates = [Candidate(a, self._accounts(placement, a, now), self._accepts(placement, a.id)) for a in ps.arms]
        if any(c.accounts for c in candidates):
            await self.budgets.ensure(candidates, now)  # the only await: a lease, rarely
            if self.states.get(placement) is not ps:
                raise InvalidInput("placement", "the placement changed during the decision; retry")
        # From here to the end nothing awaits: the decision and its reservation are atomic.
        if not event_id:
            event_id = uuid.uuid4().hex
        elif event_id in self._open:
            raise AlreadyExists(f"event_id {event_id!r} is already used by an open decision")
        tracked = bool(customer_id) and self.history.horizon > 0
        history = self.history.impressions(customer_id, now) if tracked else []
        salt = ps.salt
        variant = self._variant(spec, customer_id, event_id)
        draw = lambda: uniform_for(salt, event_id)  # noqa: E731
        if variant == "holdout":
            assert spec.experiment is not None and spec.experiment.holdout is not None
            choice = serve_holdout(spec.experiment.holdout, spec, candidates, features, draw, now, history)
            model_version = 0
        else:
            slot = ps.slots[variant]
            choice = decide(slot.model, spec.variant(variant), candidates, shared_line(features), draw, now, history)
            model_version = slot.model.learned
        chosen = candidates[choice.eligible[choice.arm_index]] if choice.arm_index is not None else None
        cost = reward_cost = 0.0
        keys: tuple[tuple[str, str], ...] = ()
        if chosen is not None and chosen.accounts:
            cost, reward_cost = chosen.spec.cost_per_impression, chosen.spec.cost_per_reward
            self.budgets.reserve(chosen.accounts, cost, reward_cost)
            keys = tuple((a.key, a.period) for a in chosen.accounts)
        deadline = now + spec.reward_window
        decision = LoggedDecision(
            event_id=event_id,
            placement=placement,
            customer_id=customer_id,
            timestamp=now,
            features=tuple(features),
            arms=tuple((candidates[i].arm.id, candidates[i].arm.version) for i in choice.eligible),
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
        )
        assert self.writer is not None
        self.writer.add_decision(decision)
        if chosen is not None:
            self._open[event_id] = OpenDecision(placement, deadline, chosen.arm.id, reward_cost, keys)
            heapq.heappush(self._deadlines, (deadline, event_id))
            if tracked:
                self.history.record(
                    customer_id, Impression(now, chosen.arm.id, chosen.spec.campaign, placement, event_id)
                )
        return decision

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
        accepted, closed = self._acceptance.get((placement, arm), (0, 0))
        return (accepted + 1) / (closed + 2)

    # -- Reward ----------------------------------------------------------------------------

    async def reward(self, event_id: str, reward: float) -> str:
        """Store the reward durably, then let the learner have it; idempotent per event."""
        if not event_id:
            raise InvalidInput("event_id", "must not be empty")
        if len(event_id) > self.settings.max_id_length:
            raise InvalidInput("event_id", f"longer than {self.settings.max_id_length} characters")
        if not math.isfinite(reward):
            raise InvalidInput("reward", f"must be finite, got {reward}")
        assert self.writer is not None and self.learner is not None
        now = self.clock()
        entry = self._open.get(event_id)
        if entry is None:
            return await self._reward_closed(event_id, reward, now)
        if now > entry.deadline:
            return await self._late(event_id, reward, now)  # the sweeper closes it with the default
        del self._open[event_id]
        close = Close(event_id, Outcome.REWARD, reward, now, entry.reward_cost, entry.budgets)
        try:
            seq = await self.writer.close_window(close)
        except BaseException:
            self._open[event_id] = entry  # not stored: the window stays open for a retry
            raise
        if seq is None:
            return await self._reward_closed(event_id, reward, now)
        self._closed(event_id, entry, close)
        return RewardStatus.LEARNED

    def _closed(self, event_id: str, entry: OpenDecision, close: Close) -> None:
        """A window closed durably: settle its budget, update history, wake the learner."""
        assert self.learner is not None
        if entry.budgets:
            self.budgets.settle(entry.budgets, entry.reward_cost, close.incurred)
        responded = close.outcome == Outcome.REWARD and close.reward > 0
        self.history.respond(event_id, responded)
        tally = self._acceptance.setdefault((entry.placement, entry.arm_id), [0, 0])
        tally[0] += responded
        tally[1] += 1
        self.learner.poke(entry.placement)

    async def _reward_closed(self, event_id: str, reward: float, now: float) -> str:
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(self._reader_pool, self.store.find_decision, event_id)
        if d is None:
            raise NotFound(f"event {event_id!r} is unknown")
        if d.outcome == Outcome.REWARD:
            return RewardStatus.DUPLICATE
        if d.outcome == Outcome.NO_ARM:
            raise InvalidInput("event_id", f"event {event_id!r} served no arm; there is nothing to reward")
        if d.outcome == Outcome.OPEN and now <= d.deadline:
            # Open in the database but not in this process's memory: another server owns it.
            assert self.writer is not None and self.learner is not None
            close = Close(event_id, Outcome.REWARD, reward, now, d.reward_cost, d.budgets)
            if await self.writer.close_window(close) is not None:
                self.learner.poke(d.placement)
                return RewardStatus.LEARNED
            return await self._reward_closed(event_id, reward, now)
        return await self._late(event_id, reward, now)

    async def _late(self, event_id: str, reward: float, now: float) -> str:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_pool, self.store.record_late_reward, event_id, reward, now)
        return RewardStatus.LATE

    # -- reward windows ----------------------------------------------------------------------

    async def sweep(self) -> int:
        """Close every expired window with its placement's default reward; returns how many."""
        assert self.writer is not None
        now = self.clock()
        closing: list[tuple[str, OpenDecision, Close]] = []
        while self._deadlines and self._deadlines[0][0] < now:
            deadline, event_id = heapq.heappop(self._deadlines)
            entry = self._open.get(event_id)
            if entry is None or entry.deadline != deadline:
                continue
            del self._open[event_id]
            ps = self.states.get(entry.placement)
            default = ps.record.spec.default_reward if ps is not None else 0.0
            closing.append((event_id, entry, Close(event_id, Outcome.DEFAULT, default, now, entry.reward_cost, entry.budgets)))
        if not closing:
            return 0
        results = await asyncio.gather(*(self.writer.close_window(c) for _, _, c in closing), return_exceptions=True)
        closed = 0
        for (event_id, entry, close), res in zip(closing, results, strict=True):
            if isinstance(res, BaseException):  # retry on a later sweep
                self._open[event_id] = entry
                heapq.heappush(self._deadlines, (entry.deadline, event_id))
            elif res is not None:
                closed += 1
                self._closed(event_id, entry, close)
        return closed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except Exception as e:
                log.warning("closing expired reward windows failed: %s", e)

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
        tallies, total, no_arm = await loop.run_in_executor(self._reader_pool, self.store.tally, pid)
        by_arm = {t.arm_id: t for t in tallies}
        rows = [(by_arm.pop(a.id, ArmTally(a.id)), a.active) for a in ps.record.spec.arms]
        rows += [(t, False) for t in by_arm.values()]
        pending = sum(t.pending for t, _ in rows)
        variants = await loop.run_in_executor(self._reader_pool, self.store.tally_variants, pid)
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

    @property
    def queue_depth(self) -> int:
        return self.writer.depth if self.writer else 0
