"""Stored events listed as a review queue lists them: newest first, by decision, not yet labelled, or where a
rule fired (found through the hourly rule counts, ``rule_hits``). Reads no PII."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine as SqlEngine
from sqlalchemy import String, cast, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from risk_engine.dsl import Decision
from risk_engine.errors import InvalidInput
from risk_engine.storage import models as m
from risk_engine.storage.db import DatabaseUnavailable
from risk_engine.storage.rule_hits import HOUR_S
from risk_engine.subjects import SubjectKind

RULE_HOURS_NARROWED = 200  # a listing by rule reads only the hours it fired in, when they make this few runs


@dataclass(frozen=True)
class EventListing:
    """Which stored events a listing (a review queue) asks for: ``decision`` in the subject's words (a review's
    ``hold``), ``unlabelled``: not yet resolved by a label, ``rule``: a rule with this reason code fired; a page
    of ``limit``, before the event ``before_id`` (the last ``id`` of the page before)."""

    decision: str | None = None
    unlabelled: bool = False
    limit: int = 50
    before_id: int | None = None
    rule: str | None = None


def rule_fired(reason: Mapping[str, Any], code: str) -> bool:
    """True if a stored answer's reason is the rule ``code`` firing (a model's reason may share the code)."""
    return bool(reason["code"] == code and reason["source"] == "rule")


def list_events(db: SqlEngine, kind: SubjectKind, query: EventListing) -> list[dict[str, Any]]:
    """Stored events of the subject ``kind`` that ``query`` asks for, newest first; each item carries ``id`` for
    the next page's ``before_id``. No PII is read."""
    subject, rule, limit = kind.name, query.rule, query.limit
    stmt = (
        select(m.Event.id, m.Event.event_id, m.Event.occurred_at, m.Event.response)
        .where(m.Event.subject == subject)
        .order_by(m.Event.id.desc())
        .limit(limit)
    )
    if rule is not None:  # the stored answer's text holds the code; the reasons are checked below
        stmt = stmt.where(cast(m.Event.response, String).contains(f'"code":"{rule}"', autoescape=True))
        hours = hours_fired(db, subject, rule)
        if not hours:
            return []  # never fired: nothing to read
        if len(hours) <= RULE_HOURS_NARROWED:  # only the hours it fired in (a rare rule: a few of months)
            stmt = stmt.where(
                or_(
                    *(
                        (m.Event.occurred_at >= datetime.fromtimestamp(first * HOUR_S, UTC))
                        & (m.Event.occurred_at < datetime.fromtimestamp((last + 1) * HOUR_S, UTC))
                        for first, last in hours
                    )
                )
            )
    if query.decision is not None:
        names = kind.decision_names or {d.value: d.value for d in Decision}
        internal = [d for d, name in names.items() if name == query.decision]
        if not internal:
            raise InvalidInput([{"field": "decision", "reason": f"one of {', '.join(sorted(set(names.values())))}"}])
        stmt = stmt.where(m.Event.decision.in_(internal))
    if query.before_id is not None:
        stmt = stmt.where(m.Event.id < query.before_id)
    if query.unlabelled:
        labelled = select(m.Label.id).where(m.Label.subject == subject, m.Label.event_id == m.Event.event_id)
        stmt = stmt.where(~labelled.exists())
    try:
        with Session(db) as s:
            rows = list(s.execute(stmt).all())
            if rule is not None:
                # a model's reason with that code matches the text too: keep the events where a rule fired,
                # reading on until the page is full or the events run out
                kept: list[Any] = []
                while True:
                    kept += [r for r in rows if any(rule_fired(x, rule) for x in r.response["reasons"])]
                    if len(kept) >= limit or len(rows) < limit:
                        break
                    rows = list(s.execute(stmt.where(m.Event.id < rows[-1].id)).all())
                rows = kept[:limit]
    except OperationalError as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc
    return [
        {
            "id": row.id,
            kind.id_field: row.event_id,
            "occurred_at": row.occurred_at.isoformat(),
            "decision": row.response["decision"],
            "score": row.response["score"],
            "reasons": [r["code"] for r in row.response["reasons"] if r["source"] == "rule"],
            "policy_version": row.response["policy_version"],
        }
        for row in rows
    ]


def hours_fired(db: SqlEngine, subject: str, code: str) -> list[tuple[int, int]]:
    """The hours in which a rule with ``code`` fired on a stored event of ``subject``, as runs of consecutive
    hours ``(first, last)``, from the hourly counts (``storage/rule_hits.py``)."""
    try:
        with Session(db) as s:
            hours = s.scalars(
                select(m.RuleHit.hour)
                .where(m.RuleHit.subject == subject, m.RuleHit.code == code, m.RuleHit.hits > 0)
                .distinct()
                .order_by(m.RuleHit.hour)
            ).all()
    except OperationalError as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc
    runs: list[tuple[int, int]] = []
    for hour in hours:
        if runs and runs[-1][1] == hour - 1:
            runs[-1] = (runs[-1][0], hour)
        else:
            runs.append((hour, hour))
    return runs
