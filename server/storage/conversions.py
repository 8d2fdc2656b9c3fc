"""Conversions from billing in the database (issue #31): the conversions, the audit of which
decisions each was credited to, and the reads attribution and uplift need.

A conversion is stored once by its conversion_id: ``INSERT ... ON CONFLICT DO NOTHING
RETURNING`` decides on the row as it is locked, so of two servers racing on one id exactly one
stores it (and its credits), the other hears "duplicate", as decisions do
(sqlcore.insert_decisions_sql). A batch is one transaction: the credits of a conversion are
written only when the conversion itself was, so nothing of a duplicate is written twice.

A customer's impressions are read on ``ix_decisions_customer`` (customer_id, created_at), never by
scanning the log: a batch's customers at once, one statement per 500 (customer, arm) pairs; uplift
is one statement per placement.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import orjson
from sqlalchemy.engine import Connection

from nextbest.bandit.attribution import Conversion, Credit, Touch
from nextbest.bandit.errors import Unavailable
from nextbest.storage.base import TouchRange, VariantConversions
from nextbest.storage.sqlcore import SqlBase

_CHUNK = 500  # rows per multi-row INSERT: 4,000 parameters (SQLite's limit is 32,766)
_TOUCH_CHUNK = 500  # (customer, arm) pairs per touches read: 2,000 parameters
_READ_CHUNK = 10_000  # ids per SELECT (PostgreSQL: one array parameter; SQLite: one JSON text)
_CONVERSION_COLUMNS = "conversion_id, customer_id, arm_id, product, value, occurred_at, received_at, credited"
_CREDIT_COLUMNS = "conversion_id, event_id, slot, placement_id, arm_id, share, value"


def _refused(e: BaseException) -> Unavailable:
    """A value the driver could not send (a lone surrogate, a number out of range): the database
    refuses the record (storage/refusal.py tells it from "away" by this cause)."""
    return Unavailable(f"the database refused a conversion: {e.__class__.__name__}")


class ConversionQueries(SqlBase):
    """Store.touches_of, record_conversions, credits_of_conversions, credits_of_decision,
    conversion_tally, any_conversion and unattributed_by_product."""

    def _mark(self) -> str:
        return "%s" if self._postgres else "?"

    def _in(self, column: str) -> str:
        """``column`` in one list parameter: an array on PostgreSQL, a JSON text on SQLite."""
        return f"{column} = ANY(%s)" if self._postgres else f"{column} IN (SELECT value FROM json_each(?))"

    def _list(self, values: Sequence[str]) -> Any:
        return list(values) if self._postgres else orjson.dumps(list(values)).decode()

    def touches_of(self, ranges: Sequence[TouchRange]) -> list[list[Touch]]:
        # One read per distinct (customer, arm), over the union of its ranges' windows, in
        # chunks of _TOUCH_CHUNK pairs per statement; each range then takes its own rows here.
        spans: dict[tuple[str, str], tuple[float, float]] = {}
        for r in ranges:
            if not r.customer_id or not r.since < r.until:
                continue
            for arm in r.arms:
                lo, hi = spans.get((r.customer_id, arm), (r.since, r.until))
                spans[(r.customer_id, arm)] = (min(lo, r.since), max(hi, r.until))
        found: dict[tuple[str, str], list[Touch]] = {}
        if spans:
            keys = list(spans.items())
            with self._connect() as c:
                for start in range(0, len(keys), _TOUCH_CHUNK):
                    chunk = keys[start : start + _TOUCH_CHUNK]
                    sql = self._touches_sql(len(chunk))
                    params = tuple(v for (customer, arm), (lo, hi) in chunk for v in (customer, arm, lo, hi))
                    for row in c.exec_driver_sql(sql, params):
                        found.setdefault((row[0], row[4]), []).append(Touch(row[1], int(row[2]), row[3], row[4], float(row[5])))
        out = []
        for r in ranges:
            mine = [t for arm in set(r.arms) for t in found.get((r.customer_id, arm), ()) if r.since <= t.at < r.until]
            mine.sort(key=lambda t: (t.at, t.event_id, t.slot))
            out.append(mine)
        return out

    def _touches_sql(self, n: int) -> str:
        """The activated decisions of ``n`` (customer, arm, since, until) rows, each row's read on
        ix_decisions_customer: SQLite's CROSS JOIN keeps the rows the outer loop; on PostgreSQL a
        LATERAL subquery that is not pulled up (OFFSET 0), else a log of some 10^4 rows is
        hash-joined by scanning it (7 ms instead of 1.6 for 200 rows of 20,000 decisions here)."""
        row = f"({', '.join([self._mark()] * 4)})"
        head = f"WITH q (customer_id, arm_id, since, until) AS (VALUES {', '.join([row] * n)}) "
        cols = "d.customer_id, d.event_id, d.slot, d.placement_id, d.arm_id, d.created_at"
        match = "d.customer_id = q.customer_id AND d.arm_id = q.arm_id AND d.created_at >= q.since AND d.created_at < q.until"
        if self._postgres:
            return f"{head}SELECT d.* FROM q CROSS JOIN LATERAL (SELECT {cols} FROM decisions d WHERE {match} AND d.activated OFFSET 0) d"
        return f"{head}SELECT {cols} FROM q CROSS JOIN decisions d ON {match} WHERE d.activated = 1"

    def record_conversions(self, items: Sequence[tuple[Conversion, Sequence[Credit]]], now: float) -> list[bool]:
        if not items:
            return []
        try:
            with self._begin() as c:
                stored = self._insert_conversions(c, items, now)
                credits = [
                    (conv.conversion_id, k.event_id, k.slot, k.placement, k.arm_id, k.share, k.value)
                    for (conv, ks), ok in zip(items, stored, strict=True)
                    if ok
                    for k in ks
                ]
                self._insert_rows(c, "conversion_credits", _CREDIT_COLUMNS, credits, returning="", key=3)
        except (ValueError, TypeError, OverflowError) as e:  # the driver could not encode a value
            raise _refused(e) from e
        return stored

    def _insert_conversions(self, c: Connection, items: Sequence[tuple[Conversion, Sequence[Credit]]], now: float) -> list[bool]:
        """Insert the conversions not stored yet; per item whether it was inserted (the first of
        twins in a batch is; an id stored before, by any server, is not)."""
        rows = [
            (conv.conversion_id, conv.customer_id, conv.arm_id, conv.product, conv.value, conv.occurred_at, now, len(ks))
            for conv, ks in items
        ]
        taken = {r[0] for r in self._insert_rows(c, "conversions", _CONVERSION_COLUMNS, rows, returning="conversion_id", key=1)}
        out = []
        for conv, _ in items:
            out.append(conv.conversion_id in taken)
            taken.discard(conv.conversion_id)  # a later twin in the batch was not inserted
        return out

    def _insert_rows(self, c: Connection, table: str, columns: str, rows: Sequence[tuple[Any, ...]], returning: str, key: int) -> list[Any]:
        """Multi-row INSERTs of ``rows`` in chunks; with ``returning``, ON CONFLICT DO NOTHING
        and the inserted rows' ``returning`` column (else a conflict fails the transaction).
        ``key``: how many leading columns are the table's primary key. The rows go in key order
        (a stable sort: the first of twins stays first), so two servers inserting the same ids
        take their index locks in one order: in opposite orders PostgreSQL found a deadlock
        and refused one batch (test_servers_racing_on_one_conversion_store_it_once)."""
        if not rows:
            return []
        rows = sorted(rows, key=lambda r: r[:key])
        width = len(rows[0])
        row = f"({', '.join([self._mark()] * width)})"
        out: list[Any] = []
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            sql = f"INSERT INTO {table} ({columns}) VALUES {', '.join([row] * len(chunk))}"
            params = tuple(v for r in chunk for v in r)
            if returning:
                out += c.exec_driver_sql(f"{sql} ON CONFLICT DO NOTHING RETURNING {returning}", params).all()
            else:
                c.exec_driver_sql(sql, params)
        return out

    def credits_of_conversions(self, ids: Collection[str]) -> dict[str, list[Credit]]:
        wanted = list(dict.fromkeys(ids))
        out: dict[str, list[Credit]] = {}
        if not wanted:
            return out
        sql = (
            "SELECT c.conversion_id, k.event_id, k.slot, k.placement_id, k.arm_id, k.share, k.value "
            "FROM conversions c LEFT JOIN conversion_credits k ON k.conversion_id = c.conversion_id "
            "LEFT JOIN decisions d ON d.event_id = k.event_id AND d.slot = k.slot "
            f"WHERE {self._in('c.conversion_id')} ORDER BY c.conversion_id, d.created_at, k.event_id, k.slot"
        )
        with self._connect() as c:
            for i in range(0, len(wanted), _READ_CHUNK):
                for cid, event_id, slot, placement, arm, share, value in c.exec_driver_sql(sql, (self._list(wanted[i : i + _READ_CHUNK]),)):
                    got = out.setdefault(cid, [])
                    if event_id is not None:
                        got.append(Credit(event_id, int(slot), placement, arm, float(share), float(value)))
        return out

    def credits_of_decision(self, event_id: str, slot: int) -> list[tuple[str, Credit, float]]:
        m = self._mark()
        sql = (
            "SELECT k.conversion_id, k.placement_id, k.arm_id, k.share, k.value, c.occurred_at "
            "FROM conversion_credits k JOIN conversions c ON c.conversion_id = k.conversion_id "
            f"WHERE k.event_id = {m} AND k.slot = {m} ORDER BY c.occurred_at, k.conversion_id"
        )
        with self._connect() as c:
            rows = c.exec_driver_sql(sql, (event_id, slot)).all()
        return [(r[0], Credit(event_id, slot, r[1], r[2], float(r[3]), float(r[4])), float(r[5])) for r in rows]

    def conversion_tally(self, placement: str, since: float, until: float) -> list[VariantConversions]:
        m = self._mark()
        sql = (
            "WITH firsts AS ("
            "  SELECT variant, customer_id, MIN(created_at) AS first_at FROM decisions "
            f"  WHERE placement_id = {m} AND customer_id <> '' AND created_at >= {m} AND created_at < {m} "
            "  GROUP BY variant, customer_id), "
            "per AS ("
            "  SELECT f.variant, f.customer_id, COUNT(c.conversion_id) AS n, COALESCE(SUM(c.value), 0) AS v "
            "  FROM firsts f LEFT JOIN conversions c ON c.customer_id = f.customer_id "
            f"   AND c.occurred_at >= f.first_at AND c.occurred_at < {m} "
            "  GROUP BY f.variant, f.customer_id) "
            "SELECT variant, COUNT(*), SUM(CASE WHEN n > 0 THEN 1 ELSE 0 END), SUM(v), SUM(v * v) "
            "FROM per GROUP BY variant ORDER BY variant"
        )
        with self._connect() as c:
            rows = c.exec_driver_sql(sql, (placement, since, until, until)).all()
        return [VariantConversions(r[0], int(r[1]), int(r[2]), float(r[3]), float(r[4])) for r in rows]

    def any_conversion(self, since: float, until: float) -> bool:
        m = self._mark()
        sql = f"SELECT 1 FROM conversions WHERE occurred_at >= {m} AND occurred_at < {m} LIMIT 1"
        with self._connect() as c:
            return c.exec_driver_sql(sql, (since, until)).first() is not None

    def unattributed_by_product(self, since: float, until: float) -> dict[str, tuple[int, float]]:
        m = self._mark()
        sql = (
            "SELECT CASE WHEN product <> '' THEN product ELSE arm_id END AS k, COUNT(*), SUM(value) FROM conversions "
            f"WHERE credited = 0 AND occurred_at >= {m} AND occurred_at < {m} GROUP BY k ORDER BY k"
        )
        with self._connect() as c:
            rows = c.exec_driver_sql(sql, (since, until)).all()
        return {r[0]: (int(r[1]), float(r[2])) for r in rows}
