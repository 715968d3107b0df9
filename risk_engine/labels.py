"""Labels: outcomes (chargeback, confirmed fraud, legitimate...) received for scored events, stored idempotently
on their ``label_id``, each in the transaction that counts it in the hourly tallies (``rule_hits.tally_labels``).

What the detectors learn from a new label is the engine's part: the functions that store labels return the new
ones as ``NewLabel`` tuples for it. How reports read each event's outcome is ``storage.labels``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, TypeVar

import orjson
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from risk_engine.errors import Conflict, InvalidInput, NotFound
from risk_engine.storage import models as m
from risk_engine.storage.db import DatabaseUnavailable, retry_on_race
from risk_engine.storage.rule_hits import tally_labels
from risk_engine.subjects import SUBJECT_KINDS

T = TypeVar("T")
Sessions = Callable[[], Session]
NewLabel = tuple[int, str, str, bool]  # a label just stored: (label id, subject, event id, fraud)

# every subject's outcomes and whether each is fraud
LABELS: dict[str, bool] = {label: fraud for kind in SUBJECT_KINDS.values() for label, fraud in kind.labels.items()}


def label_digest(payload: dict[str, Any]) -> str:
    """Canonical hash of a label's request, to tell a replay from a different label under the same id."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class LabelRequest:
    """One outcome as a caller sends it: for ``event_id`` of ``subject``, idempotent on ``label_id``."""

    label_id: str
    event_id: str
    label: str
    occurred_at: datetime | None
    source: str | None
    subject: str = "payment"

    @cached_property
    def digest(self) -> str:
        """The request's hash, to tell a replay from another label under the same ``label_id``."""
        body: dict[str, Any] = {
            "label_id": self.label_id,
            "payment_id": self.event_id,
            "label": self.label,
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
            "source": self.source,
        }
        if self.subject != "payment":
            body["subject"] = self.subject
        return label_digest(body)

    def row(self, now: datetime) -> m.Label:
        """The label's row, received ``now``."""
        return m.Label(
            label_id=self.label_id,
            subject=self.subject,
            event_id=self.event_id,
            label=self.label,
            is_fraud=LABELS[self.label],
            occurred_at=self.occurred_at or now,
            received_at=now,
            source=self.source,
            request_hash=self.digest,
        )


def label_view(row: m.Label) -> dict[str, Any]:
    """A stored label as the API answers it."""
    return {
        "label_id": row.label_id,
        "payment_id": row.event_id,
        "label": row.label,
        "is_fraud": row.is_fraud,
        "occurred_at": row.occurred_at.isoformat(),
        "received_at": row.received_at.isoformat(),
        "source": row.source,
    }


def _new(rows: Iterable[m.Label]) -> list[NewLabel]:
    return [(row.id, row.subject, row.event_id, row.is_fraud) for row in rows]


def _available(write: Callable[[], T]) -> T:
    """``write``, raced (``retry_on_race``), with a database that cannot be reached as ``DatabaseUnavailable``."""
    try:
        return retry_on_race(write)
    except OperationalError as exc:
        raise DatabaseUnavailable(type(exc).__name__) from exc


def store_label(sessions: Sessions, request: LabelRequest, origin: str) -> tuple[dict[str, Any], NewLabel | None]:
    """Store one label, idempotently on its ``label_id``: its view, and the label if it is new (None when it
    was stored before, by the same request). ``Conflict`` if the id was used for another label, ``NotFound``
    if its event is not stored. ``origin`` is this worker's name in the tallies."""

    def write() -> tuple[dict[str, Any], NewLabel | None]:
        with sessions() as s:
            existing = s.scalars(select(m.Label).where(m.Label.label_id == request.label_id)).first()
            if existing is not None:
                if existing.request_hash != request.digest:
                    raise Conflict(f"label_id {request.label_id} was already used for a different label")
                return label_view(existing), None
            event = s.scalar(
                select(m.Event.id).where(m.Event.subject == request.subject, m.Event.event_id == request.event_id)
            )
            if event is None:
                raise NotFound(f"no {request.subject} {request.event_id}")
            row = request.row(datetime.now(UTC))
            s.add(row)
            tally_labels(s, [row], origin)
            s.commit()  # the same label id stored meanwhile: IntegrityError, and the write is read again
            return label_view(row), (row.id, row.subject, row.event_id, row.is_fraud)

    return _available(write)


def store_label_batch(
    sessions: Sessions, requests: Sequence[LabelRequest], origin: str
) -> tuple[list[dict[str, Any]], list[NewLabel]]:
    """Store many labels in one transaction, each idempotent on its ``label_id`` as ``store_label`` is: every
    label's view, in order, and the new ones. If any is wrong (its event unknown, its ``label_id`` already used
    for another label, here or before) none is stored: an ``InvalidInput`` names each by its place."""

    def write() -> tuple[list[dict[str, Any]], list[NewLabel]]:
        digests = [r.digest for r in requests]
        errors: list[dict[str, Any]] = []
        first: dict[str, int] = {}  # label id -> its first place in the batch
        for i, (r, digest) in enumerate(zip(requests, digests, strict=True)):
            j = first.setdefault(r.label_id, i)
            if j != i and digests[j] != digest:
                errors.append(
                    {"field": f"labels.{i}.label_id", "reason": f"{r.label_id} is label {j} too, with another label"}
                )
        with sessions() as s:
            stored = {row.label_id: row for row in s.scalars(select(m.Label).where(m.Label.label_id.in_(list(first))))}
            wanted = {(r.subject, r.event_id) for r in requests if r.label_id not in stored}
            known: set[tuple[str, str]] = set()
            for subject in {subject for subject, _ in wanted}:
                ids = [e for sub, e in wanted if sub == subject]
                known.update(
                    (subject, e)
                    for e in s.scalars(
                        select(m.Event.event_id).where(m.Event.subject == subject, m.Event.event_id.in_(ids))
                    )
                )
            for i, (r, digest) in enumerate(zip(requests, digests, strict=True)):
                before = stored.get(r.label_id)
                if before is not None and before.request_hash != digest:
                    errors.append(
                        {
                            "field": f"labels.{i}.label_id",
                            "reason": f"{r.label_id} was already used for a different label",
                        }
                    )
                elif before is None and (r.subject, r.event_id) not in known:
                    errors.append({"field": f"labels.{i}.payment_id", "reason": f"no {r.subject} {r.event_id}"})
            if errors:
                raise InvalidInput(errors)
            now = datetime.now(UTC)
            new = {r.label_id: r.row(now) for r in requests if r.label_id not in stored}
            s.add_all(new.values())
            tally_labels(s, list(new.values()), origin)
            s.commit()
            return [label_view(stored.get(r.label_id) or new[r.label_id]) for r in requests], _new(new.values())

    return _available(write)


def store_source_labels(
    sessions: Sessions, labels: Sequence[tuple[str, str, datetime | None]], source: str, subject: str, origin: str
) -> list[NewLabel]:
    """Store many outcomes ``(event id, label, occurred_at)`` of ``subject`` from one ``source`` (a chargeback
    file, a review tool) in one transaction, idempotently: each gets the label id ``source:event id``, and one
    stored before is left as it is. Returns the new ones. ``ValueError`` for a label the subject does not take."""
    outcomes = SUBJECT_KINDS[subject].labels
    unknown = sorted({label for _, label, _ in labels if label not in outcomes})
    if unknown:
        raise ValueError(f"a {subject} takes {', '.join(outcomes)}, not {', '.join(unknown)}")

    def write() -> list[NewLabel]:
        now = datetime.now(UTC)
        rows = {
            f"{source}:{event_id}": m.Label(
                label_id=f"{source}:{event_id}",
                subject=subject,
                event_id=event_id,
                label=label,
                is_fraud=LABELS[label],
                occurred_at=at or now,
                received_at=now,
                source=source,
                request_hash=label_digest({"payment_id": event_id, "label": label, "source": source}),
            )
            for event_id, label, at in labels
        }
        with sessions() as s:
            known = set(s.scalars(select(m.Label.label_id).where(m.Label.label_id.in_(list(rows)))))
            new = [row for key, row in rows.items() if key not in known]
            s.add_all(new)
            tally_labels(s, new, origin)
            s.commit()
            return _new(new)

    return _available(write)


def labels_after(sessions: Sessions, after: int, gaps: Iterable[int], limit: int) -> list[NewLabel]:
    """The labels of every subject with ids over ``after`` or in ``gaps`` (ids that committed after a higher one
    was read), in id order, at most ``limit``."""
    wanted: ColumnElement[bool] = m.Label.id > after
    missing = sorted(gaps)
    if missing:
        wanted = wanted | m.Label.id.in_(missing)
    with sessions() as s:
        rows = s.execute(
            select(m.Label.id, m.Label.subject, m.Label.event_id, m.Label.is_fraud)
            .where(wanted)
            .order_by(m.Label.id)
            .limit(limit)
        ).all()
    return [(i, subject, event_id, fraud) for i, subject, event_id, fraud in rows]
