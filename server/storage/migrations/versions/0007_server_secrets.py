"""server secrets: values every server of a database shares (the secret draw seed)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Written by hand: a small key-value table. The first server to start on a database without a
configured seed stores a random one there (insert if absent) and every server reads it back,
so replicas and restarts draw alike and a caller cannot compute the draws offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("server_secrets")
