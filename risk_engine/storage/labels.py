"""Labels as the reports read them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from risk_engine.storage import models as m


def fraud_by_event(s: Session, subject: str) -> dict[str, bool]:
    """Every labelled event of ``subject``: True if any of its labels says fraud."""
    fraud: dict[str, bool] = {}
    for event_id, is_fraud in s.execute(select(m.Label.event_id, m.Label.is_fraud).where(m.Label.subject == subject)):
        fraud[event_id] = fraud.get(event_id, False) or is_fraud
    return fraud
