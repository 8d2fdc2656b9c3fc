"""``nextbest report``: one self-contained HTML page about a placement's experiment.

Everything is embedded (PNG images as base64, inline CSS), so the page can be mailed,
attached to a ticket or opened offline. The figures come from the database alone (the
decision log and the conversions), read only: reward over time per variant with 95 %
intervals, arm shares over time, budget burn against an even schedule, the learning curve, the
summary tables of ``stats-log``, and the conversions from billing per variant against the
holdout (as GetStats has them).
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nextbest.bandit.offline.experiment_stats import BUCKET_SECONDS, Bucket, GroupStats, Summary, group, iso, rolling_mean, summarize
from nextbest.bandit.offline.uplift import VariantUplift
from nextbest.bandit.spec import BudgetSpec, PlacementSpec
from nextbest.offline.conversion_source import ConversionFigures, read_conversions
from nextbest.offline.stats_source import LogData, arm_budget_specs, read_log

DAY = 86400.0
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child,.t{text-align:left}img{max-width:100%;display:block;margin:.5em 0}.note{color:#666;font-size:.85em}"""


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    """The figure as an <img> with a base64 PNG (no file, no external resource)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="plot" src="data:image/png;base64,{data}">'


def _dates(ts: Sequence[float] | np.ndarray[Any, Any]) -> Any:
    return np.array(np.asarray(ts, dtype=np.float64) * 1000, dtype="datetime64[ms]")


def auto_bucket(data: LogData) -> Bucket:
    """Hours for up to three days of log, days beyond."""
    span = float(data.cols.created_at.max() - data.cols.created_at.min()) if data.cols.n else 0.0
    return "hour" if span <= 3 * DAY else "day"


def _label(v: str | None) -> str:
    return "all" if v is None else v


def plot_reward_over_time(data: LogData, bucket: Bucket, binary: bool) -> str:
    plt = _plt()
    rows = [g for g in group(data.cols, by_arm=False, bucket=bucket, binary=binary) if g.measured]
    if not rows:  # no reward is measured yet: a sentence, not an empty chart with made-up date axes
        return '<p class="note">No measured reward yet: the chart appears once a reward window has closed or a reward arrived.</p>'
    fig, ax = plt.subplots(figsize=(9, 3.6))
    offset = BUCKET_SECONDS[bucket] / 2
    for variant in sorted({g.variant for g in rows}, key=lambda v: v or ""):
        mine = [g for g in rows if g.variant == variant]
        x = _dates([(g.bucket or 0.0) + offset for g in mine])
        y = np.array([g.mean.estimate for g in mine])
        lo = np.array([g.mean.low for g in mine])
        hi = np.array([g.mean.high for g in mine])
        (line,) = ax.plot(x, y, marker="o", ms=3, label=_label(variant))
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_title(f"{'reward rate' if binary else 'mean reward'} per {bucket}, with 95 % intervals")
    ax.set_ylabel("reward rate" if binary else "mean reward")
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def plot_arm_share(data: LogData, bucket: Bucket) -> str:
    plt = _plt()
    rows = [g for g in group(data.cols, by_variant=False, bucket=bucket) if g.impressions]
    if not rows:  # every decision served no arm (nothing eligible): nothing to stack
        return '<p class="note">No decision of this placement served an arm.</p>'
    starts = sorted({g.bucket or 0.0 for g in rows})
    arms = sorted({g.arm or "" for g in rows})
    counts = np.zeros((len(arms), len(starts)))
    for g in rows:
        counts[arms.index(g.arm or ""), starts.index(g.bucket or 0.0)] = g.impressions
    share = counts / np.maximum(counts.sum(axis=0), 1)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.stackplot(_dates([s + BUCKET_SECONDS[bucket] / 2 for s in starts]), share, labels=arms, alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_title(f"share of impressions per arm, per {bucket}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def budget_burn(data: LogData) -> dict[tuple[str, str], tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    """Per budget account: the times of its spends and the cumulative spend after each.

    An impression cost is spent at the decision; a reward cost when a positive reward came
    (acknowledged: also one whose window is still open, which the budget holds until the close)."""
    c = data.cols
    events: dict[tuple[str, str], list[tuple[float, float]]] = {}
    incurred = c.explicit & (np.nan_to_num(c.reward) > 0)
    shown = c.shown
    for i, accounts in enumerate(data.budgets):
        for acc in accounts:
            ev = events.setdefault(acc, [])
            if shown[i] and c.cost[i] > 0:
                ev.append((float(c.created_at[i]), float(c.cost[i])))
            if incurred[i] and c.reward_cost[i] > 0:
                at = data.rewarded_at[i]
                ev.append((float(c.created_at[i] if math.isnan(at) else at), float(c.reward_cost[i])))
    out = {}
    for acc, ev in sorted(events.items()):
        if ev:
            ev.sort()
            t, x = zip(*ev, strict=True)
            out[acc] = (np.array(t), np.cumsum(x))
    return out


def plan_for(period: str, spec: BudgetSpec | None, first: float) -> tuple[float, float, float] | None:
    """(start, end, limit) of an account's even schedule; None when it has no end or no spec."""
    if spec is None:
        return None
    if period == "total":
        if spec.total is None or spec.end is None:
            return None
        start = spec.start.timestamp() if spec.start else first
        end = spec.end.timestamp()
        return (start, end, spec.total) if end > start else None
    if spec.daily is None:
        return None
    d0 = float(np.datetime64(period, "s").astype(np.int64))
    return d0, d0 + DAY, spec.daily


def plot_budget_burn(data: LogData, burn: dict[tuple[str, str], tuple[Any, Any]]) -> str:
    plt = _plt()
    keys = sorted({k for k, _ in burn}, key=lambda k: -max(v[1][-1] for (kk, _), v in burn.items() if kk == k))[:6]
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        spec = data.budget_specs.get(key)
        for (_, period), (t, spent) in ((a, b) for a, b in burn.items() if a[0] == key):
            color = f"C{0 if period == 'total' else 1}"
            label = "total spend" if period == "total" else "daily spend"
            ax.step(_dates(np.concatenate(([t[0]], t))), np.concatenate(([0.0], spent)), where="post", color=color, label=label)
            plan = plan_for(period, spec, float(t[0]))
            if plan is not None:
                start, end, limit = plan
                ax.plot(_dates([start, end]), [0, limit], ls="--", color=color, alpha=0.7, label="even schedule")
                ax.axhline(limit, color=color, lw=0.6, alpha=0.5)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper left")
        ax.set_title(f"budget {key}: cumulative spend", fontsize=10)
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png(fig)


def plot_learning_curve(data: LogData) -> str:
    plt = _plt()
    c = data.cols
    measured = c.measured
    if not measured.any():
        return '<p class="note">No measured reward yet: nothing to draw a learning curve from.</p>'
    fig, ax = plt.subplots(figsize=(9, 3.6))
    variants = sorted(set(c.variant), key=lambda v: v or "") if c.variant is not None else [None]
    for v in variants:
        mask = measured if v is None or c.variant is None else measured & np.array([x == v for x in c.variant])
        r = c.reward[mask]
        if r.size == 0:
            continue
        window = int(min(2000, max(50, r.size // 20)))
        ax.plot(np.arange(1, r.size + 1), rolling_mean(r, window), label=f"{_label(v)} (window {window})")
    ax.set_title("learning curve: rolling mean reward, in decision order")
    ax.set_xlabel("measured decisions")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _f(x: float, digits: int = 4) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A table whose first ``left`` columns are names (left-aligned) and the rest numbers."""

    def cell(tag: str, i: int, x: Any) -> str:
        return f"<{tag}{' class=t' if i < left else ''}>{html.escape(str(x))}</{tag}>"

    th = "".join(cell("th", i, h) for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(cell("td", i, x) for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _stats_rows(groups: Sequence[GroupStats], with_arm: bool) -> list[list[Any]]:
    return [
        [
            _label(g.variant),
            *([g.arm] if with_arm else []),
            g.impressions,
            g.measured,
            g.rewards,
            g.awaiting_close,
            _f(g.explicit_sum, 2),
            _f(g.mean.estimate),
            f"[{_f(g.mean.low)}, {_f(g.mean.high)}]",
            _f(g.spend, 2),
            _f(g.exploration_share, 3),
        ]
        for g in groups
    ]


def _ci(low: float, high: float, digits: int, sign: str = "") -> str:
    return "[–]" if math.isnan(low) or math.isnan(high) else f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def _conversion_rows(variants: Sequence[VariantUplift]) -> list[list[Any]]:
    rows = []
    for v in variants:
        r, m = v.rate_difference, v.value_difference
        rows.append(
            [
                v.variant or "–",
                v.customers,
                v.converting,
                _f(v.rate.estimate),
                _ci(v.rate.low, v.rate.high, 4),
                _f(v.value.estimate, 2),
                _ci(v.value.low, v.value.high, 2),
                "–" if r is None else f"{r.estimate:+.4f} {_ci(r.low, r.high, 4, '+')}",
                "–" if m is None else f"{m.estimate:+.2f} {_ci(m.low, m.high, 2, '+')}",
            ]
        )
    return rows


def conversions_section(c: ConversionFigures | None) -> list[str]:
    """The "conversions (from billing)" table: uplift on real purchases against the holdout."""
    parts = ["<h2>Conversions (from billing)</h2>"]
    if c is None or not (c.variants or c.unattributed):
        return [*parts, '<p class="note">No customer of this placement was decided in the period, and no conversion is unattributed.</p>']
    parts.append(f"<p>Customers decided from {iso(c.since)} to {iso(c.until)} and every conversion of theirs (attributed or not).</p>")
    head = [
        "variant",
        "customers",
        "converting",
        "rate",
        "95 % CI",
        "value/customer",
        "95 % CI",
        "rate − holdout",
        "value/customer − holdout",
    ]
    parts.append(_table(head, _conversion_rows(c.variants)))
    parts.append(
        '<p class="note">Every conversion of a decided customer counts, from their first decision on, whether an offer '
        "was credited with it or not: the holdout's purchases are what happens without offers. Rate: Wilson 95 %; "
        "value per customer (0 without a conversion): normal 95 %; differences to the holdout: difference of "
        "independent means, normal 95 %.</p>"
    )
    if c.unattributed:
        rows = [[k, n, _f(v, 2)] for k, (n, v) in c.unattributed.items()]
        parts.append("<p>Unattributed conversions (credited no decision, of any placement), by product:</p>")
        parts.append(_table(["product", "conversions", "value"], rows))
    return parts


def render(data: LogData, summary: Summary, bucket: Bucket, conversions: ConversionFigures | None = None) -> str:
    """The HTML page for a log and its summary."""
    measure = "reward rate (Wilson 95 %)" if summary.binary else "mean reward (normal 95 %)"
    head = ["variant", "impressions", "measured", "rewards", "awaiting close", "reward sum", "mean", "95 % CI", "spend", "exploration"]
    parts = [
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>nextbest report: {html.escape(summary.placement)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Placement {html.escape(summary.placement)}</h1>",
        f"<p>{summary.n:,} decisions from {iso(summary.first)} to {iso(summary.last)}; {html.escape(measure)}.</p>",
        "<h2>Variants</h2>",
        _table(head, _stats_rows(summary.variants, False)),
        '<p class="note">Rewards (explicit ones, with their sum and reward spend) count once acknowledged; '
        "<i>awaiting close</i> of them are in windows still open, learned when they close (an aggregating "
        "placement's at their running aggregate). The mean is over measured decisions: windows over.</p>",
    ]
    if summary.lifts:
        parts.append(
            _table(
                ["variant", "vs", "difference", "95 % CI", "relative"],
                [
                    [
                        x.variant,
                        x.control,
                        _f(x.difference.estimate),
                        f"[{_f(x.difference.low)}, {_f(x.difference.high)}]",
                        "–" if math.isnan(x.relative) else f"{x.relative:+.1%}",
                    ]
                    for x in summary.lifts
                ],
                left=2,
            )
        )
    elif data.cols.variant is None:
        parts.append('<p class="note">This log records no variants: one row for all decisions, no lift.</p>')
    parts += conversions_section(conversions)
    parts += ["<h2>Reward over time</h2>", plot_reward_over_time(data, bucket, summary.binary)]
    parts += ["<h2>Arms</h2>", plot_arm_share(data, bucket)]
    parts.append(_table(["variant", "arm", *head[1:]], _stats_rows(summary.arms, True), left=2))
    if data.ineligible:  # "why does this offer never show?"
        parts.append("<h2>Why arms were not eligible</h2>")
        rows = []
        for arm, reasons in sorted(data.ineligible.items(), key=lambda kv: -sum(kv[1].values())):
            top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            rows.append([arm, "; ".join(f"{r} ({n})" for r, n in top), sum(reasons.values())])
        parts.append(_table(["arm", "most frequent reasons", "decisions"], rows, left=2))
    parts += ["<h2>Learning curve</h2>", plot_learning_curve(data)]
    parts.append("<h2>Budgets</h2>")
    burn = budget_burn(data)
    if burn:
        parts.append(plot_budget_burn(data, burn))
        rows = []
        for (key, period), (_, spent) in burn.items():
            plan = plan_for(period, data.budget_specs.get(key), 0.0)
            limit = plan[2] if plan else (data.budget_specs[key].total if key in data.budget_specs and period == "total" else None)
            rows.append(
                [
                    key,
                    period,
                    _f(float(spent[-1]), 2),
                    "–" if limit is None else _f(limit, 2),
                    "–" if not limit else f"{spent[-1] / limit:.1%}",
                ]
            )
        parts.append(_table(["budget", "period", "spent", "limit", "used"], rows, left=2))
        parts.append(
            '<p class="note">Spend from the decision log; dashed: an even schedule over the budget\'s period '
            "(limits known for campaigns, and for arms when given with --config).</p>"
        )
    else:
        parts.append('<p class="note">No decision of this placement spent from a budget.</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(
    url: str,
    placement: str,
    *,
    bucket: str | None = None,
    since: float | None = None,
    until: float | None = None,
    specs: Sequence[PlacementSpec] = (),
) -> str:
    """Read the log (read-only) and render the report. ``specs`` (e.g. from an apply file) give
    arm budget limits, which the log does not hold."""
    data = read_log(url, placement, since=since, until=until, with_budgets=True)
    if specs:
        data.budget_specs.update(arm_budget_specs(specs))
    b: Bucket = "hour" if bucket == "hour" else "day" if bucket == "day" else auto_bucket(data)
    summary = summarize(placement, data.cols, b)
    start = since if since is not None else summary.first or 0.0
    end = until if until is not None else time.time()
    conversions = read_conversions(url, placement, start, end) if start < end else None
    return render(data, summary, b, conversions)
