"""Customer profiles in the database (issue #30): one row per customer, the features as the
decision log keeps them (``[[namespace, name, value], ...]``), as of the source's time.

A put applies its profiles as if one at a time, in order: each replaces the stored profile of
its customer when its ``as_of`` is at or after the stored one's, else it is stale and changes
nothing. The batch goes in one transaction. A profile older than one before it in the batch for
the same customer is stale whatever the database holds; the rest are written in rounds, the
first occurrence of every customer in the first, the second in the second (a batch naming each
customer once, the usual case, is one round), each an upsert whose ``WHERE excluded.as_of >=
profiles.as_of`` decides on the row as it is locked, so the counts are exact even when
concurrent puts name the same customers. PostgreSQL: the first round is COPY into a temporary
table, then one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (a plain INSERT when none of
the customers is stored yet); SQLite and later rounds: the driver's executemany of the same upsert.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from nextbest.bandit.errors import Unavailable
from nextbest.bandit.features import Feature
from nextbest.storage.base import Erased, Profile, ProfilesPut, features_of
from nextbest.storage.contacts import HeldConnections

_Row = tuple[str, str, float, float | None]  # customer_id, features JSON, as_of, expires_at

_UPSERT_SET = (
    "ON CONFLICT (customer_id) DO UPDATE SET features = excluded.features, as_of = excluded.as_of, "
    "expires_at = excluded.expires_at, updated_at = excluded.updated_at WHERE excluded.as_of >= profiles.as_of"
)
_TEMP = "pg_temp.nb_profiles_in"
_COPY_MIN = 64  # fewer rows than this (a PutProfiles of a few) skip the temporary table
_GET_CHUNK = 10_000  # ids per SELECT (PostgreSQL: one array parameter; SQLite: one JSON text)


def _rounds(profiles: Sequence[Profile]) -> tuple[list[list[_Row]], int]:
    """The rows to upsert, by round, and how many profiles are stale within the batch."""
    ids = [p.customer_id for p in profiles]
    dumps = orjson.dumps
    if len(set(ids)) == len(ids):  # every customer once: one round, no bookkeeping
        return [[(p.customer_id, dumps(p.features).decode(), p.as_of, p.expires_at) for p in profiles]], 0
    return _rounds_of((p.customer_id, dumps(p.features).decode(), p.as_of, p.expires_at) for p in profiles)


def _rounds_of(rows: Iterable[_Row]) -> tuple[list[list[_Row]], int]:
    latest: dict[str, float] = {}
    depth: dict[str, int] = {}
    rounds: list[list[_Row]] = []
    stale = 0
    for row in rows:
        cid, as_of = row[0], row[2]
        before = latest.get(cid)
        if before is not None and as_of < before:
            stale += 1  # an earlier profile of the batch is newer: stale whatever is stored
            continue
        latest[cid] = as_of
        k = depth.get(cid, 0)
        depth[cid] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(row)
    return rounds, stale


def _refused(e: BaseException) -> Unavailable:
    """A value the driver could not send (a lone surrogate, a NUL byte): the database refuses
    the record (storage/refusal.py tells it from "away" by this cause)."""
    return Unavailable(f"the database refused a profile: {e.__class__.__name__}")


class ProfileQueries(HeldConnections):
    """Store.put_profiles, get_profiles, delete_profiles, sweep_profiles and erase_customer."""

    _profiles_probe = False  # set once a plain INSERT of copied profiles met a stored customer

    def put_profiles(self, profiles: Sequence[Profile], now: float) -> ProfilesPut:
        if not profiles:
            return ProfilesPut()
        try:
            rounds, stale = _rounds(profiles)
        except (TypeError, ValueError) as e:  # features JSON cannot encode
            raise _refused(e) from e
        return self._put_rounds(rounds, stale, now)

    def put_profile_table(self, table: Any, now: float) -> ProfilesPut:
        n = table.num_rows
        if n == 0:
            return ProfilesPut()
        import pyarrow.compute as pc

        if self._postgres and n >= _COPY_MIN and pc.count_distinct(table.column("customer_id")).as_py() == n:
            return self._put_rounds([table], 0, now)  # every customer once: the table as CSV into COPY
        columns = [table.column(k).to_pylist() for k in ("customer_id", "features", "as_of", "expires_at")]
        rounds, stale = _rounds_of(zip(*columns, strict=True))
        return self._put_rounds(rounds, stale, now)

    def _put_rounds(self, rounds: Sequence[Any], stale: int, now: float) -> ProfilesPut:
        """Each round (rows, or an Arrow table of one round) upserted in turn, in one transaction."""
        stored = 0
        try:
            with self._begin() as c:
                for k, rows in enumerate(rounds):
                    if self._postgres and k == 0 and len(rows) >= _COPY_MIN:
                        n = self._upsert_copied(c, rows, now)
                    else:
                        n = self._upsert_many(c, rows, now)
                    stored += n
                    stale += len(rows) - n
        except (ValueError, TypeError, OverflowError) as e:  # the driver could not encode a value
            raise _refused(e) from e
        return ProfilesPut(stored=stored, stale=stale)

    def _upsert_many(self, c: Connection, rows: Sequence[_Row], now: float) -> int:
        mark = "%s" if self._postgres else "?"
        cast = "::json" if self._postgres else ""
        sql = (
            f"INSERT INTO profiles (customer_id, features, as_of, expires_at, updated_at) "
            f"VALUES ({mark}, {mark}{cast}, {mark}, {mark}, {mark}) {_UPSERT_SET}"
        )
        return int(c.exec_driver_sql(sql, [(*r, now) for r in rows]).rowcount)  # psycopg: summed over rows

    def _upsert_copied(self, c: Connection, rows: Any, now: float) -> int:
        """``rows``: _Row tuples, or an Arrow table of them (written as CSV by pyarrow)."""
        dbapi = c.connection.driver_connection
        assert dbapi is not None
        try:
            with dbapi.cursor() as cur:
                cur.execute(
                    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_TEMP} "
                    "(customer_id text, features json, as_of float8, expires_at float8) ON COMMIT DELETE ROWS"
                )
                columns = f"{_TEMP} (customer_id, features, as_of, expires_at)"
                if isinstance(rows, Sequence):
                    with cur.copy(f"COPY {columns} FROM STDIN") as copy:
                        write = copy.write_row
                        for r in rows:
                            write(r)
                else:
                    with cur.copy(f"COPY {columns} FROM STDIN") as copy:
                        copy.write(_copy_text(rows))
                n, conflicted = _insert_copied(cur, now, self._profiles_probe)
                if conflicted:  # customers already stored: check each batch from now on
                    self._profiles_probe = True
        except (ValueError, TypeError, OverflowError):
            raise
        except Exception as e:
            raise _dbapi(e, "COPY profiles") from e
        return n

    def get_profiles(self, customer_ids: Collection[str], now: float) -> dict[str, Profile]:
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return {}
        if self._postgres:
            sql = (
                "SELECT customer_id, features::text, as_of, expires_at FROM profiles "
                "WHERE customer_id = ANY(%s) AND (expires_at IS NULL OR expires_at > %s)"
            )
        else:
            sql = (
                "SELECT customer_id, features, as_of, expires_at FROM profiles "
                "WHERE customer_id IN (SELECT value FROM json_each(?)) AND (expires_at IS NULL OR expires_at > ?)"
            )
        out: dict[str, Profile] = {}
        if self._holds:  # the Choose path's misses: on the thread's held connection

            def read(cur: Any) -> None:
                for i in range(0, len(ids), _GET_CHUNK):
                    chunk: Any = ids[i : i + _GET_CHUNK]
                    arg = chunk if self._postgres else orjson.dumps(chunk).decode()
                    for cid, features, as_of, expires_at in cur.execute(sql, (arg, now)).fetchall():
                        out[cid] = Profile(cid, _features(features), float(as_of), expires_at)

            self._on_held(read)
            return out
        with self._connect() as c:
            for i in range(0, len(ids), _GET_CHUNK):
                chunk: Any = ids[i : i + _GET_CHUNK]
                arg = chunk if self._postgres else orjson.dumps(chunk).decode()
                for cid, features, as_of, expires_at in c.exec_driver_sql(sql, (arg, now)).all():
                    out[cid] = Profile(cid, features_of(orjson.loads(features)), float(as_of), expires_at)
        return out

    def delete_profiles(self, customer_ids: Collection[str]) -> int:
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return 0
        n = 0
        with self._begin() as c:
            for i in range(0, len(ids), _GET_CHUNK):
                chunk = ids[i : i + _GET_CHUNK]
                if self._postgres:
                    n += int(c.exec_driver_sql("DELETE FROM profiles WHERE customer_id = ANY(%s)", (chunk,)).rowcount)
                else:
                    sql = "DELETE FROM profiles WHERE customer_id IN (SELECT value FROM json_each(?))"
                    n += int(c.exec_driver_sql(sql, (orjson.dumps(chunk).decode(),)).rowcount)
        return n

    def sweep_profiles(self, now: float, limit: int) -> int:
        if limit <= 0:
            return 0
        mark = "%s" if self._postgres else "?"
        sql = f"DELETE FROM profiles WHERE customer_id IN (SELECT customer_id FROM profiles WHERE expires_at <= {mark} LIMIT {mark})"
        with self._begin() as c:
            return int(c.exec_driver_sql(sql, (now, limit)).rowcount)

    def erase_customer(self, customer_id: str) -> Erased:
        if not customer_id:  # the decisions of no known customer are not one customer's
            return Erased()
        mark = "%s" if self._postgres else "?"
        with self._begin() as c:
            profiles = c.exec_driver_sql(f"DELETE FROM profiles WHERE customer_id = {mark}", (customer_id,)).rowcount
            contacts = c.exec_driver_sql(f"DELETE FROM contact_impressions WHERE customer_id = {mark}", (customer_id,)).rowcount
            decisions = c.exec_driver_sql(
                f"UPDATE decisions SET customer_id = '', features = '[]', context = NULL WHERE customer_id = {mark}",
                (customer_id,),
            ).rowcount
            conversions = c.exec_driver_sql(f"UPDATE conversions SET customer_id = '' WHERE customer_id = {mark}", (customer_id,)).rowcount
        return Erased(profiles=int(profiles), decisions=int(decisions), contacts=int(contacts), conversions=int(conversions))


def _insert_copied(cur: Any, now: float, probe: bool) -> tuple[int, bool]:
    """The copied rows into ``profiles``: how many were stored, and whether a plain INSERT met a
    stored customer. A plain INSERT first (a first load: none of the customers is stored): the
    upsert's speculative insertion costs PostgreSQL about 2 µs more a row (4.2-5.0 against
    2.3-2.7 µs, its own CPU, 1 M rows). A stored customer fails it (one "duplicate key" in
    PostgreSQL's log): back to the savepoint, and the upsert decides on the rows as they are
    then, counts exact. ``probe`` (once that happened): the plain INSERT only when a check
    (about 0.7 µs a row) finds none of the customers stored."""
    import psycopg

    insert = (
        "INSERT INTO profiles (customer_id, features, as_of, expires_at, updated_at) "
        f"SELECT customer_id, features, as_of, expires_at, %s FROM {_TEMP}"
    )
    plain = True
    if probe:
        cur.execute(f"SELECT EXISTS (SELECT 1 FROM {_TEMP} i WHERE EXISTS (SELECT 1 FROM profiles p WHERE p.customer_id = i.customer_id))")
        row = cur.fetchone()
        plain = row is not None and not row[0]
    conflicted = False
    if plain:
        cur.execute("SAVEPOINT nb_profiles_new")
        try:
            cur.execute(insert, (now,))
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT nb_profiles_new")
            conflicted = True
        else:
            n = int(cur.rowcount)
            cur.execute("RELEASE SAVEPOINT nb_profiles_new")
            return n, False
    cur.execute(f"{insert} {_UPSERT_SET}", (now,))
    return int(cur.rowcount), conflicted


def _features(text: str) -> tuple[Feature, ...]:
    """``features_of`` of a stored profile's JSON text, inlined: run for every profile a Choose
    misses in the cache."""
    return tuple([(ns, name, v if type(v) is str else float(v)) for ns, name, v in orjson.loads(text)])


def _copy_text(table: Any) -> Any:
    """An Arrow table of _Row columns in COPY's text format, built by pyarrow's kernels: each
    line's fields joined by tabs, the lines' bytes one buffer. Text, not CSV: PostgreSQL parses
    it in 2.6 µs a row against 3.1-3.3 (its CPU, 1 M rows; CSV doubles every quote of the JSON)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def escaped(texts: Any) -> Any:
        for raw, esc in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
            texts = pc.replace_substring(texts, raw, esc)
        return texts

    ids, features = escaped(table.column("customer_id")), escaped(table.column("features"))
    as_of = pc.cast(table.column("as_of"), pa.string())  # the shortest text that reads back the same
    expires = pc.fill_null(pc.cast(table.column("expires_at"), pa.string()), "\\N")
    lines = pc.binary_join_element_wise(ids, features, as_of, expires, "\t")
    lines = pc.binary_join_element_wise(lines, "", "\n")  # each line and a newline
    lines = pc.cast(lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines, pa.large_string())
    _, offsets, data = lines.buffers()
    at = np.frombuffer(offsets, dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    return memoryview(data.slice(int(at[0]), int(at[-1] - at[0])))


def _dbapi(e: Exception, statement: str) -> Exception:
    """A psycopg error raised on the raw connection, as SQLAlchemy's wrapper of it (which the
    store's transaction turns into Unavailable and storage/refusal.py reads); others unchanged."""
    import psycopg

    if isinstance(e, psycopg.Error):
        return DBAPIError.instance(statement, None, e, psycopg.Error)
    return e
