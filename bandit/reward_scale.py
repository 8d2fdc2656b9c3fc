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
