"""Reads the conversion figures of a placement for the report, read-only: the same statements
as GetStats (Store.conversion_tally, Store.unattributed_by_product) on a read-only connection."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from nextbest.bandit.offline.uplift import VariantUplift, uplift
from nextbest.offline.log_source import _connect
from nextbest.storage.conversions import ConversionQueries


@dataclass(frozen=True, slots=True)
class ConversionFigures:
    """Uplift on real purchases over [since, until): per variant, and the unattributed by product."""

    since: float
    until: float
    variants: list[VariantUplift]
    unattributed: dict[str, tuple[int, float]]


class _Reader(ConversionQueries):
    """The store's conversion reads on a read-only engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"


def read_conversions(url: str, placement: str, since: float, until: float) -> ConversionFigures | None:
    """None when the database has no conversions table (a log from before conversions)."""
    with _connect(url) as conn:
        if not inspect(conn).has_table("conversions"):
            return None
        reader = _Reader(conn.engine)
        tally = reader.conversion_tally(placement, since, until)
        unattributed = reader.unattributed_by_product(since, until)
    return ConversionFigures(since, until, uplift(tally), unattributed)
