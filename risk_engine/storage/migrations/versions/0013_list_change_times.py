"""list_changes.changed_at: when each change was recorded, so changes every worker has long followed are pruned

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import risk_engine.storage.models

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("list_changes") as batch:
        batch.add_column(sa.Column("changed_at", risk_engine.storage.models.UtcDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("list_changes") as batch:
        batch.drop_column("changed_at")
