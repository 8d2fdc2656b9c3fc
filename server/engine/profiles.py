"""Stored customer profiles as Choose reads them (placements with ``context: {profile: true}``).

A Choose must not wait on the database while other calls wait on it: a profile is read from a
bounded cache kept per customer for ``profile_cache_ttl`` seconds, and on a miss asynchronously,
in a worker thread, together with every other miss of the same moment (one query for all of
them, like a group commit for reads). Freshness across servers is the TTL: a profile written
through another server or by the loader is used here within ``profile_cache_ttl``; one written
through this server's ProfileService drops its cached entry at once (``written``).

When the database cannot be read, a Choose decides on the entry it had (however old) or, having
none, without a profile (its rules fail closed), and a counter says so: a channel gets an answer.

A cached profile keeps what every Choose would otherwise compute again from it (its features'
names and VW text, made in the reader thread): a hit costs a dictionary look-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nextbest.bandit.errors import Unavailable
from nextbest.bandit.features import feature_key, shared_tokens
from nextbest.storage.base import Profile, Store

log = logging.getLogger(__name__)

_MAX_READ = 500  # customers in one read; more misses at once make more reads


@dataclass(frozen=True, slots=True)
class CachedProfile:
    """A stored profile as Choose merges it: ``keys`` names each feature (``namespace.name``),
    ``text`` is their VW tokens (``shared_tokens``)."""

    profile: Profile
    keys: tuple[str, ...]
    key_set: frozenset[str]
    text: str

    @classmethod
    def of(cls, profile: Profile) -> CachedProfile:
        keys = tuple(feature_key(f) for f in profile.features)
        return cls(profile, keys, frozenset(keys), shared_tokens(profile.features))


class ProfileCache:
    """Profiles by customer id, cached for ``ttl`` seconds, at most ``size`` customers."""

    def __init__(
        self,
        *,
        store: Store,
        reader_pool: ThreadPoolExecutor,
        clock: Callable[[], float],
        ttl: float,
        size: int,
        on_read_failed: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._reader_pool = reader_pool
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._on_read_failed = on_read_failed
        # customer -> (profile or None when it has none, when read); oldest use first
        self._entries: OrderedDict[str, tuple[CachedProfile | None, float]] = OrderedDict()
        self._waiting: dict[str, list[asyncio.Future[CachedProfile | None]]] = {}  # misses not yet read, a future per Choose
        self._scheduled = False
        self._in_flight = 0  # reads not done: misses meanwhile wait for the next, together
        self.reads = 0  # queries made (tests and metrics)

    async def get(self, customer_id: str) -> CachedProfile | None:
        """The customer's unexpired stored profile, or None."""
        now = self._clock()
        entry = self._entries.get(customer_id)
        if entry is not None and now - entry[1] < self._ttl:
            self._entries.move_to_end(customer_id)
            return _unexpired(entry[0], now)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[CachedProfile | None] = loop.create_future()  # its own: a Choose that goes cancels only it
        waiting = self._waiting.get(customer_id)
        if waiting is None:
            self._waiting[customer_id] = [fut]
            if not self._scheduled and not self._in_flight:
                # Read on the next turn of the loop: the misses of every Choose now running join;
                # while a read is out, the misses of its time join the next one, sent when it is done.
                self._scheduled = True
                loop.call_soon(self._read_waiting)
        else:
            waiting.append(fut)
        return _unexpired(await fut, now)

    def written(self, customer_ids: Collection[str]) -> None:
        """Profiles written or deleted through this server: read them again at their next Choose."""
        for c in customer_ids:
            self._entries.pop(c, None)

    def _read_waiting(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, {}
        ids = list(waiting)
        for i in range(0, len(ids), _MAX_READ):
            part = {c: waiting[c] for c in ids[i : i + _MAX_READ]}
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._read_then_next(part))

    async def _read_then_next(self, waiting: dict[str, list[asyncio.Future[CachedProfile | None]]]) -> None:
        try:
            await self._read(waiting)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._waiting and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._read_waiting)

    async def _read(self, waiting: dict[str, list[asyncio.Future[CachedProfile | None]]]) -> None:
        now = self._clock()
        self.reads += 1
        try:
            found = await asyncio.get_running_loop().run_in_executor(self._reader_pool, self._read_prepared, list(waiting), now)
        except Unavailable as e:
            log.warning("profiles could not be read (%s): deciding on cached or no profiles", e)
            self._on_read_failed()
            for c, futs in waiting.items():
                entry = self._entries.get(c)
                for fut in futs:
                    if not fut.done():
                        fut.set_result(entry[0] if entry is not None else None)
            return
        except BaseException as e:  # a bug must not leave Chooses waiting for ever
            for futs in waiting.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(e)
            raise
        for c, futs in waiting.items():
            profile = found.get(c)
            if self._size > 0 and self._ttl > 0:
                self._entries[c] = (profile, now)
                self._entries.move_to_end(c)
            for fut in futs:
                if not fut.done():
                    fut.set_result(profile)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def _read_prepared(self, customer_ids: list[str], now: float) -> dict[str, CachedProfile]:
        """In the reader thread: the profiles, each with what a Choose needs of it."""
        return {c: CachedProfile.of(p) for c, p in self._store.get_profiles(customer_ids, now).items()}


def _unexpired(cached: CachedProfile | None, now: float) -> CachedProfile | None:
    if cached is None or (cached.profile.expires_at is not None and cached.profile.expires_at <= now):
        return None
    return cached
