"""Reward windows: the Reward path, Activate, and the closing of windows.

A decision's window opens when it is shown (at Choose, or at Activate for a deferred one) and
closes at its deadline (or, under ``earliest`` with ``learn_at: reward``, at its first reward).
A closed window gets a position in the learn sequence and is learned exactly once.

Every write that acts on a decision is bound to it: the row must be of the window's placement
and, for the server holding the window, still held by it (storage/base.py Close.placement).
What is learned at the close is decided on the row, in the close's transaction: the first
reward stored on it and the "agg" reward events of every server. A server's memory is a cache
of its rows; no server closes another's window early or replaces what it stored.

The Reward decision table. "here": this server holds the window in memory; "elsewhere": the
row is open and another server holds it (or none: a stopped server's, closed by the orphan
closer or taken over). Policy: engine/reward_policy.py (aggregation x learn_at).

  window (as found)           policy          where      answer      stored                       learned
  --------------------------  --------------  ---------  ----------  ---------------------------  ----------------------------
  open, activated             AT_REWARD       here       LEARNED     close REWARD r               at once, r
  open, activated             AT_REWARD       elsewhere  LEARNED     close REWARD r (row bound)   at once, r
  open, activated             FIRST_AT_CLOSE  either     LEARNED     r on the row (first)         at the close, r
  open, has a first reward    FIRST_AT_CLOSE  either     DUPLICATE   nothing                      -
  open, activated             AGGREGATE       either     RECORDED    "agg" event (key once)       at the close, the aggregate
  open, key counted already   AGGREGATE       either     DUPLICATE   nothing                      -
  open, deferred              any             either     INVALID_ARGUMENT (activate first)        -
  past its deadline           any             either     LATE        "late" event                 never
  past it, has a first reward AT_REWARD/FIRST either     DUPLICATE   nothing                      -
  closed with a reward        AT_REWARD/FIRST either     DUPLICATE   nothing                      -
  closed with a reward        AGGREGATE       -          LATE        "late" event                 never
  closed with the default     any             -          LATE        "late" event                 never
  no arm / never activated    any             -          INVALID_ARGUMENT                         -
  unknown, or another placement's for a limited token:   NOT_FOUND (the same answer)              -

Activate: held here, the window's row is activated (bound to its placement and owner); held
elsewhere, the row is activated bound to its placement, and the holder's close of the
unactivated window finds it activated and keeps the window open to its reward deadline.

A write that finds the row no longer as the window knew it (closed meanwhile, taken over)
reads the row again and answers from it: the same table, one level down. Retries are safe: a
key (``reward_id``) is stored once per window, a first reward once per row.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

from nextbest.bandit import access
from nextbest.bandit.contact import Impression
from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.bandit.errors import InvalidInput, NotFound, Unavailable
from nextbest.bandit.spec import MAX_ABS_REWARD_LIMIT, PlacementSpec
from nextbest.bandit.text import check_text, quote
from nextbest.engine.budgets import BudgetKeeper
from nextbest.engine.contacts import Contacts
from nextbest.engine.learner import Learner, PlacementState
from nextbest.engine.open_windows import MAX_POSITIONS, Key, OpenDecision, OpenWindows
from nextbest.engine.reward_policy import ActivateStatus, Policy, RewardStatus, aggregation_of, policy_of
from nextbest.engine.writer import BatchWriter
from nextbest.settings import Settings
from nextbest.storage.base import FIRST, Activation, Close, ContactRow, Recorded, RewardEvent, Store
from nextbest.storage.refusal import RecordRefused
from nextbest.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

_FLUSH_WAIT = 2.0  # seconds an unknown event's Reward waits for this server's queued decisions

# Set by RewardBatch, which logs one line for all its unknown events instead of one each.
batch_quiet: ContextVar[bool] = ContextVar("nextbest_batch_quiet", default=False)

# The in-flight key of a window's first reward (a NUL never comes from a caller: ids are
# checked for it at the edge).
_FIRST = "\x00first"

__all__ = ["ActivateStatus", "OpenDecision", "RewardStatus", "RewardWindows", "batch_quiet"]


class RewardWindows:
    """Reward, Activate and window closing; a part of the Engine, on its event loop."""

    def __init__(
        self,
        *,
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
        server_id: str | None = None,
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
        self.server_id = server_id  # written on this server's rows (decisions.owner)
        self.windows = OpenWindows()
        self.open = self.windows.open  # (event_id, position) -> OpenDecision
        # Windows whose closing reward is being stored: a second Reward for one of them (a
        # retry, or two at once) waits for that write and answers DUPLICATE, as it would once
        # the write is durable, instead of looking in the database too early (NOT_FOUND).
        self._closing: dict[Key, tuple[str, asyncio.Future[Close | None]]] = {}

    def add(self, event_id: str, position: int, entry: OpenDecision) -> None:
        if entry.owner is None:
            entry.owner = self.server_id
        self.windows.add(event_id, position, entry)

    def slots_of(self, event_id: str) -> list[int]:
        return self.windows.positions(event_id)

    def spec(self, placement: str) -> PlacementSpec | None:
        ps = self._states.get(placement)
        return ps.record.spec if ps is not None else None

    # -- Reward: checks ---------------------------------------------------------------------

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
        if not 0 <= slot < MAX_POSITIONS:
            raise InvalidInput(f"{field}slot", f"must be between 0 and {MAX_POSITIONS - 1}, got {slot}")

    def _check_magnitude(self, placement: str, reward: float) -> None:
        """A reward larger than its placement's ``max_abs_reward``: one such outlier learned
        would swamp the model's estimates (a 1e13 reward put a trained SquareCB placement's
        best arm from 0.99 to uniform, for good)."""
        spec = self.spec(placement)
        bound = spec.max_abs_reward if spec is not None else MAX_ABS_REWARD_LIMIT
        if abs(reward) > bound:
            raise InvalidInput("reward", f"magnitude {abs(reward):g} is above the placement's max_abs_reward {bound:g}")

    def _visible(self, placement: str, event_id: str, slot: int, reward: float) -> None:
        """NOT_FOUND, as for an unknown event, unless the caller may use the placement."""
        if not access.allows(placement):
            raise self.unknown(event_id, slot, reward, quiet=True)

    # -- Reward: dispatch ---------------------------------------------------------------------

    async def reward(self, event_id: str, reward: float, slot: int = 0, reward_id: str = "") -> RewardStatus:
        """Store the reward durably, then let the learner have it; learned at most once.
        The cases are the rows of the module's table."""
        self.check(event_id, reward, slot, "", reward_id)
        now = self._clock()
        key = (event_id, slot)
        entry = self.windows.get(key)
        if entry is None:
            return await self._not_held(key, reward, now, reward_id)
        self._visible(entry.placement, event_id, slot, reward)
        self._check_magnitude(entry.placement, reward)
        if not entry.activated:
            if now > entry.deadline:  # as from its row: Activate answers EXPIRED now
                raise InvalidInput("event_id", f"event {quote(event_id)} was never activated; it is not learned")
            raise InvalidInput("event_id", f"event {quote(event_id)} is deferred and not activated; call Activate first")
        if now > entry.deadline:
            return await self._past_deadline(key, entry, reward, now, reward_id)  # the sweeper closes it
        policy = policy_of(self.spec(entry.placement))
        if policy is Policy.AT_REWARD and (entry.rewards or (entry.writing and _FIRST in entry.writing)):
            policy = Policy.FIRST_AT_CLOSE  # a first reward stored before a change to learn_at: reward stays the one
        if policy is Policy.AT_REWARD:
            return await self._learn_here(key, entry, reward, now)
        if policy is Policy.FIRST_AT_CLOSE:
            return await self._first_here(key, entry, reward, now)
        return await self._gather_here(key, entry, reward, now, reward_id)

    async def _not_held(self, key: Key, reward: float, now: float, reward_id: str) -> RewardStatus:
        """No window here: being closed here a moment ago, or another server's, or closed."""
        closing = self._closing.get(key)
        if closing is not None:
            self._visible(closing[0], key[0], key[1], reward)
            if await asyncio.shield(closing[1]) is not None:  # if that write fails, so does this call: retry it
                return RewardStatus.DUPLICATE
        d = await self.find(key[0], key[1])
        if d is None:
            raise self.unknown(key[0], key[1], reward, quiet=batch_quiet.get())
        self._visible(d.placement, key[0], key[1], reward)
        self._check_magnitude(d.placement, reward)
        return await self._on_row(d, reward, now, reward_id)

    async def _on_row(self, d: LoggedDecision, reward: float, now: float, reward_id: str, again: bool = True) -> RewardStatus:
        """The table's rows for a window not held here, from its row as read. ``again``: a
        write the row refused may read it once more (it changed in between)."""
        key = (d.event_id, d.slot)
        policy = policy_of(self.spec(d.placement))
        if d.outcome == Outcome.NO_ARM:
            raise InvalidInput("event_id", f"event {quote(d.event_id)} served no arm; there is nothing to reward")
        if d.outcome == Outcome.NOT_ACTIVATED or (d.outcome == Outcome.OPEN and not d.activated and now > d.deadline):
            raise InvalidInput("event_id", f"event {quote(d.event_id)} was never activated; it is not learned")
        if d.outcome == Outcome.OPEN and not d.activated:
            raise InvalidInput("event_id", f"event {quote(d.event_id)} is deferred and not activated; call Activate first")
        if d.outcome == Outcome.OPEN and now <= d.deadline and again:
            if policy is Policy.AT_REWARD and d.reward is None:
                return await self._learn_elsewhere(d, reward, now)
            if policy is Policy.AGGREGATE:
                return await self._gather_elsewhere(d, reward, now, reward_id)
            return await self._first_elsewhere(d, reward, now)
        if d.outcome == Outcome.REWARD and policy is not Policy.AGGREGATE:
            return RewardStatus.DUPLICATE
        if d.outcome == Outcome.OPEN and d.reward is not None and policy is not Policy.AGGREGATE:
            return RewardStatus.DUPLICATE  # a first reward waits on the row for the close
        return await self._late(key, reward, now, reward_id)

    async def _reread(self, key: Key, reward: float, now: float, reward_id: str, here: bool = False) -> RewardStatus:
        """A write the row refused: the window changed (closed, taken over); answer from the row.
        ``here``: the refused write was this server's own window's, bound to its owner: the row
        may be open and another server's now (taken over), and is written as such, once."""
        d = await self.find(key[0], key[1])
        if d is None:
            raise self.unknown(key[0], key[1], reward, quiet=batch_quiet.get())
        # The row may be another decision than the window knew (a Choose whose id the store
        # refused, not yet undone): the caller's rights and the bound are checked on it again.
        self._visible(d.placement, key[0], key[1], reward)
        self._check_magnitude(d.placement, reward)
        return await self._on_row(d, reward, now, reward_id, again=here)

    # -- Reward: the cases ----------------------------------------------------------------------

    async def _learn_here(self, key: Key, entry: OpenDecision, reward: float, now: float) -> RewardStatus:
        """AT_REWARD, held here: the reward closes the window and is learned at once."""
        self.windows.drop(key, entry)
        close = entry.close(key[0], key[1], Outcome.REWARD, reward, now, None)
        written = self._writer.close_window(close)
        self._closing[key] = (entry.placement, written)
        written.add_done_callback(lambda f: self._closed_write(key, f))
        try:
            as_stored = await asyncio.shield(written)
        except asyncio.CancelledError:
            # The caller gave up (its deadline) but the close is queued and may still land:
            # settle the window when it does, or reopen it if the write fails.
            written.add_done_callback(lambda f: self._after_abandoned(key, entry, f))
            raise
        except BaseException:
            self.add(key[0], key[1], entry)  # not stored: the window stays open for a retry
            raise
        if as_stored is None:  # the row changed under the window (closed, taken over)
            return await self._reread(key, reward, now, "", here=True)
        self._closed(key[0], entry, as_stored)
        # The row held a first reward (stored under learn_at: window_close before a change):
        # that one was learned, and this one is a duplicate.
        return RewardStatus.LEARNED if as_stored.reward == reward else RewardStatus.DUPLICATE

    async def _learn_elsewhere(self, d: LoggedDecision, reward: float, now: float) -> RewardStatus:
        """AT_REWARD, another server's window: closed on its row, learned at once; the owner's
        own close at its deadline then finds it closed."""
        close = Close(d.event_id, Outcome.REWARD, reward, now, d.reward_cost, d.budgets, d.slot, d.cost, placement=d.placement)
        as_stored = await self._writer.close_window(close)
        if as_stored is None:
            return await self._reread((d.event_id, d.slot), reward, now, "")
        self._learner.poke(d.placement)
        return RewardStatus.LEARNED if as_stored.reward == reward else RewardStatus.DUPLICATE

    async def _first_here(self, key: Key, entry: OpenDecision, reward: float, now: float) -> RewardStatus:
        """FIRST_AT_CLOSE, held here: the first reward is stored on the row now and learned when
        the window closes, in decision order with the failures; any later one is a duplicate."""
        if entry.rewards:
            return RewardStatus.DUPLICATE
        first = entry.writing.get(_FIRST) if entry.writing else None
        if first is not None:  # the first is being stored: its outcome is ours
            if await asyncio.shield(first) is Recorded.STORED:  # if that write fails, so does this call: retry it
                return RewardStatus.DUPLICATE
        ev = RewardEvent(key[0], key[1], reward, now, FIRST, None, placement=entry.placement, owner=entry.owner)
        event_key = key[0] if key[1] == 0 else f"{key[0]}#{key[1]}"
        # Once stored, fatigue and contact history know of the response now, not at the close.
        recorded = self._track(
            entry, _FIRST, self._writer.record(ev), reward, "", lambda: self._contacts.history.respond(event_key, reward > 0)
        )
        result = await asyncio.shield(recorded)  # a caller that gives up leaves the reward to the callback
        if result is Recorded.STORED:
            return RewardStatus.LEARNED
        if result is Recorded.DUPLICATE:
            return RewardStatus.DUPLICATE
        return await self._reread(key, reward, now, "", here=True)

    async def _first_elsewhere(self, d: LoggedDecision, reward: float, now: float) -> RewardStatus:
        """FIRST_AT_CLOSE, another server's window: on the row, for the owner's close at the
        deadline (it takes it from there): whichever server's first reward comes first is the one."""
        ev = RewardEvent(d.event_id, d.slot, reward, now, FIRST, None, placement=d.placement)
        result = await self._writer.record(ev)
        if result is Recorded.STORED:
            return RewardStatus.LEARNED
        if result is Recorded.DUPLICATE:
            return RewardStatus.DUPLICATE
        return await self._reread((d.event_id, d.slot), reward, now, "")

    async def _gather_here(self, key: Key, entry: OpenDecision, reward: float, now: float, reward_id: str) -> RewardStatus:
        """AGGREGATE, held here: the reward is stored as an "agg" event of the window's row; the
        close folds every such event in, whichever server stored it."""
        if reward_id:
            if entry.has_key(reward_id):
                return RewardStatus.DUPLICATE  # a retry of a reward counted already
            first = entry.writing.get(reward_id) if entry.writing else None
            if first is not None:  # a retry while the first is being stored: its outcome is ours
                if await asyncio.shield(first) is not Recorded.CLOSED:  # if that write fails, so does this call
                    return RewardStatus.DUPLICATE
        ev = RewardEvent(key[0], key[1], reward, now, "agg", reward_id or None, placement=entry.placement, owner=entry.owner)
        # Every write in flight is tracked (under the caller's key, else one of its own), so
        # that the sweep never closes the window before the reward is counted in it.
        recorded = self._track(entry, reward_id or self.windows.unique_key(), self._writer.record(ev), reward, reward_id)
        result = await asyncio.shield(recorded)  # a caller that gives up leaves the reward to the callback
        if result is Recorded.STORED:
            return RewardStatus.RECORDED
        if result is Recorded.DUPLICATE:
            return RewardStatus.DUPLICATE
        return await self._reread(key, reward, now, reward_id, here=True)

    async def _gather_elsewhere(self, d: LoggedDecision, reward: float, now: float, reward_id: str) -> RewardStatus:
        """AGGREGATE, another server's window: an "agg" event on its row, folded in at its close."""
        ev = RewardEvent(d.event_id, d.slot, reward, now, "agg", reward_id or None, placement=d.placement)
        result = await self._writer.record(ev)
        if result is Recorded.STORED:
            return RewardStatus.RECORDED
        if result is Recorded.DUPLICATE:
            return RewardStatus.DUPLICATE
        return await self._reread((d.event_id, d.slot), reward, now, reward_id)

    async def _past_deadline(self, key: Key, entry: OpenDecision, reward: float, now: float, reward_id: str) -> RewardStatus:
        """Held here, past its deadline, not swept yet: LATE, unless the window has its first
        reward (AT_REWARD, FIRST_AT_CLOSE), stored from here or elsewhere: DUPLICATE, as the
        other servers answer from the row and as it is once closed."""
        if policy_of(self.spec(entry.placement)) is not Policy.AGGREGATE:
            if entry.rewards:
                return RewardStatus.DUPLICATE
            first = entry.writing.get(_FIRST) if entry.writing else None
            if first is not None and await asyncio.shield(first) is Recorded.STORED:
                return RewardStatus.DUPLICATE
            d = await self.find(key[0], key[1])
            if d is not None and d.reward is not None:
                return RewardStatus.DUPLICATE  # another server's first, on the row
        return await self._late(key, reward, now, reward_id)

    async def _late(self, key: Key, reward: float, now: float, reward_id: str = "") -> RewardStatus:
        """Kept beside the log, never learned; a key stored before (a retry) is a duplicate."""
        result = await self._writer.record(RewardEvent(key[0], key[1], reward, now, "late", reward_id or None))
        return RewardStatus.DUPLICATE if result is Recorded.DUPLICATE else RewardStatus.LATE

    # -- Reward: bookkeeping -------------------------------------------------------------------

    @staticmethod
    def _track(
        entry: OpenDecision,
        writing_key: str,
        fut: asyncio.Future[Recorded],
        reward: float,
        reward_id: str,
        on_stored: Callable[[], None] | None = None,
    ) -> asyncio.Future[Recorded]:
        """Note a reward write in flight on its window (the sweep waits for it) and count the
        reward once it is stored on the window's row, whether or not its caller still waits; a
        failed or refused one is not counted and its key is free again."""
        if entry.writing is None:
            entry.writing = {}
        entry.writing[writing_key] = fut  # type: ignore[assignment]

        def settle(f: asyncio.Future[Recorded]) -> None:
            if entry.writing is not None:
                entry.writing.pop(writing_key, None)
            if f.cancelled() or f.exception() is not None or f.result() is not Recorded.STORED:
                return
            entry.add_reward(reward, reward_id)
            if on_stored is not None:
                on_stored()

        fut.add_done_callback(settle)
        return fut

    def _closed_write(self, key: Key, written: asyncio.Future[Close | None]) -> None:
        if key in self._closing and self._closing[key][1] is written:
            del self._closing[key]

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

    def _after_abandoned(self, key: Key, entry: OpenDecision, written: asyncio.Future[Close | None]) -> None:
        if written.cancelled() or written.exception() is not None:
            self.add(key[0], key[1], entry)  # not stored: open again, and swept in time
        elif (as_stored := written.result()) is not None:
            self._closed(key[0], entry, as_stored)

    # -- finding decisions ----------------------------------------------------------------------

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
        if d is None and self._settings.may_have_peers:
            await self._maybe_unlogged(event_id)
        return d

    async def _maybe_unlogged(self, event_id: str) -> None:
        """Unavailable if a live server made the id (server-made ids name it: Chooser._new_id)
        and has not logged the decision yet (its group commit is late, or it is stalled): the
        event may exist, and a retry finds it. An id of a stopped server, or of none, is unknown."""
        maker, dash, rest = event_id.partition("-")
        if not dash or len(maker) != 16 or len(rest) != 32 or maker == self.server_id:
            return
        since = self._clock() - self._settings.live_for
        alive = await asyncio.get_running_loop().run_in_executor(self._reader_pool, self._store.server_alive, maker, since)
        if alive:
            raise Unavailable(f"event {quote(event_id)} is not logged yet by the server that made it; retry")

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

    # -- Activate -----------------------------------------------------------------------------

    async def activate(self, event_id: str) -> ActivateStatus:
        """A deferred decision was shown: count its impressions, spend, start its windows."""
        if not event_id:
            raise InvalidInput("event_id", "must not be empty")
        check_text(event_id, "event_id", self._settings.max_id_length)
        now = self._clock()
        positions = self.slots_of(event_id)
        if not positions:
            d = await self.find(event_id, 0)
            if d is None or not access.allows(d.placement):
                raise NotFound(f"event {quote(event_id)} is unknown")
            return await self._activate_elsewhere(d, now)
        for p in positions:
            if not access.allows(self.open[(event_id, p)].placement):
                raise NotFound(f"event {quote(event_id)} is unknown")
        status = ActivateStatus.ALREADY_ACTIVE
        for p in positions:
            entry = self.open.get((event_id, p))
            if entry is None or entry.activated:
                continue
            if now > entry.deadline:
                status = ActivateStatus.EXPIRED
                continue
            spec = self.spec(entry.placement)
            window = spec.reward_window if spec is not None else 600.0
            act = Activation(event_id, now, now + window, entry.cost, entry.budgets, p, placement=entry.placement, owner=entry.owner)
            if not await self._writer.activate(act):
                continue
            entry.activated, entry.deadline = True, now + window
            self.windows.moved(event_id, p, entry)
            if entry.budgets:
                self._budgets.settle(entry.budgets, entry.cost, incurred=True)  # held impression cost is spent
            if entry.customer_id and self._contacts.history.horizon > 0:
                if self._contacts.shared is not None:  # shown now: it counts from now, on every server
                    row = ContactRow(entry.customer_id, now, entry.placement, entry.arm_id, event_id, p)
                    await self._contacts.shared.record_now(entry.customer_id, [row])
                else:
                    ev = event_id if p == 0 else f"{event_id}#{p}"
                    self._contacts.history.record(entry.customer_id, Impression(now, entry.arm_id, entry.campaign, entry.placement, ev))
            status = ActivateStatus.ACTIVATED
        return status

    async def _activate_elsewhere(self, first: LoggedDecision, now: float) -> ActivateStatus:
        """A deferred decision another server holds (or none): activated on its rows, bound to
        their placement; the holder's window learns of it when its activation deadline passes
        (the close of an unactivated window finds the row activated and reopens: sweep)."""
        if first.outcome != Outcome.OPEN:
            return ActivateStatus.EXPIRED if first.outcome == Outcome.NOT_ACTIVATED else ActivateStatus.ALREADY_ACTIVE
        if first.activated:
            return ActivateStatus.ALREADY_ACTIVE
        if now > first.deadline:
            return ActivateStatus.EXPIRED
        loop = asyncio.get_running_loop()
        rows = [first]
        for p in range(1, MAX_POSITIONS):  # the event's other positions, in one Choose's rows
            d = await loop.run_in_executor(self._reader_pool, self._store.find_decision, first.event_id, p)
            if d is None:
                break
            rows.append(d)
        spec = self.spec(first.placement)
        window = spec.reward_window if spec is not None else 600.0
        status = ActivateStatus.ALREADY_ACTIVE
        for d in rows:
            if d.outcome != Outcome.OPEN or d.activated or d.placement != first.placement:
                continue
            act = Activation(d.event_id, now, now + window, d.cost, d.budgets, d.slot, placement=d.placement)
            if await self._writer.activate(act):
                status = ActivateStatus.ACTIVATED
                if d.customer_id and d.arm_id and self._contacts.shared is not None:
                    row = ContactRow(d.customer_id, now, d.placement, d.arm_id, d.event_id, d.slot)
                    await self._contacts.shared.record_now(d.customer_id, [row])
        return status

    async def _activated_elsewhere(self, key: Key, entry: OpenDecision) -> None:
        """The close of an unactivated window closed nothing: another server activated its row.
        The window goes on here, as the row says (activated, its reward deadline)."""
        d = await asyncio.get_running_loop().run_in_executor(self._reader_pool, self._store.find_decision, key[0], key[1])
        if d is None or d.outcome != Outcome.OPEN or not d.activated or key in self.open:
            return
        entry.activated, entry.deadline = True, d.deadline
        if entry.budgets:
            self._budgets.settle(entry.budgets, entry.cost, incurred=True)  # the held impression cost is spent
        self.add(key[0], key[1], entry)

    # -- closing windows ------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Close every expired window, with what its row gathered (the first reward, the
        aggregate of the "agg" events of every server) or the default reward; a deferred
        decision never activated is dropped. Returns how many windows closed."""
        now = self._clock()
        closing: list[tuple[Key, OpenDecision, Close]] = []
        later = []
        for item, entry in self.windows.expired(now):
            key = (item[2], item[3])
            if entry.writing:  # a reward accepted in time is still being stored: close it next sweep, with it
                later.append(item)
                continue
            del self.open[key]
            spec = self.spec(entry.placement)
            if not entry.activated:
                close = entry.close(key[0], key[1], Outcome.NOT_ACTIVATED, 0.0, now, None)
            else:
                default = spec.default_reward if spec is not None else 0.0
                close = entry.close(key[0], key[1], Outcome.DEFAULT, default, now, aggregation_of(spec))
            closing.append((key, entry, close))
        for item in later:
            self.windows.later(item)
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
            elif res is not None:  # as stored: the row's first reward or aggregate, else the default
                closed += 1
                self._closed(key[0], entry, res)
            elif not entry.activated:  # activated on another server meanwhile: it goes on here
                await self._activated_elsewhere(key, entry)
        return closed

    def forget(self, key: Key, entry: OpenDecision) -> None:
        """A window whose decision was not logged (its id is another decision's): gone."""
        self.windows.drop(key, entry)
