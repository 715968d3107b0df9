"""Labels as the reports read them: each event's outcome beside the event, looked up in the labels' index per
row, so a report over N days never reads every label of the subject (a platform that labels every resolved
order holds tens of millions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ScalarSelect, case, func, select

from risk_engine.storage import models as m

# the same as ``event_outcome``, in SQL text for the reads that go through the driver (``FROM events``)
EVENT_OUTCOME_SQL = (
    "(SELECT MAX(CASE WHEN labels.is_fraud THEN 1 ELSE 0 END) FROM labels"
    " WHERE labels.subject = events.subject AND labels.event_id = events.event_id)"
)


def event_outcome(excluding: Sequence[int] = ()) -> ScalarSelect[Any]:
    """A column for a select of events: NULL if the event has no label, 1 if any of its labels says fraud,
    else 0 (read it with ``outcome``); leaving out the labels whose ids are in ``excluding``."""
    stmt = select(func.max(case((m.Label.is_fraud, 1), else_=0))).where(
        m.Label.subject == m.Event.subject, m.Label.event_id == m.Event.event_id
    )
    if excluding:
        stmt = stmt.where(m.Label.id.not_in(excluding))
    return stmt.correlate(m.Event).scalar_subquery()


def outcome(value: Any) -> bool | None:
    """An event's outcome from its ``event_outcome`` column: None (unlabelled), True (fraud) or False."""
    return None if value is None else bool(value)
