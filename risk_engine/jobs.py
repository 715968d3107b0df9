"""Background jobs (backtests): long work on a thread of the worker that started it, recorded in the database so
that every worker on it lists the job, answers for it and can cancel it.

The running worker writes the job's progress every ``HEARTBEAT_S`` and reads there whether it was asked to stop.
A running job whose heartbeat is older than ``LOST_AFTER_S`` belonged to a worker that died: it is shown as
failed. Finished jobs are kept ``RETAIN_S``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from risk_engine.storage import jobs as stored
from risk_engine.storage import models as m

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
LOST_AFTER_S = 30.0
RETAIN_S = 30 * 86400.0
LISTED = 100  # how many of the latest jobs a listing shows


class Cancelled(Exception):
    """The job was asked to stop."""


@dataclass
class Job:
    """A job running in this worker: the work reports progress in ``processed`` and checks ``cancel``."""

    id: str
    kind: str
    target: str = ""  # what it works on: "payment:v2 since 30d"
    processed: int = 0
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)


def job_view(row: m.JobRecord, now: datetime) -> dict[str, Any]:
    """A stored job as the API shows it; a running job gone silent is shown as the failure it is."""
    state, error = row.state, row.error
    if state == "running" and row.heartbeat_at < now - timedelta(seconds=LOST_AFTER_S):
        state = "failed"
        error = f"the worker running it stopped before it finished (no word from it for {LOST_AFTER_S:.0f} s)"
    return {
        "id": row.id,
        "kind": row.kind,
        "target": row.target,
        "state": state,
        "processed": row.processed,
        "started_by": row.started_by,
        "started_at": row.started_at.timestamp(),
        "finished_at": row.finished_at.timestamp() if row.finished_at else None,
        "result": row.result,
        "error": error,
    }


def _now() -> datetime:
    return datetime.now(UTC)


class Jobs:
    """Start, list, read and cancel background jobs, stored in ``db``."""

    def __init__(self, db: Engine, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.db = db
        self.heartbeat_s = heartbeat_s
        self._running: dict[str, tuple[Job, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def start(
        self, kind: str, work: Callable[[Job], dict[str, Any]], target: str = "", started_by: str = ""
    ) -> dict[str, Any]:
        """Record a job and run ``work(job)`` on a thread; returns the job's view."""
        job = Job(id=f"{kind}_{uuid.uuid4().hex[:12]}", kind=kind, target=target)
        now = _now()
        row = stored.new_record(job.id, kind, target, started_by, now)
        stored.insert(self.db, row, RETAIN_S)
        thread = threading.Thread(target=self._run, args=(job, work), name=job.id, daemon=True)
        with self._lock:
            self._running[job.id] = (job, thread)
        thread.start()
        return job_view(row, now)

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        finished = threading.Event()

        def beat() -> None:
            while not finished.wait(self.heartbeat_s):
                try:
                    if stored.heartbeat(self.db, job.id, job.processed, _now()):
                        job.cancel.set()
                except Exception as exc:  # the database is away: the job goes on, the next beat retries
                    log.warning("job %s: heartbeat failed: %s", job.id, type(exc).__name__)

        threading.Thread(target=beat, name=f"{job.id}-heartbeat", daemon=True).start()
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            result = work(job)
            state = "done"
        except Cancelled:
            if self._stopping:
                state, error = "failed", "its worker shut down before it finished"
            else:
                state = "cancelled"
        except Exception as exc:  # the job's failure is reported through the API, not raised
            state = "failed"
            # a driver's error text may quote the statement's parameters: only its class is kept, as for writes
            error = type(exc).__name__ if isinstance(exc, DBAPIError) else f"{type(exc).__name__}: {exc}"
        finally:
            finished.set()
            with self._lock:
                self._running.pop(job.id, None)
        for attempt in range(3):
            try:
                stored.finish(self.db, job.id, state, job.processed, result, error, _now())
                return
            except Exception as exc:
                log.warning("job %s: recording its end failed: %s", job.id, type(exc).__name__)
                time.sleep(0.5 * (attempt + 1))
        # not recorded: its heartbeat has stopped, so it is shown as failed once LOST_AFTER_S has passed

    def recent(self, limit: int = LISTED) -> list[dict[str, Any]]:
        """The latest jobs of every worker, newest first, without their reports."""
        now = _now()
        return [job_view(row, now) for row in stored.recent(self.db, limit)]

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A job by id, with its report once done."""
        row = stored.get(self.db, job_id)
        return job_view(row, _now()) if row is not None else None

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Ask a running job to stop, whichever worker runs it (at once if this one does)."""
        with self._lock:
            local = self._running.get(job_id)
        if local is not None:
            local[0].cancel.set()
        row = stored.request_cancel(self.db, job_id)
        return job_view(row, _now()) if row is not None else None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop this worker's running jobs (recorded as failed: the worker shut down) and wait for them."""
        self._stopping = True
        with self._lock:
            running = list(self._running.values())
        for job, _ in running:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for _, thread in running:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def wait(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """Poll a job until it is no longer running or ``timeout`` passes; its last view."""
        deadline = time.monotonic() + timeout
        view = self.get(job_id)
        while view is not None and view["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
            view = self.get(job_id)
        return view
