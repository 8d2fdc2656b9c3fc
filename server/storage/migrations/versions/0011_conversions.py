"""conversions from billing and their credits; a customer's impressions by time

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

Written by hand (issue #31): ``conversions``, one row per conversion id (the idempotency key of
a purchase reported by billing: customer, arm or product, value, when it occurred, how many
decisions it credited), and ``conversion_credits``, the audit of conversion -> credited
decisions with their shares. ``ix_decisions_customer``: attribution reads a customer's impressions
in a time range, and erasing a customer finds all their decisions, without scanning the log.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversions",
        sa.Column("conversion_id", sa.String(256), primary_key=True),
        sa.Column("customer_id", sa.String(256), nullable=False),
        sa.Column("arm_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("product", sa.String(128), nullable=False, server_default=""),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("occurred_at", sa.Double(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("credited", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_conversions_customer", "conversions", ["customer_id", "occurred_at"])
    op.create_index("ix_conversions_occurred", "conversions", ["occurred_at"])
    op.create_table(
        "conversion_credits",
        sa.Column("conversion_id", sa.String(256), primary_key=True),
        sa.Column("event_id", sa.String(256), primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("placement_id", sa.String(128), nullable=False),
        sa.Column("arm_id", sa.String(128), nullable=False),
        sa.Column("share", sa.Double(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
    )
    op.create_index("ix_conversion_credits_event", "conversion_credits", ["event_id", "slot"])
    op.create_index("ix_decisions_customer", "decisions", ["customer_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_decisions_customer", table_name="decisions")
    op.drop_index("ix_conversion_credits_event", table_name="conversion_credits")
    op.drop_table("conversion_credits")
    op.drop_index("ix_conversions_occurred", table_name="conversions")
    op.drop_index("ix_conversions_customer", table_name="conversions")
    op.drop_table("conversions")
