"""snapshots.slot renamed model_name

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

Written by hand (issue #29: one name per concept): a saved model is named "" (the placement's
own), a variant id or "shadow:<id>"; the column holding that name was called ``slot`` from
before multi-slot placements, whose "slot" is a decision's position 0-9. Renamed in place: the
rows, the primary key and the models are kept (SQLite rebuilds the table in batch mode,
PostgreSQL renames the column).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots") as batch_op:
        batch_op.alter_column("slot", new_column_name="model_name")


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch_op:
        batch_op.alter_column("model_name", new_column_name="slot")
