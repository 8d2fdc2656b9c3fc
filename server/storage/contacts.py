"""Contact history in the database, for contact policies that hold across servers.

A Choose for a tracked customer opens a transaction that locks the customer (a PostgreSQL
advisory transaction lock on a hash of the id; on SQLite the database's write lock), reads
their impressions, and after the decision writes the new ones and commits. Two servers
deciding for one customer therefore take turns, and the second sees the first's impression.
Whether a customer responded comes from the decision's row (open: not yet known).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from bandit.errors import Unavailable
from bandit.log import Outcome
from server.storage.base import ContactRow, RecentImpression
from server.storage.sqlcore import SqlBase

_CONTACT_LOCK_CLASS = 0x6E62  # first key of the two-key advisory locks (apart from the learner's one-key lock)


class ContactHandle:
    """An open, customer-locked transaction: commit or abort it exactly once."""

    def __init__(self, conn: Any, tx: Any) -> None:
        self.conn, self.tx = conn, tx


class ContactQueries(SqlBase):
    def contacts_open(self, customer_id: str, since: float) -> tuple[ContactHandle, list[RecentImpression]]:
        """Lock the customer and read their impressions since ``since`` (oldest first)."""
        try:
            conn = self.engine.connect()
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        try:
            tx = conn.begin()
            if self._postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:c))"), {"k": _CONTACT_LOCK_CLASS, "c": customer_id})
            else:  # any write takes SQLite's one write lock, held to the commit
                conn.exec_driver_sql("INSERT INTO counters (name, value) VALUES ('contact_lock', 0) ON CONFLICT DO NOTHING")
                conn.exec_driver_sql("UPDATE counters SET value = value + 1 WHERE name = 'contact_lock'")
            rows = conn.execute(
                text(
                    "SELECT ci.arm_id, ci.placement_id, ci.event_id, ci.slot, ci.at, d.outcome, d.reward "
                    "FROM contact_impressions ci LEFT JOIN decisions d ON d.event_id = ci.event_id AND d.slot = ci.slot "
                    "WHERE ci.customer_id = :c AND ci.at >= :since ORDER BY ci.at, ci.id"
                ),
                {"c": customer_id, "since": since},
            ).all()
        except SQLAlchemyError as e:
            conn.close()  # rolls back and frees the lock
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        except BaseException:
            conn.close()
            raise
        out = [
            RecentImpression(
                customer_id, arm, placement, event_id if not slot else f"{event_id}#{slot}", at,
                Outcome(outcome) if outcome is not None else Outcome.OPEN, reward,
            )
            for arm, placement, event_id, slot, at, outcome, reward in rows
        ]
        return ContactHandle(conn, tx), out

    def contacts_commit(self, handle: ContactHandle, rows: Sequence[ContactRow]) -> None:
        """Record the impressions and release the customer."""
        try:
            if rows:
                mark = "%s" if self._postgres else "?"
                handle.conn.exec_driver_sql(
                    "INSERT INTO contact_impressions (customer_id, at, placement_id, arm_id, event_id, slot) "
                    f"VALUES ({', '.join([mark] * 6)})",
                    [(r.customer_id, r.at, r.placement, r.arm_id, r.event_id, r.slot) for r in rows],
                )
            handle.tx.commit()
        except SQLAlchemyError as e:
            raise Unavailable(f"database unavailable: {e.__class__.__name__}") from e
        finally:
            handle.conn.close()

    def contacts_abort(self, handle: ContactHandle) -> None:
        """Release the customer, recording nothing."""
        try:
            handle.conn.close()
        except SQLAlchemyError:
            pass  # the connection is gone: so is its transaction and its lock

    def prune_contacts(self, before: float) -> int:
        """Forget impressions older than every policy's horizon."""
        with self._begin() as c:
            return int(c.execute(text("DELETE FROM contact_impressions WHERE at < :t"), {"t": before}).rowcount or 0)
