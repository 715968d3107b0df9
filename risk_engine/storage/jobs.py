"""Background jobs as stored: one row each, written by the worker running the job, read by any worker."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from risk_engine.storage import models as m


def _session(db: Engine) -> Session:
    return Session(db, expire_on_commit=False)


def new_record(job_id: str, kind: str, target: str, started_by: str, now: datetime) -> m.JobRecord:
    """The row of a job starting ``now``."""
    return m.JobRecord(
        id=job_id,
        kind=kind,
        target=target,
        state="running",
        processed=0,
        started_by=started_by,
        started_at=now,
        heartbeat_at=now,
        finished_at=None,
        cancel_requested=False,
        result=None,
        error=None,
    )


def insert(db: Engine, row: m.JobRecord, retain_s: float) -> None:
    """Store a new job, and forget jobs that finished more than ``retain_s`` ago."""
    with _session(db) as s:
        s.execute(delete(m.JobRecord).where(m.JobRecord.finished_at < row.started_at - timedelta(seconds=retain_s)))
        s.add(row)
        s.commit()


def heartbeat(db: Engine, job_id: str, processed: int, now: datetime) -> bool:
    """Record a running job's progress and that its worker is alive; True if someone asked it to stop."""
    with _session(db) as s:
        s.execute(update(m.JobRecord).where(m.JobRecord.id == job_id).values(processed=processed, heartbeat_at=now))
        cancel = s.scalar(select(m.JobRecord.cancel_requested).where(m.JobRecord.id == job_id))
        s.commit()
    return bool(cancel)


def finish(
    db: Engine, job_id: str, state: str, processed: int, result: dict[str, Any] | None, error: str | None, now: datetime
) -> None:
    """Record how a job ended."""
    with _session(db) as s:
        s.execute(
            update(m.JobRecord)
            .where(m.JobRecord.id == job_id)
            .values(state=state, processed=processed, result=result, error=error, finished_at=now, heartbeat_at=now)
        )
        s.commit()


def request_cancel(db: Engine, job_id: str) -> m.JobRecord | None:
    """Ask a running job to stop (its worker reads it at its next heartbeat); the job, or None if unknown."""
    with _session(db) as s:
        s.execute(
            update(m.JobRecord)
            .where(m.JobRecord.id == job_id, m.JobRecord.state == "running")
            .values(cancel_requested=True)
        )
        s.commit()
        return s.get(m.JobRecord, job_id)


def get(db: Engine, job_id: str) -> m.JobRecord | None:
    """A job by id."""
    with _session(db) as s:
        return s.get(m.JobRecord, job_id)


def recent(db: Engine, limit: int) -> list[m.JobRecord]:
    """The latest ``limit`` jobs, newest first, without their reports."""
    with _session(db) as s:
        columns = [c for c in m.JobRecord.__table__.columns if c.name != "result"]
        rows = s.execute(
            select(*columns).order_by(m.JobRecord.started_at.desc(), m.JobRecord.id.desc()).limit(limit)
        ).all()
    return [m.JobRecord(**row._mapping, result=None) for row in rows]
