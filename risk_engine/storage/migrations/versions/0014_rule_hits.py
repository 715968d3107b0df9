"""rule_hits: rule hits and their labels counted per hour as events are stored, filled once from the stored events

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from risk_engine.storage.rule_hits import backfill

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rule_hits",
        sa.Column("subject", sa.String(32), nullable=False),
        sa.Column("hour", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.Column("labelled", sa.BigInteger(), nullable=False),
        sa.Column("fraud", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subject", "hour", "code", "origin"),
    )
    backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("rule_hits")
