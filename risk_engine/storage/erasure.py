"""Erasing a person's PII: the sealed PII bundles of the stored events that carry one of their identifiers.

Only the ciphertext goes (crypto-shredding): the records keep their blind indexes, keyed pseudonyms that velocity,
backtests and lists need and from which nothing can be read back without the blind-index key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Engine, String, cast, func, or_, select, update
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.audit import audit

ERASED = "erased"  # an erased event's key id: it had PII, which was erased on request (no data key has this id)


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
