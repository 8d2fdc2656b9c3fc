"""Experiment statistics from the decision log: rates and means with 95 % intervals, per
variant, arm and time bucket, and the lift of each variant over the holdout.

Pure numpy, so a notebook can use it on any log; ``nextbest.offline.stats_source`` reads the columns.

Conventions (also in docs/experiments.md):
- An *impression* is a decision that served an arm and was shown (a deferred decision that
  was never activated is ``not_shown``); decisions without an arm count as ``no_offer``.
  Both are left out of the reward figures.
- A reward is *measured* once the decision's reward window is over (``deadline`` before
  ``as_of``, by default now) and it was closed with an explicit or the default reward; other
  shown decisions are ``pending``. Means are over measured decisions. Waiting for the window
  matters: a positive reward closes a decision early while a miss waits for the default, so
  counting rewarded decisions whose window is still running would inflate recent rates.
- *Rewards* count the explicit rewards as soon as they are acknowledged: those closed with
  their reward and those *awaiting close* (a window still open that holds a first reward under
  ``learn_at: window_close``, or rewards recorded for an aggregating placement, valued at their
  running aggregate). Only measured ones are in the means.
- Rewards that are all 0 or 1 are *binary*: the rate gets a Wilson interval and the lift's
  variance is p(1 - p). Otherwise a mean gets a normal interval with the sample variance.
- *Exploration share*: impressions whose arm was not the most probable entry of the pmf.
- *Spend*: the impression cost of shown decisions, plus the reward cost when a positive
  reward incurred it (counted when the reward is acknowledged, also awaiting close).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
OPEN, REWARD, DEFAULT, NO_ARM, NOT_ACTIVATED = 0, 1, 2, 3, 4  # nextbest.bandit.decision_log.Outcome, as stored
CONTROL = "holdout"
Bucket = Literal["hour", "day"]
BUCKET_SECONDS: dict[str, float] = {"hour": 3600.0, "day": 86400.0}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Interval:
    """An estimate with its 95 % interval; nan where undefined (no data, one sample)."""

    estimate: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan)


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of a proportion: sane at 0 %, 100 % and small n, unlike Wald."""
    if n <= 0:
        return NAN_INTERVAL
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def sample_variance(total: float, total_sq: float, n: int) -> float:
    """Unbiased variance from sums (n - 1 in the denominator); nan below two samples."""
    if n < 2:
        return math.nan
    return max(0.0, (total_sq - total * total / n) / (n - 1))


def mean_interval(total: float, total_sq: float, n: int, z: float = Z95) -> Interval:
    """Mean with a normal-approximation interval (mean ± z·s/√n)."""
    if n <= 0:
        return NAN_INTERVAL
    mean = total / n
    var = sample_variance(total, total_sq, n)
    half = z * math.sqrt(var / n) if not math.isnan(var) else math.nan
    return Interval(mean, mean - half, mean + half)


def difference(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int, z: float = Z95) -> Interval:
    """a − b with a normal interval: se = √(var_a/n_a + var_b/n_b) (independent samples)."""
    if n_a <= 0 or n_b <= 0:
        return NAN_INTERVAL
    diff = mean_a - mean_b
    se = math.sqrt(var_a / n_a + var_b / n_b)
    return Interval(diff, diff - z * se, diff + z * se)


def bucket_starts(timestamps: FloatArray, bucket: Bucket) -> FloatArray:
    """The start (epoch seconds, UTC) of each timestamp's hour or day."""
    size = BUCKET_SECONDS[bucket]
    return np.floor(np.asarray(timestamps, dtype=np.float64) / size) * size


def explored(pmfs: Sequence[Sequence[float]], chosen: Sequence[int | None]) -> BoolArray:
    """Per decision: the chosen entry was below the pmf's maximum (so exploration chose it)."""
    out = np.zeros(len(chosen), dtype=np.bool_)
    for i, (pmf, c) in enumerate(zip(pmfs, chosen, strict=True)):
        if c is not None and 0 <= c < len(pmf):
            out[i] = pmf[c] < max(pmf) - 1e-12
    return out


def rolling_mean(values: FloatArray, window: int) -> FloatArray:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    c = np.concatenate(([0.0], np.cumsum(x)))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    out: FloatArray = (c[idx] - c[lo]) / (idx - lo)
    return out


def even_schedule(t: FloatArray, start: float, end: float, limit: float) -> FloatArray:
    """What an even spend of ``limit`` between start and end has spent by each time."""
    frac = np.clip((np.asarray(t, dtype=np.float64) - start) / (end - start), 0.0, 1.0)
    out: FloatArray = limit * frac
    return out


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class LogColumns:
    """The decision log, one array entry per decision; ``variant`` None when not recorded."""

    created_at: FloatArray
    arm: Sequence[str | None]
    outcome: IntArray
    reward: FloatArray  # nan without an arm, or while open without an acknowledged reward
    cost: FloatArray
    reward_cost: FloatArray
    explored: BoolArray
    variant: Sequence[str | None] | None = None
    activated: BoolArray | None = None  # None: every decision was shown (no deferred decisions)
    deadline: FloatArray | None = None  # end of each reward window (None: all over)
    as_of: float = math.inf  # windows ending after this are still running

    @property
    def n(self) -> int:
        return int(self.created_at.size)

    @property
    def measured(self) -> BoolArray:
        m: BoolArray = ((self.outcome == REWARD) | (self.outcome == DEFAULT)) & ~np.isnan(self.reward)
        if self.deadline is not None:
            m &= self.deadline <= self.as_of
        return m

    @property
    def awaiting_close(self) -> BoolArray:
        """Shown decisions whose window is still open and holds an acknowledged reward."""
        a: BoolArray = (self.outcome == OPEN) & ~np.isnan(self.reward) & self.shown
        return a

    @property
    def explicit(self) -> BoolArray:
        """Shown decisions with an explicit reward, acknowledged: closed with it, or awaiting close."""
        e: BoolArray = ((self.outcome == REWARD) & self.shown) | self.awaiting_close
        return e

    @property
    def shown(self) -> BoolArray:
        has_arm = np.array([a is not None for a in self.arm], dtype=np.bool_)
        return has_arm if self.activated is None else has_arm & self.activated

    @property
    def spend(self) -> FloatArray:
        incurred = self.explicit & (np.nan_to_num(self.reward) > 0)
        out: FloatArray = np.where(self.shown, self.cost, 0.0) + np.where(incurred, self.reward_cost, 0.0)
        return out

    def is_binary(self) -> bool:
        r = self.reward[self.measured]
        return bool(np.all((r == 0.0) | (r == 1.0)))


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One row: a variant (None: not recorded), an arm (None: all arms), a bucket (None: all time)."""

    variant: str | None
    arm: str | None
    bucket: float | None
    decisions: int
    impressions: int
    no_offer: int
    not_shown: int  # deferred decisions not (yet) activated
    pending: int
    measured: int
    rewards: int  # explicit rewards, counted when acknowledged (closed with them, or awaiting close)
    reward_sum: float  # of the measured decisions (explicit and default rewards): the mean's
    reward_sq: float
    mean: Interval
    spend: float
    explored: int
    explicit_sum: float = 0.0  # the sum of ``rewards``
    awaiting_close: int = 0  # of ``rewards``, those whose window is still open (learned at the close)
    awaiting_sum: float = 0.0

    @property
    def exploration_share(self) -> float:
        return self.explored / self.impressions if self.impressions else math.nan

    def variance(self, binary: bool) -> float:
        if binary:
            p = self.reward_sum / self.measured if self.measured else math.nan
            return p * (1 - p)
        return sample_variance(self.reward_sum, self.reward_sq, self.measured)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "arm": self.arm,
            "bucket": iso(self.bucket),
            "decisions": self.decisions,
            "impressions": self.impressions,
            "no_offer": self.no_offer,
            "not_shown": self.not_shown,
            "pending": self.pending,
            "measured": self.measured,
            "rewards": self.rewards,
            "rewards_awaiting_close": self.awaiting_close,
            "explicit_reward_sum": self.explicit_sum,
            "reward_sum_awaiting_close": self.awaiting_sum,
            "reward_sum": self.reward_sum,
            "mean": _num(self.mean.estimate),
            "ci_low": _num(self.mean.low),
            "ci_high": _num(self.mean.high),
            "spend": self.spend,
            "exploration_share": _num(self.exploration_share),
        }


@dataclass(frozen=True, slots=True)
class Lift:
    """A variant's mean reward minus the control's, with its 95 % interval."""

    variant: str
    control: str
    difference: Interval
    relative: float  # difference / control mean (nan when the control mean is 0)

    def to_dict(self) -> dict[str, Any]:
        d = self.difference
        return {
            "variant": self.variant,
            "control": self.control,
            "difference": _num(d.estimate),
            "ci_low": _num(d.low),
            "ci_high": _num(d.high),
            "relative": _num(self.relative),
        }


def _num(x: float) -> float | None:
    """JSON has no nan."""
    return None if math.isnan(x) else x


def _factorize(values: Sequence[Any]) -> tuple[list[Any], IntArray]:
    index: dict[Any, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return list(index), codes


def group(
    cols: LogColumns,
    *,
    by_variant: bool = True,
    by_arm: bool = True,
    bucket: Bucket | None = None,
    binary: bool | None = None,
) -> list[GroupStats]:
    """Aggregate the log by the chosen keys (bincount over one combined key, so millions of
    decisions take a fraction of a second). Per-arm rows leave out decisions without an arm."""
    binary = cols.is_binary() if binary is None else binary
    n = cols.n
    keep = np.ones(n, dtype=np.bool_)
    if by_arm:
        keep = np.array([a is not None for a in cols.arm], dtype=np.bool_)
    rows = np.flatnonzero(keep)
    picked = rows.tolist()
    keys: list[tuple[list[Any], IntArray]] = []
    if by_variant and cols.variant is not None:
        keys.append(_factorize([cols.variant[i] for i in picked]))
    if by_arm:
        keys.append(_factorize([cols.arm[i] for i in picked]))
    if bucket is not None:
        keys.append(_factorize(bucket_starts(cols.created_at[rows], bucket).tolist()))
    combined = np.zeros(rows.size, dtype=np.int64)
    for labels, codes in keys:
        combined = combined * len(labels) + codes
    uniq, inv = np.unique(combined, return_inverse=True)
    m = uniq.size

    def count(mask: BoolArray) -> IntArray:
        return np.bincount(inv, weights=mask[rows].astype(np.float64), minlength=m).astype(np.int64)

    def total(x: FloatArray) -> FloatArray:
        out: FloatArray = np.bincount(inv, weights=x[rows], minlength=m).astype(np.float64)
        return out

    measured = cols.measured
    reward = np.where(measured, cols.reward, 0.0)
    has_arm = np.array([a is not None for a in cols.arm], dtype=np.bool_)
    shown = cols.shown
    sums = {
        "decisions": count(np.ones(n, dtype=np.bool_)),
        "impressions": count(shown),
        "no_offer": count(~has_arm),
        "not_shown": count(has_arm & ~shown),
        "pending": count(shown & ~measured),
        "measured": count(measured),
        "rewards": count(cols.explicit),
        "awaiting": count(cols.awaiting_close),
        "explored": count(shown & cols.explored),
    }
    reward_sum, reward_sq, spend = total(reward), total(reward * reward), total(cols.spend)
    explicit_sum = total(np.where(cols.explicit, cols.reward, 0.0))
    awaiting_sum = total(np.where(cols.awaiting_close, cols.reward, 0.0))
    out = []
    for g, code in enumerate(uniq.tolist()):
        parts: list[Any] = []
        for labels, _ in reversed(keys):
            code, k = divmod(code, len(labels))
            parts.append(labels[k])
        parts.reverse()
        it = iter(parts)
        variant = next(it) if by_variant and cols.variant is not None else None
        arm = next(it) if by_arm else None
        start = float(next(it)) if bucket is not None else None
        k_meas = int(sums["measured"][g])
        mean = wilson(float(reward_sum[g]), k_meas) if binary else mean_interval(float(reward_sum[g]), float(reward_sq[g]), k_meas)
        out.append(
            GroupStats(
                variant,
                arm,
                start,
                int(sums["decisions"][g]),
                int(sums["impressions"][g]),
                int(sums["no_offer"][g]),
                int(sums["not_shown"][g]),
                int(sums["pending"][g]),
                k_meas,
                int(sums["rewards"][g]),
                float(reward_sum[g]),
                float(reward_sq[g]),
                mean,
                float(spend[g]),
                int(sums["explored"][g]),
                float(explicit_sum[g]),
                int(sums["awaiting"][g]),
                float(awaiting_sum[g]),
            )
        )
    out.sort(key=lambda s: (s.variant or "", s.bucket or 0.0, s.arm or ""))
    return out


def lifts(variants: Sequence[GroupStats], binary: bool, control: str = CONTROL) -> list[Lift]:
    """Each variant's mean minus the control's (difference of means, normal approximation)."""
    ctrl = next((v for v in variants if v.variant == control), None)
    if ctrl is None:
        return []
    out = []
    for v in variants:
        if v.variant == control or v.variant is None:
            continue
        d = difference(v.mean.estimate, v.variance(binary), v.measured, ctrl.mean.estimate, ctrl.variance(binary), ctrl.measured)
        c = ctrl.mean.estimate
        out.append(Lift(v.variant, control, d, d.estimate / c if c and not math.isnan(c) else math.nan))
    return out


@dataclass(frozen=True, slots=True)
class Summary:
    """Everything ``stats-log`` prints: totals per variant, per variant and arm, per bucket."""

    placement: str
    n: int
    first: float | None
    last: float | None
    binary: bool
    variants: list[GroupStats]  # arm None, bucket None
    arms: list[GroupStats]  # bucket None
    buckets: list[GroupStats]  # per variant, arm and bucket (empty without a bucket)
    lifts: list[Lift]
    bucket: Bucket | None = None
    variant_buckets: list[GroupStats] = field(default_factory=list)  # per variant and bucket, all arms

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "decisions": self.n,
            "first": iso(self.first),
            "last": iso(self.last),
            "binary": self.binary,
            "bucket": self.bucket,
            "interval": "wilson" if self.binary else "normal",
            "variants": [g.to_dict() for g in self.variants],
            "arms": [g.to_dict() for g in self.arms],
            "buckets": [g.to_dict() for g in self.buckets],
            "lifts": [x.to_dict() for x in self.lifts],
            "variant_buckets": [g.to_dict() for g in self.variant_buckets],
        }


def summarize(placement: str, cols: LogColumns, bucket: Bucket | None = None) -> Summary:
    binary = cols.is_binary()
    variants = group(cols, by_arm=False, binary=binary)
    return Summary(
        placement,
        cols.n,
        float(cols.created_at.min()) if cols.n else None,
        float(cols.created_at.max()) if cols.n else None,
        binary,
        variants,
        group(cols, binary=binary),
        group(cols, bucket=bucket, binary=binary) if bucket else [],
        lifts(variants, binary),
        bucket,
        group(cols, by_arm=False, bucket=bucket, binary=binary) if bucket else [],
    )
