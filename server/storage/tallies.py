"""The SQL store's statistics: per-arm and per-variant tallies of the decision log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, case, func, select, text, union_all
from sqlalchemy.engine import Connection

from nextbest.bandit.decision_log import Outcome
from nextbest.storage import tables as t
from nextbest.storage.base import ArmTally, Awaiting, IneligibleTally, VariantTally
from nextbest.storage.sqlcore import SqlBase

# The running aggregate of an open window's rewards, as its close will compute it (the
# ``reward_aggregation`` of the window's gathered rewards); "earliest" takes the first.
_SQL_AGGREGATE: dict[str, Callable[[Any], Any]] = {"sum": func.sum, "max": func.max, "average": func.avg}


class StatsQueries(SqlBase):
    """Aggregates over the decision log."""

    def recent_rewards(self, placement: str, limit: int) -> list[float]:
        """The rewards of a placement's last ``limit`` learned decisions, oldest first."""
        d = t.decisions.c
        with self._connect() as c:
            rows = (
                c.execute(
                    select(d.reward)
                    .where(d.placement_id == placement, d.learn_seq.is_not(None), d.reward.is_not(None))
                    .order_by(d.learn_seq.desc())
                    .limit(limit)
                )
                .scalars()
                .all()
            )
        return [float(r) for r in reversed(rows)]

    def learned_count(self, placement: str, after_seq: int, upto_seq: int) -> int:
        """How many of a placement's decisions have a learn position in (after_seq, upto_seq]."""
        d = t.decisions.c
        with self._connect() as c:
            n = c.execute(
                select(func.count()).where(d.placement_id == placement, d.learn_seq > after_seq, d.learn_seq <= upto_seq)
            ).scalar_one()
        return int(n)

    def tally(self, placement: str) -> tuple[list[ArmTally], int, int]:
        """Per-arm counts, the number of decisions, and how many served no arm. A reward counts
        once acknowledged: those of windows still open are in the figures, and apart."""
        d = t.decisions.c
        incurred = case((and_(d.outcome == int(Outcome.REWARD), d.reward > 0), d.reward_cost), else_=0.0)
        with self._connect() as c:
            rows = c.execute(
                select(
                    d.arm_id,
                    d.outcome,
                    func.count(),
                    func.coalesce(func.sum(d.reward), 0.0),
                    func.coalesce(func.sum(d.cost + incurred), 0.0),
                    d.activated,
                )
                .where(d.placement_id == placement)
                .group_by(d.arm_id, d.outcome, d.activated)
            ).all()
            r = t.reward_events.c
            late = c.execute(
                select(d.arm_id, func.count())
                .select_from(t.reward_events.join(t.decisions, and_(r.event_id == d.event_id, r.slot == d.slot)))
                .where(d.placement_id == placement, r.kind == "late")
                .group_by(d.arm_id)
            ).all()
            awaiting = self._awaiting_close(c, placement)
        tallies: dict[str, ArmTally] = {}
        total = no_arm = 0
        for arm_id, outcome, count, reward_sum, spend, activated in rows:
            total += count
            if arm_id is None:
                no_arm += count
                continue
            if not activated:  # deferred and not (yet) shown: no impression, no spend
                continue
            tl = tallies.setdefault(arm_id, ArmTally(arm_id))
            tl.impressions += count
            tl.spend += float(spend)
            if outcome == Outcome.REWARD:
                tl.rewards_learned += count
                tl.reward_sum_learned += float(reward_sum)
            elif outcome == Outcome.DEFAULT:
                tl.default_rewards += count
            elif outcome == Outcome.OPEN:
                tl.pending += count
        for arm_id, count in late:
            if arm_id is not None:
                tallies.setdefault(arm_id, ArmTally(arm_id)).late_rewards += count
        for w in awaiting:
            tl = tallies.setdefault(w.arm_id, ArmTally(w.arm_id))
            tl.rewards_awaiting_close += w.count
            tl.reward_sum_awaiting_close += w.reward_sum
            tl.spend_awaiting_close += w.spend
        for tl in tallies.values():
            tl.rewards = tl.rewards_learned + tl.rewards_awaiting_close
            tl.reward_sum = tl.reward_sum_learned + tl.reward_sum_awaiting_close
            tl.spend += tl.spend_awaiting_close
        return list(tallies.values()), total, no_arm

    def awaiting_close(self, placement: str) -> list[Awaiting]:
        """The acknowledged rewards of a placement's open windows, per (variant, arm): for the
        metrics, read at every scrape (open windows only: an index range)."""
        with self._connect() as c:
            return self._awaiting_close(c, placement)

    def _awaiting_close(self, c: Connection, placement: str) -> list[Awaiting]:
        """Rewards acknowledged for windows still open, per (variant, arm), valued as the close
        would learn them now: under the placement's ``reward_aggregation`` (as stored: every
        server's live configuration) the aggregate of the window's first reward on the row
        (``learn_at: window_close``) and its recorded ("agg") rewards, in the order stored;
        under ``earliest`` the first of them. The reward cost of a positive one is its spend.
        Open windows only: index ranges (ix_decisions_unclaimed, ix_reward_events_event)."""
        d, r = t.decisions.c, t.reward_events.c
        is_open = (d.placement_id == placement, d.outcome == int(Outcome.OPEN), d.activated.is_(True), d.arm_id.is_not(None))
        joined = t.reward_events.join(t.decisions, and_(r.event_id == d.event_id, r.slot == d.slot))
        out: dict[tuple[str, str], Awaiting] = {}

        def add(variant: str | None, arm_id: str, count: int, reward_sum: float, spend: float) -> None:
            w = out.setdefault((variant or "", arm_id), Awaiting(variant or "", arm_id))
            w.count += int(count)
            w.reward_sum += float(reward_sum)
            w.spend += float(spend)

        def per_arm(value: Any, cost: Any, variant: Any, arm_id: Any) -> Any:
            return select(
                variant,
                arm_id,
                func.count(),
                func.coalesce(func.sum(value), 0.0),
                func.coalesce(func.sum(case((value > 0, cost), else_=0.0)), 0.0),
            ).group_by(variant, arm_id)

        how = self._aggregation(c, placement)
        if how in _SQL_AGGREGATE:
            gathered = union_all(
                select(d.event_id, d.slot, d.reward.label("v")).where(*is_open, d.reward.is_not(None)),
                select(r.event_id, r.slot, r.reward.label("v")).select_from(joined).where(*is_open, r.kind == "agg"),
            ).subquery()
            g = gathered.c
            window = select(g.event_id, g.slot, _SQL_AGGREGATE[how](g.v).label("value")).group_by(g.event_id, g.slot).subquery()
            w = window.c
            rows = c.execute(
                per_arm(w.value, d.reward_cost, d.variant, d.arm_id).select_from(
                    window.join(t.decisions, and_(d.event_id == w.event_id, d.slot == w.slot))
                )
            ).all()
            for row in rows:
                add(*row)
            return list(out.values())
        # earliest: the row's first reward; a window without one that holds recorded rewards
        # (from before a change of reward_aggregation) learns the first of them
        for row in c.execute(per_arm(d.reward, d.reward_cost, d.variant, d.arm_id).where(*is_open, d.reward.is_not(None))).all():
            add(*row)
        seen: set[tuple[str, int]] = set()
        recorded = select(r.event_id, r.slot, d.variant, d.arm_id, d.reward_cost, r.reward).select_from(joined)
        for event_id, slot, variant, arm_id, cost, value in c.execute(
            recorded.where(*is_open, d.reward.is_(None), r.kind == "agg").order_by(r.id)
        ).all():
            if (event_id, slot) not in seen:
                seen.add((event_id, slot))
                add(variant, arm_id, 1, value, cost if value > 0 else 0.0)
        return list(out.values())

    @staticmethod
    def _aggregation(c: Connection, placement: str) -> str:
        """The placement's ``reward_aggregation`` as stored (every server's live configuration)."""
        spec = c.execute(select(t.placements.c.spec).where(t.placements.c.id == placement)).scalar()
        how = spec.get("reward_aggregation") if isinstance(spec, dict) else None
        return how if isinstance(how, str) else "earliest"

    def tally_variants(self, placement: str) -> list[VariantTally]:
        d = t.decisions.c
        explicit = case((d.outcome == int(Outcome.REWARD), 1), else_=0)
        closed = case((d.outcome.in_([int(Outcome.REWARD), int(Outcome.DEFAULT)]), 1), else_=0)
        with self._connect() as c:
            rows = c.execute(
                select(
                    d.variant,
                    func.count(),
                    func.sum(case((and_(d.arm_id.is_not(None), d.activated.is_(True)), 1), else_=0)),
                    func.sum(explicit),
                    func.coalesce(func.sum(case((d.outcome == int(Outcome.REWARD), d.reward), else_=0.0)), 0.0),
                    func.coalesce(func.sum(case((closed == 1, d.reward), else_=0.0)), 0.0),
                    func.sum(closed),
                )
                .where(d.placement_id == placement)
                .group_by(d.variant)
                .order_by(d.variant)
            ).all()
            awaiting = self._awaiting_close(c, placement)
        out = [VariantTally(r[0], r[1], int(r[2] or 0), int(r[3] or 0), float(r[4]), float(r[5]), int(r[6] or 0)) for r in rows]
        by = {v.variant: v for v in out}
        for w in awaiting:
            v = by.get(w.variant)
            if v is not None:
                v.rewards += w.count
                v.reward_sum += w.reward_sum
                v.rewards_awaiting_close += w.count
                v.reward_sum_awaiting_close += w.reward_sum
        return out

    def learn_backlog(self, cursors: dict[str, int]) -> tuple[int, dict[str, int]]:
        """The learn sequence's top and, per placement, windows closed but not yet learned: not
        yet in the learn sequence, or in it above the placement's most advanced model (its
        cursor). Index ranges only (ix_decisions_unclaimed, and learn_seq's unique index above
        the cursor, which is short while the learner keeps up): read at every metrics scrape."""
        d = t.decisions.c
        closed = [int(Outcome.REWARD), int(Outcome.DEFAULT)]
        out: dict[str, int] = {}
        with self._connect() as c:
            top = c.execute(select(t.counters.c.value).where(t.counters.c.name == "learn_seq")).scalar() or 0
            for pid, cursor in cursors.items():
                waiting = select(func.count()).where(d.placement_id == pid, d.outcome.in_(closed), d.learn_seq.is_(None))
                ahead = select(func.count()).where(d.learn_seq > cursor, d.placement_id == pid)
                out[pid] = int(c.execute(waiting).scalar_one()) + int(c.execute(ahead).scalar_one())
        return int(top), out

    def tally_ineligible(self, placement: str) -> list[IneligibleTally]:
        """The ``ineligible`` column ([[arm, reason], ...]) unnested by the database itself:
        json_each on SQLite, json_array_elements on PostgreSQL; one pass over the placement's
        decisions, like ``tally``."""
        if self.engine.dialect.name == "postgresql":
            sql = (
                "SELECT e->>0 AS arm, e->>1 AS reason, count(*) AS n FROM decisions, json_array_elements(decisions.ineligible) AS e"
                " WHERE decisions.placement_id = :p GROUP BY 1, 2 ORDER BY n DESC, arm, reason"
            )
        else:
            sql = (
                "SELECT json_extract(e.value, '$[0]') AS arm, json_extract(e.value, '$[1]') AS reason, count(*) AS n"
                " FROM decisions, json_each(decisions.ineligible) AS e WHERE decisions.placement_id = :p"
                " GROUP BY 1, 2 ORDER BY n DESC, arm, reason"
            )
        with self._connect() as c:
            rows = c.execute(text(sql), {"p": placement}).all()
        return [IneligibleTally(str(r.arm), str(r.reason), int(r.n)) for r in rows]
