"""SQLite: times the group-commit writer stored as ``isoformat`` text, rewritten as SQLAlchemy stores them

Until this revision the writer handed ``events`` and ``seller_credit`` times to the sqlite3 driver as datetime
objects, and the driver's default adapter wrote ``2026-11-22 18:15:00+08:00``: the caller's own offset, and
a format SQLAlchemy's (``2026-11-22 10:15:00.000000``, UTC) does not compare with as text. Read back one at a
time they were right; compared in SQL (the backtest's ``--since``, the latest event, the recent-payments window
of a restart) an event sent with a +08:00 offset counted eight hours late. This rewrites them in UTC, in
SQLAlchemy's format. PostgreSQL stored them as timestamptz all along: nothing to do there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 01:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = {"events": ("occurred_at", "created_at"), "seller_credit": ("occurred_at", "created_at")}


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, columns in COLUMNS.items():
        for column in columns:
            # isoformat(" ") with an offset is 25 characters, 32 with microseconds; SQLAlchemy's text is 26.
            # SQLite's strftime reads the offset and answers in UTC (to the second: microseconds come across)
            op.execute(
                f"UPDATE {table} SET {column} = strftime('%Y-%m-%d %H:%M:%S', {column}) || '.' || "
                f"CASE WHEN length({column}) = 32 THEN substr({column}, 21, 6) ELSE '000000' END "
                f"WHERE length({column}) IN (25, 32) AND substr({column}, -6, 1) IN ('+', '-')"
            )


def downgrade() -> None:
    """Nothing to undo: UTC text in SQLAlchemy's format reads back the same under every earlier revision."""
