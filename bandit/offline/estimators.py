"""Off-policy evaluation: what would a candidate policy have earned on the logged traffic?

Inverse propensity scoring (IPS), its self-normalised variant (SNIPS) and the doubly robust
estimator (DR), as plain vectorised numpy over one row per logged event, so the service, a
replay job and a notebook all get the same numbers.

Row ``i`` of every array describes one logged event:

* ``rewards[i]``            the observed reward of the logged action;
* ``logged_prob[i]``        the probability the logging policy drew that action, in (0, 1];
* ``target_prob[i]``        the probability the candidate gives that same action, in [0, 1];
* ``reward_hat_logged[i]``  the reward model's prediction for the logged action (DR only);
* ``reward_hat_target[i]``  the model's expected reward under the candidate at that context,
  ``sum_a pi(a|x_i) * rhat(x_i, a)`` (DR only).

Confidence intervals are 95 % normal approximations; they are honest only when the weights
are not heavy-tailed, which is why every estimate carries the effective sample size and
support warnings that say when not to trust it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from nextbest.bandit.errors import InvalidInput

FloatArray = NDArray[np.float64]

ESTIMATORS: Final = ("ips", "snips", "dr")
Z_95: Final = 1.96

# Default thresholds of the support diagnostics; support_warnings() lets callers override them.
MIN_PROB: Final = 1e-3
MAX_TINY_SHARE: Final = 0.01
MIN_ESS: Final = 30.0
MIN_ESS_FRACTION: Final = 0.01
MAX_CLIPPED_FRACTION: Final = 0.05

_SMALLEST_NORMAL: Final = float(np.finfo(np.float64).tiny)


class EstimatorInputError(InvalidInput, ValueError):
    """Bad estimator input. A ValueError for notebook users, an InvalidInput for the server."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """A policy value with the diagnostics needed to decide whether to believe it."""

    estimator: str  # "ips" | "snips" | "dr"
    value: float
    ci_low: float  # 95 % confidence interval
    ci_high: float
    n: int  # number of logged events used
    ess: float  # effective sample size of the importance weights, (sum w)^2 / sum w^2
    clipped: int = 0  # how many weights were clipped
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- validation


def _vector(x: ArrayLike, name: str) -> FloatArray:
    """Float64 view of the input; float64 arrays pass through without a copy."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise EstimatorInputError(name, f"must be an array of numbers ({e})") from None
    if arr.ndim != 1:
        raise EstimatorInputError(name, f"must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_finite(arr: FloatArray, name: str) -> None:
    # A finite sum proves every element finite (inf and nan propagate), so the common case
    # costs one reduction and no n-sized temporary; the full check runs only on suspicion.
    with np.errstate(over="ignore"):  # a sum of huge finite values may overflow; not an error
        total = float(arr.sum())
    if not math.isfinite(total) and not bool(np.isfinite(arr).all()):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise EstimatorInputError(name, f"has {bad} NaN or infinite value(s)")


def _check_probabilities(arr: FloatArray, name: str, *, allow_zero: bool) -> None:
    # min/max are cheap reductions; NaN propagates through both and fails every comparison.
    # A logged probability must be a normal float: 1/subnormal overflows to an infinite weight.
    floor = 0.0 if allow_zero else _SMALLEST_NORMAL
    lo, hi = float(arr.min()), float(arr.max())
    if not (lo >= floor and hi <= 1.0):
        valid = arr >= floor
        bad = int(np.count_nonzero(~(valid & (arr <= 1.0))))
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise EstimatorInputError(name, f"must lie in {interval}; {bad} value(s) do not (min={lo!r}, max={hi!r})")


def _validate(
    rewards: ArrayLike,
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    **extra: ArrayLike,
) -> tuple[FloatArray, FloatArray, FloatArray, dict[str, FloatArray]]:
    """Check every input once, up front, so a bad log fails loudly instead of biasing."""
    r = _vector(rewards, "rewards")
    p_log = _vector(logged_prob, "logged_prob")
    p_tgt = _vector(target_prob, "target_prob")
    others = {name: _vector(x, name) for name, x in extra.items()}
    _check_rows(("rewards", r), ("logged_prob", p_log), ("target_prob", p_tgt), *others.items())
    _check_finite(r, "rewards")
    _check_probabilities(p_log, "logged_prob", allow_zero=False)
    _check_probabilities(p_tgt, "target_prob", allow_zero=True)
    for name, arr in others.items():
        _check_finite(arr, name)
    return r, p_log, p_tgt, others


def _check_rows(first: tuple[str, FloatArray], *rest: tuple[str, FloatArray]) -> None:
    """One row per logged event in every array, and at least one event."""
    ref, n = first[0], first[1].shape[0]
    if n == 0:
        raise EstimatorInputError(ref, "is empty; need at least one logged event")
    for name, arr in rest:
        if arr.shape[0] != n:
            raise EstimatorInputError(name, f"has {arr.shape[0]} rows but {ref} has {n}; need one row per event")


def _probabilities(logged_prob: ArrayLike, target_prob: ArrayLike) -> tuple[FloatArray, FloatArray]:
    p_log = _vector(logged_prob, "logged_prob")
    p_tgt = _vector(target_prob, "target_prob")
    _check_rows(("logged_prob", p_log), ("target_prob", p_tgt))
    _check_probabilities(p_log, "logged_prob", allow_zero=False)
    _check_probabilities(p_tgt, "target_prob", allow_zero=True)
    return p_log, p_tgt


def _check_clip(clip: float | None) -> None:
    if clip is not None and not (clip > 0.0):  # also rejects NaN
        raise EstimatorInputError("clip", f"must be a positive number or None, got {clip!r}")


# --------------------------------------------------------------------------- weights


def _weights(p_log: FloatArray, p_tgt: FloatArray, clip: float | None) -> tuple[FloatArray, int]:
    """Importance weights, clipped in place; clipping trades a little bias for variance."""
    w: FloatArray = np.divide(p_tgt, p_log)
    clipped = 0
    if clip is not None:
        clipped = int(np.count_nonzero(w > clip))
        if clipped:
            np.minimum(w, clip, out=w)
    return w, clipped


def importance_weights(logged_prob: ArrayLike, target_prob: ArrayLike, *, clip: float | None = None) -> tuple[FloatArray, int]:
    """The weights every estimator uses, and how many were clipped, for inspection."""
    _check_clip(clip)
    return _weights(*_probabilities(logged_prob, target_prob), clip)


def effective_sample_size(weights: ArrayLike) -> float:
    """How many equally weighted events the weighted log is worth: (sum w)^2 / sum w^2."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):  # handled below
        total = float(w.sum())
        squares = float(np.dot(w, w))  # BLAS dot: no n-sized temporary for w**2
    if 0.0 < squares < math.inf and total < math.inf:
        return total * total / squares
    if total == 0.0 or w.shape[0] == 0:
        return 0.0
    # w**2 under- or overflowed; the ratio is scale-invariant, so rescale (rare path).
    scaled = w / float(np.abs(w).max())
    return float(scaled.sum()) ** 2 / float(np.dot(scaled, scaled))


# --------------------------------------------------------------------------- diagnostics


def _diagnose(
    min_logged: float,
    mass: float,
    tiny_mass: float,
    n: int,
    ess: float,
    clipped: int,
    *,
    min_prob: float = MIN_PROB,
    max_tiny_share: float = MAX_TINY_SHARE,
    min_ess: float = MIN_ESS,
    min_ess_fraction: float = MIN_ESS_FRACTION,
    max_clipped_fraction: float = MAX_CLIPPED_FRACTION,
) -> tuple[str, ...]:
    """The warnings, from running figures: the smallest logged probability, the candidate's
    probability mass in all and on events logged with probability < ``min_prob``."""
    out: list[str] = []
    if min_logged < min_prob and mass > 0.0:
        share = tiny_mass / mass
        if share > max_tiny_share:
            out.append(
                f"low_support: {share:.1%} of the candidate's mass falls on events the "
                f"logging policy chose with probability < {min_prob:g}; "
                "those few events dominate the estimate"
            )
    if ess < min_ess or ess < min_ess_fraction * n:
        out.append(
            f"low_ess: effective sample size {ess:.1f} of {n} events "
            f"(want >= {min_ess:g} and >= {min_ess_fraction:.0%} of n); the CI is unreliable"
        )
    if clipped > max_clipped_fraction * n:
        out.append(f"many_clipped: {clipped} of {n} weights ({clipped / n:.1%}) were clipped; clipping biases the estimate")
    return tuple(out)


def _tiny_mass(p_log: FloatArray, p_tgt: FloatArray, min_prob: float) -> float:
    # The mask is built only when some logged probability is tiny at all (rare in healthy logs).
    return float(p_tgt[p_log < min_prob].sum()) if float(p_log.min()) < min_prob else 0.0


def support_warnings(
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    *,
    min_prob: float = MIN_PROB,
    max_tiny_share: float = MAX_TINY_SHARE,
    min_ess: float = MIN_ESS,
    min_ess_fraction: float = MIN_ESS_FRACTION,
    clip: float | None = None,
    max_clipped_fraction: float = MAX_CLIPPED_FRACTION,
) -> tuple[str, ...]:
    """Reasons the log cannot support the candidate, before any reward is looked at.

    Each warning starts with a stable code (``low_support``, ``low_ess``, ``many_clipped``)
    so that callers can filter on it; the rest is for humans.
    """
    _check_clip(clip)
    p_log, p_tgt = _probabilities(logged_prob, target_prob)
    w, clipped = _weights(p_log, p_tgt, clip)
    return _diagnose(
        float(p_log.min()),
        float(p_tgt.sum()),
        _tiny_mass(p_log, p_tgt, min_prob),
        p_log.shape[0],
        effective_sample_size(w),
        clipped,
        min_prob=min_prob,
        max_tiny_share=max_tiny_share,
        min_ess=min_ess,
        min_ess_fraction=min_ess_fraction,
        max_clipped_fraction=max_clipped_fraction,
    )


# --------------------------------------------------------------------------- estimators


def estimator_names(estimators: Sequence[str], field: str = "estimator") -> tuple[str, ...]:
    """The estimators' names as the code spells them (``ESTIMATORS``), or the error naming the first unknown one."""
    names = tuple(e.strip().lower() if isinstance(e, str) else "" for e in estimators)
    for given, e in zip(estimators, names, strict=True):
        if e not in ESTIMATORS:
            raise EstimatorInputError(field, f"unknown estimator {given!r}; expected one of {', '.join(ESTIMATORS)}")
    return names


class _Moments:
    """Count, sum and squared deviations of per-event terms, merged chunk by chunk (Chan, Golub
    and LeVeque's pairwise update), so that a log read in pieces gives the mean and CI of the log
    read whole; with one chunk, bit for bit the same arithmetic."""

    __slots__ = ("m2", "mean", "n", "total")

    def __init__(self) -> None:
        self.n, self.total, self.mean, self.m2 = 0, 0.0, 0.0, 0.0

    def add(self, terms: FloatArray) -> None:
        """Merge a chunk's terms (centred in place: the caller's buffer is reused)."""
        k = terms.shape[0]
        s = float(terms.sum())
        mu = s / k
        terms -= mu
        m2 = float(np.dot(terms, terms))
        if self.n == 0:
            self.n, self.total, self.mean, self.m2 = k, s, mu, m2
            return
        n = self.n + k
        delta = mu - self.mean
        self.m2 += m2 + delta * delta * (self.n * k / n)
        self.mean += delta * (k / n)
        self.total += s
        self.n = n

    def mean_and_ci(self) -> tuple[float, float, float]:
        """Mean with a normal 95 % CI. The mean is ``sum / n`` (numpy's own formula), so that
        IPS and SNIPS of the logging policy reproduce ``np.mean(rewards)`` bit for bit."""
        value = self.total / self.n
        if self.n < 2:
            return value, math.nan, math.nan
        se = math.sqrt(self.m2 / (self.n - 1) / self.n)
        return value, value - Z_95 * se, value + Z_95 * se


_ZERO_WEIGHT_SUM: Final = "zero_weight_sum: the candidate gives probability 0 to every logged action; SNIPS is undefined"


def _few_events(n: int) -> tuple[str, ...]:
    return ("too_few_events: one event gives no variance estimate; the CI is NaN",) if n < 2 else ()


class Accumulator:
    """IPS, SNIPS and DR of one candidate over a log read in chunks, in memory that does not grow
    with the log: each estimator keeps a few running sums, not the events.

    ``add`` takes one chunk of the per-event arrays (the module docstring names them; DR's two
    reward-model arrays only if DR is asked for), ``estimates`` gives one Estimate per estimator,
    in the order asked. The result equals the one of the log read whole up to rounding:

    * IPS and DR are means of per-event terms, merged by ``_Moments``;
    * SNIPS and the effective sample size use the weights' sums, kept scaled by a power of two
      (exact: it only moves the exponent) so that neither the sum nor the sum of squares can
      overflow or underflow; SNIPS's squared deviations from its final value are the squares
      around the w^2-weighted mean of r (merged like IPS's) plus one non-negative term, which
      avoids the cancellation of ``sum(w^2 r^2) - value * ...``.

    :func:`ips`, :func:`snips` and :func:`dr` are this with a single chunk.
    """

    def __init__(self, estimators: Sequence[str] = ESTIMATORS, *, clip: float | None = None) -> None:
        _check_clip(clip)
        self.estimators = estimator_names(estimators)
        self.clip = clip
        self.n = 0
        self.clipped = 0
        self._min_logged = math.inf
        self._mass = 0.0  # sum of target_prob
        self._tiny_mass = 0.0  # ... on events logged with probability < MIN_PROB
        self._exp: int | None = None  # the weight sums below are scaled by 2 ** -_exp
        self._w = 0.0
        self._w2 = 0.0
        self._wr = 0.0
        self._chunks = 0  # SNIPS: chunks with a positive weight
        self._mean2 = 0.0  # w^2-weighted mean of r
        self._dev2 = 0.0  # sum w^2 (r - _mean2)^2, scaled
        self._first_dev2 = 0.0  # sum (w (r - value_1))^2 of the first chunk around its own value
        self._ips = _Moments()
        self._dr = _Moments()

    def add(
        self,
        rewards: ArrayLike,
        logged_prob: ArrayLike,
        target_prob: ArrayLike,
        reward_hat_logged: ArrayLike | None = None,
        reward_hat_target: ArrayLike | None = None,
    ) -> None:
        """Fold one chunk of events in; every array is checked as the one-shot estimators do."""
        if _vector(rewards, "rewards").shape[0] == 0:
            return
        hats: dict[str, ArrayLike] = {}
        if "dr" in self.estimators:
            if reward_hat_logged is None or reward_hat_target is None:
                missing = "reward_hat_logged" if reward_hat_logged is None else "reward_hat_target"
                raise EstimatorInputError(missing, "is required by the dr estimator")
            hats = {"reward_hat_logged": reward_hat_logged, "reward_hat_target": reward_hat_target}
        r, p_log, p_tgt, checked = _validate(rewards, logged_prob, target_prob, **hats)
        w, clipped = _weights(p_log, p_tgt, self.clip)
        self.n += r.shape[0]
        self.clipped += clipped
        self._min_logged = min(self._min_logged, float(p_log.min()))
        self._mass += float(p_tgt.sum())
        self._tiny_mass += _tiny_mass(p_log, p_tgt, MIN_PROB)
        self._add_weight_sums(w, r)
        if "dr" in self.estimators:
            terms = np.subtract(r, checked["reward_hat_logged"])
            terms *= w
            terms += checked["reward_hat_target"]
            self._dr.add(terms)
        if "ips" in self.estimators:
            self._ips.add(np.multiply(w, r, out=w))  # w is no longer needed: reuse its buffer

    def _add_weight_sums(self, w: FloatArray, r: FloatArray) -> None:
        top = float(w.max())
        if top == 0.0:
            return  # adds nothing to any weight sum
        exp = math.frexp(top)[1]
        if self._exp is None or exp > self._exp:
            if self._exp is not None:  # a larger weight: bring what was summed to the new scale
                f = math.ldexp(1.0, self._exp - exp)
                self._w, self._wr = self._w * f, self._wr * f
                self._w2, self._dev2, self._first_dev2 = self._w2 * f * f, self._dev2 * f * f, self._first_dev2 * f * f
            self._exp = exp
        ws = np.ldexp(w, -self._exp)
        self._w += float(ws.sum())
        if "snips" not in self.estimators:
            self._w2 += float(np.dot(ws, ws))
            return
        sum_wr = float(np.multiply(ws, r).sum())  # numpy's pairwise sum, as np.mean's
        self._wr += sum_wr
        # SNIPS's squares sum (w (r - value))^2 around the final value, unknown until the end:
        # kept as the w^2-weighted mean of r and the squares around it, merged like _Moments,
        # so that sum = squares + sum(w^2) (mean - value)^2 cancels nothing.
        w2 = np.multiply(ws, ws)
        chunk_w2 = float(np.dot(ws, ws))  # as without SNIPS, so that the ESS is the same
        self._chunks += 1
        if self._chunks == 1:  # one chunk only: the squares around its own value, as ever
            dev = np.subtract(r, sum_wr / float(ws.sum()))
            dev *= ws
            self._first_dev2 = float(np.dot(dev, dev))
        if chunk_w2 == 0.0:  # every weight underflowed in the square: nothing to merge
            return
        mean = float(np.dot(w2, r)) / chunk_w2
        dev = np.subtract(r, mean)
        squares = float(np.dot(w2, np.multiply(dev, dev, out=dev)))
        total = self._w2 + chunk_w2
        delta = mean - self._mean2
        self._dev2 += squares + delta * delta * (self._w2 * chunk_w2 / total)
        self._mean2 += delta * (chunk_w2 / total)
        self._w2 = total

    @property
    def ess(self) -> float:
        """Effective sample size of the weights so far, (sum w)^2 / sum w^2."""
        return self._w * self._w / self._w2 if self._w2 > 0.0 else 0.0

    def estimates(self) -> list[Estimate]:
        if self.n == 0:
            raise EstimatorInputError("rewards", "is empty; need at least one logged event")
        n, ess = self.n, self.ess
        warnings = _few_events(n) + _diagnose(self._min_logged, self._mass, self._tiny_mass, n, ess, self.clipped)
        out = []
        for e in self.estimators:
            if e == "snips":
                out.append(self._snips(warnings))
                continue
            value, low, high = (self._ips if e == "ips" else self._dr).mean_and_ci()
            out.append(Estimate(e, value, low, high, n, ess, self.clipped, warnings))
        return out

    def _snips(self, warnings: tuple[str, ...]) -> Estimate:
        """Sum(w r) / sum(w), with the delta method's CI: influence terms ``w_i (r_i - value) /
        mean(w)``, whose mean is zero by construction, so se^2 = sum(phi^2) / (n (n - 1))."""
        n, ess = self.n, self.ess
        if self._chunks == 0:
            return Estimate("snips", math.nan, math.nan, math.nan, n, ess, self.clipped, (*warnings, _ZERO_WEIGHT_SUM))
        value = self._wr / self._w
        if n < 2:
            return Estimate("snips", value, math.nan, math.nan, n, ess, self.clipped, warnings)
        d = self._mean2 - value
        squares = self._first_dev2 if self._chunks == 1 else self._dev2 + self._w2 * d * d
        se = math.sqrt(squares / (n * (n - 1))) / (self._w / n)
        return Estimate("snips", value, value - Z_95 * se, value + Z_95 * se, n, ess, self.clipped, warnings)


def _one_shot(
    name: str,
    clip: float | None,
    rewards: ArrayLike,
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    reward_hat_logged: ArrayLike | None = None,
    reward_hat_target: ArrayLike | None = None,
) -> Estimate:
    acc = Accumulator((name,), clip=clip)
    acc.add(rewards, logged_prob, target_prob, reward_hat_logged, reward_hat_target)
    return acc.estimates()[0]


def ips(
    rewards: ArrayLike,
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    *,
    clip: float | None = None,
) -> Estimate:
    """Unbiased (without clipping) but high-variance: mean of w * r."""
    return _one_shot("ips", clip, rewards, logged_prob, target_prob)


def snips(
    rewards: ArrayLike,
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    *,
    clip: float | None = None,
) -> Estimate:
    """Sum(w r) / sum(w): slightly biased, but bounded by the reward range and less variable."""
    return _one_shot("snips", clip, rewards, logged_prob, target_prob)


def dr(
    rewards: ArrayLike,
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    reward_hat_logged: ArrayLike,
    reward_hat_target: ArrayLike,
    *,
    clip: float | None = None,
) -> Estimate:
    """Model prediction plus an IPS correction of its residual on the logged action.

    Unbiased (without clipping) if either the propensities or the reward model are right, and
    the better the model, the smaller the residuals the weights multiply, so the lower the
    variance.
    """
    return _one_shot("dr", clip, rewards, logged_prob, target_prob, reward_hat_logged, reward_hat_target)


def estimate(
    name: str,
    rewards: ArrayLike,
    logged_prob: ArrayLike,
    target_prob: ArrayLike,
    reward_hat_logged: ArrayLike | None = None,
    reward_hat_target: ArrayLike | None = None,
    *,
    clip: float | None = None,
) -> Estimate:
    """Estimator chosen by name, so configs and loops can name it.

    IPS and SNIPS ignore the reward-model arrays, so one call signature serves all three.
    """
    (key,) = estimator_names([name], "name")
    return _one_shot(key, clip, rewards, logged_prob, target_prob, reward_hat_logged, reward_hat_target)
