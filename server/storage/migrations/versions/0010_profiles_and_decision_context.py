"""customer profiles; the context a decision used

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Written by hand (issue #30): ``profiles``, one row per customer (features as the decision log
keeps them, the source's as_of, an optional expiry), and ``decisions.context``, where a decision
came from besides its request (the profile's as_of and which features it gave, each arm's
history features: bandit.decision_log.DecisionContext). NULL for older decisions: the request's
features only. And one contact-history row per impression (a unique index on event and slot).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "profiles",
        sa.Column("customer_id", sa.String(256), primary_key=True),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("as_of", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    # Only profiles that expire: most never do, and an index entry per write costs the loader.
    where = sa.text("expires_at IS NOT NULL")
    op.create_index("ix_profiles_expires", "profiles", ["expires_at"], postgresql_where=where, sqlite_where=where)
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("context", sa.JSON(), nullable=True))
    # One contact row per impression: the Choose that made it and a backfill from the log
    # (Store.backfill_contacts) may both write it; the second is then left out.
    op.execute("DELETE FROM contact_impressions WHERE id NOT IN (SELECT min(id) FROM contact_impressions GROUP BY event_id, slot)")
    op.create_index("ux_contact_impressions_event", "contact_impressions", ["event_id", "slot"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_contact_impressions_event", table_name="contact_impressions")
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_column("context")
    op.drop_index("ix_profiles_expires", table_name="profiles")
    op.drop_table("profiles")
