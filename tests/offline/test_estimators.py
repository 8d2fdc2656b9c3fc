"""Off-policy estimators: hand-checked arithmetic, properties, CI coverage and input checks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextbest.bandit.errors import InvalidInput
from nextbest.bandit.offline.estimators import (
    ESTIMATORS,
    Estimate,
    dr,
    effective_sample_size,
    estimate,
    importance_weights,
    ips,
    snips,
    support_warnings,
)

Z = 1.96

# ------------------------------------------------------------------ a small hand-checked log
#
#   event    r    logged   target   w = target/logged   w*r   rhat_logged   rhat_target
#     0      1     0.50     1.00          2.0           2.0       0.8           0.7
#     1      0     0.25     0.50          2.0           0.0       0.2           0.3
#     2      1     0.50     0.00          0.0           0.0       0.6           0.5
#     3      1     0.80     0.80          1.0           1.0       0.5           0.6
#     4      0     0.40     0.20          0.5           0.0       0.4           0.2
#
# sum w = 5.5, sum w^2 = 4 + 4 + 0 + 1 + 0.25 = 9.25, sum w*r = 3, n = 5.
R = [1.0, 0.0, 1.0, 1.0, 0.0]
P_LOG = [0.5, 0.25, 0.5, 0.8, 0.4]
P_TGT = [1.0, 0.5, 0.0, 0.8, 0.2]
H_LOG = [0.8, 0.2, 0.6, 0.5, 0.4]
H_TGT = [0.7, 0.3, 0.5, 0.6, 0.2]


def approx(x: float) -> Any:
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_ips_by_hand() -> None:
    # value = 3 / 5 = 0.6
    # terms - mean = [1.4, -0.6, -0.6, 0.4, -0.6]; squares sum to 1.96+0.36+0.36+0.16+0.36 = 3.2
    # sample var = 3.2 / 4 = 0.8; se = sqrt(0.8 / 5) = 0.4; half-width = 1.96 * 0.4 = 0.784
    e = ips(R, P_LOG, P_TGT)
    assert e.estimator == "ips" and e.n == 5 and e.clipped == 0
    assert e.value == approx(0.6)
    assert (e.ci_low, e.ci_high) == (approx(0.6 - 0.784), approx(0.6 + 0.784))
    assert e.ess == approx(5.5**2 / 9.25)  # 30.25 / 9.25 = 3.27...


def test_snips_by_hand() -> None:
    # value = sum(w r) / sum(w) = 3 / 5.5 = 6/11
    # r - 6/11 = [5, -6, 5, 5, -6] / 11; times w = [10, -12, 0, 5, -3] / 11 (sums to 0)
    # influence phi = that / mean(w) = that / 1.1 = [100, -120, 0, 50, -30] / 121
    # sum phi^2 = (10000 + 14400 + 0 + 2500 + 900) / 14641 = 27800 / 14641
    # se^2 = sum phi^2 / (n (n-1)) = 27800 / 14641 / 20 = 1390 / 14641; se = sqrt(1390) / 121
    e = snips(R, P_LOG, P_TGT)
    se = math.sqrt(1390) / 121
    assert e.value == approx(6 / 11)
    assert (e.ci_low, e.ci_high) == (approx(6 / 11 - Z * se), approx(6 / 11 + Z * se))
    assert e.ess == approx(30.25 / 9.25)


def test_dr_by_hand() -> None:
    # r - rhat_logged       = [0.2, -0.2, 0.4, 0.5, -0.4]
    # w * (r - rhat_logged) = [0.4, -0.4, 0.0, 0.5, -0.2]
    # + rhat_target         = [1.1, -0.1, 0.5, 1.1, 0.0]  -> sum 2.6, value 0.52
    # deviations [0.58, -0.62, -0.02, 0.58, -0.52]; squares sum 0.3364+0.3844+0.0004+0.3364+0.2704
    # = 1.328; var = 0.332; se = sqrt(0.332 / 5) = sqrt(0.0664)
    e = dr(R, P_LOG, P_TGT, H_LOG, H_TGT)
    hw = Z * math.sqrt(0.0664)
    assert e.estimator == "dr"
    assert e.value == approx(0.52)
    assert (e.ci_low, e.ci_high) == (approx(0.52 - hw), approx(0.52 + hw))
    assert e.ess == approx(30.25 / 9.25)


def test_clipping_by_hand() -> None:
    # clip = 1.5: w = [1.5, 1.5, 0, 1, 0.5], 2 weights clipped
    # IPS = (1.5 + 0 + 0 + 1 + 0) / 5 = 0.5; deviations [1, -0.5, -0.5, 0.5, -0.5], squares sum 2
    # var = 0.5, se = sqrt(0.1); ESS = 4.5^2 / (2.25 + 2.25 + 0 + 1 + 0.25) = 20.25 / 5.75
    e = ips(R, P_LOG, P_TGT, clip=1.5)
    assert e.clipped == 2
    assert e.value == approx(0.5)
    assert e.ci_high - e.value == approx(Z * math.sqrt(0.1))
    assert e.ess == approx(20.25 / 5.75)
    assert any(w.startswith("many_clipped") for w in e.warnings)  # 40 % clipped
    # SNIPS with the same clip: 2.5 / 4.5
    assert snips(R, P_LOG, P_TGT, clip=1.5).value == approx(2.5 / 4.5)
    # DR terms: [0.7+0.3, 0.3-0.3, 0.5, 0.6+0.5, 0.2-0.2] = [1.0, 0.0, 0.5, 1.1, 0.0] -> 2.6 / 5
    assert dr(R, P_LOG, P_TGT, H_LOG, H_TGT, clip=1.5).value == approx(0.52)
    # A weight equal to the clip is not clipped; a clip above every weight changes nothing.
    assert ips(R, P_LOG, P_TGT, clip=2.0).clipped == 0
    assert ips(R, P_LOG, P_TGT, clip=100.0) == ips(R, P_LOG, P_TGT)


def test_weights_and_ess_helpers() -> None:
    w, clipped = importance_weights(P_LOG, P_TGT, clip=1.5)
    np.testing.assert_array_equal(w, [1.5, 1.5, 0.0, 1.0, 0.5])
    assert clipped == 2
    assert effective_sample_size([1.0, 1.0, 1.0, 1.0]) == 4.0
    assert effective_sample_size([4.0, 0.0, 0.0, 0.0]) == 1.0
    assert effective_sample_size([0.0, 0.0]) == 0.0
    # Scale-invariant even where w**2 under- or overflows.
    assert effective_sample_size([1e-190, 1e-190, 0.0]) == approx(2.0)
    assert effective_sample_size([1e200, 1e200, 0.0]) == approx(2.0)


def test_estimate_dispatch() -> None:
    assert estimate("ips", R, P_LOG, P_TGT) == ips(R, P_LOG, P_TGT)
    assert estimate(" SNIPS ", R, P_LOG, P_TGT, clip=1.5) == snips(R, P_LOG, P_TGT, clip=1.5)
    assert estimate("dr", R, P_LOG, P_TGT, H_LOG, H_TGT) == dr(R, P_LOG, P_TGT, H_LOG, H_TGT)
    # One signature for all: IPS and SNIPS ignore the model's predictions.
    for name in ESTIMATORS:
        assert estimate(name, R, P_LOG, P_TGT, H_LOG, H_TGT).estimator == name


def test_inputs_are_not_modified_and_float64_is_not_copied() -> None:
    from nextbest.bandit.offline.estimators import _vector

    arrays = [np.array(a, dtype=np.float64) for a in (R, P_LOG, P_TGT, H_LOG, H_TGT)]
    before = [a.copy() for a in arrays]
    for clip in (None, 1.5):
        ips(*arrays[:3], clip=clip)
        snips(*arrays[:3], clip=clip)
        dr(*arrays, clip=clip)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _vector(arrays[0], "rewards") is arrays[0]


# ------------------------------------------------------------------ properties

rewards_st = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
prob_st = st.floats(1e-6, 1.0, allow_nan=False)
rows_st = st.lists(st.tuples(rewards_st, prob_st), min_size=1, max_size=200)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(rows=rows_st)
def test_logged_policy_reproduces_the_observed_mean(rows: list[tuple[float, float]]) -> None:
    r = np.array([x for x, _ in rows])
    p = np.array([q for _, q in rows])
    mean = np.mean(r)
    e_ips, e_snips = ips(r, p, p), snips(r, p, p)
    assert e_ips.value == mean  # exactly: w == p / p == 1
    assert e_snips.value == mean
    assert e_ips.ess == len(rows) == e_snips.ess
    # With a model that predicts 0 everywhere, DR is IPS term for term.
    zeros = np.zeros_like(r)
    assert dr(r, p, p, zeros, zeros).value == e_ips.value
    if len(rows) > 1:
        assert e_ips.ci_low <= mean <= e_ips.ci_high


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(rewards_st, prob_st, st.floats(0.0, 1.0)), min_size=1, max_size=100),
    clip=st.one_of(st.none(), st.floats(0.5, 50.0)),
)
def test_snips_is_a_weighted_average_of_rewards(rows: list[tuple[float, float, float]], clip: float | None) -> None:
    r, p, t = (np.array(col) for col in zip(*rows, strict=True))
    e = snips(r, p, t, clip=clip)
    w, clipped = importance_weights(p, t, clip=clip)
    assert e.clipped == clipped == (0 if clip is None else int(np.sum(t / p > clip)))
    if w.sum() == 0:
        assert math.isnan(e.value)
        assert any(x.startswith("zero_weight_sum") for x in e.warnings)
    else:
        tol = 1e-9 * (1 + np.abs(r).max())
        assert r.min() - tol <= e.value <= r.max() + tol
        assert 0 < e.ess <= len(rows) * (1 + 1e-12)


# ------------------------------------------------------------------ coverage on a known world

K, C, RUNS, EVENTS = 4, 20, 100, 2_000


def _world() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """True reward probabilities, a full-support logging policy, a near-greedy candidate."""
    rng = np.random.default_rng(20240601)
    p_true = 1.0 / (1.0 + np.exp(-rng.normal(-1.0, 0.8, (C, K))))
    scores = np.exp(rng.normal(0.0, 1.0, (C, K)))
    logging = 0.6 * scores / scores.sum(axis=1, keepdims=True) + 0.4 / K  # every prob >= 0.1
    target = np.full((C, K), 0.1 / K)
    target[np.arange(C), p_true.argmax(axis=1)] += 0.9
    # Contexts are uniform over C, so the candidate's value is exact:
    value = float((target * p_true).sum(axis=1).mean())
    return p_true, logging, target, value


def _simulate(seed: int, p_true: np.ndarray, logging: np.ndarray, target: np.ndarray) -> dict[str, Estimate]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, C, EVENTS)
    a = np.minimum((rng.random(EVENTS)[:, None] > logging.cumsum(axis=1)[x]).sum(axis=1), K - 1)
    r = (rng.random(EVENTS) < p_true[x, a]).astype(np.float64)
    r_hat = np.clip(p_true + rng.normal(0.0, 0.1, (C, K)), 0.0, 1.0)  # decent, not perfect
    lp, tp = logging[x, a], target[x, a]
    return {
        "ips": ips(r, lp, tp),
        "snips": snips(r, lp, tp),
        "dr": dr(r, lp, tp, r_hat[x, a], (target * r_hat).sum(axis=1)[x]),
    }


def test_confidence_intervals_cover_the_true_value() -> None:
    # Measured over 5,000 runs the coverage is ~95 % for all three, so a block of 100 runs
    # falls below 90 with probability ~1-2 %; the seeds are fixed, so this run is deterministic.
    p_true, logging, target, truth = _world()
    runs = [_simulate(seed, p_true, logging, target) for seed in range(RUNS)]
    for name in ESTIMATORS:
        covered = sum(run[name].ci_low <= truth <= run[name].ci_high for run in runs)
        assert covered >= 90, f"{name}: CI covered the truth in {covered}/{RUNS} runs"
        values = np.array([run[name].value for run in runs])
        # Unbiased (SNIPS nearly so): the average of 100 runs is within 4 standard errors.
        assert abs(values.mean() - truth) < 4 * values.std(ddof=1) / math.sqrt(RUNS)
        assert all(not run[name].warnings for run in runs)  # healthy log: ESS ~ 400
    ips_values = np.array([run["ips"].value for run in runs])
    dr_values = np.array([run["dr"].value for run in runs])
    assert dr_values.var() < 0.8 * ips_values.var()  # measured ratio ~0.5
    assert np.mean([r["dr"].ci_high - r["dr"].ci_low for r in runs]) < np.mean([r["ips"].ci_high - r["ips"].ci_low for r in runs])


# ------------------------------------------------------------------ support warnings


def test_healthy_log_has_no_warnings() -> None:
    p = np.full(10_000, 0.25)
    assert support_warnings(p, p) == ()
    assert ips(np.ones(10_000), p, p).warnings == ()


def test_mass_on_tiny_logged_probabilities_is_flagged() -> None:
    rng = np.random.default_rng(1)
    logged = rng.uniform(0.2, 1.0, 10_000)
    target = logged.copy()
    logged[:200] = 1e-4  # 2 % of events, explored almost never...
    target[:200] = 1.0  # ...but the candidate always plays them
    codes = [w.split(":")[0] for w in support_warnings(logged, target)]
    assert codes == ["low_support"]  # ESS ~ 202 of 10,000 is still above the 1 % floor
    # The same log is fine if the candidate avoids those actions.
    target[:200] = 0.0
    assert support_warnings(logged, target) == ()
    # Thresholds are the caller's to choose.
    target[:200] = 1.0
    assert not any(w.startswith("low_support") for w in support_warnings(logged, target, min_prob=1e-5, min_ess=0, min_ess_fraction=0))


def test_low_ess_clipping_and_tiny_logs_are_flagged() -> None:
    assert [w.split(":")[0] for w in support_warnings(P_LOG, P_TGT)] == ["low_ess"]  # ESS 3.3
    codes = [w.split(":")[0] for w in support_warnings(P_LOG, P_TGT, clip=1.5)]
    assert codes == ["low_ess", "many_clipped"]
    one = ips([1.0], [0.5], [0.5])
    assert one.value == 1.0 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert one.warnings[0].startswith("too_few_events")


def test_candidate_that_never_agrees_with_the_log() -> None:
    zeros = [0.0] * 5
    e = snips(R, P_LOG, zeros)
    assert math.isnan(e.value) and math.isnan(e.ci_low) and e.ess == 0.0
    assert any(w.startswith("zero_weight_sum") for w in e.warnings)
    i = ips(R, P_LOG, zeros)
    assert (i.value, i.ci_low, i.ci_high, i.ess) == (0.0, 0.0, 0.0, 0.0)
    assert any(w.startswith("low_ess") for w in i.warnings)
    assert dr(R, P_LOG, zeros, H_LOG, H_TGT).value == approx(sum(H_TGT) / 5)


# ------------------------------------------------------------------ input validation

BAD_PROBS = [0.0, 5e-324, -0.1, math.nan, math.inf, 1.5]  # 1 / 5e-324 would be an inf weight


@pytest.mark.parametrize("bad", BAD_PROBS)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_bad_logged_prob_is_rejected(name: str, bad: float) -> None:
    p = list(P_LOG)
    p[1] = bad
    with pytest.raises(ValueError, match="logged_prob") as info:
        estimate(name, R, p, P_TGT, H_LOG, H_TGT)
    assert isinstance(info.value, InvalidInput) and info.value.field == "logged_prob"


@pytest.mark.parametrize("bad", [-0.1, math.nan, 1.0000001, -math.inf])
def test_bad_target_prob_is_rejected(bad: float) -> None:
    t = list(P_TGT)
    t[3] = bad
    for name in ESTIMATORS:
        with pytest.raises(ValueError, match="target_prob"):
            estimate(name, R, P_LOG, t, H_LOG, H_TGT)
    with pytest.raises(ValueError, match="target_prob"):
        support_warnings(P_LOG, t)


@pytest.mark.parametrize("field", ["rewards", "reward_hat_logged", "reward_hat_target"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_rewards_and_predictions_are_rejected(field: str, bad: float) -> None:
    args = {"rewards": list(R), "reward_hat_logged": list(H_LOG), "reward_hat_target": list(H_TGT)}
    args[field][0] = bad
    with pytest.raises(ValueError, match=field):
        dr(args["rewards"], P_LOG, P_TGT, args["reward_hat_logged"], args["reward_hat_target"])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_but_finite_rewards_are_accepted() -> None:
    # Their sum overflows to inf; the fast finiteness check must not mistake that for bad input.
    e = ips([1e308, 1e308], [1.0, 1.0], [1.0, 1.0])
    assert e.value == math.inf


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((R, P_LOG[:4], P_TGT), "logged_prob"),
        ((R, P_LOG, P_TGT + [0.5]), "target_prob"),
        ((R[:3], P_LOG, P_TGT), "logged_prob"),
        ((R, P_LOG, P_TGT, H_LOG[:4], H_TGT), "reward_hat_logged"),
        ((R, P_LOG, P_TGT, H_LOG, H_TGT[:2]), "reward_hat_target"),
    ],
)
def test_length_mismatch_names_the_argument(args: tuple[Any, ...], field: str) -> None:
    name = "dr" if len(args) == 5 else "ips"
    with pytest.raises(ValueError, match=field):
        estimate(name, *args)


def test_shape_and_type_errors() -> None:
    with pytest.raises(ValueError, match="rewards.*empty"):
        ips([], [], [])
    with pytest.raises(ValueError, match="logged_prob.*empty"):
        support_warnings([], [])
    with pytest.raises(ValueError, match="one-dimensional"):
        ips([[1.0]], [[0.5]], [[0.5]])
    with pytest.raises(ValueError, match="rewards"):
        ips(["a", "b"], [0.5, 0.5], [0.5, 0.5])


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan])
def test_bad_clip_is_rejected(clip: float) -> None:
    for name in ESTIMATORS:
        with pytest.raises(ValueError, match="clip"):
            estimate(name, R, P_LOG, P_TGT, H_LOG, H_TGT, clip=clip)


def test_unknown_estimator_and_missing_model() -> None:
    with pytest.raises(ValueError, match="unknown estimator 'dm'"):
        estimate("dm", R, P_LOG, P_TGT)
    with pytest.raises(ValueError, match="reward_hat_logged"):
        estimate("dr", R, P_LOG, P_TGT)
    with pytest.raises(ValueError, match="reward_hat_target"):
        estimate("dr", R, P_LOG, P_TGT, H_LOG)


# ------------------------------------------------------------------ the benchmark script


def _load_bench() -> ModuleType:
    return importlib.import_module("nextbest.bench.estimators")


def test_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert _load_bench().main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["events"] == 10_000 and report["smoke"] is True
    assert set(report["results"]) == {"reference", *ESTIMATORS}
    for row in report["results"].values():
        assert row["events_per_s"] > 0 and row["ratio_vs_reference"] > 0
    table = capsys.readouterr().out
    assert all(name in table for name in ESTIMATORS)
