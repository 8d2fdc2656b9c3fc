"""The SQL store's coordination between servers: the budget leases, the one learner, and what
replicas poll (configuration and model versions, windows a stopped server left open)."""

from __future__ import annotations

import fcntl
from collections.abc import Collection

from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from nextbest.bandit.decision_log import LoggedDecision, Outcome
from nextbest.storage import tables as t
from nextbest.storage.base import AccountRow
from nextbest.storage.sqlcore import SqlBase, decision_from_row

_LEARNER_LOCK = 0x6E657874  # "next": the advisory lock key of the one learner


class Coordination(SqlBase):
    """Budget leases and the learner lock; polled versions; which server holds which window."""

    # -- servers and the windows they hold ------------------------------------------------

    def register_server(self, server_id: str, now: float) -> None:
        """Sign this server in: its decisions are written as held by it from now on."""
        with self._begin() as c:
            c.execute(t.servers.insert().values(id=server_id, heartbeat=now))
        self.owner = server_id

    def heartbeat(self, now: float) -> None:
        """This server's sign of life (signed in again if another server took it for stopped)."""
        s = t.servers.c
        with self._begin() as c:
            if c.execute(update(t.servers).where(s.id == self.owner).values(heartbeat=now)).rowcount == 0:
                c.execute(t.servers.insert().values(id=self.owner, heartbeat=now))

    def unregister_server(self) -> None:
        """Sign off (a clean stop): this server counts as stopped at once, so that the next
        server to poll takes over its open windows without waiting for its silence."""
        with self._begin() as c:
            c.execute(update(t.servers).where(t.servers.c.id == self.owner).values(heartbeat=0.0))

    def adopt_open(self, live_since: float | None, unowned: bool = False) -> list[LoggedDecision]:
        """Take over the open windows of the servers silent since ``live_since`` (signed off,
        or killed), and forget those servers; None: of every other server and of none, for a
        server starting on a database no other server writes. ``unowned``: also the windows
        no server holds (written before owners were recorded). Windows of live servers stay
        theirs. Returns every open window this server holds when it took any (the caller keeps
        those it does not hold in memory yet), else none: a poll that finds no stopped server
        costs one small read. Where two servers race for a stopped one's windows, the
        conditional UPDATE gives each window to one of them."""
        d, s = t.decisions.c, t.servers.c
        with self._begin() as c:
            if live_since is None:
                held_elsewhere = or_(d.owner.is_(None), d.owner != self.owner)
                stopped: list[str] = []
            else:
                stopped = list(c.execute(select(s.id).where(s.heartbeat < live_since, s.id != self.owner)).scalars())
                if not stopped and not unowned:
                    return []
                held_elsewhere = or_(d.owner.in_(stopped), d.owner.is_(None)) if unowned else d.owner.in_(stopped)
            taken = c.execute(update(t.decisions).where(d.outcome == int(Outcome.OPEN), held_elsewhere).values(owner=self.owner)).rowcount
            if stopped:
                c.execute(delete(t.servers).where(s.id.in_(stopped)))
            if not taken:
                return []
            rows = c.execute(select(t.decisions).where(d.outcome == int(Outcome.OPEN), d.owner == self.owner)).all()
        return [decision_from_row(r) for r in rows]

    def lease(self, key: str, period: str, limit: float, amount: float) -> float:
        """Grant up to ``amount`` more of a budget, never past ``limit``; returns the grant.

        A conditional UPDATE is atomic on SQLite and PostgreSQL alike, so concurrent
        processes can never lease more than the limit between them.
        """
        a = t.budget_accounts.c
        with self._begin() as c:
            c.execute(
                (pg_insert if self._postgres else sqlite_insert)(t.budget_accounts)
                .values(key=key, period=period, leased=0.0, spent=0.0, reserved=0.0)
                .on_conflict_do_nothing()
            )
            for _ in range(8):
                leased = float(c.execute(select(a.leased).where(a.key == key, a.period == period)).scalar_one())
                grant = min(amount, limit - leased)
                if grant <= 1e-12:
                    return 0.0
                res = c.execute(
                    update(t.budget_accounts).where(a.key == key, a.period == period, a.leased == leased).values(leased=leased + grant)
                )
                if res.rowcount == 1:
                    return grant
        return 0.0

    def release(self, key: str, period: str, amount: float) -> None:
        a = t.budget_accounts.c
        with self._begin() as c:
            c.execute(update(t.budget_accounts).where(a.key == key, a.period == period).values(leased=a.leased - amount))

    def load_accounts(self, keys: Collection[tuple[str, str]] | None = None) -> list[AccountRow]:
        a = t.budget_accounts.c
        query = select(t.budget_accounts)
        if keys is not None:
            if not keys:
                return []
            # Key and period separately: a row-value IN is not portable; the few extra rows
            # (another period of a wanted key) are dropped below.
            query = query.where(a.key.in_({k for k, _ in keys}), a.period.in_({p for _, p in keys}))
        with self._connect() as c:
            rows = c.execute(query).all()
        wanted = None if keys is None else set(keys)
        return [AccountRow(r.key, r.period, r.leased, r.spent, r.reserved) for r in rows if wanted is None or (r.key, r.period) in wanted]

    def config_version(self) -> tuple[float, int, float, int]:
        """Changes whenever any server applies a configuration: replicas poll it."""
        p, cm = t.placements.c, t.campaigns.c
        with self._connect() as c:
            a = c.execute(select(func.coalesce(func.max(p.updated_at), 0.0), func.count())).one()
            b = c.execute(select(func.coalesce(func.max(cm.updated_at), 0.0), func.count())).one()
        return (float(a[0]), int(a[1]), float(b[0]), int(b[1]))

    def snapshot_versions(self, placement: str) -> dict[str, tuple[int, int]]:
        """(learned, learn_seq) of each saved model of a placement, without the model bytes."""
        s = t.snapshots.c
        with self._connect() as c:
            rows = c.execute(select(s.slot, s.learned, s.learn_seq).where(s.placement_id == placement)).all()
        return {r.slot: (int(r.learned), int(r.learn_seq)) for r in rows}

    def expired_open(self, cutoff: float, limit: int) -> list[LoggedDecision]:
        """Open decisions whose window ended before ``cutoff``: a server that stopped left them."""
        d = t.decisions.c
        with self._connect() as c:
            rows = c.execute(select(t.decisions).where(d.outcome == int(Outcome.OPEN), d.deadline < cutoff).limit(limit)).all()
        return [decision_from_row(r) for r in rows]

    # -- one learner at a time ------------------------------------------------------------

    def try_learner_lock(self) -> bool:
        """Become the one learner: a PostgreSQL advisory lock held by a dedicated session, or
        an exclusive lock on a file beside a SQLite database. Both end with the process."""
        if self._lock is not None:
            return True
        if self._postgres:
            conn = self.engine.connect()
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LEARNER_LOCK}).scalar())
            if got:
                self._lock = conn
            else:
                conn.close()
            return got
        path = (self.engine.url.database or "nextbest") + ".learner.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lock = f
        return True

    def holds_learner_lock(self) -> bool:
        """Whether the lock is still ours (a PostgreSQL session can be cut under us)."""
        if self._lock is None:
            return False
        if not self._postgres:
            return True
        try:
            ok = self._lock.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k AND pid = pg_backend_pid()"),
                {"k": _LEARNER_LOCK},
            ).scalar()
            return bool(ok)
        except SQLAlchemyError:
            self._drop_lock()
            return False

    def _drop_lock(self) -> None:
        lock, self._lock = self._lock, None
        try:
            if lock is not None:
                lock.close()
        except Exception:
            pass
