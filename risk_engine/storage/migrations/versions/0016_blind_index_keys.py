"""blind_index_keys: the generations of the blind-index key chain; events.hash_generation: the generation each
request hash was computed under

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from risk_engine.storage.models import UtcDateTime

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "blind_index_keys",
        sa.Column("generation", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("fingerprint", sa.String(80), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", UtcDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UtcDateTime(timezone=True), nullable=True),
        sa.Column("events_through", sa.BigInteger(), nullable=False),
        sa.Column("entries_through", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("generation"),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("hash_generation", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("hash_generation")
    op.drop_table("blind_index_keys")
