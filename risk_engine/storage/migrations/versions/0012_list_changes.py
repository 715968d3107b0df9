"""list_changes: which list entries changed, in order, so workers follow list edits without reading whole lists;
an index to page through a list's entries by id, and one for the audit log's filter by target

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "list_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("list_name", sa.String(64), nullable=False),
        sa.Column("token", sa.String(128), nullable=False),
    )
    op.create_index("ix_list_entries_list_id", "list_entries", ["list_name", "id"])
    op.create_index("ix_audit_log_target_id", "audit_log", ["target", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_target_id", table_name="audit_log")
    op.drop_index("ix_list_entries_list_id", table_name="list_entries")
    op.drop_table("list_changes")
