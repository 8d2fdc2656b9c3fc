"""The reward scale exploration divides value gaps by: robust to outliers, and recovering.

Softmax and SquareCB are tuned for rewards in [0, 1]; a placement rewarding revenue explores
like one rewarding acceptance once its values are divided by the size of its rewards. That size
used to be the largest magnitude ever learned, so one outlier set it for good: a single reward
of 1e13 on a trained SquareCB placement made every value gap vanish and its choices uniform,
still after 200 normal rewards and a restart. Here it is a high quantile of the magnitudes of
the last ``window`` rewards learned: an outlier or two do not move it, and what they move is
forgotten after ``window`` further rewards. The same figure is rebuilt at start from the last
rewards in the log, so a restart does not change how a placement explores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

WINDOW = 1000  # rewards the scale looks back on
QUANTILE = 0.99  # of their magnitudes: 10 outliers of 1,000 do not move it
_EVERY = 32  # rewards between recomputations (a partition of 1,000 numbers, ~10 µs)


class RewardScale:
    """A high quantile of the recent reward magnitudes, at least 1."""

    def __init__(self, recent: Iterable[float] = (), window: int = WINDOW, ceiling: float = float("inf")) -> None:
        self._recent: deque[float] = deque((abs(r) for r in recent), maxlen=window)
        self._ceiling = ceiling
        self._pending = 0
        self.value = self._compute()

    def add(self, reward: float) -> float:
        """Count a learned reward; returns the scale, recomputed every few rewards."""
        self._recent.append(abs(reward))
        self._pending += 1
        if self._pending >= _EVERY:
            self.value = self._compute()
        return self.value

    def _compute(self) -> float:
        self._pending = 0
        if not self._recent:
            return 1.0
        q = float(np.quantile(np.fromiter(self._recent, float, len(self._recent)), QUANTILE, method="higher"))
        return min(max(1.0, q), max(1.0, self._ceiling))


DEFAULT_MAX_ABS_REWARD = 1e6  # PlacementSpec.max_abs_reward's default: a guard, no statement of scale


def exploration_scale(
    estimate: float,
    learned: int,
    reward_range: tuple[float, float] | None = None,
    max_abs_reward: float = DEFAULT_MAX_ABS_REWARD,
    window: int = WINDOW,
) -> float:
    """What softmax and SquareCB divide value gaps by.

    * A declared ``reward_range`` (the range of one decision's reward): its width, from the
      first decision on, whatever the rewards so far.
    * Else ``estimate`` (``RewardScale.value``, at least 1), started from a prior: a
      ``max_abs_reward`` the placement declared (below its default) weighs ``1 - learned /
      window`` against the estimate, so that the first few rewards (a margin of 2 where margins
      reach 15) do not set how the placement explores; after ``window`` rewards learned, the
      estimate alone. Without either, the estimate alone, as before.
    """
    if reward_range is not None:
        return float(reward_range[1] - reward_range[0])
    if max_abs_reward >= DEFAULT_MAX_ABS_REWARD or learned >= window:
        return estimate
    w = 1.0 - max(learned, 0) / window
    return max(1.0, w * max_abs_reward + (1.0 - w) * estimate)
