"""The append-only audit log: who changed what, when, with the state before and after."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from risk_engine.storage import models as m


def audit(
    s: Session, actor: str, action: str, target: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    """Add an audit-log entry to ``s`` (committed with the change it records)."""
    s.add(m.AuditEntry(at=datetime.now(UTC), actor=actor, action=action, target=target, before=before, after=after))
