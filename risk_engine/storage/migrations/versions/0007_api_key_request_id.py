"""api_keys.request_id: the caller's idempotency key for keys created over the API

A replayed ``POST /v1/keys`` finds the key its first attempt created instead of creating a second one. Keys
created by the CLI or the bootstrap have none; a unique index admits any number of NULLs on both databases.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 06:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("request_id", sa.String(128), nullable=True))
    op.create_index("uq_api_keys_request_id", "api_keys", ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_api_keys_request_id", "api_keys")
    op.drop_column("api_keys", "request_id")
