"""Exploration turns scores into a distribution, and the draw follows it."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from nextbest.bandit import exploration

scores = st.lists(st.floats(-10, 10), min_size=1, max_size=50).map(lambda v: np.array(v, dtype=np.float64))


@given(scores, st.floats(0, 1))
def test_epsilon_greedy_is_a_distribution_favouring_the_best(v: np.ndarray, eps: float) -> None:
    pmf = exploration.epsilon_greedy(v, eps)
    assert pmf.min() >= 0 and math.isclose(pmf.sum(), 1.0)
    assert pmf[int(np.argmax(v))] >= pmf.max() - 1e-12


@given(scores, st.floats(0.01, 100))
def test_softmax_is_a_distribution_ordered_by_score(v: np.ndarray, lam: float) -> None:
    pmf = exploration.softmax(v, lam)
    assert pmf.min() >= 0 and math.isclose(pmf.sum(), 1.0)
    order = np.argsort(v)
    assert np.all(np.diff(pmf[order]) >= -1e-12)


@given(scores, st.floats(0, 1e4))
def test_squarecb_is_a_distribution_favouring_the_best(v: np.ndarray, gamma: float) -> None:
    pmf = exploration.squarecb(v, gamma)
    assert pmf.min() >= 0 and math.isclose(pmf.sum(), 1.0)
    assert pmf[int(np.argmax(v))] >= pmf.max() - 1e-12


def test_squarecb_by_hand() -> None:
    pmf = exploration.squarecb(np.array([1.0, 0.5, 0.0]), gamma=10.0)
    # non-best: 1/(3 + 10*0.5) = 0.125 and 1/(3 + 10*1) = 1/13; the best takes the rest
    assert np.allclose(pmf, [1 - 0.125 - 1 / 13, 0.125, 1 / 13])
    assert exploration.squarecb_gamma(10, 0.5, 400) == 200.0


@given(st.lists(st.floats(0, 1), min_size=1, max_size=20).filter(lambda p: sum(p) > 0), st.floats(0, 1, exclude_max=True))
def test_draw_never_picks_a_zero_probability_arm(p: list[float], u: float) -> None:
    pmf = np.array(p) / sum(p)
    assert pmf[exploration.draw(pmf, u)] > 0


def test_draw_follows_the_distribution() -> None:
    rng = np.random.default_rng(3)
    pmf = np.array([0.5, 0.0, 0.3, 0.2])
    counts = np.bincount([exploration.draw(pmf, rng.random()) for _ in range(20000)], minlength=4) / 20000
    assert np.allclose(counts, pmf, atol=0.015)
