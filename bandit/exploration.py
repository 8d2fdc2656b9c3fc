"""Exploration: turn expected rewards of the eligible arms into a probability mass function.

Our code, not VW's ``--cb_explore_adf``, does this so that business adjustments (budgets,
pacing, fatigue) can act on the scores before the draw, and the logged probability is the
exact probability of the drawn arm.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]


def epsilon_greedy(values: Vector, epsilon: float) -> Vector:
    """Best arm gets 1 - epsilon; epsilon is spread uniformly over all arms. Ties share."""
    k = len(values)
    pmf = np.full(k, epsilon / k)
    best = values == values.max()
    pmf[best] += (1.0 - epsilon) / float(best.sum())
    return pmf


def softmax(values: Vector, lam: float) -> Vector:
    """Probabilities proportional to exp(lambda * value)."""
    z = lam * (values - values.max())
    w: Vector = np.exp(z)
    out: Vector = w / float(w.sum())
    return out


def squarecb(values: Vector, gamma: float) -> Vector:
    """Inverse-gap weighting (Foster & Rakhlin): p_a = 1 / (K + gamma * gap_a); the best
    arm takes the rest. As gamma grows with experience, exploration shrinks."""
    k = len(values)
    best = int(np.argmax(values))
    pmf: Vector = 1.0 / (k + gamma * (values[best] - values))
    pmf[best] = 0.0
    pmf[best] = max(0.0, 1.0 - float(pmf.sum()))
    return pmf


def squarecb_gamma(scale: float, exponent: float, learned: int) -> float:
    """VW's schedule: gamma = scale * t^exponent, t the examples learned so far."""
    return float(scale * float(max(learned, 1)) ** exponent)


def draw(pmf: Vector, u: float) -> int:
    """Index drawn from pmf by inverse CDF with uniform u in [0, 1)."""
    cdf = np.cumsum(pmf)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= len(pmf) or pmf[i] <= 0.0:  # only by rounding at the top end
        i = int(np.flatnonzero(pmf > 0.0)[-1])
    return i
