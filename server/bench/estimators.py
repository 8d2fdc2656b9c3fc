#!/usr/bin/env python3
"""Throughput of the off-policy estimators (bandit/offline/estimators.py) on synthetic logged events.

Each estimator is timed end to end (input validation, weights, ESS, support diagnostics, value
and CI) on the same float64 arrays, and reported as events/s and as a ratio against a bare
reference measured in the same run: ``np.mean(target_prob / logged_prob * rewards)``, the
IPS point estimate with nothing else. No estimator can beat it, so the ratio says how much the
validation and diagnostics cost, independently of how fast this machine is.

Usage::

    python -m nextbest.bench.estimators                 # 1,000,000 events, best of 7
    python -m nextbest.bench.estimators --smoke         # 10,000 events, quick, no targets
    python -m nextbest.bench.estimators --json out.json --strict   # exit 1 if a target is missed
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from nextbest.bandit.offline import estimators

FloatArray = NDArray[np.float64]

FULL_EVENTS = 1_000_000
SMOKE_EVENTS = 10_000
# events/s each estimator must reach on the full run; the reference has no target.
TARGETS: dict[str, float] = {"ips": 20e6, "snips": 20e6, "dr": 5e6}
MIN_REPEAT_SECONDS = 0.02  # each repeat loops until this long, so tiny runs are not all noise


def synthetic_log(n: int, *, actions: int = 5, seed: int = 0) -> dict[str, FloatArray]:
    """A log shaped like the service's: epsilon-greedy logging, a partly deterministic candidate."""
    rng = np.random.default_rng(seed)
    eps = 0.2
    greedy = rng.random(n) < 1.0 - eps + eps / actions
    logged = np.where(greedy, 1.0 - eps + eps / actions, eps / actions)
    # Half the rows: a deterministic candidate (0 or 1); the rest a stochastic one.
    target = np.where(rng.random(n) < 0.5, (rng.random(n) < 0.4).astype(np.float64), rng.random(n))
    true_p = rng.uniform(0.05, 0.3, n)
    rewards = (rng.random(n) < true_p).astype(np.float64)
    hat_logged = np.clip(true_p + rng.normal(0.0, 0.05, n), 0.0, 1.0)
    hat_target = np.clip(true_p + rng.normal(0.0, 0.05, n), 0.0, 1.0)
    return {
        "rewards": rewards,
        "logged_prob": logged,
        "target_prob": target,
        "reward_hat_logged": hat_logged,
        "reward_hat_target": hat_target,
    }


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best per-call time over ``repeats`` timed loops: the least disturbed measurement."""
    fn()  # warm up: first-touch page faults, lazy imports
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-9)
    number = max(1, int(MIN_REPEAT_SECONDS / once))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def run(n: int, repeats: int, clip: float | None) -> dict[str, Any]:
    log = synthetic_log(n)
    r, p_log, p_tgt = log["rewards"], log["logged_prob"], log["target_prob"]
    h_log, h_tgt = log["reward_hat_logged"], log["reward_hat_target"]
    cases: dict[str, Callable[[], object]] = {
        "reference": lambda: np.mean(p_tgt / p_log * r),
        "ips": lambda: estimators.ips(r, p_log, p_tgt, clip=clip),
        "snips": lambda: estimators.snips(r, p_log, p_tgt, clip=clip),
        "dr": lambda: estimators.dr(r, p_log, p_tgt, h_log, h_tgt, clip=clip),
    }
    seconds = {name: best_seconds(fn, repeats) for name, fn in cases.items()}
    results: dict[str, Any] = {}
    for name, s in seconds.items():
        target = TARGETS.get(name)
        results[name] = {
            "seconds": s,
            "events_per_s": n / s,
            "ratio_vs_reference": seconds["reference"] / s,
            "target_events_per_s": target,
            "meets_target": None if target is None else n / s >= target,
        }
    return {
        "events": n,
        "repeats": repeats,
        "clip": clip,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    title = f"{report['events']:,} events, best of {report['repeats']}, clip={report['clip']}, numpy {report['numpy']}"
    lines = [
        title,
        f"{'estimator':<10} {'ms/call':>9} {'events/s':>14} {'vs ref':>7} {'target':>10}  ok",
    ]
    for name, row in report["results"].items():
        target = row["target_events_per_s"]
        ok = {None: "-", True: "yes", False: "NO"}[row["meets_target"]]
        lines.append(
            f"{name:<10} {row['seconds'] * 1e3:>9.3f} {row['events_per_s']:>14,.0f} "
            f"{row['ratio_vs_reference']:>7.3f} "
            f"{'-' if target is None else f'{target / 1e6:g}M':>10}  {ok}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EVENTS:,} events, quick")
    parser.add_argument("--events", type=int, help=f"number of events (default {FULL_EVENTS:,})")
    parser.add_argument("--repeats", type=int, help="timed repeats, best kept (default 7; 3 smoke)")
    parser.add_argument("--clip", type=float, default=None, help="weight clip for all estimators")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed (not with --smoke)")
    args = parser.parse_args(argv)
    n = args.events or (SMOKE_EVENTS if args.smoke else FULL_EVENTS)
    repeats = args.repeats or (3 if args.smoke else 7)
    if n < 2 or repeats < 1:
        parser.error("--events must be >= 2 and --repeats >= 1")

    report = run(n, repeats, args.clip)
    report["smoke"] = bool(args.smoke)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    missed = [k for k, row in report["results"].items() if row["meets_target"] is False]
    if missed and not args.smoke:
        print(f"below target: {', '.join(missed)}", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
