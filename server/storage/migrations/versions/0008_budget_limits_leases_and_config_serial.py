"""budget limits in the database, leases per server, the configuration each server has loaded

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Written by hand: budget_accounts.cap (the stored limit a lease is checked against; NULL on
existing rows until the next lease or configuration change sets it), budget_limits (the limits
as applied), budget_leases (who holds which lease: existing leases belong to no server, so they
are never given back twice) and servers.config_seen (the configuration serial a server has
loaded; 0 for servers signed in before it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "budget_limits",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("cap", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("key", "kind"),
    )
    op.create_table(
        "budget_leases",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("server_id", sa.String(length=32), nullable=False),
        sa.Column("leased", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key", "period", "server_id"),
    )
    with op.batch_alter_table("budget_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cap", sa.Double(), nullable=True))
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("config_seen", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_column("config_seen")
    with op.batch_alter_table("budget_accounts", schema=None) as batch_op:
        batch_op.drop_column("cap")
    op.drop_table("budget_leases")
    op.drop_table("budget_limits")
