"""Reward windows: rewards, activations of deferred decisions, and the closing of windows.

A decision's window opens when it is shown (at Choose, or at Activate for a deferred one) and
closes at its deadline or, under ``earliest`` aggregation with ``learn_at: reward``, at its first
reward. A closed window gets a position in the learn sequence and is learned exactly once, with
its first reward (earliest), the aggregate of the rewards within it (sum, max, average) or the
default. With ``learn_at: window_close`` (the default) the first reward is stored at once and
learned at the deadline, so windows are learned in the order their decisions were made, the
successes with the failures.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass

from nextbest.bandit import access
from nextbest.bandit.contact import Impression
from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.errors import InvalidInput, NextbestError, NotFound
from nextbest.bandit.spec import MAX_ABS_REWARD_LIMIT
from nextbest.bandit.text import check_text, quote
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.contacts import Contacts
from nextbest.engine.learner import Learner, PlacementState
from nextbest.engine.writer import BatchWriter
from nextbest.settings import Settings
from nextbest.storage.base import FIRST, Activation, Close, ContactRow, RewardEvent, Store
from nextbest.storage.refusal import RecordRefused
from nextbest.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

_FLUSH_WAIT = 2.0  # seconds an unknown event's Reward waits for this server's queued decisions

# Set by RewardBatch, which logs one line for all its unknown events instead of one each.
batch_quiet: ContextVar[bool] = ContextVar("nextbest_batch_quiet", default=False)


class RewardStatus:
    LEARNED = "learned"  # durable; learned once (at once under earliest aggregation)
    DUPLICATE = "duplicate"
    LATE = "late"
    RECORDED = "recorded"  # durable; part of the aggregate learned when the window closes


class ActivateStatus:
    ACTIVATED = "activated"
    ALREADY_ACTIVE = "already_active"
    EXPIRED = "expired"


@dataclass(slots=True)
class OpenDecision:
    """What a decision's window needs while it is open, kept in memory."""

    placement: str
    deadline: float
    arm_id: str
    customer_id: str = ""
    campaign: str | None = None
    cost: float = 0.0
    reward_cost: float = 0.0
    budgets: tuple[tuple[str, str], ...] = ()
    activated: bool = True
    # Only where a placement aggregates rewards, created on the first: an open window is one
    # object for the garbage collector, not three (a full collection over 200,000 open windows
    # took 180 ms with empty list and set fields, measured).
    rewards: list[float] | None = None  # recorded for aggregation
    reward_ids: set[str] | None = None  # the callers' keys of those rewards
    writing: dict[str, asyncio.Future[bool]] | None = None  # keys whose reward is being stored

    def add_reward(self, reward: float) -> None:
        if self.rewards is None:
            self.rewards = []
        self.rewards.append(reward)

    def has_key(self, reward_id: str) -> bool:
        return self.reward_ids is not None and reward_id in self.reward_ids

    def add_key(self, reward_id: str) -> None:
        if self.reward_ids is None:
            self.reward_ids = set()
        self.reward_ids.add(reward_id)


def aggregate(how: str, rewards: list[float]) -> float:
    if how == "sum":
        return math.fsum(rewards)
    if how == "max":
        return max(rewards)
    if how == "average":
        return math.fsum(rewards) / len(rewards)
    return rewards[0]


# The in-flight key of a first reward under ``learn_at: window_close`` (a NUL never comes
# from a caller: ids are checked for it at the edge).
_FIRST = "\x00first"


class RewardWindows:
    """Reward, Activate and window closing; a part of the Engine, on its event loop."""

    def __init__(
        self,
        states: dict[str, PlacementState],
        writer: BatchWriter,
        learner: Learner,
        budgets: BudgetKeeper,
        contacts: Contacts,
        metrics: Metrics,
        acceptance: dict[tuple[str, str], list[int]],
        store: Store,
        reader_pool: ThreadPoolExecutor,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self._states = states
        self._writer = writer
        self._learner = learner
        self._budgets = budgets
        self._contacts = contacts
        self._metrics = metrics
        self._acceptance = acceptance  # (placement, arm) -> [accepted, closed], read by the Chooser
        self._store = store
        self._reader_pool = reader_pool
        self._settings = settings
        self._clock = clock
        self.open: dict[tuple[str, int], OpenDecision] = {}
        # Heap of open windows by deadline, then by the order they opened (a counter), so that
        # windows closing in one sweep are learned in decision order even when deadlines tie.
        self._deadlines: list[tuple[float, int, str, int]] = []
        self._opened = itertools.count()
        # Windows whose closing reward is being stored: a second Reward for one of them (a
        # retry, or two at once) waits for that write and answers DUPLICATE, as it would once
        # the write is durable, instead of looking in the database too early (NOT_FOUND).
        self._closing: dict[tuple[str, int], tuple[str, asyncio.Future[Close | None]]] = {}

    def add(self, event_id: str, slot: int, entry: OpenDecision) -> None:
        self.open[(event_id, slot)] = entry
        heapq.heappush(self._deadlines, (entry.deadline, next(self._opened), event_id, slot))

    def slots_of(self, event_id: str) -> list[int]:
        return [s for s in range(10) if (event_id, s) in self.open]

    # -- Reward -------------------------------------------------------------------------------

    def check(self, event_id: str, reward: float, slot: int, field: str = "", reward_id: str = "") -> None:
        """A reward's own validity (InvalidInput naming ``field`` + its part), before any work.
        The placement's own ``max_abs_reward`` is checked once the event is found."""
        if not event_id:
            raise InvalidInput(f"{field}event_id", "must not be empty")
        check_text(event_id, f"{field}event_id", self._settings.max_id_length)
        if reward_id:
            check_text(reward_id, f"{field}reward_id", 128)
        if not math.isfinite(reward):
            raise InvalidInput(f"{field}reward", f"must be finite, got {reward}")
        if abs(reward) > MAX_ABS_REWARD_LIMIT:
            raise InvalidInput(f"{field}reward", f"magnitude {abs(reward):g} is above {MAX_ABS_REWARD_LIMIT:g}")
        if not 0 <= slot < 10:
            raise InvalidInput(f"{field}slot", f"must be between 0 and 9, got {slot}")

    def _check_magnitude(self, placement: str, reward: float) -> None:
        """A reward larger than its placement's ``max_abs_reward``: one such outlier learned
        would swamp the model's estimates (a 1e13 reward put a trained SquareCB placement's
        best arm from 0.99 to uniform, for good)."""
        ps = self._states.get(placement)
        bound = ps.record.spec.max_abs_reward if ps is not None else MAX_ABS_REWARD_LIMIT
        if abs(reward) > bound:
            raise InvalidInput("reward", f"magnitude {abs(reward):g} is above the placement's max_abs_reward {bound:g}")

    async def reward(self, event_id: str, reward: float, slot: int = 0, reward_id: str = "") -> str:
        """Store the reward durably, then let the learner have it; learned at most once."""
        self.check(event_id, reward, slot, "", reward_id)
        now = self._clock()
        key = (event_id, slot)
        entry = self.open.get(key)
        if entry is None:
            closing = self._closing.get(key)
            if closing is not None:
                access.require(closing[0])
                ok = await asyncio.shield(closing[1])  # if that write fails, so does this call: retry it
                if ok:
                    return RewardStatus.DUPLICATE
            return await self._reward_closed(event_id, slot, reward, now, reward_id)
        access.require(entry.placement)
        self._check_magnitude(entry.placement, reward)
        if not entry.activated:
            raise InvalidInput("event_id", f"event {quote(event_id)} is deferred and not activated; call Activate first")
        if now > entry.deadline:
            return await self._late(event_id, slot, reward, now, reward_id)  # the sweeper closes it
        ps = self._states.get(entry.placement)
        how = ps.record.spec.reward_aggregation if ps is not None else "earliest"
        if how == "earliest" and (
            (ps is not None and ps.record.spec.learn_at == "window_close") or entry.rewards or (entry.writing and _FIRST in entry.writing)
        ):  # (a window holding a first reward from before a change to learn_at: reward keeps it)
            return await self._first_reward(event_id, slot, entry, reward, now)
        if how != "earliest":
            if reward_id:
                if entry.has_key(reward_id):
                    return RewardStatus.DUPLICATE  # a retry of a reward counted already
                first = entry.writing.get(reward_id) if entry.writing else None
                if first is not None:  # a retry while the first is being stored: its outcome is ours
                    await asyncio.shield(first)  # if that write fails, so does this call: retry it
                    return RewardStatus.DUPLICATE
            recorded = self._writer.record(RewardEvent(event_id, slot, reward, now, "agg", reward_id or None))
            # Every write in flight is tracked (under the caller's key, else one of its own), so
            # that the sweep never closes the window before the reward is counted in it.
            writing_key = reward_id or f"\x00{next(self._opened)}"
            entry.writing = entry.writing or {}
            entry.writing[writing_key] = recorded
            recorded.add_done_callback(lambda f: self._settle_recorded(f, entry, reward, reward_id, writing_key))
            await asyncio.shield(recorded)  # a caller that gives up leaves the reward to the callback
            return RewardStatus.RECORDED
        del self.open[key]
        close = Close(event_id, Outcome.REWARD, reward, now, entry.reward_cost, entry.budgets, slot, entry.cost)
        written = self._writer.close_window(close)
        self._closing[key] = (entry.placement, written)
        written.add_done_callback(lambda f: self._closed_write(key, f))
        try:
            ok = await asyncio.shield(written)
        except asyncio.CancelledError:
            # The caller gave up (its deadline) but the close is queued and may still land:
            # settle the window when it does, or reopen it if the write fails.
            written.add_done_callback(lambda f: self._after_abandoned(key, entry, close, f))
            raise
        except BaseException:
            self.open[key] = entry  # not stored: the window stays open for a retry
            raise
        if ok is None:
            return await self._reward_closed(event_id, slot, reward, now, reward_id)
        self._closed(event_id, entry, ok)
        # The row held a first reward (stored under learn_at: window_close before a change):
        # that one was learned, and this one is a duplicate.
        return RewardStatus.LEARNED if ok.reward == reward else RewardStatus.DUPLICATE

    async def _first_reward(self, event_id: str, slot: int, entry: OpenDecision, reward: float, now: float) -> str:
        """``learn_at: window_close``: the first reward is stored durably now and learned when the
        window closes, in decision order with the failures; any later one is a duplicate."""
        if entry.rewards:
            return RewardStatus.DUPLICATE
        first = entry.writing.get(_FIRST) if entry.writing else None
        if first is not None:  # the first is being stored: its outcome is ours
            await asyncio.shield(first)  # if that write fails, so does this call: retry it
            return RewardStatus.DUPLICATE
        # Stored on the decision's row, where a first reward sent to another server lands too:
        # whichever comes first is the one, and the close at the deadline takes it from the row.
        recorded = self._writer.record(RewardEvent(event_id, slot, reward, now, FIRST, None))
        entry.writing = entry.writing or {}
        entry.writing[_FIRST] = recorded

        def settle(f: asyncio.Future[bool]) -> None:
            if self._settle_recorded(f, entry, reward, "", _FIRST):
                # Fatigue and contact history know of the response now, not at the close.
                self._contacts.history.respond(event_id if slot == 0 else f"{event_id}#{slot}", reward > 0)

        recorded.add_done_callback(settle)
        if await asyncio.shield(recorded):  # a caller that gives up leaves the reward to the callback
            return RewardStatus.LEARNED
        return await self._first_refused(event_id, slot, reward, now)

    async def _first_refused(self, event_id: str, slot: int, reward: float, now: float) -> str:
        """A first reward the row did not take: it has one already (another server's: DUPLICATE),
        or the window closed meanwhile (learned: DUPLICATE; with the default: LATE)."""
        d = await self.find(event_id, slot)
        if d is None:
            raise self.unknown(event_id, slot, reward, quiet=batch_quiet.get())
        if d.outcome in (Outcome.OPEN, Outcome.REWARD):
            return RewardStatus.DUPLICATE
        return await self._late(event_id, slot, reward, now)

    def _closed_write(self, key: tuple[str, int], written: asyncio.Future[Close | None]) -> None:
        if key in self._closing and self._closing[key][1] is written:
            del self._closing[key]

    @staticmethod
    def _settle_recorded(f: asyncio.Future[bool], entry: OpenDecision, reward: float, reward_id: str, writing_key: str) -> bool:
        """Count a recorded reward (aggregated, or a window's first) once its write is durable,
        whether or not its caller still waits; a failed one, or a first the row did not take,
        is not counted and its key is free again. Returns whether it was counted."""
        if entry.writing is not None:
            entry.writing.pop(writing_key, None)
        if f.cancelled() or f.exception() is not None or not f.result():
            return False
        if reward_id:
            entry.add_key(reward_id)
        entry.add_reward(reward)
        return True

    @staticmethod
    def counted(entry: OpenDecision, reward: float, reward_id: str) -> None:
        """A stored aggregated reward, counted once per key (rebuilding after a restart)."""
        if reward_id:
            if entry.has_key(reward_id):
                return
            entry.add_key(reward_id)
        entry.add_reward(reward)

    def _closed(self, event_id: str, entry: OpenDecision, close: Close) -> None:
        """A window closed durably: settle its budget, update history, wake the learner."""
        if entry.budgets:
            held = entry.reward_cost + (0.0 if entry.activated else entry.cost)
            self._budgets.settle(entry.budgets, held, close.incurred)
        if not close.learnable:
            return
        self._metrics.closed(entry.placement, entry.arm_id, close.outcome == Outcome.REWARD)
        responded = close.outcome == Outcome.REWARD and close.reward > 0
        self._contacts.history.respond(event_id if close.slot == 0 else f"{event_id}#{close.slot}", responded)
        tally = self._acceptance.setdefault((entry.placement, entry.arm_id), [0, 0])
        tally[0] += responded
        tally[1] += 1
        self._learner.poke(entry.placement)

    def _after_abandoned(self, key: tuple[str, int], entry: OpenDecision, close: Close, written: asyncio.Future[Close | None]) -> None:
        if written.cancelled() or written.exception() is not None:
            self.add(key[0], key[1], entry)  # not stored: open again, and swept in time
        elif (as_stored := written.result()) is not None:
            self._closed(key[0], entry, as_stored)

    async def find(self, event_id: str, slot: int) -> LoggedDecision | None:
        """A decision from the database, once it can be there: this server's own unflushed
        decisions are flushed first; where other servers share the database, one not yet visible
        is looked for again for a short while (their group commit's interval), within the call's
        deadline (gRPC cancels the call then). None: unknown."""
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(self._reader_pool, self._store.find_decision, event_id, slot)
        if d is not None:
            return d
        if self._writer.pending:  # maybe decided here a moment ago, still queued or being written
            try:
                await asyncio.wait_for(self._writer.flush(), _FLUSH_WAIT)
            except TimeoutError:  # the database is slow or away: answer from what it has
                pass
            d = await loop.run_in_executor(self._reader_pool, self._store.find_decision, event_id, slot)
        delay, waited = 0.01, 0.0
        while d is None and self._settings.may_have_peers and waited < self._settings.peer_visibility_wait:
            await asyncio.sleep(delay)
            waited += delay
            delay *= 2
            d = await loop.run_in_executor(self._reader_pool, self._store.find_decision, event_id, slot)
        return d

    def unknown(self, event_id: str, slot: int, reward: float, quiet: bool = False) -> NotFound:
        """The error for a reward to an unknown event, logged (unless ``quiet``: RewardBatch
        logs one summary line for all its unknown events) and counted."""
        if not quiet:
            # Kept for diagnosis (a channel sending wrong ids): a structured log record and a counter.
            log.warning(
                "reward %r for unknown event %s",
                reward,
                quote(event_id),
                extra={"event": "reward_unknown_event", "event_id": event_id[:128], "reward": reward},
            )
        self._metrics.reward("unknown")
        return NotFound(f"event {quote(event_id)}" + (f" slot {slot}" if slot else "") + " is unknown")

    async def _reward_closed(self, event_id: str, slot: int, reward: float, now: float, reward_id: str = "") -> str:
        d = await self.find(event_id, slot)
        if d is None:
            raise self.unknown(event_id, slot, reward, quiet=batch_quiet.get())
        access.require(d.placement)
        self._check_magnitude(d.placement, reward)
        if d.outcome == Outcome.REWARD:
            return RewardStatus.DUPLICATE
        if d.outcome == Outcome.NO_ARM:
            raise InvalidInput("event_id", f"event {quote(event_id)} served no arm; there is nothing to reward")
        if d.outcome == Outcome.NOT_ACTIVATED:
            raise InvalidInput("event_id", f"event {quote(event_id)} was never activated; it is not learned")
        if d.outcome == Outcome.OPEN and d.activated and now <= d.deadline:
            # Open in the database but not in this process's memory: another server owns it.
            ps = self._states.get(d.placement)
            spec = ps.record.spec if ps is not None else None
            if spec is not None and spec.learn_at == "window_close" and spec.reward_aggregation == "earliest":
                # On the row, for the owner's close at the deadline (it takes it from there).
                if await self._writer.record(RewardEvent(event_id, slot, reward, now, FIRST, None)):
                    return RewardStatus.LEARNED
                return await self._first_refused(event_id, slot, reward, now)
            close = Close(event_id, Outcome.REWARD, reward, now, d.reward_cost, d.budgets, slot, d.cost)
            if (as_stored := await self._writer.close_window(close)) is not None:
                self._learner.poke(d.placement)
                return RewardStatus.LEARNED if as_stored.reward == reward else RewardStatus.DUPLICATE
            return await self._reward_closed(event_id, slot, reward, now, reward_id)
        return await self._late(event_id, slot, reward, now, reward_id)

    async def _late(self, event_id: str, slot: int, reward: float, now: float, reward_id: str = "") -> str:
        await self._writer.record(RewardEvent(event_id, slot, reward, now, "late", reward_id or None))
        return RewardStatus.LATE

    # -- Activate -----------------------------------------------------------------------------

    async def activate(self, event_id: str) -> str:
        """A deferred decision was shown: count its impressions, spend, start its windows."""
        if not event_id:
            raise InvalidInput("event_id", "must not be empty")
        check_text(event_id, "event_id", self._settings.max_id_length)
        now = self._clock()
        slots = self.slots_of(event_id)
        if not slots:
            d = await self.find(event_id, 0)
            if d is None:
                raise NotFound(f"event {quote(event_id)} is unknown")
            access.require(d.placement)
            expired = d.outcome == Outcome.NOT_ACTIVATED or not d.activated
            return ActivateStatus.EXPIRED if expired else ActivateStatus.ALREADY_ACTIVE
        for slot in slots:
            access.require(self.open[(event_id, slot)].placement)
        status = ActivateStatus.ALREADY_ACTIVE
        for slot in slots:
            entry = self.open[(event_id, slot)]
            if entry.activated:
                continue
            if now > entry.deadline:
                status = ActivateStatus.EXPIRED
                continue
            ps = self._states.get(entry.placement)
            window = ps.record.spec.reward_window if ps is not None else 600.0
            act = Activation(event_id, now, now + window, entry.cost, entry.budgets, slot)
            if not await self._writer.activate(act):
                continue
            entry.activated, entry.deadline = True, now + window
            heapq.heappush(self._deadlines, (entry.deadline, next(self._opened), event_id, slot))
            if entry.budgets:
                self._budgets.settle(entry.budgets, entry.cost, incurred=True)  # held impression cost is spent
            if entry.customer_id and self._contacts.history.horizon > 0:
                if self._contacts.shared is not None:  # shown now: it counts from now, on every server
                    row = ContactRow(entry.customer_id, now, entry.placement, entry.arm_id, event_id, slot)
                    await self._contacts.shared.record_now(entry.customer_id, [row])
                else:
                    ev = event_id if slot == 0 else f"{event_id}#{slot}"
                    self._contacts.history.record(entry.customer_id, Impression(now, entry.arm_id, entry.campaign, entry.placement, ev))
            status = ActivateStatus.ACTIVATED
        return status

    # -- closing windows ------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Close every expired window: with the aggregate of its rewards, or the default reward;
        a deferred decision never activated is dropped. Returns how many windows closed."""
        now = self._clock()
        closing: list[tuple[tuple[str, int], OpenDecision, Close]] = []
        later: list[tuple[float, int, str, int]] = []
        while self._deadlines and self._deadlines[0][0] < now:
            item = heapq.heappop(self._deadlines)
            deadline, _, event_id, slot = item
            entry = self.open.get((event_id, slot))
            if entry is None or entry.deadline != deadline:
                continue
            if entry.writing:  # a reward accepted in time is still being stored: close it next sweep, with it
                later.append(item)
                continue
            del self.open[(event_id, slot)]
            ps = self._states.get(entry.placement)
            spec = ps.record.spec if ps is not None else None
            if not entry.activated:
                outcome, value = Outcome.NOT_ACTIVATED, 0.0
            elif entry.rewards:
                outcome, value = Outcome.REWARD, aggregate(spec.reward_aggregation if spec else "sum", entry.rewards)
            else:
                outcome, value = Outcome.DEFAULT, spec.default_reward if spec is not None else 0.0
            close = Close(event_id, outcome, value, now, entry.reward_cost, entry.budgets, slot, entry.cost)
            closing.append(((event_id, slot), entry, close))
        for item in later:
            heapq.heappush(self._deadlines, item)
        if not closing:
            return 0
        results = await asyncio.gather(*(self._writer.close_window(c) for _, _, c in closing), return_exceptions=True)
        closed = 0
        for (key, entry, _), res in zip(closing, results, strict=True):
            if isinstance(res, RecordRefused):  # retrying fails again: the window is given up
                log.error("closing the window of event %s slot %d was refused; it is dropped", quote(key[0]), key[1])
                if entry.budgets:  # in memory only: the database refused to record anything
                    self._budgets.settle(entry.budgets, entry.reward_cost + (0.0 if entry.activated else entry.cost), False)
            elif isinstance(res, BaseException):  # retry on a later sweep
                self.add(key[0], key[1], entry)
            elif res is not None:  # as stored: a DEFAULT close may have taken a first reward from the row
                closed += 1
                self._closed(key[0], entry, res)
        return closed

    async def adopt(self, starting: bool = False) -> int:
        """Take over the open windows of servers that stopped (at start: also this server's own
        before a restart), with the rewards they had gathered; a live server's stay with it.
        Returns how many windows were taken over."""
        loop = asyncio.get_running_loop()
        live_since = self._clock() - self._settings.live_for if self._settings.may_have_peers else None
        taken = sorted(  # opened in decision order, so that they close (and are learned) in it
            (
                d
                for d in await loop.run_in_executor(self._reader_pool, self._store.adopt_open, live_since, starting)
                if (d.event_id, d.slot) not in self.open
            ),
            key=lambda d: (d.timestamp, d.slot),
        )
        if not taken:
            return 0
        # Their gathered rewards are read before any of them opens here, so that from the moment
        # a window is open on this server (no await in between) it holds them: a Reward or a
        # sweep never sees it half taken over.
        keys = {(d.event_id, d.slot) for d in taken}
        events = await loop.run_in_executor(self._reader_pool, self._store.open_reward_events)
        for d in taken:
            if (d.event_id, d.slot) in self.open:  # decided here meanwhile (a reused id): keep ours
                keys.discard((d.event_id, d.slot))
                continue
            ps = self._states.get(d.placement)
            campaign = ps.arm_campaigns.get(d.arm_id or "") if ps else None
            entry = OpenDecision(
                d.placement, d.deadline, d.arm_id or "", d.customer_id, campaign, d.cost, d.reward_cost, d.budgets, d.activated
            )
            if d.reward is not None:  # a first reward on the row (learn_at: window_close)
                entry.add_reward(d.reward)
            self.add(d.event_id, d.slot, entry)
        for ev in events:
            held = self.open.get((ev.event_id, ev.slot))
            if held is not None and (ev.event_id, ev.slot) in keys:
                self.counted(held, ev.reward, ev.reward_id or "")
        return len(taken)

    # -- RewardBatch ----------------------------------------------------------------------------

    async def placement_of(self, event_id: str) -> str | None:
        """The placement of an event (None: unknown), for placement-limited tokens."""
        for slot in self.slots_of(event_id)[:1]:
            return self.open[(event_id, slot)].placement
        loop = asyncio.get_running_loop()
        d = await loop.run_in_executor(self._reader_pool, self._store.find_decision, event_id, 0)
        return None if d is None else d.placement

    async def reward_batch(self, items: Sequence[tuple[str, float, int, str]]) -> list[str | NextbestError]:
        """Several rewards at once: all are checked before any is stored (InvalidInput naming
        ``rewards[i]``), then each is handled as its own Reward; their writes share group
        commits. Per item: its status, or the domain error it failed with."""
        if len(items) > self._settings.max_reward_batch:
            raise InvalidInput("rewards", f"more than {self._settings.max_reward_batch} rewards in one call")
        for i, (event_id, reward, slot, reward_id) in enumerate(items):
            self.check(event_id, reward, slot, f"rewards[{i}].", reward_id)
        if access.current.get() is not None:
            # One event of a placement the caller may not use denies the whole call, before any
            # is stored; each reward checks again on the read it acts on (bandit/access.py).
            for event_id in dict.fromkeys(e for e, _, _, _ in items):
                placement = await self.placement_of(event_id)
                if placement is not None:
                    access.require(placement)
        quiet = batch_quiet.set(True)
        try:
            results = await asyncio.gather(*(self.reward(e, r, s, k) for e, r, s, k in items), return_exceptions=True)
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
                "reward batch of %d named %d unknown events, e.g. %s",
                len(items),
                len(unknown),
                quote(unknown[0]),
                extra={"event": "reward_unknown_event", "event_id": unknown[0][:128], "unknown": len(unknown)},
            )
        return out
