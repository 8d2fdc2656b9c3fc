"""``nextbest export``, ``schema``, ``stats-log`` and ``report``: experiments by script.

``export`` asks a live server; the others need no server (``stats-log`` and ``report`` read
the decision log, read-only, like ``replay``). Exit codes: 0 done, 1 nothing to report or the
database is unavailable, 2 bad arguments. Heavy imports happen when a command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nextbest.bandit.errors import InvalidInput
from nextbest.cli.json_style import camel_keys
from nextbest.cli.target import add_target

if TYPE_CHECKING:
    from nextbest.bandit.offline.experiment_stats import GroupStats, Summary


def _write(path: str, text: str, field: str = "--out") -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise InvalidInput(field, f"cannot write {path}: {e.strerror}") from None


def _export(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient
    from nextbest.config.export import export_yaml

    with NextbestClient(args.target) as nb:
        text = export_yaml(nb)
    _write(args.out, text)
    if args.out != "-":
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from nextbest.config.schema import published_text

    _write(args.out, published_text())
    return 0


def _times(args: argparse.Namespace) -> tuple[float | None, float | None]:
    from nextbest.offline.times import parse_time

    return parse_time(args.since, "--since"), parse_time(args.until, "--until")


def _f(x: float, width: int, digits: int = 4, sign: bool = False) -> str:
    if math.isnan(x):
        return f"{'-':>{width}}"
    return f"{x:>+{width}.{digits}f}" if sign else f"{x:>{width}.{digits}f}"


def _rows(groups: Sequence[GroupStats], with_bucket: bool) -> list[str]:
    from nextbest.bandit.offline.experiment_stats import iso

    vw = max([7] + [len(g.variant or "-") for g in groups])
    aw = max([3] + [len(g.arm or "*") for g in groups])
    head = (f"{'bucket':<21}" if with_bucket else "") + (
        f"{'variant':<{vw}}  {'arm':<{aw}}  {'impressions':>11} {'measured':>9} {'rewards':>8} {'mean':>7}"
        f"  {'95% CI':>17} {'spend':>10} {'explore':>8}"
    )
    out = [head]
    for g in groups:
        ci = f"[{_f(g.mean.low, 0)}, {_f(g.mean.high, 0)}]"
        out.append(
            (f"{iso(g.bucket) or '':<21}" if with_bucket else "")
            + f"{g.variant or '-':<{vw}}  {g.arm or '*':<{aw}}  {g.impressions:>11,} {g.measured:>9,} {g.rewards:>8,}"
            f" {_f(g.mean.estimate, 7)}  {ci:>17} {g.spend:>10.2f} {_f(g.exploration_share, 8, 3)}"
        )
    return out


def format_summary(s: Summary) -> str:
    """The plain output of stats-log: totals per variant, per variant and arm, lifts, buckets."""
    from nextbest.bandit.offline.experiment_stats import iso

    kind = "0/1 rewards: rate with a Wilson 95% interval" if s.binary else "mean reward with a normal 95% interval"
    lines = [f"placement {s.placement}: {s.n:,} decisions, {iso(s.first)} .. {iso(s.last)}; {kind}", ""]
    lines += _rows(s.variants, False)
    lines += ["", *_rows(s.arms, False)]
    if s.lifts:
        lines += ["", f"lift over {s.lifts[0].control} (difference of means, 95% CI)"]
        for x in s.lifts:
            d = x.difference
            rel = "" if math.isnan(x.relative) else f"  ({x.relative:+.1%})"
            lines.append(f"  {x.variant:<12} {_f(d.estimate, 8, sign=True)}  [{_f(d.low, 0, sign=True)}, {_f(d.high, 0, sign=True)}]{rel}")
    if s.bucket:
        rows = sorted([*s.variant_buckets, *s.buckets], key=lambda g: (g.bucket or 0.0, g.variant or "", g.arm or ""))
        lines += ["", f"per {s.bucket} (arm * = all arms):", *_rows(rows, True)]
    return "\n".join(lines)


def _stats_log(args: argparse.Namespace) -> int:
    from nextbest.offline.stats_source import placement_stats

    since, until = _times(args)
    summary = placement_stats(args.db, args.placement, bucket=args.bucket, since=since, until=until)
    if args.json:
        print(json.dumps(camel_keys(summary.to_dict())))  # the CLI's JSON style (nextbest.cli.json_style)
    else:
        print(format_summary(summary))
    return 0


def _report(args: argparse.Namespace) -> int:
    from nextbest.offline.report import build_report

    since, until = _times(args)
    specs = []
    if args.config:
        from nextbest.config.files import load_apply_file

        specs = load_apply_file(Path(args.config)).placements
    page = build_report(args.db, args.placement, bucket=args.bucket, since=since, until=until, specs=specs)
    _write(args.out, page)
    if args.out != "-":
        print(f"wrote {args.out} ({len(page) // 1024:,} KiB)")
    return 0


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="database URL or SQLite path (read only)")
    p.add_argument("--placement", required=True)
    p.add_argument("--bucket", choices=("hour", "day"), help="time buckets")
    p.add_argument("--since", help="first decision time (epoch seconds or ISO 8601, UTC by default)")
    p.add_argument("--until", help="decisions before this time")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add export, schema, stats-log and report to the nextbest command."""
    e = sub.add_parser("export", help="write the live configuration as an apply file (YAML)")
    add_target(e)
    e.add_argument("--out", default="-", help="file to write (default: standard output)")
    e.set_defaults(func=_export)

    s = sub.add_parser("schema", help="print the JSON Schema of apply files (for editors)")
    s.add_argument("--out", default="-", help="file to write (default: standard output)")
    s.set_defaults(func=_schema)

    st = sub.add_parser("stats-log", help="experiment statistics with 95%% intervals, from the decision log")
    _log_args(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_stats_log)

    r = sub.add_parser("report", help="a self-contained HTML report of a placement, from the decision log")
    _log_args(r)
    r.add_argument("--out", required=True, help="HTML file to write ('-': standard output)")
    r.add_argument("--config", help="apply file whose arm budgets give the budget plans (the log has no limits)")
    r.set_defaults(func=_report)
