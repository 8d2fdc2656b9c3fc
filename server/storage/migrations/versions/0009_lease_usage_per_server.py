"""what each server used of its own leases

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Written by hand: budget_leases.used, what a server's decisions spent and reserved from its own
leases, so that the unused part of a server that stopped without giving it back (kill -9) is
given back by the server that takes its windows over. Existing rows start at 0: such a lease
is not given back (as before), never given back twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("budget_leases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("used", sa.Double(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("budget_leases", schema=None) as batch_op:
        batch_op.drop_column("used")
