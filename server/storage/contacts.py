"""Contact history in the database, for contact policies that hold across servers.

A Choose for a tracked customer locks the customer (PostgreSQL: an advisory transaction lock on
a hash of the id, in a transaction held until the commit; SQLite, whose servers share one
machine: an exclusive lock on a file beside the database, so that SQLite's own write lock is
never held across a decision), reads their impressions, and after the decision writes the new
ones and releases the lock. Two servers deciding for one customer therefore take turns, and the
second sees the first's impression. Whether a customer responded comes from the decision's row
(open: not yet known).
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from nextbest.bandit.decision_log import Outcome
from nextbest.bandit.errors import Unavailable
from nextbest.storage.base import ContactRow, RecentImpression
from nextbest.storage.sqlcore import SqlBase

_CONTACT_LOCK_CLASS = 0x6E62  # first key of the two-key advisory locks (apart from the learner's one-key lock)
_BACKFILL_LOCK_CLASS = 0x6E63  # the backfill's two-key lock, apart from the customers' locks
_READ = text(
    "SELECT ci.arm_id, ci.placement_id, ci.event_id, ci.slot, ci.at, d.outcome, d.reward "
    "FROM contact_impressions ci LEFT JOIN decisions d ON d.event_id = ci.event_id AND d.slot = ci.slot "
    "WHERE ci.customer_id = :c AND ci.at >= :since ORDER BY ci.at, ci.id"
)

_READ_MANY = (
    "SELECT ci.customer_id, ci.arm_id, ci.placement_id, ci.event_id, ci.slot, ci.at, d.outcome, d.reward "
    "FROM contact_impressions ci LEFT JOIN decisions d ON d.event_id = ci.event_id AND d.slot = ci.slot "
    "WHERE ci.customer_id {ids} AND ci.at >= {since} ORDER BY ci.customer_id, ci.at, ci.id"
)
_READ_MANY_PG = _READ_MANY.format(ids="= ANY(%s)", since="%s")  # one statement whatever the count
_INSERT_PG = (
    "INSERT INTO contact_impressions (customer_id, at, placement_id, arm_id, event_id, slot) "
    "SELECT * FROM unnest(%s::varchar[], %s::float8[], %s::varchar[], %s::varchar[], %s::varchar[], %s::int[]) "
    "ON CONFLICT DO NOTHING"  # copied from the log already (backfill_contacts)
)


def _impressions(customer_id: str, rows: Sequence[Any]) -> list[RecentImpression]:
    return [
        RecentImpression(
            customer_id,
            arm,
            placement,
            event_id if not slot else f"{event_id}#{slot}",
            at,
            Outcome(outcome) if outcome is not None else Outcome.OPEN,
            reward,
        )
        for arm, placement, event_id, slot, at, outcome, reward in rows
    ]


def _contact_arrays(rows: Sequence[ContactRow]) -> tuple[list[Any], ...]:
    return (
        [r.customer_id for r in rows],
        [r.at for r in rows],
        [r.placement for r in rows],
        [r.arm_id for r in rows],
        [r.event_id for r in rows],
        [r.slot for r in rows],
    )


class ContactHandle:
    """A held customer lock: commit or abort it exactly once. PostgreSQL: the open transaction
    holding the advisory lock; SQLite: the locked file."""

    def __init__(self, conn: Any = None, tx: Any = None, lock_file: Any = None) -> None:
        self.conn, self.tx, self.lock_file = conn, tx, lock_file

    def release_file(self) -> None:
        if self.lock_file is not None:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            self.lock_file.close()
            self.lock_file = None


_T = TypeVar("_T")


class HeldConnections(SqlBase):
    """Each worker thread's own connection, autocommit and kept open, for the Choose path's
    small statements of many Chooses at once (profile misses; on PostgreSQL also history reads
    and impressions): through the pool each paid a checkout (on PostgreSQL with its liveness
    ping) and a rollback at its return: a pooled SELECT 1 cost 370 us of CPU on PostgreSQL, on
    a held connection 65 us; a one-profile read on SQLite 210 us. On PostgreSQL a statement
    that finds its connection broken (the database restarted) is tried once more on a new one."""

    _held: threading.local  # .conn: this thread's driver connection, or None
    _held_all: list[Any]  # every one opened, closed with the store
    _held_guard: threading.Lock

    def _init_held(self) -> None:
        self._held = threading.local()
        self._held_all = []
        self._held_guard = threading.Lock()

    @property
    def _holds(self) -> bool:
        """Whether held connections serve this database (not SQLite in memory: one per connection)."""
        return self._postgres or self.engine.url.database not in (None, "", ":memory:")

    def _on_held(self, run: Callable[[Any], _T]) -> _T:
        """``run(cursor)`` on this thread's connection; database errors become Unavailable."""
        if self._postgres:
            import psycopg

            errors: tuple[type[Exception], ...] = (psycopg.Error,)
        else:
            import sqlite3

            errors = (sqlite3.Error,)
        conn = getattr(self._held, "conn", None)
        for retry in (conn is not None and self._postgres, False):
            if conn is None:
                conn = self._open_held()
            cur = conn.cursor()
            try:
                return run(cur)
            except errors as e:
                if not self._postgres or conn.broken or conn.closed:
                    self._drop_held(conn)
                    conn = None
                    if retry:
                        continue
                raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
            finally:
                try:
                    cur.close()
                except Exception:
                    pass  # its connection is gone
        raise AssertionError("unreachable")

    def _open_held(self) -> Any:
        try:
            proxy = self.engine.raw_connection()
            conn: Any = proxy.driver_connection
            proxy.detach()  # ours now: closed by close_held, never returned to the pool
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        try:
            conn.rollback()
            if self._postgres:
                conn.autocommit = True  # each statement its own transaction: one round trip
            else:
                conn.isolation_level = None  # no transaction left open after a read (WAL snapshot)
        except Exception as e:
            conn.close()
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        with self._held_guard:
            self._held_all.append(conn)
        self._held.conn = conn
        return conn

    def _drop_held(self, conn: Any) -> None:
        self._held.conn = None
        with self._held_guard:
            if conn in self._held_all:
                self._held_all.remove(conn)
        try:
            conn.close()
        except Exception:
            pass  # broken already

    def close_held(self) -> None:
        with self._held_guard:
            held, self._held_all = self._held_all, []
        for conn in held:
            try:
                conn.close()
            except Exception:
                pass


class ContactQueries(HeldConnections):
    def contacts_open(self, customer_id: str, since: float) -> tuple[ContactHandle, list[RecentImpression]]:
        """Lock the customer and read their impressions since ``since`` (oldest first)."""
        if not self._postgres:
            path = (self.engine.url.database or "nextbest") + ".contacts.lock"
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
                with self._connect() as c:
                    rows = c.execute(_READ, {"c": customer_id, "since": since}).all()
            except BaseException:
                f.close()  # closing drops the lock
                raise
            return ContactHandle(lock_file=f), _impressions(customer_id, rows)
        try:
            conn = self.engine.connect()
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        try:
            tx = conn.begin()
            conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:c))"), {"k": _CONTACT_LOCK_CLASS, "c": customer_id})
            rows = conn.execute(_READ, {"c": customer_id, "since": since}).all()
        except SQLAlchemyError as e:
            conn.close()  # rolls back and frees the lock
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        except BaseException:
            conn.close()
            raise
        return ContactHandle(conn, tx), _impressions(customer_id, rows)

    def contacts_read(self, customer_ids: Sequence[str], since: float) -> dict[str, list[RecentImpression]]:
        """The impressions since ``since`` of each customer (oldest first), in one query and
        without any lock: history features of many Chooses at once (issue #30)."""
        out: dict[str, list[RecentImpression]] = {c: [] for c in customer_ids}
        if not out:
            return out
        if self._postgres:
            ids = list(customer_ids)

            def read(cur: Any) -> Sequence[Any]:
                found: Sequence[Any] = cur.execute(_READ_MANY_PG, (ids, since)).fetchall()
                return found

            rows: Sequence[Any] = self._on_held(read)
        else:
            try:
                with self._connect() as c:  # driver SQL: no statement to compile per read
                    sql = _READ_MANY.format(ids=f"IN ({', '.join('?' * len(customer_ids))})", since="?")
                    rows = c.exec_driver_sql(sql, (*customer_ids, since)).all()
            except SQLAlchemyError as e:
                raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        for customer, arm, placement, event_id, slot, at, outcome, reward in rows:
            out[customer].append(
                RecentImpression(
                    customer,
                    arm,
                    placement,
                    event_id if not slot else f"{event_id}#{slot}",
                    at,
                    Outcome(outcome) if outcome is not None else Outcome.OPEN,
                    reward,
                )
            )
        return out

    def contacts_commit(self, handle: ContactHandle, rows: Sequence[ContactRow]) -> None:
        """Record the impressions and release the customer."""
        try:
            if handle.conn is None:  # SQLite: a short write of its own, then the file lock goes
                if rows:
                    self.contacts_insert(rows)
                return
            if rows:
                self._insert_contacts(handle.conn, rows)
            handle.tx.commit()
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        finally:
            handle.release_file()
            if handle.conn is not None:
                handle.conn.close()

    def contacts_abort(self, handle: ContactHandle) -> None:
        """Release the customer, recording nothing."""
        handle.release_file()
        try:
            if handle.conn is not None:
                handle.conn.close()
        except SQLAlchemyError:
            pass  # the connection is gone: so is its transaction and its lock

    def contacts_insert(self, rows: Sequence[ContactRow]) -> None:
        """Record impressions without taking the customer's lock (no decision waits on them).
        PostgreSQL: one statement on the thread's held connection, its own transaction."""
        if self._postgres:
            if rows:
                params = _contact_arrays(rows)
                self._on_held(lambda cur: cur.execute(_INSERT_PG, params))
            return
        with self._begin() as c:
            self._insert_contacts(c, rows)

    def _insert_contacts(self, c: Any, rows: Sequence[ContactRow]) -> None:
        if self._postgres:  # one statement of six arrays: executemany sent a statement per row
            c.exec_driver_sql(_INSERT_PG, _contact_arrays(rows))
            return
        mark = "?"
        c.exec_driver_sql(
            f"INSERT INTO contact_impressions (customer_id, at, placement_id, arm_id, event_id, slot) VALUES ({', '.join([mark] * 6)}) "
            "ON CONFLICT DO NOTHING",  # copied from the log already (backfill_contacts)
            [(r.customer_id, r.at, r.placement, r.arm_id, r.event_id, r.slot) for r in rows],
        )

    def backfill_contacts(self, since: float) -> int:
        """Copy the log's impressions since ``since`` that the shared history lacks (a longer
        horizon than any placement had, e.g. a history window just added: until then no server
        recorded impressions that no rule read). Servers doing it at once take turns
        (PostgreSQL: an advisory lock); a Choose recording its own impression meanwhile (a
        placement without rules records it in the background, after its decision may be
        logged) meets the unique index on (event_id, slot): whichever comes second is left out."""
        sql = text(
            "INSERT INTO contact_impressions (customer_id, at, placement_id, arm_id, event_id, slot) "
            "SELECT d.customer_id, d.created_at, d.placement_id, d.arm_id, d.event_id, d.slot FROM decisions d "
            "WHERE d.created_at >= :since AND d.arm_id IS NOT NULL AND d.customer_id <> '' AND d.activated = :yes "
            "AND NOT EXISTS (SELECT 1 FROM contact_impressions ci WHERE ci.event_id = d.event_id AND ci.slot = d.slot) "
            "ON CONFLICT DO NOTHING"
        )
        try:
            with self._begin() as c:
                if self._postgres:
                    c.execute(text("SELECT pg_advisory_xact_lock(:k, 0)"), {"k": _BACKFILL_LOCK_CLASS})
                return int(c.execute(sql, {"since": since, "yes": True}).rowcount or 0)
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e

    def prune_contacts(self, before: float) -> int:
        """Forget impressions older than every policy's horizon."""
        with self._begin() as c:
            return int(c.execute(text("DELETE FROM contact_impressions WHERE at < :t"), {"t": before}).rowcount or 0)
