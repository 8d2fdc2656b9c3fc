"""``nextbest tune``: search a placement's learning settings on its decision log.

The log is read as ``nextbest replay --db`` reads it (read only, no server needed for the
search); the search is ``nextbest.bandit.offline.tune``'s. ``--dry-run`` (the default) prints
the table; ``--apply`` adds the winner as a shadow of the placement through the server at
``--target`` (the path ``nextbest apply`` takes), only when its lower 95 % bound beats the
current setting's on at least ``--min-events`` events. Exit codes: 0 done (also a dry run),
1 the database or the server is unavailable, 2 bad arguments or a refusal (a log too short for
the search, below ``--min-events``, a winner that does not beat the current setting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nextbest.bandit.errors import InvalidInput
from nextbest.cli.args import positive_int
from nextbest.cli.target import add_target

if TYPE_CHECKING:
    from nextbest.bandit.offline.replay_log import ReplayLog
    from nextbest.bandit.offline.tune import Scored, Setting, TuneResult

DEFAULT_MIN_EVENTS = 50_000  # nextbest.bandit.offline.tune.DEFAULT_MIN_EVENTS, without importing numpy
MIN_SEARCH_EVENTS = 1_000  # nextbest.bandit.offline.tune.MIN_SEARCH_EVENTS


class Refused(InvalidInput):
    """A refusal the command explains (exit code 2)."""


@dataclass(frozen=True)
class DbChunks:
    """The log as ``nextbest replay --db`` reads it, picklable for the pool's workers."""

    db: str
    placement: str
    since: float | None
    until: float | None
    chunk: int

    def __call__(self) -> Iterator[ReplayLog]:
        from nextbest.offline.log_source import replay_chunks

        return replay_chunks(self.db, self.placement, since=self.since, until=self.until, with_features=True, chunk=self.chunk)()


def _stored_setting(db: str, placement: str) -> tuple[str, bool, int] | None:
    """The placement's ``vw_args``, ``interactions`` and ``bits`` as the database stores them."""
    from sqlalchemy import select

    from nextbest.offline.log_source import _connect
    from nextbest.storage import tables as t

    with _connect(db) as conn:
        row = conn.execute(select(t.placements.c.spec).where(t.placements.c.id == placement)).first()
    if row is None or not isinstance(row.spec, dict):
        return None
    spec = row.spec
    return str(spec.get("vw_args") or ""), bool(spec.get("interactions", True)), int(spec.get("bits", 18))


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _est(s: Scored, name: str) -> str:
    e = s.estimates.get(name)
    if e is None:
        return "-"
    return f"{_fmt(e.value)} [{_fmt(e.ci_low)}, {_fmt(e.ci_high)}]"


def format_table(result: TuneResult, placement: str) -> str:
    """One row per candidate, best first by the score's lower 95 % bound."""
    rows = result.ranked()
    width = max(len(s.candidate.setting.text()) for s in rows)
    head = (
        f"{'#':>3}  {'candidate':<9}  {'VW args':<{width}}  {'prog. loss':>10}  {'SNIPS [95% CI]':<26}  {'DR [95% CI]':<26}  {'events':>9}"
    )
    lines = [
        f"{len(rows)} settings of {placement} over {result.events:,} events in {result.seconds:.1f} s "
        f"({result.stages} stage{'s' if result.stages > 1 else ''}; ranked by the {result.score.upper()} lower 95 % bound)",
        "",
        head,
    ]
    for i, s in enumerate(rows, 1):
        name = s.candidate.name + ("*" if s is result.current else "")
        lines.append(
            f"{i:>3}  {name:<9}  {s.candidate.setting.text():<{width}}  {_fmt(s.loss):>10}  "
            f"{_est(s, 'snips'):<26}  {_est(s, 'dr'):<26}  {s.events:>9,}"
        )
    lines += [
        "",
        "* the current setting; prog. loss: mean squared error of the served arm's reward, each event predicted before it is learned",
    ]
    warnings = sorted({w.split(":", 1)[0] for s in rows for w in s.warnings})
    if warnings:
        lines.append(f"warnings (nextbest replay explains them): {', '.join(warnings)}")
    return "\n".join(lines)


def _progress(stream: Any) -> Callable[[str, bool], None]:
    """On a terminal one line rewritten in place (a stage's last stays); else a stage's last only."""
    tty = stream.isatty()
    shown = [0.0]

    def show(line: str, final: bool) -> None:
        now = time.monotonic()
        if tty and (final or now - shown[0] >= 0.2):
            shown[0] = now
            stream.write(f"\r{line}\033[K" + ("\n" if final else ""))
        elif final:
            stream.write(line + "\n")
        stream.flush()

    return show


def _apply_shadow(target: str, placement: str, setting: Setting, bits: int, shadow_id: str) -> str:
    """Add the setting as a shadow of the live placement, through the server's apply."""
    from nextbest.bandit.spec import ShadowSpec
    from nextbest.client import NextbestClient

    with NextbestClient(target) as nb:
        spec = nb.placement(placement)  # a PlacementSpec: the client converts GetPlacement's answer
        for s in spec.shadows:
            if s.vw_args == setting.vw_args and s.interactions == setting.interactions and s.bits == bits:
                print(f"shadow {s.id} already learns this setting: nothing to apply")
                return s.id
        shadow = ShadowSpec(id=shadow_id, vw_args=setting.vw_args, interactions=setting.interactions, bits=bits)
        spec = spec.model_copy(update={"shadows": [x for x in spec.shadows if x.id != shadow_id] + [shadow]})
        changes = nb.apply([spec])
    for c in changes:
        print(f"{c.action.lower()} placement {c.placement}" + "".join(f"\n    {d}" for d in c.details))
    return shadow_id


def _current(args: argparse.Namespace) -> tuple[Setting, int, str]:
    from nextbest.bandit.offline.tune import Setting

    if args.current is not None:
        return Setting.of_placement(args.current, not args.no_interactions), args.bits or 18, "--current"
    stored = _stored_setting(args.db, args.placement)
    if stored is None:
        return Setting.of_placement("", True), args.bits or 18, "the defaults (the placement is not in the database)"
    vw_args, interactions, bits = stored
    return Setting.of_placement(vw_args, interactions), args.bits or bits, "the database"


def _history(args: argparse.Namespace, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True)
    print(f"history: {line}")
    if not args.history:
        return
    try:
        with open(args.history, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise InvalidInput("--history", f"cannot write {args.history}: {e.strerror}") from None
    with open(args.history, encoding="utf-8") as f:
        past = [json.loads(x) for x in f if x.strip()]
    past = [p for p in past if p.get("placement") == args.placement]
    print(f"\ntuning history of {args.placement} ({args.history}):")
    for p in past:
        at = time.strftime("%Y-%m-%d %H:%M", time.gmtime(p["at"]))
        w = p["winner"]
        low = "-" if w.get("ci_low") is None else f"{w['ci_low']:.4f}"
        winner, outcome = w["vw_args"] or "(none)", p["applied"] or "not applied"
        print(f"  {at}  {p['events']:>9,} events  winner {winner!r} {p['score']} low {low}  -> {outcome}")


def _tune(args: argparse.Namespace) -> int:
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as replay: chunks are too small for BLAS threads
    from nextbest.bandit.offline.tune import Options, history_record, log_namespaces, search, verdict
    from nextbest.offline.log_source import count_replay_events, replay_chunks
    from nextbest.offline.times import parse_time

    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    current, bits, where = _current(args)
    n = count_replay_events(args.db, args.placement, since=since, until=until)
    if n < args.min_search_events:
        raise Refused("log", f"placement {args.placement} has {n:,} closed decisions; the search needs at least {args.min_search_events:,}")
    if args.apply and n < args.min_events:
        raise Refused(
            "--min-events",
            f"placement {args.placement} has {n:,} closed decisions; --apply needs at least {args.min_events:,} "
            + "(--min-events): nothing searched, nothing applied",
        )
    first = next(iter(replay_chunks(args.db, args.placement, since=since, until=until, with_features=True, chunk=200)()))
    namespaces = log_namespaces(first)
    source = DbChunks(args.db, args.placement, since, until, args.chunk)
    options = Options(bits=bits, reward_model_args=args.reward_model_args, reward_model_loss=args.reward_model_loss)
    print(f"current setting ({where}): {current.text()}; namespaces: context {namespaces[0]}, arms {namespaces[1]}", file=sys.stderr)
    result = search(
        source,
        current,
        namespaces=namespaces,
        stages=args.stages,
        jobs=args.jobs,
        score=args.score,
        options=options,
        progress=_progress(sys.stderr),
    )
    print(format_table(result, args.placement))
    decision = verdict(result, args.min_events)
    applied = None
    code = 0
    print()
    if args.apply:
        if decision.apply:
            shadow_id = args.shadow_id or time.strftime("tuned-%Y%m%d-%H%M", time.gmtime())
            applied = "shadow:" + _apply_shadow(args.target, args.placement, result.best.candidate.setting, bits, shadow_id)
            print(f"applied: {decision.reason}; the winner learns as {applied} of {args.placement} (nextbest stats shows it)")
        else:
            print(f"refused: {decision.reason}; nothing applied")
            code = 2
    else:
        print(f"dry run: {'--apply would start the winner as a shadow' if decision.apply else '--apply would refuse'}: {decision.reason}")
    _history(args, history_record(args.placement, result, decision, time.time(), applied))
    return code


def _jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tune`` to the nextbest command."""
    t = sub.add_parser("tune", help="search a placement's learning settings on its decision log")
    t.add_argument("placement")
    t.add_argument("--db", required=True, help="database URL or SQLite path (read only)")
    t.add_argument("--since", help="start, inclusive: epoch seconds or ISO date/time (UTC unless it has an offset)")
    t.add_argument("--until", help="end, exclusive: epoch seconds or ISO date/time (UTC unless it has an offset)")
    t.add_argument(
        "--stages",
        type=int,
        choices=(1, 2, 3),
        default=3,
        help="1: cb_type x learning rate; 2: + interactions; 3: + l1/l2/power_t (default 3)",
    )
    t.add_argument("--jobs", type=positive_int, default=_jobs(), help="processes scoring candidates (default min(2, cores))")
    t.add_argument(
        "--score", choices=("snips", "dr"), default="snips", help="the estimator whose lower 95 %% bound ranks and decides (default snips)"
    )
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the table, change nothing (the default)")
    mode.add_argument(
        "--apply", action="store_true", help="start the winner as a shadow of the placement at --target, when it beats the current setting"
    )
    t.add_argument(
        "--min-events",
        dest="min_events",
        type=positive_int,
        default=DEFAULT_MIN_EVENTS,
        help=f"--apply needs at least this many events (default {DEFAULT_MIN_EVENTS})",
    )
    t.add_argument(
        "--min-search-events",
        dest="min_search_events",
        type=positive_int,
        default=MIN_SEARCH_EVENTS,
        help=f"refuse a log shorter than this (default {MIN_SEARCH_EVENTS})",
    )
    t.add_argument("--shadow-id", dest="shadow_id", help="the shadow's id with --apply (default tuned-YYYYMMDD-HHMM)")
    t.add_argument("--current", help="the current setting's vw_args, instead of the placement's stored ones")
    t.add_argument("--no-interactions", dest="no_interactions", action="store_true", help="with --current: interactions off (no -q UA)")
    t.add_argument("--bits", type=int, help="model bits (default the placement's, else 18)")
    t.add_argument("--reward-model-args", dest="reward_model_args", help="VW arguments of DR's reward model (default: replay's)")
    t.add_argument(
        "--reward-model-loss",
        dest="reward_model_loss",
        choices=("auto", "squared", "logistic"),  # nextbest.bandit.offline.reward_model.REWARD_MODEL_LOSSES
        default="auto",
        help="loss of DR's reward model, as nextbest replay's (default auto: logistic when every reward is 0 or 1)",
    )
    t.add_argument("--chunk", type=positive_int, default=50_000, help="events read at a time (default 50000)")
    t.add_argument("--history", metavar="FILE", help="append the history line to this JSON-lines file and show the placement's history")
    add_target(t)
    t.set_defaults(func=_tune)
