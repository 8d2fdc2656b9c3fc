"""ReportConversions: purchases from billing (issue #31), attributed to decisions, learned as rewards.

A conversion names a customer and an arm or a billing product, never an event. The desk:

  validate all  ->  resolve each to arms  ->  read the customers' touches (one read)  ->  attribute
    ->  record the batch with its credits (one transaction)  ->  a reward per credit

Validation and resolution refuse the whole batch (InvalidInput naming ``conversions[i].<field>``)
before anything is written: nothing is half-applied. The credits are stored with their
conversion, once (a conversion id seen before is DUPLICATE and answered with its stored
credits). Each credit then goes the way a Reward goes (RewardWindows.reward, keyed by the
conversion id), which gives it durability, idempotency per key, LATE after the decision's
window, the placement's aggregation and learn_at. An answer is given only after the batch's
commit and every reward call returned: what was acknowledged is durable.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nextbest.bandit.attribution import Conversion, Credit, Touch, attribute
from nextbest.bandit.errors import InvalidInput, NextbestError
from nextbest.bandit.spec import MAX_ABS_REWARD_LIMIT, AttributionSpec
from nextbest.bandit.text import quote
from nextbest.engine.conversion_result import MAX_AGE, ConversionResult, ConversionStatus
from nextbest.engine.learner import PlacementState
from nextbest.engine.windows import RewardWindows, batch_quiet
from nextbest.engine.writer import BatchWriter
from nextbest.settings import Settings
from nextbest.storage.base import Store, TouchRange

_REWARD_KEY = 128  # RewardRequest.reward_id's limit

# The stored ids' column width (conversions.conversion_id, customer_id): a longer id, allowed by a
# raised max_id_length, is refused as INVALID_ARGUMENT, never by the database.
_MAX_STORED_ID = 256


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A conversion and what it can be credited to: (placement, arm) pairs and their rules."""

    conversion: Conversion
    arms: frozenset[tuple[str, str]]
    rules: Mapping[str, AttributionSpec]


def _result(new: bool, credits: Sequence[Credit], stored: Sequence[Credit]) -> ConversionResult:
    """A new conversion's status by its credits; a duplicate's with the credits stored for it."""
    if not new:
        return ConversionResult(ConversionStatus.DUPLICATE, tuple(stored))
    return ConversionResult(ConversionStatus.ATTRIBUTED if credits else ConversionStatus.UNATTRIBUTED, tuple(credits))


def reward_key(conversion_id: str) -> str:
    """The reward_id of a conversion's credits: ``conversion:<id>``, or a digest of a long id
    (a conversion id may be as long as max_id_length, a reward key at most 128 characters)."""
    key = f"conversion:{conversion_id}"
    if len(key) <= _REWARD_KEY:
        return key
    return "conversion#" + hashlib.sha256(conversion_id.encode()).hexdigest()


class ConversionDesk:
    """The ReportConversions path of an engine."""

    def __init__(
        self,
        *,
        store: Store,
        reader_pool: ThreadPoolExecutor,
        writer_pool: ThreadPoolExecutor,
        states: dict[str, PlacementState],
        windows: RewardWindows,
        writer: BatchWriter,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._writer = writer
        self._reader_pool = reader_pool
        self._writer_pool = writer_pool
        self._states = states
        self._windows = windows
        self._settings = settings
        self._clock = clock

    async def report(self, items: Sequence[Conversion]) -> list[ConversionResult]:
        """One result per conversion, in order; InvalidInput (nothing written) for a bad batch."""
        now = self._clock()
        self._validate(items, now)
        resolved = [self._resolve(c, f"conversions[{i}].") for i, c in enumerate(items)]
        if not resolved:
            return []
        await self._logged()
        # A duplicate is attributed too (its touches read for nothing): whether an id is new is
        # known only from the insert, which decides among servers racing on it.
        touches = await self._touches(resolved)
        credits = [attribute(r.conversion.value, r.conversion.occurred_at, t, r.rules) for r, t in zip(resolved, touches, strict=True)]
        fresh = await self._record(resolved, credits, now)
        ids = [r.conversion.conversion_id for r in resolved]
        stored = await self._stored_credits([cid for cid, new in zip(ids, fresh, strict=True) if not new])
        results = [_result(new, mine, stored.get(cid, [])) for cid, new, mine in zip(ids, fresh, credits, strict=True)]
        return await self._reward_all(results, ids)

    # -- the steps ------------------------------------------------------------------------------

    def _validate(self, items: Sequence[Conversion], now: float) -> None:
        """Every conversion's own validity, before any work (InvalidInput naming the item)."""
        limit = self._settings.max_reward_batch
        if len(items) > limit:
            raise InvalidInput("conversions", f"{len(items)} conversions, more than max_reward_batch ({limit}); send smaller batches")
        for i, c in enumerate(items):
            try:
                c.check(
                    now=now,
                    max_id_length=min(self._settings.max_id_length, _MAX_STORED_ID),
                    max_abs_value=MAX_ABS_REWARD_LIMIT,
                    max_age=MAX_AGE,
                )
            except InvalidInput as e:
                raise InvalidInput(f"conversions[{i}].{e.field}", e.message) from None

    def _resolve(self, c: Conversion, field: str) -> _Resolved:
        """The (placement, arm) pairs a conversion can credit: the arm of that id, or every arm
        that lists the product, in every loaded placement; InvalidInput for one that none has,
        or a value above the max_abs_reward of a placement it could credit."""
        arms: set[tuple[str, str]] = set()
        rules: dict[str, AttributionSpec] = {}
        for pid, ps in self._states.items():
            spec = ps.record.spec
            for arm in spec.arms:
                if (c.arm_id and arm.id == c.arm_id) or (c.product and c.product in arm.products):
                    arms.add((pid, arm.id))
                    rules[pid] = spec.attribution
                    if abs(c.value) > spec.max_abs_reward:
                        raise InvalidInput(f"{field}value", f"magnitude above placement {pid}'s max_abs_reward ({spec.max_abs_reward:g})")
        if not arms:
            what, name = ("arm_id", c.arm_id) if c.arm_id else ("product", c.product)
            raise InvalidInput(f"{field}{what}", f"no placement has {'an arm' if c.arm_id else 'an arm with product'} {quote(name)}")
        return _Resolved(c, frozenset(arms), rules)

    async def _logged(self) -> None:
        """This server's decisions and activations made before the call are in the log, where
        the touches are read (another server's are as soon as its group commit is)."""
        if self._writer.pending:
            await self._writer.flush()

    async def _touches(self, resolved: Sequence[_Resolved]) -> list[list[Touch]]:
        """Each conversion's customer's activated impressions of its resolved arms within the
        widest window of their placements (attribute keeps each placement's own): the whole
        batch in one read (Store.touches_of), in a worker thread."""
        ranges = [
            TouchRange(
                r.conversion.customer_id,
                frozenset(arm for _, arm in r.arms),
                r.conversion.occurred_at - max(rule.window for rule in r.rules.values()),
                r.conversion.occurred_at,
            )
            for r in resolved
        ]
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._reader_pool, self._store.touches_of, ranges)
        return [[t for t in ts if (t.placement, t.arm_id) in r.arms] for r, ts in zip(resolved, found, strict=True)]

    async def _record(self, resolved: Sequence[_Resolved], credits: Sequence[list[Credit]], now: float) -> list[bool]:
        """The batch and its credits in one transaction; False for a conversion id stored before."""
        items = [(r.conversion, c) for r, c in zip(resolved, credits, strict=True)]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_pool, self._store.record_conversions, items, now)

    async def _stored_credits(self, duplicates: Sequence[str]) -> dict[str, list[Credit]]:
        if not duplicates:
            return {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader_pool, self._store.credits_of_conversions, duplicates)

    async def _reward_all(self, results: list[ConversionResult], ids: Sequence[str]) -> list[ConversionResult]:
        """A reward per credit, new or duplicate, each as its own Reward keyed by its conversion.
        A duplicate's are sent again on purpose: a client retrying after a crash between the
        commit and the rewards completes what the crash interrupted, and the rewards stored
        before are DUPLICATE (per key). A LATE answer is fine: recorded, not learned. A reward
        that fails fails its conversion's result (retry it: the conversion is a duplicate then)."""
        calls = [(i, cr) for i, r in enumerate(results) for cr in r.credits]
        quiet = batch_quiet.set(True)
        try:
            done = await asyncio.gather(
                *(self._windows.reward(cr.event_id, cr.value, cr.slot, reward_key(ids[i])) for i, cr in calls), return_exceptions=True
            )
        finally:
            batch_quiet.reset(quiet)
        failed: dict[int, NextbestError] = {}
        for (i, _), outcome in zip(calls, done, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, NextbestError):
                    raise outcome  # a bug or a cancellation: the whole call fails
                failed.setdefault(i, outcome)
        return [ConversionResult(None, r.credits, failed[i]) if i in failed else r for i, r in enumerate(results)]
