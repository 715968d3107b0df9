"""Stored list entries: add (idempotent on the value), remove, read, each change audited.

These need only the database, so ``risk-engine lists`` edits a list without opening an engine (which would
rebuild velocity and detectors from the whole history); running engines pick the change up by polling
``list_signature``. What is stored for a value (itself, or a blind index) is decided by the caller
(``features.lists.list_value_token``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.audit import audit
from risk_engine.storage.db import retry_on_race


def _session(db: Engine) -> Session:
    return Session(db, expire_on_commit=False)


def add_entry(
    db: Engine,
    list_name: str,
    token: str,
    display: str,
    actor: str,
    expires_at: datetime | None = None,
    note: str | None = None,
) -> m.ListEntry:
    """Store ``token`` on ``list_name``; the stored row. The same value again changes nothing, unless it states
    another expiry (``None``: never) or a note, which then replace the stored ones (audited as ``list.update``)."""

    def write() -> m.ListEntry:
        with _session(db) as s:
            row = s.scalars(
                select(m.ListEntry).where(m.ListEntry.list_name == list_name, m.ListEntry.token == token)
            ).first()
            stated = {"display": display, "expires_at": expires_at.isoformat() if expires_at else None}
            if row is None:
                row = m.ListEntry(
                    list_name=list_name,
                    token=token,
                    display=display,
                    added_by=actor,
                    note=note,
                    created_at=datetime.now(UTC),
                    expires_at=expires_at,
                )
                s.add(row)
                audit(s, actor, "list.add", f"list:{list_name}", None, stated)
                s.commit()
            elif row.expires_at != expires_at or (note is not None and note != row.note):
                before = {
                    "display": row.display,
                    "expires_at": row.expires_at.isoformat() if row.expires_at else None,
                    "note": row.note,
                }
                row.expires_at = expires_at
                row.note = note if note is not None else row.note
                audit(s, actor, "list.update", f"list:{list_name}", before, {**stated, "note": row.note})
                s.commit()
            return row

    return retry_on_race(write)  # two processes adding the same value at once: the second finds the first's


def remove_entry(db: Engine, list_name: str, token: str, actor: str) -> bool:
    """Remove ``token`` from ``list_name`` (audited). False if it was not there."""
    with _session(db) as s:
        row = s.scalars(
            select(m.ListEntry).where(m.ListEntry.list_name == list_name, m.ListEntry.token == token)
        ).first()
        if row is None:
            return False
        audit(s, actor, "list.remove", f"list:{list_name}", {"display": row.display}, None)
        s.delete(row)
        s.commit()
    return True


def entry_views(db: Engine, list_name: str) -> list[dict[str, Any]]:
    """A list's entries as stored, oldest first (PII lists show masked values only)."""
    with _session(db) as s:
        rows = s.scalars(select(m.ListEntry).where(m.ListEntry.list_name == list_name).order_by(m.ListEntry.id))
        return [
            {
                "entry": r.display,
                "added_by": r.added_by,
                "note": r.note,
                "created_at": r.created_at.isoformat(),
                "expires_at": r.expires_at.isoformat() if r.expires_at else None,
            }
            for r in rows
        ]


def all_entries(db: Engine) -> Sequence[m.ListEntry]:
    """Every stored entry of every list."""
    with _session(db) as s:
        return s.scalars(select(m.ListEntry)).all()


def list_signature(db: Engine) -> tuple[int, int, int]:
    """What changes with every stored list change: the entries' count and newest id (additions, removals,
    seeds) and the newest list audit entry (an entry's expiry or note replaced in place)."""
    with _session(db) as s:
        count, newest = s.execute(select(func.count(), func.max(m.ListEntry.id)).select_from(m.ListEntry)).one()
        # a range, not LIKE 'list.%': both databases answer it from the (action, id) index
        audited = s.scalar(
            select(func.max(m.AuditEntry.id)).where(m.AuditEntry.action >= "list.", m.AuditEntry.action < "list/")
        )
    return int(count), int(newest or 0), int(audited or 0)
