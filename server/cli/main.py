"""The ``nextbest`` command: serve, apply, stats, choose, reward, explain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from nextbest.bandit.errors import InvalidInput, NextbestError
from nextbest.cli.json_style import message_json
from nextbest.cli.target import add_target
from nextbest.config.plans import Change
from nextbest.offline.times import parse_time
from nextbest.v1 import admin_pb2, decision_pb2

# What the "server" extra installs (pyproject.toml): a client-only install lacks these, and the
# commands that serve, replay or simulate say so instead of a traceback.
SERVER_DEPENDENCIES = frozenset(
    {
        "vowpalwabbit",
        "pylibvw",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "numpy",
        "matplotlib",
        "prometheus_client",
        "pydantic_settings",
        "grpc_health",
        "grpc_reflection",
        "pyarrow",
    }
)


def _serve(args: argparse.Namespace) -> int:
    from nextbest.app import serve
    from nextbest.settings import load_settings
    from nextbest.telemetry.json_logs import setup_logging

    settings = load_settings(
        args.config,
        host=args.host,
        port=args.port,
        db=args.db,
        init_config=args.init_config,
        log_level=args.log_level,
        workers=args.workers,
        learner=args.learner,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
    )
    setup_logging(settings.log_level)
    if settings.workers > 1:
        return _serve_workers(settings.workers, settings.port, settings.metrics_port)
    asyncio.run(serve(settings))
    return 0


def _serve_workers(n: int, port: int, metrics_port: int | None) -> int:
    """Several server processes on one port (SO_REUSEPORT): every core serves. They share the
    database like replicas do: one of them learns, the others load its models."""
    import signal
    import subprocess

    if port == 0:
        raise InvalidInput("--port", "--workers needs a fixed port")
    argv = [a for a in sys.argv[1:] if not a.startswith(("--workers=", "--metrics-port="))]
    for flag in ("--workers", "--metrics-port"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    env = {**os.environ, "NEXTBEST_WORKERS": "1", "NEXTBEST_REUSE_PORT": "true"}
    procs = []
    for k in range(n):  # one metrics port each: metrics_port, metrics_port + 1, ...
        extra = {"NEXTBEST_METRICS_PORT": str(metrics_port + k)} if metrics_port else {}
        procs.append(subprocess.Popen([sys.executable, "-m", "nextbest.cli.main", *argv], env={**env, **extra}))

    def forward(sig: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(p.wait() for p in procs)


def print_changes(changes: Sequence[Change], dry_run: bool) -> None:
    if not changes:
        print("no changes: the live configuration already matches")
        return
    verb = {"CREATE": "create", "UPDATE": "update", "RETIRE": "retire"}
    for c in changes:
        what = f"campaign {c.campaign}" if c.campaign else f"placement {c.placement}" + (f" arm {c.arm_id}" if c.arm_id else "")
        print(f"{'would ' if dry_run else ''}{verb.get(c.action, c.action.lower())} {what}")
        for d in c.details:
            print(f"    {d}")
    print(f"{len(changes)} change(s) {'planned (dry run, nothing applied)' if dry_run else 'applied'}")


def _apply(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient
    from nextbest.config.files import load_apply_file

    cfg = load_apply_file(Path(args.file))  # invalid files stop here, before any call
    for p in cfg.placements:
        for w in p.warnings():
            print(f"warning: {w}", file=sys.stderr)
    with NextbestClient(args.target) as nb:
        changes = nb.apply(cfg.placements, dry_run=args.dry_run, campaigns=cfg.campaigns)
    print_changes(changes, args.dry_run)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient

    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    with NextbestClient(args.target) as nb:
        s = nb.stats(args.placement, since, until).raw
    if args.json:
        print(message_json(s))
        return 0
    windows = f"{s.pending} reward window{'' if s.pending == 1 else 's'} open"
    print(f"placement {s.placement}: {s.decisions} decisions, {windows}, model version {s.model_version}")
    print(
        f"{'arm':<24}{'impressions':>12}{'rewards':>10}{'reward_sum':>12}{'learned':>9}{'awaiting':>10}"
        f"{'mean':>8}{'default':>9}{'late':>6}  active"
    )
    for a in s.arms:
        mean = a.reward_sum / a.impressions if a.impressions else 0.0
        print(
            f"{a.arm_id:<24}{a.impressions:>12}{a.rewards:>10}{a.reward_sum:>12.2f}{a.rewards_learned:>9}"
            f"{a.rewards_awaiting_close:>10}{mean:>8.3f}{a.default_rewards:>9}{a.late_rewards:>6}  {'yes' if a.active else 'no'}"
        )
    awaiting = sum(a.rewards_awaiting_close for a in s.arms)
    if awaiting:
        total = sum(a.reward_sum_awaiting_close for a in s.arms)
        print(f"(rewards count once acknowledged: {awaiting} of them, sum {total:.2f}, await their window's close to be learned)")
    if any(a.ineligible for a in s.arms):  # "why does this offer never show?"
        print(f"\n{'not eligible':<24}{'decisions':>10}  most frequent reasons")
        for a in s.arms:
            if a.ineligible:
                reasons = "; ".join(f"{r.reason} ({r.decisions})" for r in a.ineligible_reasons[:3])
                print(f"{a.arm_id:<24}{a.ineligible:>10}  {reasons}")
    if len(s.variants) > 1 or (s.variants and s.variants[0].variant):
        print(f"\n{'variant':<16}{'decisions':>10}{'rewards':>9}{'awaiting':>10}{'closed':>8}{'mean reward':>13}")
        for v in s.variants:
            print(f"{v.variant or '-':<16}{v.decisions:>10}{v.rewards:>9}{v.rewards_awaiting_close:>10}{v.closed:>8}{v.mean_reward:>13.4f}")
    if len(s.models) > 1 or any(m.scored for m in s.models):
        print(f"\n{'model':<24}{'learned':>9}{'scored':>8}{'agreement':>11}{'est. value':>12}")
        for m in s.models:
            print(f"{m.name or '(placement)':<24}{m.learned:>9}{m.scored:>8}{m.agreement:>11.3f}{m.estimated_value:>12.4f}")
    if s.budgets:
        print(f"\n{'budget':<36}{'period':>11}{'limit':>10}{'spent':>10}{'held':>8}{'left':>10}{'leased':>8}{'price':>8}  exhausts")
        for b in s.budgets:
            when = b.projected_exhaustion.ToDatetime().strftime("%Y-%m-%d %H:%M") if b.HasField("projected_exhaustion") else "-"
            price = f"{b.pacing_multiplier:.3g}" if b.paced else "-"
            print(
                f"{b.budget:<36}{b.period:>11}{b.limit:>10.2f}{b.spent:>10.2f}{b.reserved:>8.2f}{b.remaining:>10.2f}"
                f"{b.leased_unused:>8.2f}{price:>8}  {when}"
            )
        print("(every server's figures, as the database has them; leased: held by a server, not yet used)")
    if s.conversions or s.unattributed:
        print()
        print(conversions_table(s, _period(since, until)))
    return 0


def _ci(low: float, high: float, digits: int, sign: str = "") -> str:
    return "[–]" if math.isnan(low) or math.isnan(high) else f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def _period(since: float | None, until: float | None) -> str:
    def at(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")

    if since is None:
        return "the last 30 days" if until is None else f"30 days to {at(until)}"
    return f"{at(since)} to {'now' if until is None else at(until)}"


def conversions_table(s: admin_pb2.GetStatsResponse, period: str) -> str:
    """GetStats' conversion figures: per variant, the difference to the holdout, the unattributed."""
    lines = [
        f"conversions (from billing), {period}: every conversion of the customers decided, attributed or not",
        f"{'variant':<16}{'customers':>10}{'converting':>11}{'rate':>8}  {'95% CI':<18}{'value/customer':>15}  95% CI",
    ]
    for v in s.conversions:
        r, m = v.conversion_rate, v.value_per_customer
        lines.append(
            f"{v.variant or '-':<16}{v.customers:>10}{v.converting_customers:>11}{r.estimate:>8.4f}  {_ci(r.low, r.high, 4):<18}"
            f"{m.estimate:>15.2f}  {_ci(m.low, m.high, 2)}"
        )
    diffs = [v for v in s.conversions if v.HasField("difference_to_holdout")]
    if diffs:
        lines.append("difference to the holdout (95% CI)")
        for v in diffs:
            r, m = v.difference_to_holdout.conversion_rate, v.difference_to_holdout.value_per_customer
            lines.append(
                f"  {v.variant:<14}rate {r.estimate:+.4f} {_ci(r.low, r.high, 4, '+'):<20}"
                f"value/customer {m.estimate:+.2f} {_ci(m.low, m.high, 2, '+')}"
            )
    if s.unattributed:
        lines.append(f"unattributed (credited no decision, any placement){'conversions':>14}{'value':>12}")
        lines += [f"  {u.product:<48}{u.conversions:>14}{u.value:>12.2f}" for u in s.unattributed]
    return "\n".join(lines)


def _parse_feature(text: str) -> tuple[str, str, float | str]:
    """``customer.segment=youth`` or ``customer.arpu:12.5`` (a number)."""
    if "=" in text:
        key, value = text.split("=", 1)
        val: float | str = value
    elif ":" in text:
        key, value = text.rsplit(":", 1)
        try:
            val = float(value)
        except ValueError:
            raise InvalidInput("--feature", f"{text!r}: the value after ':' must be a number") from None
    else:
        raise InvalidInput("--feature", f"{text!r}: write name=text or name:number")
    ns, _, name = key.rpartition(".")
    return ns, name, val


def _choose(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient
    from nextbest.v1 import common_pb2

    feats = []
    for text in args.feature:
        ns, name, val = _parse_feature(text)
        feats.append(
            common_pb2.Feature(namespace=ns, name=name, text=val)
            if isinstance(val, str)
            else common_pb2.Feature(namespace=ns, name=name, number=val)
        )
    with NextbestClient(args.target) as nb:
        r = nb.choose(args.placement, feats, customer_id=args.customer, event_id=args.event_id, exclude_arms=args.exclude)
    assert r.raw is not None  # the client keeps the response it read
    print(message_json(r.raw))
    return 0


def explain_table(r: decision_pb2.ExplainResponse) -> str:
    """The readable form: the decision, then one line per arm."""
    lines = [
        f"event {r.event_id} (slot {r.slot}) on {r.placement}, {r.decided_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC",
        f"served: {r.arm_id or '(no arm)'} with probability {r.probability:.4g}" + (f"  ({r.reason})" if r.reason else ""),
    ]
    how = r.policy or "not recorded (logged before explanations were)"
    if r.policy in ("epsilon", "softmax", "squarecb"):
        name = {"epsilon": "epsilon", "softmax": "lambda", "squarecb": "gamma"}[r.policy]
        how += f" ({name} {r.exploration_parameter:.4g}" + (f", reward scale {r.reward_scale:.4g})" if r.policy != "epsilon" else ")")
    lines.append(f"policy: {how}; model version {r.model_version}" + (f"; variant {r.variant}" if r.variant else ""))
    if r.no_offer_probability:
        lines.append(f"no offer (pacing): probability {r.no_offer_probability:.4g}")
    lines.append("")
    if r.scored:
        lines.append(f"  {'arm':<24}{'p':>8}{'value':>10}{'= model':>10}{'+ bvalue':>10}{'- fatigue':>11}{'- pacing':>10}")
    else:
        lines.append(f"  {'arm':<24}{'p':>8}")
    for a in r.arms:
        mark = "*" if a.arm_id == r.arm_id and a.eligible else " "
        if not a.eligible:
            lines.append(f"{mark} {a.arm_id:<24}{'-':>8}  not eligible: {a.reason}")
        elif r.scored:
            lines.append(
                f"{mark} {a.arm_id:<24}{a.probability:>8.4f}{a.value:>10.4f}{a.expected_reward:>10.4f}"
                f"{a.business_value:>10.4f}{a.fatigue_penalty:>11.4f}{a.pacing_cost:>10.4f}"
            )
        else:
            lines.append(f"{mark} {a.arm_id:<24}{a.probability:>8.4f}" + (f"  {a.reason}" if a.reason else ""))  # the fallback says so
    return "\n".join(lines + _explained_features(r))


def _explained_features(r: decision_pb2.ExplainResponse) -> list[str]:
    """The features the decision used with their source, and each arm's history, as logged."""

    def text(f: Any) -> str:
        name = f"{f.namespace}.{f.name}" if f.namespace else f.name
        return f"{name}={f.text}" if f.WhichOneof("value") == "text" else f"{name}={f.number:g}"

    out: list[str] = []
    if r.features:
        as_of = f" (profile as of {r.profile_as_of.ToDatetime():%Y-%m-%d %H:%M:%S} UTC)" if r.HasField("profile_as_of") else ""
        out += ["", f"features used{as_of}:"]
        source = {
            decision_pb2.FEATURE_SOURCE_PROFILE: "profile",
            decision_pb2.FEATURE_SOURCE_HISTORY: "history",
            decision_pb2.FEATURE_SOURCE_PLACEMENT: "placement",
        }
        out += [f"  {text(f.feature):<48}{source.get(f.source, 'request')}" for f in r.features]
    history = [(a.arm_id, a.history) for a in r.arms if a.history]
    if history:
        out += ["", "history per arm (source: history):"]
        out += [f"  {arm:<24}" + " ".join(text(f).removeprefix("history.") for f in fs) for arm, fs in history]
    if r.conversions:
        out += ["", f"conversions credited ({len(r.conversions)}):", f"  {'conversion':<32}{'share':>8}{'value':>12}  occurred at"]
        out += [
            f"  {c.conversion_id:<32}{c.share:>8.4f}{c.value:>12.4f}  {c.occurred_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC"
            for c in r.conversions
        ]
    return out


def _explain(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient

    with NextbestClient(args.target) as nb:
        r = nb.explain(args.event_id, slot=args.slot).raw
    print(message_json(r) if args.json else explain_table(r))
    return 0


def _reward(args: argparse.Namespace) -> int:
    from nextbest.client import NextbestClient

    with NextbestClient(args.target) as nb:
        print(nb.reward(args.event_id, args.reward, slot=args.slot, reward_id=args.reward_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextbest", description="Contextual-bandit next-best-offer decision service.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--host", help="address to bind (default 127.0.0.1; NEXTBEST_HOST)")
    s.add_argument("--port", type=int, help="port (default 50051, 0 picks a free one; NEXTBEST_PORT)")
    s.add_argument("--db", help="database URL (default sqlite:///nextbest.db; NEXTBEST_DB)")
    s.add_argument("--config", help="settings file (YAML)")
    s.add_argument("--init-config", dest="init_config", help="apply file loaded when the database has no placements")
    s.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING, ERROR")
    s.add_argument("--metrics-port", dest="metrics_port", type=int, help="serve Prometheus metrics on this HTTP port")
    s.add_argument("--http-port", dest="http_port", type=int, help="also serve the API as HTTP/JSON on this port (NEXTBEST_HTTP_PORT)")
    s.add_argument("--workers", type=int, help="server processes sharing the port, one per core (NEXTBEST_WORKERS)")
    s.add_argument(
        "--learner",
        choices=["auto", "always", "never"],
        help="auto (default): the first server to take the learner lock learns; never: serve only",
    )
    s.set_defaults(func=_serve)

    a = sub.add_parser("apply", help="make the live configuration match an apply file")
    a.add_argument("file")
    a.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    add_target(a)
    a.set_defaults(func=_apply)

    st = sub.add_parser("stats", help="impressions and rewards of a placement, per arm")
    st.add_argument("placement")
    st.add_argument("--json", action="store_true")
    st.add_argument("--since", help="start of the conversion figures' period (ISO 8601 or epoch seconds; default 30 days ago)")
    st.add_argument("--until", help="end of that period (default now)")
    add_target(st)
    st.set_defaults(func=_stats)

    c = sub.add_parser("choose", help="ask for a decision (for trying things out)")
    c.add_argument("placement")
    c.add_argument("-f", "--feature", action="append", default=[], help="ns.name=text or ns.name:number; repeatable")
    c.add_argument("--customer", default="")
    c.add_argument("--event-id", dest="event_id", default="")
    c.add_argument(
        "--exclude", action="append", default=[], metavar="ARM", help="an arm not to offer now (owned, out of stock); repeatable"
    )
    add_target(c)
    c.set_defaults(func=_choose)

    r = sub.add_parser("reward", help="report the reward of a decision")
    r.add_argument("event_id")
    r.add_argument("reward", type=float)
    r.add_argument("--slot", type=int, default=0, help="the slot rewarded (multi-slot placements)")
    r.add_argument("--reward-id", default="", help="a key of this reward: a retry with it is a duplicate")
    add_target(r)
    r.set_defaults(func=_reward)

    x = sub.add_parser("explain", help="why a decision served what it served, arm by arm")
    x.add_argument("event_id")
    x.add_argument("--slot", type=int, default=0, help="the slot (multi-slot placements)")
    x.add_argument("--json", action="store_true")
    add_target(x)
    x.set_defaults(func=_explain)

    from nextbest.cli.replay import add_commands as replay_commands

    replay_commands(sub)
    from nextbest.cli.tune import add_commands as tune_commands

    tune_commands(sub)
    from nextbest.cli.experiments import add_commands as experiment_commands

    experiment_commands(sub)
    from nextbest.cli.simulate import add_commands as simulation_commands

    simulation_commands(sub)
    from nextbest.cli.profiles import add_commands as profile_commands

    profile_commands(sub)
    from nextbest.cli.conversions import add_commands as conversion_commands

    conversion_commands(sub)
    from nextbest.bench.main import add_commands as bench_commands

    bench_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. A reader that closes the pipe early (``| head -1``) ends
    it quietly, as it would ``cat``: no traceback, exit code 141 (128 + SIGPIPE, as the shell
    reports a command the signal ended), the rest of the output dropped."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, where a closed pipe could only be reported
    except BrokenPipeError:
        # As the Python documentation recommends (library/signal.html, "Note on SIGPIPE"): the
        # interpreter flushes stdout again at exit, so point it at devnull first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NextbestError as e:  # NotFound, Unavailable: the command could not do its work
        print(f"error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        code = e.code()
        print(f"error: {code.name if code else 'UNKNOWN'}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVER_DEPENDENCIES:
            raise
        print(
            f"error: `nextbest {args.command}` needs the server's dependencies ({e.name} is not installed): pip install 'nextbest[server]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    logging.basicConfig()
    sys.exit(main())
