"""Reads the decision log for experiment statistics and reports, read-only (like replay).

The ``variant`` and ``activated`` columns are read when the database has them (older
databases do not): without a variant (or with the empty one, outside experiments) a decision
belongs to no variant and there is no lift to report; without ``activated`` every decision
with an arm was shown.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Text, and_, cast, column, inspect, select
from sqlalchemy.engine import Connection

from nextbest.bandit.decision_log import aggregate
from nextbest.bandit.errors import InvalidInput, NotFound
from nextbest.bandit.offline.experiment_stats import DEFAULT, OPEN, Bucket, LogColumns, Summary, explored, summarize
from nextbest.bandit.spec import BudgetSpec, PlacementSpec
from nextbest.offline.log_source import _bulk_json, _connect
from nextbest.storage import tables as t

BUCKETS = ("hour", "day")


@dataclass(frozen=True, slots=True)
class LogData:
    """A placement's decisions, oldest first, with what the report needs besides the stats."""

    placement: str
    cols: LogColumns
    rewarded_at: np.ndarray[Any, np.dtype[np.float64]]  # nan while open
    budgets: list[list[tuple[str, str]]]  # per decision: the (key, period) accounts it spent from
    budget_specs: dict[str, BudgetSpec] = field(default_factory=dict)  # budget key -> its spec, when known
    # arm -> reason -> decisions that left the arm out for it (read with the budgets, for the report)
    ineligible: dict[str, dict[str, int]] = field(default_factory=dict)


def has_column(conn: Connection, table: str, name: str) -> bool:
    return any(c["name"] == name for c in inspect(conn).get_columns(table))


def _budget_specs(conn: Connection, placement: str) -> dict[str, BudgetSpec]:
    """Campaign budgets from the campaigns table, and arm budgets when the stored placement
    spec carries its arms' settings (``arm_settings``: by arm id, as stored since they are kept)."""
    out: dict[str, BudgetSpec] = {}
    for r in conn.execute(select(t.campaigns.c.id, t.campaigns.c.spec)).all():
        try:
            out[f"campaign:{r.id}"] = BudgetSpec.model_validate(r.spec["budget"])
        except (KeyError, TypeError, ValueError):
            continue
    row = conn.execute(select(t.placements.c.spec).where(t.placements.c.id == placement)).first()
    settings = row.spec.get("arm_settings") if row is not None and isinstance(row.spec, dict) else None
    for arm_id, arm in (settings or {}).items():
        if isinstance(arm, dict) and arm.get("budget"):
            try:
                out[f"arm:{placement}/{arm_id}"] = BudgetSpec.model_validate(arm["budget"])
            except ValueError:
                continue
    return out


def arm_budget_specs(specs: Sequence[PlacementSpec]) -> dict[str, BudgetSpec]:
    """Budget keys and specs of the arms and campaigns of placements (e.g. from an apply file)."""
    return {f"arm:{p.id}/{a.id}": a.budget for p in specs for a in p.arms if a.budget is not None}


def _as_of(outcomes: Sequence[int], closed_at: Sequence[float | None]) -> float:
    """Now, or the server's clock when it is ahead: the last time it closed a window with the
    default reward (so a log from a server with another clock, or a copy, reads the same)."""
    swept = [t for o, t in zip(outcomes, closed_at, strict=True) if o == DEFAULT and t is not None]
    return max([time.time(), *swept])


def _aggregation(conn: Connection, placement: str) -> str:
    row = conn.execute(select(t.placements.c.spec).where(t.placements.c.id == placement)).first()
    how = row.spec.get("reward_aggregation") if row is not None and isinstance(row.spec, dict) else None
    return how if isinstance(how, str) else "earliest"


def _recorded_rewards(conn: Connection, placement: str, where: list[Any]) -> dict[tuple[str, int], list[float]]:
    """The rewards recorded ("agg") for the placement's open windows in the period, in the order
    stored: an aggregating placement's acknowledged rewards before their window closes."""
    d, r = t.decisions.c, t.reward_events.c
    rows = conn.execute(
        select(r.event_id, r.slot, r.reward)
        .select_from(t.reward_events.join(t.decisions, and_(r.event_id == d.event_id, r.slot == d.slot)))
        .where(*where, d.outcome == OPEN, r.kind == "agg")
        .order_by(r.id)
    ).all()
    out: dict[tuple[str, int], list[float]] = {}
    for event_id, slot, reward in rows:
        out.setdefault((event_id, int(slot)), []).append(float(reward))
    return out


def read_log(
    url: str,
    placement: str,
    *,
    since: float | None = None,
    until: float | None = None,
    with_budgets: bool = False,
    as_of: float | None = None,
) -> LogData:
    """Every decision of a placement in the period (open ones too), oldest first. Rewards are
    measured for windows over by ``as_of`` (default: now)."""
    d = t.decisions.c
    with _connect(url) as conn:
        variant = has_column(conn, "decisions", "variant")
        activated = has_column(conn, "decisions", "activated")
        cols: list[Any] = [
            d.created_at,
            d.arm_id,
            d.chosen,
            cast(d.pmf, Text),
            d.outcome,
            d.reward,
            d.cost,
            d.reward_cost,
            d.rewarded_at,
            d.deadline,
            d.event_id,
            d.slot,
        ]
        if with_budgets:
            cols.append(cast(d.budgets, Text))
            cols.append(cast(d.ineligible, Text))
        if activated:
            cols.append(column("activated"))
        if variant:
            cols.append(column("variant"))
        where = [d.placement_id == placement]
        if since is not None:
            where.append(d.created_at >= since)
        if until is not None:
            where.append(d.created_at < until)
        rows = conn.execute(select(*cols).select_from(t.decisions).where(*where).order_by(d.created_at, d.event_id)).all()
        specs = _budget_specs(conn, placement) if with_budgets else {}
        gathered = _recorded_rewards(conn, placement, where)
        how = _aggregation(conn, placement)
    if not rows:
        raise NotFound(f"placement {placement!r} has no decisions in the chosen period")
    c = list(zip(*rows, strict=True))
    chosen = [None if x is None else int(x) for x in c[2]]

    def floats(values: Sequence[Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)

    reward = floats(c[5])
    if gathered:  # open windows' recorded rewards: their running aggregate, as the close would learn it
        outcome = np.asarray(c[4], dtype=np.int64)
        for i in np.flatnonzero(outcome == OPEN).tolist():
            values = gathered.get((c[10][i], int(c[11][i])))
            if values:
                reward[i] = aggregate(how, ([] if math.isnan(reward[i]) else [float(reward[i])]) + values)

    log = LogColumns(
        created_at=np.asarray(c[0], dtype=np.float64),
        arm=list(c[1]),
        outcome=np.asarray(c[4], dtype=np.int64),
        reward=reward,
        cost=floats(c[6]),
        reward_cost=floats(c[7]),
        explored=explored(_bulk_json(c[3]), chosen),
        variant=[v or None for v in c[-1]] if variant else None,
        activated=np.array([bool(x) for x in c[-2 if variant else -1]], dtype=np.bool_) if activated else None,
        deadline=floats(c[9]),
        as_of=_as_of(c[4], c[8]) if as_of is None else as_of,
    )
    budgets: list[list[tuple[str, str]]] = []
    ineligible: dict[str, dict[str, int]] = {}
    if with_budgets:
        budgets = [[(k, p) for k, p in (b or [])] for b in (json.loads(x) if x else None for x in c[12])]
        for x in c[13]:
            for arm, reason in json.loads(x) if x else ():
                by_reason = ineligible.setdefault(arm, {})
                by_reason[reason] = by_reason.get(reason, 0) + 1
    return LogData(placement, log, floats(c[8]), budgets, specs, ineligible)


def placement_stats(
    url: str,
    placement: str,
    *,
    bucket: str | None = None,
    since: float | None = None,
    until: float | None = None,
    as_of: float | None = None,
) -> Summary:
    """Statistics of a placement's decisions: per variant, per arm and, with a bucket, over time."""
    if bucket is not None and bucket not in BUCKETS:
        raise InvalidInput("--bucket", f"{bucket!r}: expected one of {', '.join(BUCKETS)}")
    data = read_log(url, placement, since=since, until=until, as_of=as_of)
    b: Bucket | None = "hour" if bucket == "hour" else "day" if bucket == "day" else None
    return summarize(placement, data.cols, b)
