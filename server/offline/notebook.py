"""Experiments from a notebook: apply a configuration, read statistics, render a report.

    from nextbest.offline import notebook as sdk
    sdk.apply("experiment.yaml", target="127.0.0.1:50051", dry_run=True)
    df = sdk.stats("app_home_banner", db="sqlite:///nextbest.db", bucket="day")
    sdk.report("app_home_banner", db="sqlite:///nextbest.db", out="report.html")

The same functions back the ``nextbest`` commands, so a notebook and a script agree.
``stats`` returns a pandas DataFrame when pandas is installed, else a list of dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nextbest.config.files import ApplyFile, load_apply_file, parse_apply_text
from nextbest.config.plans import Change

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_DB = "sqlite:///nextbest.db"


def load(path_or_text: str | Path) -> ApplyFile:
    """An apply file from a path, or from YAML text (anything with a newline or a colon that is
    not an existing file)."""
    if isinstance(path_or_text, Path):
        return load_apply_file(path_or_text)
    if "\n" not in path_or_text and Path(path_or_text).is_file():
        return load_apply_file(Path(path_or_text))
    if "\n" not in path_or_text and ":" not in path_or_text:
        return load_apply_file(Path(path_or_text))  # a missing file: its error names the path
    return parse_apply_text(path_or_text, "<text>")


def apply(path_or_text: str | Path, target: str = DEFAULT_TARGET, dry_run: bool = False) -> list[Change]:
    """Make the live configuration match the file (or only plan it); returns the changes."""
    from nextbest.client import NextbestClient

    cfg = load(path_or_text)
    with NextbestClient(target) as nb:
        return nb.apply(cfg.placements, dry_run=dry_run, campaigns=cfg.campaigns)


def export(target: str = DEFAULT_TARGET) -> str:
    """The live configuration as apply-file text."""
    from nextbest.client import NextbestClient
    from nextbest.config.export import export_yaml

    with NextbestClient(target) as nb:
        return export_yaml(nb)


def _frame(rows: list[dict[str, Any]], as_frame: bool | None) -> Any:
    if as_frame is False:
        return rows
    try:
        import pandas as pd
    except ImportError:
        if as_frame:
            raise
        return rows
    return pd.DataFrame(rows)


def stats(
    placement: str,
    db: str = DEFAULT_DB,
    bucket: str | None = None,
    *,
    by: str = "arm",
    since: float | str | None = None,
    until: float | str | None = None,
    as_frame: bool | None = None,
) -> Any:
    """Rows of statistics with 95 % intervals: ``by="arm"`` (per variant and arm, and per
    bucket when one is given), ``"variant"`` (per variant, and bucket) or ``"lift"`` (each
    variant against the holdout). A DataFrame with pandas (``as_frame=False``: always dicts)."""
    from nextbest.offline.stats_source import placement_stats
    from nextbest.offline.times import parse_time

    s = placement_stats(
        db,
        placement,
        bucket=bucket,
        since=parse_time(None if since is None else str(since)),
        until=parse_time(None if until is None else str(until), "until"),
    )
    if by == "lift":
        rows = [x.to_dict() for x in s.lifts]
    elif by == "variant":
        rows = [g.to_dict() for g in (s.variant_buckets if bucket else s.variants)]
    elif by == "arm":
        rows = [g.to_dict() for g in (s.buckets if bucket else s.arms)]
    else:
        raise ValueError(f"by must be 'arm', 'variant' or 'lift', not {by!r}")
    return _frame(rows, as_frame)


def summary(placement: str, db: str = DEFAULT_DB, bucket: str | None = None) -> dict[str, Any]:
    """Everything ``nextbest stats-log --json`` prints, as a dict."""
    from nextbest.offline.stats_source import placement_stats

    return placement_stats(db, placement, bucket=bucket).to_dict()


def report(
    placement: str,
    db: str = DEFAULT_DB,
    out: str | Path | None = None,
    bucket: str | None = None,
    config: str | Path | None = None,
    specs: Sequence[Any] = (),
) -> str:
    """The HTML report; written to ``out`` when given. ``config`` (an apply file) or ``specs``
    give arm budget limits for the budget plot."""
    from nextbest.offline.report import build_report

    placements = list(specs) or (load(config).placements if config is not None else [])
    page = build_report(db, placement, bucket=bucket, specs=placements)
    if out is not None:
        Path(out).write_text(page, encoding="utf-8")
    return page
