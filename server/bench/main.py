"""``nextbest bench``: how fast Choose and Reward are, next to what this machine allows at best.

Every figure is measured in the same run as its ceiling — a bare gRPC echo with the same
message sizes and the same load generator (for throughput and latency), raw VW on the same
example text (for the model's share) — and reported as a ratio to it, so the ratios carry over
between machines where the absolute numbers do not. Servers and load generators are separate
processes on loopback; every phase is bounded in time and count.

    scripts/bench                      # full run, a few minutes
    scripts/bench --smoke --json out.json
    scripts/bench --phases vw,server_time --profile 25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nextbest.bench.load import CHOOSE
from nextbest.bench.report import TARGET_POINT, Report

PHASES = (
    "vw",
    "server_time",
    "rules",
    "echo",
    "partial",
    "choose",
    "latency",
    "context",  # also run by --phases profiles,choose (issue #30's command): see wants_context
    "reward",
    "postgres",
    "replicas",
    "memory",
    "replay",
    "capacity",
    "profiles",
    "overload",
    "conversions",
    "http",
)
# Left out of a smoke run of every phase (each has a smoke test of its own): context starts three
# servers, which took 8-40 s in smoke mode on this shared machine; conversions a server, Chooses
# for 900 customers and a loader process (26-31 s); http a server of its own and four load runs.
SMOKE_BY_NAME_ONLY = frozenset({"context", "conversions", "http"})
LOADS = (0.5, 0.8)
# A single run's p99 at the target's point swings 6-60 ms here from minute to minute (the machine
# is shared), so that point is run several times and judged on the run with the median p99.


def run(args: argparse.Namespace) -> Report:
    """All selected phases, in an order that lets later ones reuse earlier servers and events."""
    from nextbest.bench import inproc
    from nextbest.bench import phases as ph
    from nextbest.bench.procs import Workers, busy_fraction, start_echo

    lim = ph.SMOKE if args.smoke else ph.FULL
    phases = set(args.phases)
    if args.smoke and args.phases == list(PHASES):
        phases -= SMOKE_BY_NAME_ONLY
    rep = Report(smoke=args.smoke)
    rep.meta.update(machine_meta(), background_busy=busy_fraction(0.5 if not args.smoke else 0.2))
    if rep.meta["background_busy"] > 0.15:
        rep.note(f"the machine was {rep.meta['background_busy']:.0%} busy before the run: other work skews these figures")

    if "vw" in phases:
        for a in ph.ARM_COUNTS:
            rep.vw(inproc.vw_raw(a, lim.vw_seconds, 10**6))
    if "server_time" in phases:
        for a in ph.ARM_COUNTS:
            rep.server_time(inproc.server_time(a, lim.server_rounds, lim.server_per_round, args.profile))
        rep.reward_inproc(inproc.reward_inproc(lim.server_rounds * lim.server_per_round, lim.reward_concurrency, args.profile))
    if "rules" in phases:
        rep.rules(inproc.rules_cost(20, 3 * lim.server_rounds, lim.server_per_round // 2))

    if "replay" in phases:  # no server: the replay reads a log it writes itself
        from nextbest.bench import replay as rp

        rep.replay(rp.run(rp.SMOKE if args.smoke else rp.FULL))
    if "capacity" in phases:  # in process, as replay
        from nextbest.bench import capacity

        rep.capacity(capacity.run(args.smoke))
    if "profiles" in phases:  # no server: nextbest profiles load writes to the database directly
        from nextbest.bench import profiles

        sizes = args.profile_rows or (profiles.SMOKE_ROWS if args.smoke else profiles.FULL_ROWS)
        rep.profile_load(profiles.run(sizes, postgres=False if args.no_postgres else None))
    served = {"echo", "partial", "choose", "latency", "reward", "postgres", "replicas", "overload", "conversions", "http"}
    needs_servers = phases & served or wants_context(phases)
    with ph.temp_dir() as tmp_name:
        tmp = Path(tmp_name)
        workers = Workers(args.clients) if needs_servers else None
        echo = start_echo() if needs_servers else None
        try:
            if workers is not None and echo is not None:
                er = ph.LoadRunner(workers, echo, tmp, lim)
                rep.echo(
                    "choose", er.run({"method": CHOOSE, "mode": "closed", "payloads": er.choose_file("bench20"), "event_prefix": "echo-"})
                )
                rep.echo("reward", er.echo_reward())
                if "partial" in phases:
                    _partial_section(rep, workers, tmp, lim)
                _sqlite_section(rep, workers, er, tmp, lim, phases)
                if wants_context(phases):
                    _context_section(args, rep, workers, tmp, lim)
                if "overload" in phases:
                    _overload_section(rep, workers, tmp, lim)
                if "postgres" in phases:
                    _postgres_section(args, rep, workers, tmp, lim)
                if "replicas" in phases:
                    _replicas_section(args, rep, tmp, lim)
                if "conversions" in phases:
                    _conversions_section(args, rep, workers, tmp, lim)
                if "http" in phases:  # HTTP/JSON Choose against gRPC Choose on one server
                    from nextbest.bench import http

                    http.add_to(rep, http.run(workers, tmp, lim))
        finally:
            if echo is not None:
                echo.stop()
            if workers is not None:
                workers.close()
        if "memory" in phases:
            for variant, bits, vw_args in memory_variants(args.memory_bits):
                rep.memory(variant, ph.memory(lim.placements, bits, vw_args, lim.memory_limit, tmp))
    rep.meta["seconds"] = time.perf_counter() - rep.started
    rep.meta["background_busy_after"] = busy_fraction(0.2)
    return rep


def _partial_section(rep: Report, workers: Any, tmp: Path, lim: Any) -> None:
    """Servers doing part of a Choose's work, saturated like Choose: where its time goes."""
    from nextbest.bench import phases as ph
    from nextbest.bench.procs import start_echo

    for kind in ("parse", "decode"):
        server = start_echo(kind)
        try:
            rep.partial(kind, ph.LoadRunner(workers, server, tmp, lim).saturate("bench20"))
        finally:
            server.stop()


def _sqlite_section(rep: Report, workers: Any, echo_runner: Any, tmp: Path, lim: Any, phases: set[str]) -> None:
    """Choose, latency and Reward on one SQLite server."""
    from nextbest.bench import phases as ph
    from nextbest.bench.procs import start_nextbest

    if not phases & {"choose", "latency", "reward"}:
        return
    db = tmp / "bench.db"
    server = start_nextbest(f"sqlite:///{db}")
    events = ph.Events()
    try:
        ph.apply_bench_placements(server.target)
        runner = ph.LoadRunner(workers, server, tmp, lim)
        for a in ph.ARM_COUNTS if phases & {"choose", "latency"} else ():
            # each latency run right after its saturation run: less drift between the two
            r = runner.saturate(f"bench{a}", events)
            rep.choose(a, r)
            if "latency" in phases:
                for load in LOADS:
                    rate = max(1.0, load * r["rate"])
                    runs = [
                        (runner.paced(f"bench{a}", rate, events), echo_runner.paced("bench20", rate))
                        for _ in range(lim.target_repeats if (a, load) == TARGET_POINT else 1)
                    ]
                    rep.latency(a, load, rate, runs)
        if "reward" in phases:
            ph.prepare_events(runner, events, lim.reward_ids, "sq")
            _rewards(rep, runner, events.ids, lim.seconds, "sqlite")
    finally:
        server.stop()


def wants_context(phases: set[str]) -> bool:
    """The profile + history comparison runs when named, and under ``--phases profiles,choose``:
    issue #30 measures Choose with profiles as part of those two."""
    return "context" in phases or {"profiles", "choose"} <= phases


def _context_section(args: argparse.Namespace, rep: Report, workers: Any, tmp: Path, lim: Any) -> None:
    """Choose (20 arms) with profile + history against the same placement without
    (nextbest.bench.context): SQLite, then PostgreSQL when it answers."""
    from nextbest.bench import context
    from nextbest.bench.procs import postgres_available

    postgres = not args.smoke and not args.no_postgres and postgres_available()
    if not postgres and not args.smoke:
        rep.note("context on PostgreSQL skipped: " + ("--no-postgres" if args.no_postgres else "PostgreSQL does not answer"))
    rep.context(context.run(workers, tmp, lim, args.smoke, postgres))


def _overload_section(rep: Report, workers: Any, tmp: Path, lim: Any) -> None:
    """Choose (20 arms) at 4 x its saturation rate, open loop, on a server of its own: how
    much is shed, how fast the refusals come, and what the accepted calls' latency becomes,
    against the same server at half its saturation rate, and against the same flood on a
    server with shedding off, in the same run. Callers do not back off (open loop): what a
    server gets from clients that ignore RESOURCE_EXHAUSTED."""
    from nextbest.bench import phases as ph
    from nextbest.bench.procs import start_nextbest

    server = start_nextbest(f"sqlite:///{tmp / 'overload.db'}", env={"NEXTBEST_SHED_QUEUE_MS": "100"})
    try:
        ph.apply_bench_placements(server.target, (20,))
        runner = ph.LoadRunner(workers, server, tmp, lim)
        sat = runner.saturate("bench20", tag="ov")
        unloaded = runner.paced("bench20", max(1.0, 0.5 * sat["rate"]), tag="ovu")
        flood = runner.overload("bench20", 4.0 * sat["rate"])
        backoff = runner.backoff_flood("bench20")
    finally:
        server.stop()
    server = start_nextbest(f"sqlite:///{tmp / 'overload-off.db'}", env={"NEXTBEST_SHED_QUEUE_MS": "0"})
    try:
        ph.apply_bench_placements(server.target, (20,))
        runner = ph.LoadRunner(workers, server, tmp, lim)
        unshed = runner.overload("bench20", 4.0 * sat["rate"])
        backoff_unshed = runner.backoff_flood("bench20")
    finally:
        server.stop()
    rep.overload(sat, unloaded, flood, unshed)
    rep.overload_backoff(backoff, backoff_unshed)


REWARD_BATCH = 100  # rewards per RewardBatch call in the batched Reward run


def _rewards(rep: Report, runner: Any, ids: list[str], seconds: float, backend: str) -> None:
    """Reward one call per reward, then RewardBatch on the events left over."""
    single = runner.rewards(ids, seconds)
    rep.reward(backend, single)
    rest = ids[single["ids_used"] :]
    if len(rest) >= REWARD_BATCH:
        rep.reward(backend, runner.rewards(rest, seconds, REWARD_BATCH))
    else:
        rep.note(f"RewardBatch ({backend}) not run: every prepared event was used by the single Reward run")


def _postgres_section(args: argparse.Namespace, rep: Report, workers: Any, tmp: Path, lim: Any) -> None:
    """Choose (20 arms) and Reward on a fresh PostgreSQL schema, dropped afterwards."""
    from nextbest.bench import phases as ph
    from nextbest.bench.procs import postgres_available, postgres_schema, start_nextbest

    if args.no_postgres:
        rep.skip("postgres", "--no-postgres")
        return
    if not postgres_available():
        rep.skip("postgres", "PostgreSQL does not answer at 127.0.0.1:5432")
        return
    with postgres_schema() as url:
        server = start_nextbest(url)
        try:
            ph.apply_bench_placements(server.target, (ph.ARM_COUNTS[0], 20))
            runner = ph.LoadRunner(workers, server, tmp, lim)
            events = ph.Events()
            rep.choose(20, runner.saturate("bench20", events, "pg"), backend="postgres")
            ph.prepare_events(runner, events, lim.reward_ids, "pg")
            _rewards(rep, runner, events.ids, lim.seconds, "postgres")
        finally:
            server.stop()


def _replicas_section(args: argparse.Namespace, rep: Report, tmp: Path, lim: Any) -> None:
    """Choose (20 arms) on PostgreSQL: one server, then two (a learner and a replica), each
    under the same two load processes; all on this machine's cores."""
    from nextbest.bench import phases as ph
    from nextbest.bench.procs import Workers, postgres_available, postgres_schema, start_nextbest

    if args.no_postgres or not postgres_available():
        rep.skip("replicas", "--no-postgres" if args.no_postgres else "PostgreSQL does not answer at 127.0.0.1:5432")
        return
    clients = Workers(2)
    try:
        with postgres_schema() as url:
            a = start_nextbest(url)
            b = None
            try:
                ph.apply_bench_placements(a.target, (20,))
                runner = ph.LoadRunner(clients, a, tmp, lim)
                one = runner.run({"method": CHOOSE, "payloads": runner.choose_file("bench20"), "mode": "closed", "event_prefix": "one-"})
                b = start_nextbest(url, "--learner", "never")
                ph.wait_placements(b.target, ["bench20"])
                two = runner.run(
                    {
                        "method": CHOOSE,
                        "payloads": runner.choose_file("bench20"),
                        "mode": "closed",
                        "event_prefix": "two-",
                        "targets": [a.target, b.target],
                    }
                )
                rep.replicas(one, two)
            finally:
                a.stop()
                if b is not None:
                    b.stop()
    finally:
        clients.close()


def _conversions_section(args: argparse.Namespace, rep: Report, workers: Any, tmp: Path, lim: Any) -> None:
    """ReportConversions batches against RewardBatch, and a conversions file load, on a server
    of their own (nextbest.bench.conversions): PostgreSQL where it answers, else SQLite."""
    from nextbest.bench import conversions
    from nextbest.bench.procs import postgres_available

    postgres = not args.no_postgres and postgres_available()
    conversions.add_to(rep, conversions.run(workers, tmp, lim, args.smoke, postgres, args.conversion_rows))


def memory_variants(bits: int) -> list[tuple[str, int, str]]:
    """As shipped (bits 18, VW's default example ring of 256 preallocated examples, ~7.6 MiB
    per model), and tuned: fewer bits and a ring of 4 unless the server already sets one."""
    from nextbest.bandit.model import vw_arguments
    from nextbest.bench.procs import placement

    shipped = vw_arguments(placement("x", 1))
    has_ring = any(a in ("--ring_size", "--example_queue_limit") for a in shipped)
    return [("default", 18, ""), ("tuned", bits, "" if has_ring else "--ring_size 4")]


def machine_meta() -> dict[str, Any]:
    import grpc
    import vowpalwabbit

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "vowpalwabbit": getattr(vowpalwabbit, "__version__", "?"),
        "platform": platform.platform(),
    }


# -- command line ---------------------------------------------------------------------------------


def _phases(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PHASES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(bad)}; choose from {', '.join(PHASES)}")
    return names


def _profile_rows(text: str) -> tuple[int, ...]:
    from nextbest.bench.profiles import parse_sizes

    return parse_sizes(text)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="every phase tiny (seconds in all): keeps the benchmark working")
    p.add_argument("--json", metavar="FILE", help="also write every figure and raw measurement as JSON")
    p.add_argument("--no-postgres", dest="no_postgres", action="store_true", help="skip PostgreSQL even if it answers")
    p.add_argument(
        "--phases", type=_phases, default=list(PHASES), metavar="LIST", help=f"comma-separated subset of {','.join(PHASES)} (default all)"
    )
    p.add_argument("--clients", type=int, default=1, help="load generator processes (default 1: the machine has few cores)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile the in-process Choose and Reward paths (cProfile) and print the top N entries",
    )
    p.add_argument(
        "--profile-rows",
        dest="profile_rows",
        type=_profile_rows,
        metavar="N[,N...]",
        help="profiles phase: rows of the generated Parquet extracts (default 100000,1000000; smoke 2000), e.g. 1000000,10000000",
    )
    p.add_argument(
        "--conversion-rows",
        dest="conversion_rows",
        type=int,
        metavar="N",
        help="conversions phase: rows of the loaded Parquet extract (default 50000; smoke 2000), e.g. 1000000",
    )
    p.add_argument(
        "--memory-bits",
        dest="memory_bits",
        type=int,
        default=14,
        help="VW -b of the tuned memory variant (default 14: 1,000 placements x 20 arms in < 2 GiB)",
    )
    p.set_defaults(func=_bench)


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds ``nextbest bench`` to the CLI."""
    configure(sub.add_parser("bench", help="benchmark Choose, Reward, VW and memory against their ceilings"))


def _bench(args: argparse.Namespace) -> int:
    rep = run(args)
    print(rep.table())
    if args.profile:
        print(rep.profiles())
    if args.json:
        Path(args.json).write_text(json.dumps(rep.to_json(), indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextbest bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    configure(p)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
