"""The engine: placements, their models, the decision log and rewards, wired together.

Everything here runs on one asyncio event loop, which is the single owner of every VW model:
predicts (Choose) and learns (the learner task) interleave on it and never overlap. Database
work runs in two thread pools — one writer (ordered, group-committed) and readers — so the
loop never waits on the database.
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

from bandit.decider import ArmView, decide
from bandit.errors import AlreadyExists, InvalidInput, NotFound
from bandit.features import Feature, arm_line, check_features, features_from_mapping, shared_line
from bandit.log import LoggedDecision, Outcome
from bandit.model import CbModel, check_vw_arguments
from bandit.spec import PlacementSpec
from server.learner import Learner, PlacementState
from server.placements import Change, plan
from server.settings import Settings
from server.stats import Stats
from server.storage.base import ArmTally, Close, PlacementRecord, Store
from server.writer import BatchWriter

log = logging.getLogger(__name__)


class RewardStatus:
    LEARNED = "learned"
    DUPLICATE = "duplicate"
    LATE = "late"


def _salt(seed: str, placement: str) -> bytes:
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
        self._open: dict[str, tuple[str, float]] = {}  # event id -> (placement, deadline)
        self._deadlines: list[tuple[float, str]] = []  # heap of open windows
        self.writer: BatchWriter | None = None
        self.learner: Learner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._config_lock = asyncio.Lock()
        self.ready = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load placements and models, learn what was rewarded since the last snapshots."""
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self._reader_pool, self.store.load_placements)
        features = await loop.run_in_executor(self._reader_pool, self.store.arm_features)
        for rec in records:
            snap = await loop.run_in_executor(self._reader_pool, self.store.load_snapshot, rec.spec.id)
            if snap is not None and snap.generation == rec.generation:
                model = CbModel(rec.spec, snap.model, learned=snap.learned)
                cursor = snap.learn_seq
            else:
                model, cursor = CbModel(rec.spec), rec.model_since_seq
            self.states[rec.spec.id] = self._state(rec, model, cursor, features)
        for event_id, pid, deadline in await loop.run_in_executor(self._reader_pool, self.store.open_decisions):
            self._open[event_id] = (pid, deadline)
            self._deadlines.append((deadline, event_id))
        heapq.heapify(self._deadlines)
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

    async def stop(self) -> None:
        """Flush the log, learn what is learnable, snapshot every model."""
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.writer is not None:
            await self.writer.stop()
        if self.learner is not None:
            await self.learner.stop()
            await self.learner.catch_up_all()
            await self.learner.snapshot_all()
        for ps in self.states.values():
            ps.model.close()
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        self.store.close()

    def _state(
        self,
        rec: PlacementRecord,
        model: CbModel,
        cursor: int,
        features: dict[tuple[str, str, int], dict[str, float | str | bool]],
    ) -> PlacementState:
        pid = rec.spec.id
        lines = {
            (arm, version): arm_line(arm, features_from_mapping(f))
            for (p, arm, version), f in features.items()
            if p == pid
        }
        arms = [ArmView.of(a, rec.arm_versions[a.id]) for a in rec.spec.active_arms()]
        return PlacementState(rec, model, cursor, arms, lines, _salt(self.settings.seed, pid))

    # -- Choose -----------------------------------------------------------------------------

    def choose(self, placement: str, customer_id: str, event_id: str, features: Sequence[Feature]) -> LoggedDecision:
        """Decide now, on the loop; the decision joins the next log batch."""
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
        ps = self.states.get(placement)
        if ps is None:
            raise NotFound(f"placement {placement!r} does not exist")
        if not event_id:
            event_id = uuid.uuid4().hex
        elif event_id in self._open:
            raise AlreadyExists(f"event_id {event_id!r} is already used by an open decision")
        salt = ps.salt
        choice = decide(ps.model, ps.record.spec, ps.arms, shared_line(features), lambda: uniform_for(salt, event_id))
        now = self.clock()
        deadline = now + ps.record.spec.reward_window
        arms = ps.arms
        decision = LoggedDecision(
            event_id=event_id,
            placement=placement,
            customer_id=customer_id,
            timestamp=now,
            features=tuple(features),
            arms=tuple((a.id, a.version) for a in arms),
            pmf=choice.pmf,
            chosen=choice.arm_index,
            probability=choice.probability,
            model_version=ps.model.learned,
            deadline=deadline,
            outcome=Outcome.OPEN if choice.arm_index is not None else Outcome.NO_ARM,
        )
        assert self.writer is not None
        self.writer.add_decision(decision)
        if choice.arm_index is not None:
            self._open[event_id] = (placement, deadline)
            heapq.heappush(self._deadlines, (deadline, event_id))
        return decision

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
        pid, deadline = entry
        if now > deadline:
            return await self._late(event_id, reward, now)  # the sweeper closes it with the default
        del self._open[event_id]
        try:
            seq = await self.writer.close_window(Close(event_id, Outcome.REWARD, reward, now))
        except BaseException:
            self._open[event_id] = entry  # not stored: the window stays open for a retry
            raise
        if seq is None:
            return await self._reward_closed(event_id, reward, now)
        self.learner.poke(pid)
        return RewardStatus.LEARNED

    async def _reward_closed(self, event_id: str, reward: float, now: float) -> str:
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(self._reader_pool, self.store.find_decision, event_id)
        if d is None:
            raise NotFound(f"event {event_id!r} is unknown")
        if d.outcome == Outcome.REWARD:
            return RewardStatus.DUPLICATE
        if d.outcome == Outcome.NO_ARM:
            raise InvalidInput("event_id", f"event {event_id!r} chose no arm; there is nothing to reward")
        if d.outcome == Outcome.OPEN and now <= d.deadline:
            # Open in the database but not in memory: another server process owns it. Close it here.
            assert self.writer is not None and self.learner is not None
            seq = await self.writer.close_window(Close(event_id, Outcome.REWARD, reward, now))
            if seq is not None:
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
        assert self.writer is not None and self.learner is not None
        now = self.clock()
        closing: list[tuple[str, tuple[str, float]]] = []
        while self._deadlines and self._deadlines[0][0] < now:
            deadline, event_id = heapq.heappop(self._deadlines)
            entry = self._open.get(event_id)
            if entry is None or entry[1] != deadline:
                continue
            del self._open[event_id]
            closing.append((event_id, entry))
        if not closing:
            return 0
        futures = []
        for event_id, (pid, _) in closing:
            ps = self.states.get(pid)
            default = ps.record.spec.default_reward if ps is not None else 0.0
            futures.append(self.writer.close_window(Close(event_id, Outcome.DEFAULT, default, now)))
        results = await asyncio.gather(*futures, return_exceptions=True)
        closed = 0
        for (event_id, entry), res in zip(closing, results, strict=True):
            if isinstance(res, BaseException):  # retry on a later sweep
                self._open[event_id] = entry
                heapq.heappush(self._deadlines, (entry[1], event_id))
            elif res is not None:
                closed += 1
                self.learner.poke(entry[0])
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

    async def apply(self, specs: Sequence[PlacementSpec], dry_run: bool = False) -> list[Change]:
        """Make the given placements live, atomically; returns the changes (planned if dry_run)."""
        ids = [s.id for s in specs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidInput("placements", f"placement {dup!r} is listed twice")
        async with self._config_lock:
            current = {pid: ps.record for pid, ps in self.states.items()}
            p = plan(current, specs, self.store.max_learn_seq() + 1)
            for rec in p.records:
                if rec.spec.id in p.new_models:
                    check_vw_arguments(rec.spec)
            if dry_run or not p.changes:
                return p.changes
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._writer_pool, self.store.save_placements, p.records, p.new_arm_versions)
            features = {(pid, a, v): f for pid, a, v, f in p.new_arm_versions}
            for rec in p.records:
                old = self.states.get(rec.spec.id)
                lines = old.arm_lines if old is not None else {}
                if old is None or rec.spec.id in p.new_models:
                    if old is not None:
                        old.model.close()
                    model, cursor = CbModel(rec.spec), rec.model_since_seq
                else:
                    model, cursor = old.model, old.cursor
                ps = self._state(rec, model, cursor, features)
                ps.arm_lines = {**lines, **ps.arm_lines}
                if old is not None and old.model is model:
                    ps.since_snapshot, ps.last_snapshot = old.since_snapshot, old.last_snapshot
                self.states[rec.spec.id] = ps
            log.info("applied %d changes to %s", len(p.changes), sorted({c.placement for c in p.changes}))
            return p.changes

    # -- statistics ---------------------------------------------------------------------------

    async def stats(self, pid: str) -> Stats:
        ps = self.states.get(pid)
        if ps is None:
            raise NotFound(f"placement {pid!r} does not exist")
        assert self.writer is not None
        await asyncio.wait_for(self.writer.flush(), timeout=10)
        loop = asyncio.get_running_loop()
        tallies, total = await loop.run_in_executor(self._reader_pool, self.store.tally, pid)
        by_arm = {t.arm_id: t for t in tallies}
        rows = [(by_arm.pop(a.id, ArmTally(a.id)), a.active) for a in ps.record.spec.arms]
        rows += [(t, False) for t in by_arm.values()]
        pending = sum(t.pending for t, _ in rows)
        return Stats(pid, rows, total, ps.model.learned, pending)

    @property
    def queue_depth(self) -> int:
        return self.writer.depth if self.writer else 0
