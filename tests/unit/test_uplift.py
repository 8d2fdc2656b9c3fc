"""Uplift on real purchases (issue #31): the figures per variant and the differences to the
holdout, checked by hand, and the 95 % intervals' coverage on seeded simulated customers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextbest.bandit.offline.uplift import uplift
from nextbest.storage.base import VariantConversions

Z = 1.959963984540054


def test_figures_and_differences_by_hand() -> None:
    # holdout: 4 customers, one bought for 10; A: 5 customers, two bought 10 and 20
    h = VariantConversions("holdout", customers=4, converting=1, value_sum=10.0, value_sq_sum=100.0)
    a = VariantConversions("A", customers=5, converting=2, value_sum=30.0, value_sq_sum=500.0)
    got_a, got_h = uplift([a, h])
    assert (got_a.variant, got_a.customers, got_a.converting) == ("A", 5, 2)
    assert got_a.rate.estimate == pytest.approx(0.4)
    assert (got_a.rate.low, got_a.rate.high) == pytest.approx((0.1176, 0.7693), abs=1e-4)  # Wilson 2 of 5
    # value per customer 6, sample variance (500 - 30²/5) / 4 = 80, se √(80/5) = 4
    assert got_a.value.estimate == pytest.approx(6.0)
    assert (got_a.value.low, got_a.value.high) == pytest.approx((6 - Z * 4, 6 + Z * 4))
    # holdout: 2.5 per customer, variance (100 - 10²/4) / 3 = 25
    assert got_h.value.estimate == pytest.approx(2.5)
    assert got_h.rate_difference is None and got_h.value_difference is None
    d = got_a.value_difference
    assert d is not None
    se = math.sqrt(80 / 5 + 25 / 4)
    assert (d.estimate, d.low, d.high) == pytest.approx((3.5, 3.5 - Z * se, 3.5 + Z * se))
    r = got_a.rate_difference
    assert r is not None
    se = math.sqrt(0.4 * 0.6 / 5 + 0.25 * 0.75 / 4)
    assert (r.estimate, r.low, r.high) == pytest.approx((0.15, 0.15 - Z * se, 0.15 + Z * se))


def test_without_a_holdout_or_customers() -> None:
    [only] = uplift([VariantConversions("", customers=3, converting=0, value_sum=0.0, value_sq_sum=0.0)])
    assert only.rate_difference is None and only.value_difference is None
    assert (only.rate.estimate, only.rate.low) == pytest.approx((0.0, 0.0)) and only.rate.high > 0
    assert (only.value.estimate, only.value.low, only.value.high) == (0.0, 0.0, 0.0)
    a, _ = uplift([VariantConversions("A", 2, 1, 5.0, 25.0), VariantConversions("holdout", 0, 0, 0.0, 0.0)])
    assert a.rate_difference is not None and math.isnan(a.rate_difference.estimate)


def test_the_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    """400 seeded experiments of 500 customers per group: conversion 10 % (holdout) and 14 %
    (variant), values exponential with mean 8. Each interval holds its true value in 90 to
    99 % of them."""
    rng = np.random.default_rng(31)
    n, p_h, p_a, mean_value, draws = 500, 0.10, 0.14, 8.0, 400
    hits = {"rate": 0, "value": 0, "rate_difference": 0, "value_difference": 0}
    for _ in range(draws):
        tallies = []
        for name, p in (("A", p_a), ("holdout", p_h)):
            bought = rng.random(n) < p
            value = np.where(bought, rng.exponential(mean_value, n), 0.0)
            tallies.append(VariantConversions(name, n, int(bought.sum()), float(value.sum()), float((value * value).sum())))
        a, _ = uplift(tallies)
        assert a.rate_difference is not None and a.value_difference is not None
        for key, iv, truth in (
            ("rate", a.rate, p_a),
            ("value", a.value, p_a * mean_value),
            ("rate_difference", a.rate_difference, p_a - p_h),
            ("value_difference", a.value_difference, (p_a - p_h) * mean_value),
        ):
            hits[key] += iv.low <= truth <= iv.high
    coverage = {k: v / draws for k, v in hits.items()}
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage
