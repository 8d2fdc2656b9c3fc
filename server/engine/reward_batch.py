"""RewardBatch: several rewards in one call, each handled as its own Reward, their writes
sharing group commits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nextbest.bandit.errors import InvalidInput, NextbestError, NotFound
from nextbest.bandit.text import quote
from nextbest.engine.reward_policy import RewardStatus
from nextbest.engine.windows import RewardWindows, batch_quiet

log = logging.getLogger(__name__)


class RewardBatch:
    """The RewardBatch path of an engine, over its reward windows."""

    def __init__(self, *, windows: RewardWindows, max_batch: int) -> None:
        self._windows = windows
        self._max_batch = max_batch

    async def reward_batch(self, items: Sequence[tuple[str, float, int, str]]) -> list[RewardStatus | NextbestError]:
        """All are checked before any is stored (InvalidInput naming ``rewards[i]``), then each
        is handled as its own Reward. Per item: its status, or the domain error it failed with;
        an event of a placement the caller may not use fails as an unknown one (NOT_FOUND)."""
        if len(items) > self._max_batch:
            raise InvalidInput("rewards", f"more than {self._max_batch} rewards in one call")
        for i, (event_id, reward, slot, reward_id) in enumerate(items):
            self._windows.check(event_id, reward, slot, f"rewards[{i}].", reward_id)
        quiet = batch_quiet.set(True)
        try:
            results = await asyncio.gather(*(self._windows.reward(e, r, s, k) for e, r, s, k in items), return_exceptions=True)
        finally:
            batch_quiet.reset(quiet)
        out: list[RewardStatus | NextbestError] = []
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
