#!/usr/bin/env python3
"""Throughput of a whole ``nextbest replay`` from the database, in events/s.

A synthetic placement (3 arms, 3 customer segments, a logging policy that explores) is written
into a temporary SQLite database; then each scenario runs end to end as the CLI does (read the
log, compute the policies' distributions, estimate) and is reported as events/s and as a ratio
against a plain reference measured in the same run: the bare ``sqlite3`` SELECT of the same
rows, with no decoding. No replay can beat it, so the ratio does not depend on the machine.

Scenarios: logged + uniform + constant with IPS and SNIPS (pure numpy, target >= 100,000
events/s); the same with DR (its reward model is VW, cross-fitted); one ``vw:`` candidate
(progressive validation, bounded by VW).

Usage::

    python -m nextbest.bench.replay                  # 200,000 events
    python -m nextbest.bench.replay --smoke          # 3,000 events, quick
    python -m nextbest.bench.replay --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nextbest.bandit.offline.replay import evaluate, parse_policy
from nextbest.bandit.spec import PlacementSpec
from nextbest.config.plans import plan
from nextbest.offline.log_source import read_replay_log
from nextbest.storage import tables as t
from nextbest.storage.sql import open_store

FULL_EVENTS = 200_000
SMOKE_EVENTS = 3_000
TARGET = 100_000.0  # events/s of the numpy-only scenario
PLACEMENT = "offers"
ARMS = {"a": {"category": "data", "price": 4.99}, "b": {"category": "voice", "price": 2.5}, "c": {"category": "tv", "price": 9.0}}
SEGMENTS = ("gold", "silver", "bronze")
# Reward probability per segment (rows) and arm (columns): arm a is best everywhere.
TRUE_P = np.array([[0.8, 0.2, 0.1], [0.7, 0.3, 0.2], [0.6, 0.1, 0.3]])
LOGGING_PMF = np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]])


def make_database(path: Path, n: int, seed: int = 0) -> str:
    """A SQLite log of ``n`` decisions (every 97th without an arm) plus ``n / 50`` open ones."""
    url = f"sqlite:///{path}"
    store = open_store(url)
    spec = PlacementSpec.model_validate({"id": PLACEMENT, "arms": [{"id": k, "features": v} for k, v in ARMS.items()]})
    p = plan({}, [spec], 1)
    store.save_placements(p.records, p.new_arm_versions)
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, len(SEGMENTS), n)
    u = rng.random(n)
    chosen = (u[:, None] > np.cumsum(LOGGING_PMF[seg], axis=1)).sum(axis=1)
    reward = (rng.random(n) < TRUE_P[seg, chosen]).astype(float)
    arpu = np.round(rng.uniform(5, 50, n), 2)
    arms = [[k, 1] for k in ARMS]
    ids = list(ARMS)
    rows: list[dict[str, Any]] = []
    t0 = 1_700_000_000.0
    for i in range(n + n // 50):
        closed = i < n
        j = i % n
        s, c = int(seg[j]), int(chosen[j])
        rows.append(
            {
                "event_id": f"e{i:08d}",
                "placement_id": PLACEMENT,
                "customer_id": f"c{j % 1000}",
                "created_at": t0 + i * 0.5,
                "deadline": t0 + i * 0.5 + 600,
                "features": [["customer", "segment", SEGMENTS[s]], ["customer", "arpu", float(arpu[j])]],
                "arms": arms if i % 97 else [],
                "pmf": [float(x) for x in LOGGING_PMF[s]] if i % 97 else [],
                "chosen": c if i % 97 else None,
                "arm_id": ids[c] if i % 97 else None,
                "probability": float(LOGGING_PMF[s, c]),
                "model_version": i,
                "outcome": (1 if reward[j] else 2) if closed and i % 97 else (3 if closed else 0),
                "reward": float(reward[j]) if closed and i % 97 else None,
                "rewarded_at": None,
                "learn_seq": i + 1 if closed and i % 97 else None,
            }
        )
    with store.engine.begin() as conn:
        for k in range(0, len(rows), 20_000):
            conn.execute(t.decisions.insert(), rows[k : k + 20_000])
    store.close()
    return url


def _reference(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT event_id, created_at, reward, probability, chosen, arms, pmf FROM decisions "
            "WHERE placement_id = ? AND outcome IN (1, 2) AND chosen IS NOT NULL AND reward IS NOT NULL "
            "ORDER BY created_at, event_id",
            (PLACEMENT,),
        ).fetchall()
    finally:
        conn.close()
    return len(rows)


def _replay(url: str, policies: Sequence[str], estimators: Sequence[str]) -> Callable[[], int]:
    def run() -> int:
        pols = [parse_policy(p) for p in policies]
        need = "dr" in estimators or any(p.needs_features for p in pols)
        log = read_replay_log(url, PLACEMENT, with_features=need)
        evaluate(log, pols, estimators)
        return log.n

    return run


def best(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
    return min(times), n


def run(n: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-") as d:
        path = Path(d) / "log.db"
        t0 = time.perf_counter()
        url = make_database(path, n)
        setup = time.perf_counter() - t0
        simple = ["logged", "uniform", "constant:a"]
        scenarios: dict[str, tuple[Callable[[], int], int]] = {
            "reference_select": (lambda: _reference(path), repeats),
            "simple_ips_snips": (_replay(url, simple, ["ips", "snips"]), repeats),
            "simple_ips_snips_dr": (_replay(url, simple, ["ips", "snips", "dr"]), 1),
            "vw_policy_ips": (_replay(url, ["vw:--cb_explore_adf --epsilon 0.1 -q UA"], ["ips"]), 1),
        }
        out: dict[str, Any] = {}
        for name, (fn, reps) in scenarios.items():
            seconds, events = best(fn, reps)
            out[name] = {"seconds": seconds, "events": events, "events_per_s": events / seconds}
    ref = out["reference_select"]["events_per_s"]
    for v in out.values():
        v["ratio_to_reference"] = v["events_per_s"] / ref
    return {"events": n, "setup_seconds": setup, "scenarios": out}


def format_table(report: dict[str, Any]) -> str:
    closed = report["scenarios"]["simple_ips_snips"]["events"]
    rows = report["events"] + report["events"] // 50
    lines = [
        f"{closed:,} closed decisions replayed of {rows:,} logged (others open or without an arm), " + f"best of {report['repeats']}",
        f"{'scenario':<22}{'seconds':>10}{'events/s':>14}{'vs SELECT':>11}",
    ]
    for name, v in report["scenarios"].items():
        lines.append(f"{name:<22}{v['seconds']:>10.3f}{v['events_per_s']:>14,.0f}{v['ratio_to_reference']:>10.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EVENTS:,} events, quick, no target")
    parser.add_argument("--events", type=int, help=f"number of events (default {FULL_EVENTS:,})")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the fast scenarios, best kept")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    n = args.events or (SMOKE_EVENTS if args.smoke else FULL_EVENTS)
    report = run(n, args.repeats)
    report.update(
        smoke=args.smoke, repeats=args.repeats, target_events_per_s=TARGET, python=platform.python_version(), machine=platform.machine()
    )
    simple = report["scenarios"]["simple_ips_snips"]["events_per_s"]
    report["target_met"] = bool(simple >= TARGET)
    print(format_table(report))
    if not args.smoke:
        print(f"target {TARGET:,.0f} events/s for simple_ips_snips: {'met' if report['target_met'] else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
