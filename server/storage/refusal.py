"""Which write errors mean "the database refuses this data" rather than "the database is away".

The writer retries a batch the database could not take now (connection lost, timeout, lock,
our own Unavailable), but retrying a batch holding a row the database refuses (a NUL byte in a
text column on PostgreSQL, a constraint, a trigger's RAISE, a value the driver cannot bind)
would fail forever; such a batch is split until the refused records are found (server/engine/writer.py).

The store wraps database errors in Unavailable (server/storage/sqlcore.py); what it wraps, its
``__cause__``, decides.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    StatementError,
)

from nextbest.bandit.errors import NextbestError, Unavailable

REASON_CHARS = 200

# SQLSTATE classes of errors caused by the values written: data exception (22: a NUL byte, a
# number out of range, bad text encoding), integrity violation (23: a constraint), program limit
# exceeded (54: e.g. an index row too large), and a trigger or function raising (P0).
_REFUSING_SQLSTATE = frozenset({"22", "23", "54", "P0"})


class RecordRefused(NextbestError):
    """The database refused this record (its data, not the database's availability): it was
    not stored, and sending it again will fail again."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the database refused this record: {reason}")
        self.reason = reason


def is_refusal(exc: BaseException) -> bool:
    """True when the database (or the driver building its rows) refuses the data written;
    False when it is away or failed for a reason not in the data (retry later)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RecordRefused):
            return True
        if isinstance(e, DBAPIError):
            return _dbapi_refusal(e)
        if isinstance(e, StatementError):  # a bind parameter's processing failed: what it raised
            e = e.orig
            continue
        if isinstance(e, sqlite3.Error):
            return isinstance(e, (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.ProgrammingError))
        if isinstance(e, Unavailable):  # the store's wrapper, or our own "away" (no cause)
            e = e.__cause__
            continue
        # Building a row: a value JSON cannot encode, text that cannot be encoded, an int too large.
        return isinstance(e, (ValueError, TypeError, OverflowError))
    return False


def _dbapi_refusal(e: DBAPIError) -> bool:
    if e.connection_invalidated:
        return False
    state = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    if isinstance(state, str) and len(state) == 5:  # the server's verdict (PostgreSQL)
        return state[:2] in _REFUSING_SQLSTATE
    # No SQLSTATE: SQLite, or the driver refused the value before sending it (psycopg's NUL
    # check, a type it cannot adapt). OperationalError (locked, I/O, connection) is "away".
    return isinstance(e, (DataError, IntegrityError, ProgrammingError))


def refusal_reason(exc: BaseException) -> str:
    """The database's own words (first line), at most REASON_CHARS characters; never the SQL
    or its parameters."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StatementError) and e.orig is not None:
            e = e.orig  # the driver's exception: its text holds no SQL statement
            break
        if isinstance(e, Unavailable) and e.__cause__ is not None:
            e = e.__cause__
            continue
        break
    if e is None:
        e = exc
    text = (str(e).strip().splitlines() or [""])[0] or e.__class__.__name__
    text = f"{e.__class__.__name__}: {text}"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."
