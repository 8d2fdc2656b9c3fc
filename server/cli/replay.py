"""``nextbest replay`` and ``nextbest export-log``: offline evaluation from the decision log.

Both work on the database (or a DSJSON file) directly, without a running server, so they can
run on a replica or a copy of the log. Exit codes: 0 done, 1 nothing to evaluate or the
database is unavailable, 2 bad arguments. The heavy imports (numpy, VW, SQLAlchemy) happen when
a command runs, so that adding these commands does not slow down every other one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

from nextbest.bandit.errors import InvalidInput
from nextbest.cli.args import positive_float, positive_int

if TYPE_CHECKING:
    from nextbest.bandit.offline.policies import Policy
    from nextbest.bandit.offline.replay import PolicyEstimate
    from nextbest.bandit.offline.replay_log import ReplayLog

ESTIMATOR_NAMES = ("ips", "snips", "dr")  # nextbest.bandit.offline.estimators.ESTIMATORS, without importing numpy
REWARD_MODEL_ARGS = "-q UA"  # nextbest.bandit.offline.reward_model.DEFAULT_REWARD_MODEL_ARGS
REWARD_MODEL_LOSSES = ("auto", "squared", "logistic")  # nextbest.bandit.offline.reward_model.REWARD_MODEL_LOSSES
MAX_LINE_BYTES = 1 << 20  # nextbest.offline.dsjson_reader.MAX_LINE

POLICY_HELP = (
    "candidate policy; repeatable: logged (what served), uniform, constant:ARM_ID, "
    'vw:"VW ARGS" (e.g. vw:"--cb_explore_adf --epsilon 0.1 -q UA", trained on the log in time '
    "order, each event scored before it is learned), model:PATH (a saved VW model, predict only), "
    "snapshot:MODEL (the placement's saved model from --db: snapshot: its own, snapshot:A variant A's)"
)


def _fmt(x: float, width: int, digits: int = 4) -> str:
    return f"{'nan':>{width}}" if math.isnan(x) else f"{x:>{width}.{digits}f}"


def format_table(
    results: Sequence[PolicyEstimate], n: int, first: float, last: float, source: str, reward_model_loss: str | None = None
) -> str:
    """The plain output: one row per policy and estimator, warnings listed below, and the loss of
    DR's reward model when DR was asked for."""
    from nextbest.bandit.offline.dsjson import iso_time

    lines = [f"{n:,} closed decisions from {source}, {iso_time(first)} .. {iso_time(last)}", ""]
    width = max([len("policy")] + [len(r.policy) for r in results])
    lines.append(f"{'policy':<{width}}  {'estimator':<9} {'value':>9}  {'95% CI':>20} {'ess':>11} {'n':>9}  warnings")
    notes: list[str] = []
    for r in results:
        e = r.estimate
        ci = f"[{_fmt(e.ci_low, 0)}, {_fmt(e.ci_high, 0)}]"
        codes = ",".join(w.split(":", 1)[0] for w in e.warnings)
        lines.append(f"{r.policy:<{width}}  {e.estimator:<9} {_fmt(e.value, 9)}  {ci:>20} {e.ess:>11.1f} {e.n:>9,}  {codes}")
        notes.extend(f"  {r.policy} / {e.estimator}: {w}" for w in e.warnings)
    if notes:
        lines += ["", "warnings:", *notes]
    if reward_model_loss is not None:
        why = {"logistic": "the probability of a reward of 1", "squared": "clipped to the range of the rewards"}
        lines += ["", f"DR's reward model: {reward_model_loss} loss ({why.get(reward_model_loss, '')}; --reward-model-loss)"]
    return "\n".join(lines)


class Progress:
    """A progress bar on standard error while a long replay runs, when that is a terminal:
    events read, their rate and, where the total is known, the share done."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr, every: float = 0.2) -> None:
        self.total, self.stream, self.every = total, stream, every
        self.started = self.shown = time.monotonic()
        self.stage = ""

    def __call__(self, stage: str, events: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.started = stage, now
        if now - self.shown < self.every:
            return
        self.shown = now
        rate = events / max(now - self.started, 1e-9)
        bar = ""
        if self.total:
            done = min(events / self.total, 1.0)
            filled = int(done * 30)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done:4.0%} "
        self.stream.write(f"\r{stage:<12} {bar}{events:,} events, {rate:,.0f}/s ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def plot(results: Sequence[PolicyEstimate], path: str) -> None:
    """Each estimate as a point with its 95 % interval, one row per policy and estimator."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInput("--plot", "needs matplotlib, which is not installed (pip install matplotlib)") from None
    rows = list(reversed(results))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    colors = {"ips": "tab:blue", "snips": "tab:orange", "dr": "tab:green"}
    for y, r in enumerate(rows):
        e = r.estimate
        err = None
        if not (math.isnan(e.ci_low) or math.isnan(e.ci_high)):
            err = [[e.value - e.ci_low], [e.ci_high - e.value]]
        ax.errorbar([e.value], [y], xerr=err, fmt="o", capsize=3, color=colors.get(e.estimator, "black"))
    ax.set_yticks(range(len(rows)), [f"{r.policy} / {r.estimate.estimator}" for r in rows])
    ax.set_xlabel("estimated mean reward per decision (95 % CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise InvalidInput("--plot", f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def _policy(spec: str, args: argparse.Namespace) -> Policy:
    """``snapshot:MODEL`` is a placement's saved model (``snapshot:`` its own, ``snapshot:A`` a
    variant's, ``snapshot:group:NAME`` model group NAME's) read from --db; every other spec is
    nextbest.bandit.offline.policies'."""
    from nextbest.bandit.offline.policies import VwPolicy, parse_policy
    from nextbest.offline.log_source import read_snapshot

    kind, sep, model_name = spec.strip().partition(":")
    if not (sep and kind == "snapshot"):
        return parse_policy(spec)
    if args.db is None or not args.placement:
        raise InvalidInput("--policy", "snapshot:MODEL reads the saved model from --db, for --placement")
    name = model_name.strip()
    # A group's model is saved under the group (engine/learner.py group_snapshot_id), not a placement.
    model = read_snapshot(args.db, name, "") if name.startswith("group:") else read_snapshot(args.db, args.placement, name)
    fd, path = tempfile.mkstemp(prefix="nextbest-snapshot-", suffix=".vw")
    with os.fdopen(fd, "wb") as f:
        f.write(model)
    return VwPolicy(f"snapshot:{model_name.strip() or args.placement}", ["-i", path], learn=False)


def _replay(args: argparse.Namespace) -> int:
    if "numpy" not in sys.modules:
        # The estimators' numpy work is on one chunk's vectors, too small for BLAS's threads,
        # which only contend for the cores: np.dot of 50,000 values took 1.5 ms with OpenBLAS's
        # threads on a busy 2-core machine, 0.014 ms with one. A value the caller set stands.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from nextbest.bandit.offline.policies import VwPolicy
    from nextbest.bandit.offline.replay import Replay, replay
    from nextbest.offline.dsjson_reader import LogOutOfOrder
    from nextbest.offline.log_source import count_replay_events, dsjson_chunks, replay_chunks
    from nextbest.offline.times import parse_time

    if (args.db is None) == (args.log is None):
        raise InvalidInput("--db", "give exactly one of --db URL and --log FILE")
    if args.db is not None and not args.placement:
        raise InvalidInput("--placement", "is required with --db")
    policies = [_policy(p, args) for p in args.policy]  # bad specs fail before any reading
    estimators = args.estimator or list(ESTIMATOR_NAMES)
    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    progress = None
    need = "dr" in estimators or any(p.needs_features for p in policies)
    reader, learners = None, []
    chunks: Callable[[], Iterator[ReplayLog]]
    if args.db is not None:
        chunks = replay_chunks(args.db, args.placement, since=since, until=until, with_features=need, chunk=args.chunk)
        source = f"placement {args.placement}"
        if sys.stderr.isatty():
            progress = Progress(count_replay_events(args.db, args.placement, since=since, until=until))
    else:
        # Only a vw: candidate (it learns the log as it goes) needs the file in time order.
        learners += [p.name for p in policies if isinstance(p, VwPolicy) and p.learn]
        chunks = reader = dsjson_chunks(
            args.log,
            args.placement,
            since=since,
            until=until,
            with_features=need,
            chunk=args.chunk,
            time_order=bool(learners),
            max_line=args.max_line_bytes,
        )
        source = args.log
        if sys.stderr.isatty():
            progress = Progress(None)
    try:
        done: Replay = replay(
            chunks,
            policies,
            estimators,
            clip=args.clip,
            reward_model_args=args.reward_model_args,
            folds=args.folds,
            reward_model_loss=args.reward_model_loss,
            progress=progress,
        )
    except LogOutOfOrder as e:
        raise InvalidInput(
            "--log",
            f"{e.message}; {learners[0]} learns the log in time order, so it needs a file in that order "
            + "(export-log writes one); the other candidates replay a file in any order",
        ) from None
    finally:
        if progress is not None:
            progress.close()
    first, last = (done.first, done.last) if reader is None else (reader.first, reader.last)
    if args.json:
        print(json.dumps([r.to_dict() for r in done.results], indent=2))
    else:
        print(format_table(done.results, done.n, first, last, source, done.reward_model_loss))
    if args.plot:
        plot(done.results, args.plot)
    return 0


def _export(args: argparse.Namespace) -> int:
    from nextbest.offline.log_source import iter_decisions, read_decisions, write_dsjson
    from nextbest.offline.times import parse_time

    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    if args.format == "parquet":
        from nextbest.offline.parquet_log import write_parquet

        rows, _ = iter_decisions(args.db, args.placement, since=since, until=until)
        n = write_parquet(args.out, rows)
        print(f"wrote {n} decisions of {args.placement} to {args.out} (Parquet)", file=sys.stderr)
        return 0
    decisions, arm_features = read_decisions(args.db, args.placement, since=since, until=until)
    n = write_dsjson(args.out, decisions, arm_features, ccb=args.format == "ccb-dsjson")
    what = "multi-slot events" if args.format == "ccb-dsjson" else "decisions"
    print(f"wrote {n} {what} of {args.placement} to {args.out}", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``replay`` and ``export-log`` to the nextbest command."""
    r = sub.add_parser("replay", help="estimate candidate policies offline from the decision log")
    r.add_argument("--db", help="database URL or SQLite path (read only)")
    r.add_argument(
        "--log",
        help="a DSJSON file (export-log's, or another writer's), instead of --db; in any order, but in time order for vw: candidates",
    )
    r.add_argument("--placement", help="placement id (required with --db; filters --log)")
    r.add_argument("--policy", action="extend", nargs="+", required=True, metavar="SPEC", help=POLICY_HELP)
    r.add_argument(
        "--estimator", action="extend", nargs="+", choices=ESTIMATOR_NAMES, help="ips, snips, dr; repeatable (default: all three)"
    )
    r.add_argument("--clip", type=positive_float, help="clip importance weights at this value")
    r.add_argument("--since", help="start, inclusive: epoch seconds or ISO date/time (UTC unless it has an offset)")
    r.add_argument("--until", help="end, exclusive: epoch seconds or ISO date/time (UTC unless it has an offset)")
    r.add_argument(
        "--reward-model-args",
        dest="reward_model_args",
        default=REWARD_MODEL_ARGS,
        help=f"VW arguments of DR's reward model, written with = as they start with a dash "
        f"(default --reward-model-args='{REWARD_MODEL_ARGS}')",
    )
    r.add_argument(
        "--reward-model-loss",
        dest="reward_model_loss",
        choices=REWARD_MODEL_LOSSES,
        default="auto",
        help="loss of DR's reward model: logistic (rewards of 0 or 1: predicts their probability), squared (other rewards; "
        "predictions clipped to the rewards' range), auto (default: logistic when every logged reward is 0 or 1)",
    )
    r.add_argument("--folds", type=int, default=2, help="cross-fitting folds of the reward model (default 2)")
    r.add_argument(
        "--chunk", type=positive_int, default=50_000, help="events read and scored at a time: memory holds one chunk (default 50000)"
    )
    r.add_argument(
        "--max-line-bytes",
        dest="max_line_bytes",
        type=positive_int,
        default=MAX_LINE_BYTES,
        metavar="N",
        help=f"--log: refuse a line longer than this, unread (default {MAX_LINE_BYTES}, 1 MiB): memory holds one line at most",
    )
    r.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    r.add_argument("--plot", metavar="FILE", help="also draw the estimates and their intervals (PNG)")
    r.set_defaults(func=_replay)

    e = sub.add_parser("export-log", help="write the closed decisions of a placement as VW DSJSON")
    e.add_argument("--db", required=True, help="database URL or SQLite path (read only)")
    e.add_argument("--placement", required=True)
    e.add_argument(
        "--format",
        choices=["dsjson", "ccb-dsjson", "parquet"],
        default="dsjson",
        help="dsjson: one cb_adf event per decision (each slot its own); ccb-dsjson: one CCB event per multi-slot choice; "
        "parquet: one row per decision and slot, pacing's no-offer events included, in row groups (DuckDB, pandas, Spark)",
    )
    e.add_argument("--out", required=True, help="output file, - for standard output")
    e.add_argument("--since", help="start, inclusive: epoch seconds or ISO date/time (UTC unless it has an offset)")
    e.add_argument("--until", help="end, exclusive: epoch seconds or ISO date/time (UTC unless it has an offset)")
    e.set_defaults(func=_export)
