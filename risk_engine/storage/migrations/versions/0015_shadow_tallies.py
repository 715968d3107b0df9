"""shadow_tallies, shadow_rule_hits: a shadow version's decisions counted as events are stored, filled once
from the stored events

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from risk_engine.storage.shadow_tallies import backfill

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shadow_tallies",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("live", sa.String(16), nullable=False),
        sa.Column("shadow", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("labelled", sa.BigInteger(), nullable=False),
        sa.Column("fraud", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("version", "live", "shadow", "origin"),
    )
    op.create_table(
        "shadow_rule_hits",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("version", "rule", "origin"),
    )
    backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("shadow_rule_hits")
    op.drop_table("shadow_tallies")
