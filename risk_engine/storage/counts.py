"""Counters kept in tables (rule hits, shadow decisions): rows added to, never rewritten."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def add_counts(
    session: Session, model: Any, keys: Sequence[str], counters: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """Add each row's ``counters`` to the stored row of the same ``keys`` (the primary key), or insert it."""
    if not rows:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(model)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: getattr(model, column) + getattr(stmt.excluded, column) for column in counters},
    )
    session.execute(stmt, rows)
