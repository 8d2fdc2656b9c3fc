"""``nextbest simulate`` and ``nextbest bakeoff``: drive a real server over gRPC and say how well it learns.

simulate plays a telecom customer base (bandit/sim/telecom.py) against the server's
placements and compares what the served policy earned with what uniform random, the best
fixed offer and an oracle would have earned on the same visits. bakeoff compares the service
with Vowpal Wabbit run directly (bandit/sim/bakeoff.py). Progress goes to stderr, results to
stdout, so ``--json`` output can be piped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nextbest.cli import simulate_billing
from nextbest.cli.args import positive_int
from nextbest.cli.simlocal import LOCAL_SEED, SIM_EPOCH, SimClock, local_server, seed_list, sim_server
from nextbest.cli.target import add_target
from nextbest.client import NextbestClient

CONTEXT_MODES = ("full", "channel", "channel+history", "profile", "profile+history")  # nextbest.bandit.sim.telecom.CONTEXTS
PROFILE_MODES = ("profile", "profile+history")
HISTORY_MODES = ("channel+history", "profile+history")
POLICIES = (
    ("policy", "served policy"),
    ("policy_expected", "  (its expected value)"),
    ("random", "uniform random"),
    ("best_fixed", "best fixed offer"),
    ("oracle", "oracle"),
)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- simulate ---------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from nextbest.bandit.sim.scenario import load_scenario
    from nextbest.bandit.sim.telecom import TelecomSim

    if args.compare_contexts is not None:
        return _compare_contexts(args)
    if simulate_billing.wanted(args):  # purchases from billing, a holdout (#31)
        return simulate_billing.run(args)
    scenario = load_scenario(args.scenario)  # an invalid file stops here, before any call
    sim = TelecomSim(scenario, seed=args.seed, reward=args.reward)
    specs = _specs(sim, args, args.context)
    where = "an in-process server on simulated time" if args.local else f"target {args.target}"
    _err(
        f"simulate: scenario {scenario.name}, {args.events} events, seed {args.seed}, reward = {sim.reward_kind}, "
        f"context {args.context}, {where}"
    )
    if args.local:
        with sim_server(args.seed) as (target, clock, learned):
            board, elapsed, start_versions = _play(args, sim, specs, target, clock, learned, f"{args.event_prefix or 'sim'}")
    else:
        if args.context in HISTORY_MODES:
            _err("note: history windows count in the server's clock (wall time): use --local for windows in simulated days")
        board, elapsed, start_versions = _play(args, sim, specs, args.target, None, None, args.event_prefix)
    trained = {p: n for p, n in start_versions.items() if n > 0}
    if trained:
        _err(f"note: these placements had learned before this run: {trained}; use a fresh database for a learning curve from scratch")
    report = _report(scenario, sim, board, args, elapsed)
    if args.plot:
        from nextbest.cli.simulate_plot import plot

        plot(board, scenario, args.plot)
        _err(f"learning curve written to {args.plot}")
    if args.json is not None:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            _err(f"results written to {args.json}")
    if args.json != "-":
        _print_table(report)
    return 0


def _specs(sim: Any, args: argparse.Namespace, context: str) -> list[Any]:
    """The scenario's placements with the command line's overrides and the context mode's setting."""
    from nextbest.bandit.spec import FatigueSpec

    specs = sim.placements()
    if args.fatigue_penalty is not None:  # compare the service with and without its fatigue penalty
        fatigue = (
            FatigueSpec(kind=args.fatigue_kind, strength=args.fatigue_penalty, half_life=args.fatigue_half_life)
            if args.fatigue_penalty > 0
            else None
        )
        specs = [p.model_copy(update={"fatigue": fatigue}) for p in specs]
    if args.learn_at is not None:  # compare learning at the first reward with learning at the close
        specs = [p.model_copy(update={"learn_at": args.learn_at}) for p in specs]
    if args.reward_window is not None:
        specs = [p.model_copy(update={"reward_window": args.reward_window}) for p in specs]
    if getattr(args, "model_group", None):  # one model for every placement, the placement a feature (#33)
        specs = [p.model_copy(update={"model_group": args.model_group}) for p in specs]
    return context_specs(specs, context)


def _play(
    args: argparse.Namespace,
    sim: Any,
    specs: list[Any],
    target: str,
    clock: SimClock | None,
    learned: Callable[[str], int] | None,
    event_prefix: str,
) -> tuple[Any, float, dict[str, int]]:
    """Apply the placements (and load the profiles the context needs), then play the visits.

    ``clock``: the in-process server's, set to each visit's simulated time before its Choose.
    ``learned``: a placement's learned count, to wait for each reward to be learned before the
    next visit, so that a seeded run makes the same decisions every time."""
    from nextbest.bandit.sim.telecom import Scoreboard, request_features

    board = Scoreboard(max(len(p.arms) for p in specs))
    start_versions: dict[str, int] = {}
    sent: dict[str, int] = {}
    with NextbestClient(target) as nb:
        if not args.no_apply:
            changes = nb.apply(specs)
            _err(f"applied {len(specs)} placements ({len(changes)} changes)")
        base = {p.id: learned(p.id) for p in specs} if learned is not None else {}
        profiles = args.context in PROFILE_MODES
        refresh = args.profile_refresh if profiles and args.profile_refresh > 0 else math.inf
        if profiles:
            # A warehouse extract of day 0; an in-process server's clock is at day 0 now.
            _load_extract(sim, target, 0.0, SIM_EPOCH if clock is not None else time.time(), args.profiles_file)
        t0 = last = time.perf_counter()
        for i in range(args.events):
            v = sim.next_visit()
            if clock is not None:
                clock.at_day(v.day)
            if v.day >= refresh:  # the warehouse's next extract, as of the start of its day
                day = math.floor(v.day / args.profile_refresh) * args.profile_refresh
                as_of = SIM_EPOCH + day * 86400.0 if clock is not None else time.time()
                _load_extract(sim, target, day, as_of, args.profiles_file, quiet=True)
                refresh = day + args.profile_refresh
            # With --event-prefix the simulator names its events; else the server does, which is
            # faster (a caller-chosen id waits for its insert: the database decides it is new).
            event_id = f"{event_prefix}-{i}" if event_prefix else ""
            d = nb.choose(v.placement, request_features(v, args.context), customer_id=sim.customer_id(v.customer), event_id=event_id)
            if not d.arm_id:
                raise RuntimeError(f"{v.placement}: no offer chosen ({d.reason})")
            if d.arm_id not in v.arms:
                raise RuntimeError(
                    f"{v.placement}: the server chose {d.arm_id!r}, not an offer of the scenario (use it without --no-apply?)"
                )
            start_versions.setdefault(v.placement, d.model_version)
            out = sim.respond(v, d.arm_id)
            if out.reward > 0 or not args.successes_only:
                nb.reward(d.event_id, out.reward)
                sent[v.placement] = sent.get(v.placement, 0) + 1
                if learned is not None:
                    _wait_learned(learned, v.placement, base.get(v.placement, 0) + sent[v.placement])
            board.add(v, d.arm_id, out)
            done = i + 1
            if done % args.progress_every == 0 or done == args.events or time.perf_counter() - last > 10:
                last = time.perf_counter()
                _err(_progress(board, done, args.events, done / (last - t0), v.day))
        elapsed = time.perf_counter() - t0
    return board, elapsed, start_versions


def _wait_learned(learned: Callable[[str], int], placement: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while learned(placement) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{placement}: the model did not learn example {n} within {timeout:g}s")
        time.sleep(0.0002)


# -- what the channel sends: context modes ----------------------------------------------------------

HISTORY_WINDOWS = ("7d", "30d")


def context_specs(specs: list[Any], context: str) -> list[Any]:
    """The placements for a context mode: the profile modes read the stored profile, the history
    modes give every arm its history features over HISTORY_WINDOWS."""
    from nextbest.bandit.spec import ContextSpec

    if context not in PROFILE_MODES + HISTORY_MODES:
        return specs
    ctx = ContextSpec.model_validate(
        {"profile": context in PROFILE_MODES, "history": list(HISTORY_WINDOWS) if context in HISTORY_MODES else []}
    )
    return [p.model_copy(update={"context": ctx}) for p in specs]


def export_profiles(sim: Any, path: str | Path, *, day: float = 0.0, as_of: float = SIM_EPOCH) -> int:
    """Write the scenario's customer base as a warehouse extract (Parquet): ``customer_id``,
    ``as_of`` and one ``customer.<name>`` column per feature, one row per customer; returns the
    rows. The values are those of ``day`` (day 0: like an extract taken when the run starts), so
    the ones that change over time (``days_since_recharge`` and its band ``lapse``) go stale as
    the simulated days pass, as a daily extract does within its day."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = sim.scenario.customers.count
    rows = [sim.profile(c, day) for c in range(n)]
    columns: dict[str, Any] = {
        "customer_id": pa.array([sim.customer_id(c) for c in range(n)], pa.string()),
        "as_of": pa.array([int(as_of)] * n, pa.timestamp("s", tz="UTC")),
    }
    for name in rows[0]:
        values = [r[name] for r in rows]
        kind = pa.string() if isinstance(values[0], str) else pa.float64()
        columns[f"customer.{name}"] = pa.array(values, kind)
    pq.write_table(pa.table(columns), str(path))
    return int(n)


def _load_extract(sim: Any, target: str, day: float, as_of: float, path: str | None, quiet: bool = False) -> None:
    """Export the customer base as of ``day`` and load it into the server."""
    with tempfile.TemporaryDirectory(prefix="nextbest-profiles-") as tmp:
        path = path or str(Path(tmp) / "profiles.parquet")
        n = export_profiles(sim, path, day=day, as_of=as_of)
        if not quiet:
            _err(f"exported {n} customer profiles as of day {day:g} to {path}")
        load_profiles(path, target, quiet)


def load_profiles(path: str, target: str, quiet: bool = False) -> None:
    """``nextbest profiles load PATH --format parquet --target TARGET``, its report on stderr
    (none when ``quiet``)."""
    import contextlib
    import io

    from nextbest.cli import profiles

    parser = argparse.ArgumentParser(prog="nextbest")
    profiles.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["profiles", "load", path, "--format", "parquet", "--target", target])
    with contextlib.redirect_stdout(io.StringIO() if quiet else sys.stderr):
        rc = int(args.func(args))
    if rc != 0:
        raise RuntimeError(f"nextbest profiles load {path} failed (exit code {rc})")


# -- the comparison of context modes ----------------------------------------------------------------

PLACEMENTS_ALONE = (("sim.ivr", "IVR"), ("sim.ussd_menu", "USSD"))
CONTEXT_LABELS = {
    "full": "every customer feature in the request (`full`)",
    "channel": "channel and customer id only (`channel`)",
    "profile": "+ stored profile (`profile`)",
    "channel+history": "+ history 7d, 30d (`channel+history`)",
    "profile+history": "+ profile + history 7d, 30d (`profile+history`)",
}


def _compare_contexts(args: argparse.Namespace) -> int:
    """Each context mode over the same seeds, each run on a fresh in-process server on simulated
    time; a Markdown table of the share of the oracle (mean ± standard deviation over seeds)."""
    from nextbest.bandit.sim.scenario import load_scenario
    from nextbest.bandit.sim.telecom import CONTEXTS

    contexts = [c.strip() for c in args.compare_contexts.split(",") if c.strip()]
    for c in contexts:
        if c not in CONTEXTS:
            raise SystemExit(f"error: unknown context {c!r} (expected some of {', '.join(CONTEXTS)})")
    seeds = seed_list(args.seeds)
    load_scenario(args.scenario)  # an invalid file stops here, before any run
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    todo = [(ctx, seed) for seed in seeds for ctx in contexts]
    if args.jobs > 1:  # runs in parallel processes: each is mostly waiting on its server's threads
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(_context_run, vars(args), ctx, seed) for ctx, seed in todo]
            runs = [f.result() for f in futures]
    else:
        runs = [_context_run(vars(args), ctx, seed) for ctx, seed in todo]
    table = context_table(runs, contexts, args.events, min(args.window, args.events))
    command = "nextbest simulate " + " ".join(
        [f"--compare-contexts {','.join(contexts)}", f"--seeds {','.join(map(str, seeds))}", f"--events {args.events}"]
        + ([f"--window {args.window}"] if args.window != 5000 else [])
        + ([f"--scenario {args.scenario}"] if args.scenario else [])
        + ([f"--reward {args.reward}"] if args.reward else [])
        + ([f"--profile-refresh {args.profile_refresh:g}"] if args.profile_refresh > 0 else [])
        + ([f"--model-group {args.model_group}"] if args.model_group else [])
    )
    if args.json is not None:
        text = json.dumps({"command": command, "runs": runs, "seconds": time.perf_counter() - started}, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
        _err(f"results written to {args.json}")
    print(table)
    print(f"\n{len(seeds)} seeds, {time.perf_counter() - started:.0f} s; reproduce: `{command}`")
    return 0


def _context_run(options: dict[str, Any], context: str, seed: int) -> dict[str, Any]:
    """One run of the comparison: a fresh in-process server on simulated time; its shares."""
    from nextbest.bandit.sim.scenario import load_scenario
    from nextbest.bandit.sim.telecom import TelecomSim

    args = argparse.Namespace(**{**options, "context": context, "seed": seed, "no_apply": False})
    sim = TelecomSim(load_scenario(args.scenario), seed=seed, reward=args.reward)
    _err(f"simulate: context {context}, seed {seed}, {args.events} events")
    with sim_server(seed) as (target, clock, learned):
        board, elapsed, _ = _play(args, sim, _specs(sim, args, context), target, clock, learned, "sim")
    refresh = args.profile_refresh if context in PROFILE_MODES else 0.0
    r = {"context": context, "profile_refresh": refresh, "seed": seed, "events": len(board), "seconds": elapsed}
    r.update(shares(board, args.window))
    _err(f"  {context} seed {seed}: {r['all']:.3f} of the oracle, last {args.window}: {r['last']:.3f} ({elapsed:.0f} s)")
    return r


def shares(board: Any, window: int) -> dict[str, float]:
    """The served policy's realized reward as a share of the oracle's expected reward: over all
    events, over the last ``window``, and over all events of each placement of PLACEMENTS_ALONE."""
    import numpy as np  # the server's dependencies: the CLI starts without them

    n = len(board)
    per = board.per_event()
    got, best = per["policy"][0], per["oracle"][0]
    last = slice(max(0, n - window), n)
    out = {"all": _share(got, best), "last": _share(got[last], best[last])}
    places = np.array(board.placement)
    for pid, _ in PLACEMENTS_ALONE:
        m = places == pid
        out[pid] = _share(got[m], best[m])
    return out


def _share(got: Any, best: Any) -> float:
    total = float(best.sum())
    return float(got.sum()) / total if total > 0 else 0.0


def context_table(runs: list[dict[str, Any]], contexts: list[str], events: int, window: int) -> str:
    """Markdown: one row per context mode, mean ± standard deviation over the runs' seeds."""
    import numpy as np  # the server's dependencies: the CLI starts without them

    cols = [("all", f"all {events:,} events"), ("last", f"last {window:,}")] + [
        (pid, f"{name}, all events") for pid, name in PLACEMENTS_ALONE
    ]
    lines = [
        "| what the channels send | " + " | ".join(label for _, label in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for ctx in contexts:
        mine = [r for r in runs if r["context"] == ctx]
        cells = []
        for key, _ in cols:
            x = np.array([r[key] for r in mine])
            cells.append(f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}")
        lines.append(f"| {_label(ctx, mine[0].get('profile_refresh', 0.0) if mine else 0.0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(context: str, refresh: float) -> str:
    label = CONTEXT_LABELS.get(context, context)
    if refresh > 0:
        every = "daily" if refresh == 1 else f"every {refresh:g} days"
        label = label.replace("`)", f"`, extract reloaded {every})")
    return label


def _progress(board: Any, done: int, total: int, rate: float, day: float) -> str:
    w = min(1000, done)
    s = board.summary(done - w)
    o = s["oracle"]["reward"]
    share = s["policy"]["reward"] / o if o > 0 else 0.0
    return (
        f"[{done:>{len(str(total))}}/{total}] day {day:5.1f}  {rate:5.0f} ev/s | last {w}: policy {s['policy']['reward']:.3f}"
        f" ({share:4.0%} of oracle {o:.3f})  random {s['random']['reward']:.3f}  best fixed {s['best_fixed']['reward']:.3f}"
    )


def _report(scenario: Any, sim: Any, board: Any, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    import numpy as np  # the server's dependencies: the CLI starts without them

    n = len(board)
    window = min(args.window, n)
    overall, last = board.summary(), board.summary(n - window)
    report: dict[str, Any] = {k: overall[k]["reward"] for k, _ in POLICIES}
    report.update(
        scenario=scenario.name,
        events=n,
        seed=args.seed,
        reward=sim.reward_kind,
        events_per_second=n / elapsed if elapsed > 0 else 0.0,
        overall=overall,
        last={"events": window, **last},
        periods=[],
        placements={},
    )
    day = np.array(board.day)
    for p in scenario.promotions:
        idx = np.flatnonzero((day >= p.start_day) & (day < p.start_day + p.days))
        if len(idx):
            report["periods"].append(
                {
                    "name": p.name,
                    "start_day": p.start_day,
                    "days": p.days,
                    "events": len(idx),
                    **board.summary(int(idx[0]), int(idx[-1]) + 1),
                }
            )
    per = board.per_event(n - window)
    places = np.array(board.placement[n - window :])
    for pid in sorted(set(board.placement)):
        m = places == pid
        report["placements"][pid] = {"events": int(m.sum()), **{k: float(per[k][0][m].mean()) if m.any() else 0.0 for k, _ in POLICIES}}
    return report


def _print_table(r: dict[str, Any]) -> None:
    last = r["last"]
    print(
        f"\nnextbest simulate: scenario {r['scenario']}, {r['events']} events, seed {r['seed']}, "
        f"reward = {r['reward']}, {r['events_per_second']:.0f} events/s"
    )
    head = (
        f"{'average per event':<24}{'reward':>9}{'revenue':>10}{'% oracle':>10}   "
        f"|{'last ' + str(last['events']):>11}{'revenue':>10}{'% oracle':>10}"
    )
    print(head)
    print("-" * len(head))
    o_all, o_last = r["overall"]["oracle"]["reward"], last["oracle"]["reward"]
    for key, label in POLICIES:
        a, b = r["overall"][key], last[key]
        print(
            f"{label:<24}{a['reward']:>9.3f}{a['revenue']:>10.2f}{_pct(a['reward'], o_all):>10}   "
            f"|{b['reward']:>11.3f}{b['revenue']:>10.2f}{_pct(b['reward'], o_last):>10}"
        )
    for p in r["periods"]:
        o = p["oracle"]["reward"]
        print(
            f"\n{p['name']} (days {p['start_day']:g}-{p['start_day'] + p['days']:g}, {p['events']} events): "
            f"policy {p['policy']['reward']:.3f} = {_pct(p['policy']['reward'], o)} of oracle {o:.3f}; "
            f"random {p['random']['reward']:.3f}, best fixed {p['best_fixed']['reward']:.3f}"
        )
    print(f"\nper placement, last {last['events']} events:")
    for pid, s in r["placements"].items():
        print(
            f"  {pid:<18}{s['events']:>6} events  policy {s['policy']:.3f}  oracle {s['oracle']:.3f} ({_pct(s['policy'], s['oracle'])})"
            f"  random {s['random']:.3f}  best fixed {s['best_fixed']:.3f}"
        )
    print("\npolicy = what the server's choices earned; the others are expectations on the same visits, from the true response model.")


def _pct(x: float, of: float) -> str:
    return f"{x / of:.0%}" if of > 0 else "-"


# -- bakeoff ----------------------------------------------------------------------------------


def _bakeoff(args: argparse.Namespace) -> int:
    from nextbest.bandit.sim import bakeoff as bk

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in names:
        if n not in bk.DATASETS:
            raise SystemExit(f"error: unknown dataset {n!r} (expected some of {', '.join(bk.DATASETS)})")
    with local_server() if args.target is None else _remote(args.target) as (target, _), NextbestClient(target) as nb:
        run_id = "" if args.target is None else f"{uuid.uuid4().hex[:6]}."  # fresh models on a shared server
        results = []
        t0 = time.perf_counter()
        for name in names:
            ds = bk.load(name)
            for seed in range(args.seed, args.seed + args.seeds):
                pid = f"bakeoff.{run_id}{name}.s{seed}"
                wait = _waiter(nb, pid) if args.sync else None
                r = bk.compare(nb, ds, seed, args.events, pid, args.epsilon, wait, _draws(pid) if args.target is None else None)
                results.append(r)
                _err(
                    f"{name:<14} seed {seed:>3}: service {r.service:.4f}  VW direct {r.direct:.4f}  ratio {r.service / r.direct:.3f}"
                    f"  (VW with the service's lag {r.direct_same_lag:.4f}; mean lag {r.mean_lag:.3f}, stale choices {r.stale_share:.1%})"
                )
        elapsed = time.perf_counter() - t0
    summary = bk.summarize(results)
    ok = all(s["ratio"] >= args.min_ratio for s in summary.values())
    if args.json:
        print(
            json.dumps(
                {
                    "events": args.events,
                    "epsilon": args.epsilon,
                    "sync": args.sync,
                    "min_ratio": args.min_ratio,
                    "passed": ok,
                    "datasets": summary,
                    "runs": [r.__dict__ for r in results],
                },
                indent=2,
            )
        )
    else:
        print(
            f"\nbake-off: {len(names)} datasets x {args.seeds} seeds x {args.events} events, epsilon {args.epsilon},"
            f" {'synchronous' if args.sync else 'asynchronous'} learning, {elapsed:.0f}s"
        )
        print(f"{'dataset':<15}{'service':>9}{'VW direct':>11}{'ratio':>8}{'VW same lag':>13}{'ratio':>8}{'mean lag':>10}{'stale':>8}")
        for name, s in summary.items():
            print(
                f"{name:<15}{s['service']:>9.4f}{s['direct']:>11.4f}{s['ratio']:>8.3f}{s['direct_same_lag']:>13.4f}"
                f"{s['ratio_same_lag']:>8.3f}{s['mean_lag']:>10.3f}{s['stale_share']:>8.1%}"
            )
        print(f"{'PASS' if ok else 'FAIL'}: every ratio service / VW direct {'>=' if ok else 'must be >='} {args.min_ratio}")
    return 0 if ok else 1


def _draws(pid: str) -> Any:
    """The local server's random number for each event (its seed is ours), so that VW run
    directly explores with the same draws; a remote server's seed is unknown."""
    from nextbest.bandit.sim import bakeoff as bk
    from nextbest.engine.chooser import placement_salt, uniform_for

    salt = placement_salt(LOCAL_SEED, pid)
    return lambda t: uniform_for(salt, bk.event_id(pid, t))


@contextmanager
def _remote(target: str) -> Iterator[tuple[str, None]]:
    yield target, None


def _waiter(nb: NextbestClient, pid: str) -> Any:
    def wait(n: int) -> None:
        deadline = time.monotonic() + 10
        while nb.stats(pid).model_version < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pid}: the model did not learn example {n} within 10s")
            time.sleep(0.0005)

    return wait


# -- command line -----------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds ``simulate`` and ``bakeoff`` to the ``nextbest`` command."""
    s = sub.add_parser("simulate", help="drive a server with a simulated telecom customer base and score its learning")
    add_target(s)
    s.add_argument("--events", type=positive_int, default=20_000, help="visits to simulate (default 20000)")
    s.add_argument("--seed", type=int, default=1, help="seed of customers, visits and responses (default 1)")
    s.add_argument("--scenario", help="scenario YAML (default: the shipped telecom scenario)")
    s.add_argument("--reward", choices=("margin", "revenue", "acceptance"), help="what a Reward reports (default: the scenario's)")
    s.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write results as JSON to FILE, or to stdout instead of the table")
    s.add_argument("--plot", metavar="FILE", help="write a learning-curve picture (PNG)")
    s.add_argument("--no-apply", dest="no_apply", action="store_true", help="use the placements already on the server")
    s.add_argument(
        "--fatigue-penalty",
        dest="fatigue_penalty",
        type=float,
        help="set every placement's fatigue penalty strength (reward units; 0 = none), overriding the scenario",
    )
    s.add_argument("--fatigue-half-life", dest="fatigue_half_life", default="3d", help="half-life of that penalty (default 3d)")
    s.add_argument(
        "--fatigue-kind",
        dest="fatigue_kind",
        choices=["subtract", "scale"],
        default="subtract",
        help="subtract the penalty from the expected reward, or scale the reward by exp(-penalty)",
    )
    s.add_argument("--window", type=positive_int, default=5000, help="final window of the report (default 5000 events)")
    s.add_argument(
        "--learn-at",
        dest="learn_at",
        choices=["window_close", "reward"],
        help="set every placement's learn_at, overriding the scenario (default: the scenario's, else window_close)",
    )
    s.add_argument(
        "--reward-window",
        dest="reward_window",
        type=float,
        help="every placement's reward window in seconds (default 600; with window_close, learning waits this long)",
    )
    s.add_argument(
        "--successes-only",
        dest="successes_only",
        action="store_true",
        help="report only positive rewards, as channels that know only conversions do; the rest get the default reward",
    )
    s.add_argument("--progress-every", dest="progress_every", type=positive_int, default=1000, help="events between progress lines")
    s.add_argument(
        "--event-prefix", dest="event_prefix", default="", help="name the events PREFIX-<n> (default: the server does; with --local, sim)"
    )
    s.add_argument(
        "--context",
        choices=CONTEXT_MODES,
        default="full",
        help="what the channels send: full = every customer feature and the simulator's impression counts (default); "
        "channel = the channel and the customer id only, as an IVR or USSD gateway; profile = channel only, on placements "
        "with context: {profile: true}, after the customer base was exported as of day 0 to Parquet and loaded with "
        "`nextbest profiles load`; channel+history and profile+history = also context.history [7d, 30d]. "
        "History windows count in the server's clock: use --local for simulated days",
    )
    s.add_argument(
        "--local",
        action="store_true",
        help="start an in-process server on a temporary SQLite database instead of --target: its clock follows the "
        "simulated days (2026-01-01 + day), it is seeded by --seed, the simulator names the events, and each reward is "
        "learned before the next visit, so a run reproduces",
    )
    s.add_argument(
        "--profile-refresh",
        dest="profile_refresh",
        type=float,
        default=0.0,
        metavar="DAYS",
        help="with --context profile[+history]: export and load the customer base again every DAYS simulated days, "
        "as of that day, as a warehouse refreshes its extract (default 0: once, as of day 0)",
    )
    s.add_argument(
        "--profiles-file", dest="profiles_file", metavar="FILE", help="where the profile extract goes (default: a temporary file)"
    )
    s.add_argument(
        "--compare-contexts",
        dest="compare_contexts",
        nargs="?",
        const=",".join(CONTEXT_MODES),
        metavar="MODES",
        help=f"run each context mode (default {','.join(CONTEXT_MODES)}) over --seeds, each on a fresh --local server, "
        "and print a Markdown table of the share of the oracle",
    )
    s.add_argument("--seeds", default="1,2,3", help="seeds of --compare-contexts and --compare-rewards (default 1,2,3)")
    s.add_argument(
        "--model-group",
        dest="model_group",
        metavar="NAME",
        help="put every simulated placement in model group NAME: one model learns from all channels, the placement a feature",
    )
    s.add_argument("--jobs", type=positive_int, default=1, help="--compare-* runs at once, each in its own process (default 1)")
    simulate_billing.add_arguments(s)
    s.set_defaults(func=_simulate)

    b = sub.add_parser("bakeoff", help="compare the service's learning with Vowpal Wabbit run directly")
    b.add_argument("--target", default=None, help="server address (default: start one in-process on a temporary database)")
    b.add_argument("--datasets", default="digits,iris,wine,breast_cancer", help="comma-separated scikit-learn datasets")
    b.add_argument("--seeds", type=positive_int, default=10, help="seeds per dataset (default 10)")
    b.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    b.add_argument("--events", type=positive_int, default=1500, help="events per run (default 1500)")
    b.add_argument("--epsilon", type=float, default=0.05, help="epsilon-greedy exploration on both sides (default 0.05)")
    b.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="do not wait for each reward to be learned before the next choice (measures what the learning lag costs)",
    )
    b.add_argument("--min-ratio", dest="min_ratio", type=float, default=0.97, help="exit 1 if a dataset's ratio is below (default 0.97)")
    b.add_argument("--json", action="store_true", help="print results as JSON")
    b.set_defaults(func=_bakeoff)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the two commands without the rest of the CLI: ``python -m nextbest.cli.simulate bakeoff``."""
    import grpc

    from nextbest.bandit.errors import InvalidInput

    parser = argparse.ArgumentParser(prog="nextbest")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
