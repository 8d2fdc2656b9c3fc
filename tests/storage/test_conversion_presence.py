"""Store.any_conversion (issue #31): whether any conversion occurred in a period, which GetStats
asks before it reads the conversion tally; on SQLite and PostgreSQL."""

from __future__ import annotations

from nextbest.storage.sql import SqlStore
from tests.storage.test_conversion_store import conv


def test_any_conversion_in_a_period(store: SqlStore) -> None:
    assert not store.any_conversion(0.0, 1e12)
    store.record_conversions([(conv("k1", "c1", 5.0, 100.0), []), (conv("k2", "c2", 5.0, 300.0), [])], now=400.0)
    assert store.any_conversion(0.0, 1e12)
    assert store.any_conversion(100.0, 101.0)  # at the start: in
    assert not store.any_conversion(101.0, 300.0)  # at the end: out
    assert store.any_conversion(299.0, 301.0)
