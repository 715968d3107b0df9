"""Group commit: one writer thread batches inserts and answers each caller once its batch is committed.

A commit per request costs 0.1-0.8 ms; a batch of hundreds costs about the same. Callers get a
``Future`` that completes after the commit (or fails with the database's error), so nothing is answered
before it is durable, and the request path never waits on a lock held by another request's commit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import IntegrityError

log = logging.getLogger(__name__)


class DuplicateRow(Exception):
    """The row collided with a unique constraint (written concurrently by someone else)."""


@dataclass(slots=True)
class _Job:
    table: Table
    row: dict[str, Any]
    future: Future[None] = field(default_factory=Future)


_STOP = object()


class GroupCommitWriter:
    """Background writer: ``submit`` queues a row and returns a future resolved after commit."""

    def __init__(self, engine: Engine, batch_max: int = 1000, linger_s: float = 0.002) -> None:
        self.engine = engine
        self.batch_max = batch_max
        self.linger_s = linger_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="risk-engine-writer", daemon=True)
        self._started = False
        self.batches = 0
        self.rows = 0
        self.on_batch: Callable[[int], None] | None = None

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, table: Table, row: dict[str, Any]) -> Future[None]:
        """Queue one insert; the future completes after its batch commits."""
        job = _Job(table, row)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued and stop."""
        if self._started:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._started = False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Job] = [first]
            stop = False
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    # linger briefly so concurrent callers share one commit
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=wait)
                    except queue.Empty:
                        break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: Sequence[_Job]) -> None:
        try:
            with self.engine.begin() as conn:
                self._insert_all(conn, batch)
        except IntegrityError:
            # one bad row must not fail its neighbours: retry them one at a time
            for job in batch:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(job.table.insert(), [job.row])
                except IntegrityError as exc:
                    job.future.set_exception(DuplicateRow(str(exc.orig)))
                except Exception as exc:
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(None)
            return
        except Exception as exc:
            log.error("group commit of %d rows failed: %s", len(batch), type(exc).__name__)
            for job in batch:
                job.future.set_exception(exc)
            return
        self.batches += 1
        self.rows += len(batch)
        for job in batch:
            job.future.set_result(None)
        if self.on_batch is not None:
            self.on_batch(len(batch))

    @staticmethod
    def _insert_all(conn: Connection, batch: Sequence[_Job]) -> None:
        by_table: dict[str, tuple[Table, list[dict[str, Any]]]] = {}
        for job in batch:
            by_table.setdefault(job.table.name, (job.table, []))[1].append(job.row)
        for table, rows in by_table.values():
            conn.execute(table.insert(), rows)
