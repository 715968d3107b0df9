"""Erasing a person's PII: the sealed PII bundles of the stored events that carry one of their identifiers.

Only the ciphertext goes (crypto-shredding): the records keep their blind indexes, keyed pseudonyms that velocity,
backtests and lists need and from which nothing can be read back without the blind-index key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, String, cast, func, or_, select, update
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.audit import audit

ERASED = "erased"  # an erased event's key id: it had PII, which was erased on request (no data key has this id)
EXPIRED = "expired"  # an event's key id once its PII outlived the retention period (``expire``)
EXPIRE_BATCH = 1_000  # events whose PII one transaction drops
RECHECKED_IDS = 1_000  # ids below the newest an expiry run reads again next time: they may have committed late


def _record_field(db: Engine, field: str) -> ColumnElement[Any]:
    """A record field as text, in SQL. SQLite holds records as JSON bytes: read as text first, since SQLite
    3.45 on reads a BLOB given to its JSON functions as its binary JSONB."""
    if db.dialect.name == "sqlite":
        extracted: ColumnElement[Any] = func.json_extract(cast(m.Event.record, String), f'$."{field}"')
        return extracted
    as_text: ColumnElement[Any] = m.Event.record[field].as_string()
    return as_text


def erase(
    db: Engine, fields: Mapping[str, Sequence[str]], tokens: Sequence[str], actor: str, target: str
) -> dict[str, int]:
    """Drop the PII bundle of every event of a subject (``fields``: subject -> record fields) whose record holds
    one of ``tokens`` in one of the fields, audited (counts only); the count erased per subject."""
    erased: dict[str, int] = {}
    with Session(db) as s:
        for subject, names in fields.items():
            matches = or_(*(_record_field(db, f) == token for f in names for token in tokens))
            ids = list(
                s.scalars(select(m.Event.id).where(m.Event.subject == subject, matches, m.Event.pii_blob.is_not(None)))
            )
            if ids:
                s.execute(update(m.Event).where(m.Event.id.in_(ids)).values(pii_blob=None, pii_key_id=ERASED))
            erased[subject] = len(ids)
        audit(s, actor, "pii.erase", target, None, {"events": erased})
        s.commit()
    return erased


def last_expiry(s: Session) -> tuple[datetime | None, int]:
    """Where the last retention run left off (its audit entry): the time before which it dropped the PII of the
    events dated then, and the newest event id it had seen. ``(None, 0)`` if none ran."""
    row = s.scalars(
        select(m.AuditEntry).where(m.AuditEntry.action == "pii.expire").order_by(m.AuditEntry.id.desc()).limit(1)
    ).first()
    if row is None or not row.after:
        return None, 0
    return datetime.fromisoformat(row.after["before"]), int(row.after["through_id"])


def expire(
    db: Engine, subjects: Iterable[str], before: datetime, actor: str, batch: int = EXPIRE_BATCH
) -> dict[str, int]:
    """Drop the sealed PII of every stored event dated before ``before`` (the retention period's start), in
    transactions of ``batch`` events, audited as ``pii.expire`` with the counts and where it stopped; the count
    per subject. A run reads only what the last one left: the events dated between its cutoff and this one's
    (the time index), and those stored since it dated before its cutoff (a backfill, by id). A cutoff earlier
    than the last run's is the last run's: PII dropped is not brought back, and nothing is dropped twice."""
    with Session(db) as s:
        done_before, through_id = last_expiry(s)
        top = s.scalar(select(func.max(m.Event.id))) or 0
    if done_before is not None and before < done_before:
        before = done_before
    wanted: list[ColumnElement[bool]] = [m.Event.occurred_at < before]
    if done_before is not None:
        wanted = [m.Event.occurred_at >= done_before, m.Event.occurred_at < before]
    expired: dict[str, int] = {}
    for subject in subjects:
        held = [m.Event.subject == subject, m.Event.pii_blob.is_not(None)]
        conditions = [wanted]
        if done_before is not None:
            conditions.append([m.Event.id > through_id, m.Event.occurred_at < done_before])
        expired[subject] = 0
        for condition in conditions:
            while True:
                with Session(db) as s:
                    ids = list(s.scalars(select(m.Event.id).where(*held, *condition).limit(batch)))
                    if not ids:
                        break
                    s.execute(update(m.Event).where(m.Event.id.in_(ids)).values(pii_blob=None, pii_key_id=EXPIRED))
                    s.commit()
                expired[subject] += len(ids)
    with Session(db) as s:
        left_at = {"before": before.isoformat(), "through_id": max(through_id, top - RECHECKED_IDS)}
        audit(s, actor, "pii.expire", "pii:retention", None, {**left_at, "events": expired})
        s.commit()
    return expired
