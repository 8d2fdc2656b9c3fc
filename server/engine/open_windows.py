"""The reward windows this server holds open in memory, by (event_id, position), with a heap of
their deadlines.

A window is held by the server that made its decision (or took it over from a server that
stopped: engine/takeover.py). What it holds is a cache of its row: every write acting on the
decision is bound to the row's placement and owner, and what is learned at the close is decided
on the row (storage/base.py Store.write), so a window here never speaks for another decision.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from nextbest.bandit.decision_log import Outcome
from nextbest.storage.base import Close

MAX_POSITIONS = 10  # positions (ChooseRequest slots) of one event: 0..9

Key = tuple[str, int]  # (event_id, position)
HeapItem = tuple[float, int, str, int]  # (deadline, opening order, event_id, position)


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
    owner: str | None = None  # the server id written on the decision's row (None: unbound, tests)
    # Only where rewards are gathered before the close, created on the first: an open window is
    # one object for the garbage collector, not three (a full collection over 200,000 open
    # windows took 180 ms with empty list and set fields, measured).
    rewards: list[float] | None = None  # acknowledged here (or on the row when taken over)
    reward_ids: set[str] | None = None  # the callers' keys of those rewards
    writing: dict[str, asyncio.Future[object]] | None = None  # keys whose reward is being stored

    def add_reward(self, reward: float, reward_id: str = "") -> None:
        """Count an acknowledged reward (once per key)."""
        if reward_id:
            if self.reward_ids is None:
                self.reward_ids = set()
            elif reward_id in self.reward_ids:
                return
            self.reward_ids.add(reward_id)
        if self.rewards is None:
            self.rewards = []
        self.rewards.append(reward)

    def has_key(self, reward_id: str) -> bool:
        return self.reward_ids is not None and reward_id in self.reward_ids

    def close(self, event_id: str, position: int, outcome: Outcome, reward: float, at: float, aggregation: str | None) -> Close:
        """The close of this window, bound to its decision's row."""
        return Close(
            event_id,
            outcome,
            reward,
            at,
            self.reward_cost,
            self.budgets,
            position,
            self.cost,
            placement=self.placement,
            owner=self.owner,
            aggregation=aggregation,
        )


class OpenWindows:
    """The open windows of this server; a dict with a deadline heap beside it."""

    def __init__(self) -> None:
        self.open: dict[Key, OpenDecision] = {}
        # Heap of open windows by deadline, then by the order they opened (a counter), so that
        # windows closing in one sweep are learned in decision order even when deadlines tie.
        self._deadlines: list[HeapItem] = []
        self._opened = itertools.count()

    def __len__(self) -> int:
        return len(self.open)

    def __contains__(self, key: object) -> bool:
        return key in self.open

    def get(self, key: Key) -> OpenDecision | None:
        return self.open.get(key)

    def add(self, event_id: str, position: int, entry: OpenDecision) -> None:
        self.open[(event_id, position)] = entry
        heapq.heappush(self._deadlines, (entry.deadline, next(self._opened), event_id, position))

    def moved(self, event_id: str, position: int, entry: OpenDecision) -> None:
        """The window's deadline changed (activation): it closes at the new one."""
        heapq.heappush(self._deadlines, (entry.deadline, next(self._opened), event_id, position))

    def drop(self, key: Key, entry: OpenDecision) -> None:
        """Forget the window if it is still ``entry`` (its heap item is skipped when popped)."""
        if self.open.get(key) is entry:
            del self.open[key]

    def positions(self, event_id: str) -> list[int]:
        return [p for p in range(MAX_POSITIONS) if (event_id, p) in self.open]

    def unique_key(self) -> str:
        """A key no caller can send (a NUL is refused at the edge), for writes without one."""
        return f"\x00{next(self._opened)}"

    def expired(self, now: float) -> Iterator[tuple[HeapItem, OpenDecision]]:
        """Pop the windows whose deadline passed, in deadline then opening order. A window whose
        reward is still being stored is yielded too: the caller puts it back with ``later``
        (after the loop: it would be popped again at once)."""
        while self._deadlines and self._deadlines[0][0] < now:
            item = heapq.heappop(self._deadlines)
            entry = self.open.get((item[2], item[3]))
            if entry is None or entry.deadline != item[0]:
                continue  # closed, or moved by an activation
            yield item, entry

    def later(self, item: HeapItem) -> None:
        """Sweep this window again next time, in its place (a reward accepted in time is still being stored)."""
        heapq.heappush(self._deadlines, item)
