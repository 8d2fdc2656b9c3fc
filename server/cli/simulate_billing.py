"""``nextbest simulate --rewards conversions``: the simulator reports like billing does (#31).

The channels show the offers; billing reports the purchases hours or days later by customer and
product, with no event id (bandit/sim/billing.py), and customers also buy without offers. Every
placement runs one experiment split, the same for all of them: the holdout's customers are shown
nothing (their decisions are deferred and never activated), the rest are served by the model.
The run plays through an in-process server on simulated time (``sim_server``), sends each
simulated hour's purchases with ReportConversions, and at the end reads GetStats' difference to
the holdout in value per customer, next to the simulator's true uplift. ``--rewards events``
plays the same visits but reports each outcome at once by event id (no conversions), for the
comparison of learning; ``--compare-rewards`` runs both over ``--seeds`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from nextbest.client import NextbestClient

REWARDS = ("events", "conversions")
REWARD_LABELS = {
    "events": "every outcome by event id, at once (`--rewards events`)",
    "conversions": "purchases from billing, hours to days later (`--rewards conversions`)",
}
HOUR = 1.0 / 24.0


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The flags of ``nextbest simulate`` for billing and the holdout."""
    s.add_argument(
        "--rewards",
        choices=REWARDS,
        default="events",
        help="how outcomes reach the server: events = Reward by event id at once (default); conversions = purchases "
        "by customer and product, hours to days later, with ReportConversions (implies --local and a holdout)",
    )
    s.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="put this share of the customers in a holdout shown nothing, on every placement (implies --local; default "
        "with --rewards conversions: 0.2); prints the uplift against it next to the true uplift",
    )
    s.add_argument(
        "--organic-per-week",
        dest="organic_per_week",
        type=float,
        default=0.3,
        help="purchases a customer makes per week without any offer, on average (default 0.3)",
    )
    s.add_argument(
        "--compare-rewards",
        dest="compare_rewards",
        action="store_true",
        help="run --rewards events and conversions over --seeds, each on a fresh --local server, and print the share "
        "of the oracle of each and the uplift against the holdout next to the truth",
    )


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command line asks for this mode."""
    return bool(args.rewards == "conversions" or args.holdout is not None or args.compare_rewards)


def run(args: argparse.Namespace) -> int:
    if args.holdout is not None and not 0.0 < args.holdout < 1.0:
        raise SystemExit(f"error: --holdout must lie strictly between 0 and 1, not {args.holdout:g}")
    if args.context not in ("full", "channel"):
        raise SystemExit("error: --rewards conversions and --holdout take --context full or channel")
    if args.compare_rewards:
        return _compare(args)
    r = billing_run(vars(args), args.rewards, args.seed)
    if args.json is not None:
        text = json.dumps(r, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(uplift_table([r]))
    print(f"\nshare of the oracle (expected reward of the offers served): {r['share']:.3f}; {_counts(r)}")
    return 0


def _counts(r: dict[str, Any]) -> str:
    c = r["conversions"]
    return (
        f"{r['treated']} visits served, {r['held_out']} held out; conversions {c['attributed']} attributed, "
        f"{c['unattributed']} unattributed ({c['organic']} of all purchases organic); {r['seconds']:.0f} s"
    )


def billing_run(options: dict[str, Any], rewards: str, seed: int) -> dict[str, Any]:
    """One run on a fresh in-process server on simulated time: the share of the oracle and, with
    conversions, per placement the uplift GetStats reports and the true one."""
    from nextbest.bandit.sim.billing import HOLDOUT, TREATED, Billing, BillingSpec, with_billing
    from nextbest.bandit.sim.scenario import load_scenario
    from nextbest.bandit.sim.telecom import Scoreboard, TelecomSim, request_features
    from nextbest.cli.simlocal import SIM_EPOCH, sim_server

    args = argparse.Namespace(**options)
    sim = TelecomSim(load_scenario(args.scenario), seed=seed, reward=args.reward)
    spec = BillingSpec(holdout=0.2 if args.holdout is None else args.holdout, organic_per_week=args.organic_per_week)
    last_day = (args.events - 1) / sim.scenario.visits_per_day
    horizon = math.ceil((last_day + spec.delay_max_hours / 24.0) / HOUR) * HOUR  # every purchase is in by then
    billing = Billing(sim, seed, spec, horizon)
    conversions = rewards == "conversions"
    specs = with_billing(sim.placements(), spec, conversions=conversions)
    board = Scoreboard(max(len(p.arms) for p in specs))
    counts = {"attributed": 0, "unattributed": 0, "duplicate": 0, "organic": 0, "purchases": 0}
    held_out = 0
    _err(f"simulate: rewards {rewards}, holdout {spec.holdout:g}, seed {seed}, {args.events} events ({horizon:.1f} simulated days)")
    t0 = time.perf_counter()
    with sim_server(seed) as (target, clock, _), NextbestClient(target) as nb:

        def report(day: float) -> None:
            due = billing.due(day)
            for i in range(0, len(due), 500):
                batch = due[i : i + 500]
                for x in nb.report_conversions([p.conversion(SIM_EPOCH) for p in batch]):
                    if x.status == "error":
                        raise RuntimeError(f"a conversion was refused: {x.error}")
                    counts[x.status] += 1
                counts["organic"] += sum(p.organic for p in batch)
                counts["purchases"] += len(batch)

        nb.apply(specs)
        next_report = HOUR  # billing's feed: every simulated hour, the hour's purchases
        for i in range(args.events):
            v = sim.next_visit()
            clock.at_day(v.day)
            if conversions and v.day >= next_report:
                report(v.day)
                next_report = (math.floor(v.day / HOUR) + 1) * HOUR
            d = nb.choose(
                v.placement,
                request_features(v, args.context),
                customer_id=sim.customer_id(v.customer),
                event_id=f"sim-{i}",  # named: the seeded server's draw of each event is fixed
                defer_activation=True,
            )
            billing.decided(v, d.variant)
            if d.variant == HOLDOUT:  # shown nothing: the decision is never activated
                held_out += 1
                continue
            if d.arm_id not in v.arms:
                raise RuntimeError(f"{v.placement}: no offer of the scenario chosen ({d.arm_id!r}, {d.reason})")
            nb.activate(d.event_id)
            out = sim.respond(v, d.arm_id)
            billing.shown(v, d.arm_id, out)
            board.add(v, d.arm_id, out)
            if not conversions:
                nb.reward(d.event_id, out.reward)
            if (i + 1) % args.progress_every == 0:
                _err(f"  [{i + 1}/{args.events}] day {v.day:5.1f}, {time.perf_counter() - t0:.0f} s")
        placements: dict[str, dict[str, Any]] = {}
        if conversions:  # the purchases still to come, hour by hour, to the horizon
            day = next_report
            while day <= horizon + 1e-9:
                clock.at_day(day)
                report(day)
                day += HOUR
            for p in specs:
                s = nb.stats(p.id, since=SIM_EPOCH, until=SIM_EPOCH + horizon * 86400.0)
                got = {x.variant: x for x in s.conversions}
                if TREATED not in got or HOLDOUT not in got:
                    continue
                diff = got[TREATED].difference_to_holdout.value_per_customer
                truth = billing.true_uplift(p.id, horizon)
                placements[p.id] = {
                    "customers": int(got[TREATED].customers),
                    "holdout_customers": int(got[HOLDOUT].customers),
                    "uplift": diff.estimate,
                    "low": diff.low,
                    "high": diff.high,
                    "true": truth,
                    "inside": bool(diff.low <= truth <= diff.high),
                }
    per = board.per_event()
    best = float(per["oracle"][0].sum())
    window = min(args.window, len(board))
    last = board.per_event(len(board) - window)
    r = {
        "rewards": rewards,
        "seed": seed,
        "events": args.events,
        "holdout": spec.holdout,
        "treated": len(board),
        "held_out": held_out,
        "share": float(per["policy_expected"][0].sum()) / best if best > 0 else 0.0,
        "share_last": float(last["policy_expected"][0].sum()) / float(last["oracle"][0].sum()) if window else 0.0,
        "conversions": counts,
        "placements": placements,
        "seconds": time.perf_counter() - t0,
    }
    _err(f"  rewards {rewards}, seed {seed}: {r['share']:.3f} of the oracle; {_counts(r)}")
    return r


def uplift_table(runs: list[dict[str, Any]]) -> str:
    """Markdown, one row per placement and seed: GetStats' difference to the holdout in value
    per customer with its 95 % interval, and the simulator's true uplift."""
    lines = [
        "| seed | placement | customers (holdout) | uplift per customer [95 % CI] | true uplift | inside |",
        "|---:|---|---:|---|---:|:---:|",
    ]
    for r in runs:
        for pid, u in r["placements"].items():
            lines.append(
                f"| {r['seed']} | {pid} | {u['customers']} ({u['holdout_customers']}) | {u['uplift']:+.2f} [{u['low']:+.2f}, "
                f"{u['high']:+.2f}] | {u['true']:+.2f} | {'yes' if u['inside'] else 'no'} |"
            )
    return "\n".join(lines)


def compare_tables(runs: list[dict[str, Any]], events: int, window: int) -> str:
    """Markdown: the share of the oracle of each way of rewarding (mean ± sd over seeds), then per
    placement the uplift and the truth averaged over seeds and how often the interval held it."""
    import numpy as np  # the server's dependencies: the CLI starts without them

    def cell(x: list[float]) -> str:
        return f"{np.mean(x):.3f} ± {np.std(x, ddof=1):.3f}" if len(x) > 1 else f"{np.mean(x):.3f}"

    lines = [f"| how outcomes reach the server | all {events:,} events | last {window:,} |", "|---|---:|---:|"]
    for rewards in REWARDS:
        mine = [r for r in runs if r["rewards"] == rewards]
        if mine:
            lines.append(f"| {REWARD_LABELS[rewards]} | {cell([r['share'] for r in mine])} | {cell([r['share_last'] for r in mine])} |")
    conv = [r for r in runs if r["rewards"] == "conversions"]
    if conv:
        lines += [
            "",
            "| placement | uplift per customer (mean over seeds) | true uplift (mean) | truth inside the 95 % CI |",
            "|---|---:|---:|---:|",
        ]
        for pid in conv[0]["placements"]:
            us = [r["placements"][pid] for r in conv if pid in r["placements"]]
            k = sum(u["inside"] for u in us)
            lines.append(
                f"| {pid} | {np.mean([u['uplift'] for u in us]):+.2f} | {np.mean([u['true'] for u in us]):+.2f} | {k} of {len(us)} |"
            )
    return "\n".join(lines)


def coverage(runs: list[dict[str, Any]]) -> tuple[int, int]:
    """(intervals that hold the true uplift, intervals) over every placement of every conversions run."""
    us = [u for r in runs if r["rewards"] == "conversions" for u in r["placements"].values()]
    return sum(u["inside"] for u in us), len(us)


def _compare(args: argparse.Namespace) -> int:
    from nextbest.cli.simlocal import seed_list

    seeds = seed_list(args.seeds)
    todo = [(rewards, seed) for seed in seeds for rewards in REWARDS]
    started = time.perf_counter()
    options = {**vars(args), "func": None}
    if args.jobs > 1:  # each run mostly waits on its server's threads
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = [f.result() for f in [pool.submit(billing_run, options, rw, s) for rw, s in todo]]
    else:
        runs = [billing_run(options, rw, s) for rw, s in todo]
    k, n = coverage(runs)
    seeds_inside = sum(all(u["inside"] for u in r["placements"].values()) for r in runs if r["rewards"] == "conversions")
    command = " ".join(
        [f"nextbest simulate --compare-rewards --seeds {','.join(map(str, seeds))} --events {args.events}"]
        + ([f"--window {args.window}"] if args.window != 5000 else [])
        + ([f"--holdout {args.holdout:g}"] if args.holdout is not None else [])
        + ([f"--organic-per-week {args.organic_per_week:g}"] if args.organic_per_week != 0.3 else [])
        + ([f"--context {args.context}"] if args.context != "full" else [])
        + ([f"--scenario {args.scenario}"] if args.scenario else [])
        + ([f"--reward {args.reward}"] if args.reward else [])
    )
    if args.json is not None:
        text = json.dumps({"command": command, "runs": runs, "inside": [k, n]}, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(compare_tables(runs, args.events, min(args.window, args.events)))
    print(f"\ntrue uplift inside the 95 % interval in {k} of {n} (placement, seed) pairs;", end=" ")
    print(f"in every placement in {seeds_inside} of {len(seeds)} seeds")
    print(f"{len(seeds)} seeds, {time.perf_counter() - started:.0f} s; reproduce: `{command}`")
    return 0
