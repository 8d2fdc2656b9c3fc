"""Uplift on real purchases (issue #31): per variant of a placement, including the holdout, the
customers decided, those who converted, the conversion rate and the conversion value per
customer with 95 % intervals, and each variant's difference to the holdout with its interval.

The input is one tally per variant (``Store.conversion_tally``): every conversion of a decided
customer counts, attributed to an offer or not, because the holdout's purchases are exactly
what happens without offers: the counterfactual. The unit is the customer, not the decision.

- The conversion rate (converting / customers) gets a Wilson interval; its difference to the
  holdout a normal interval with variances p(1 - p) (as ``experiment_stats.lifts`` for rates).
- The value per customer (the sum of a customer's conversion values, 0 for those without one)
  gets a normal-approximation interval, mean ± 1.96·s/√n with the sample variance from the
  sums of values and of their squares; its difference to the holdout is the difference of two
  independent means, se = √(s²_a/n_a + s²_h/n_h). Revenue is skewed: with few converting
  customers the normal interval is rough.
Pure: the intervals are ``experiment_stats``' own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nextbest.bandit.offline.experiment_stats import CONTROL, NAN_INTERVAL, Interval, difference, mean_interval, sample_variance, wilson


class ConversionTally(Protocol):
    """One variant's customers and their conversions (``storage.base.VariantConversions``)."""

    @property
    def variant(self) -> str: ...
    @property
    def customers(self) -> int: ...
    @property
    def converting(self) -> int: ...
    @property
    def value_sum(self) -> float: ...
    @property
    def value_sq_sum(self) -> float: ...


@dataclass(frozen=True, slots=True)
class VariantUplift:
    """One variant's conversion figures; the differences are to the holdout (None for the
    holdout itself and when the placement has none)."""

    variant: str
    customers: int
    converting: int
    rate: Interval  # converting / customers, Wilson 95 %
    value: Interval  # conversion value per customer, normal 95 %
    rate_difference: Interval | None = None  # rate − the holdout's
    value_difference: Interval | None = None  # value per customer − the holdout's


def _rate_variance(t: ConversionTally) -> float:
    p = t.converting / t.customers if t.customers else math.nan
    return p * (1 - p)


def _value_variance(t: ConversionTally) -> float:
    return sample_variance(t.value_sum, t.value_sq_sum, t.customers)


def uplift(tallies: Sequence[ConversionTally], control: str = CONTROL) -> list[VariantUplift]:
    """The figures of each tally, in the given order, with the differences to ``control``."""
    ctrl = next((t for t in tallies if t.variant == control), None)
    out = []
    for t in tallies:
        rate = wilson(t.converting, t.customers)
        value = mean_interval(t.value_sum, t.value_sq_sum, t.customers)
        rate_diff = value_diff = None
        if ctrl is not None and t.variant != control:
            if ctrl.customers and t.customers:
                c = ctrl.customers
                rate_diff = difference(rate.estimate, _rate_variance(t), t.customers, ctrl.converting / c, _rate_variance(ctrl), c)
                value_diff = difference(value.estimate, _value_variance(t), t.customers, ctrl.value_sum / c, _value_variance(ctrl), c)
            else:
                rate_diff = value_diff = NAN_INTERVAL
        out.append(VariantUplift(t.variant, t.customers, t.converting, rate, value, rate_diff, value_diff))
    return out
