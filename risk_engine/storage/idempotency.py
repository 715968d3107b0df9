"""Idempotency keys: a state-changing request sent with an ``Idempotency-Key`` header is claimed here before
it is answered and its answer stored after, so the same request again gets the stored answer.

A key belongs to the API key that sent it. The same key with another request is a conflict; while the first
request is still being answered a second one waits for nothing (it is told to retry); a claim whose request
never finished (the process died) is taken over after ``ABANDONED_S``. Keys are kept ``RETAIN_S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, Engine, delete, select, update
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.db import retry_on_race

RETAIN_S = 24 * 3600.0  # how long an answer is kept for a retry (as Stripe does)
ABANDONED_S = 300.0  # a claim this old whose answer never came is taken over


@dataclass(frozen=True)
class Claim:
    """What to do with a request: answer it (``new``), send the stored answer (``replay``), or refuse it."""

    outcome: Literal["new", "replay", "conflict", "in_progress"]
    row_id: int | None = None
    status: int | None = None
    content_type: str | None = None
    body: bytes | None = None
    first_request: str | None = None  # "METHOD path" of the request the key was first sent with


def claim(db: Engine, key_id: str, key: str, method: str, path: str, request_hash: str, now: datetime) -> Claim:
    """Claim ``key`` of ``key_id`` for this request, or say why not."""

    def attempt() -> Claim:
        with Session(db, expire_on_commit=False) as s:
            row = s.scalars(
                select(m.IdempotencyKey).where(
                    m.IdempotencyKey.key_id == key_id, m.IdempotencyKey.idempotency_key == key
                )
            ).first()
            if row is not None and row.created_at < now - timedelta(seconds=RETAIN_S):
                s.delete(row)  # expired: the key is free again
                s.flush()
                row = None
            if row is None:
                row = m.IdempotencyKey(
                    key_id=key_id,
                    idempotency_key=key,
                    method=method,
                    path=path,
                    request_hash=request_hash,
                    status=None,
                    content_type=None,
                    body=None,
                    created_at=now,
                )
                s.add(row)
                s.commit()  # a concurrent first claim of the same key fails here, and the retry finds it
                return Claim("new", row.id)
            if row.request_hash != request_hash:
                return Claim("conflict", first_request=f"{row.method} {row.path}")
            if row.status is not None:
                return Claim("replay", row.id, row.status, row.content_type, row.body)
            if row.created_at >= now - timedelta(seconds=ABANDONED_S):
                return Claim("in_progress")
            # abandoned: take it over, unless another retry just did
            taken = cast(
                CursorResult[Any],
                s.execute(
                    update(m.IdempotencyKey)
                    .where(m.IdempotencyKey.id == row.id, m.IdempotencyKey.created_at == row.created_at)
                    .values(created_at=now)
                ),
            )
            s.commit()
            return Claim("new", row.id) if taken.rowcount == 1 else Claim("in_progress")

    return retry_on_race(attempt)


def complete(db: Engine, row_id: int, status: int, content_type: str | None, body: bytes) -> None:
    """Store the answer of a claimed request."""
    with Session(db) as s:
        s.execute(
            update(m.IdempotencyKey)
            .where(m.IdempotencyKey.id == row_id)
            .values(status=status, content_type=content_type, body=body)
        )
        s.commit()


def release(db: Engine, row_id: int) -> None:
    """Give a claim up (its request failed on the server's side): a retry with the key does the work."""
    with Session(db) as s:
        s.execute(delete(m.IdempotencyKey).where(m.IdempotencyKey.id == row_id))
        s.commit()


def purge(db: Engine, now: datetime) -> int:
    """Delete the keys older than ``RETAIN_S``; how many."""
    with Session(db) as s:
        gone = cast(
            CursorResult[Any],
            s.execute(delete(m.IdempotencyKey).where(m.IdempotencyKey.created_at < now - timedelta(seconds=RETAIN_S))),
        ).rowcount
        s.commit()
    return int(gone or 0)
