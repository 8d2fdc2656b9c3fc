"""Values every server of a database shares, written once: the first server to ask stores its
candidate (insert if absent), and every server, that one included, reads back what is stored.
Two servers starting at once on an empty table both insert; the primary key keeps one row, and
both read that row, so they agree."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from nextbest.storage import tables as t
from nextbest.storage.sqlcore import SqlBase


class Secrets(SqlBase):
    """The SQL store's ``shared_secret`` (server/storage/base.py)."""

    def shared_secret(self, name: str, candidate: str) -> str:
        """The value stored under ``name``; ``candidate`` is stored first when there is none."""
        s = t.server_secrets
        ins = (pg_insert if self._postgres else sqlite_insert)(s).values(name=name, value=candidate).on_conflict_do_nothing()
        with self._begin() as c:
            c.execute(ins)
        with self._connect() as c:
            value = c.execute(select(s.c.value).where(s.c.name == name)).scalar_one()
        return str(value)
