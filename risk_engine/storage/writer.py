"""Group commit: one writer thread batches inserts and answers each caller once its batch is committed.

A commit per request costs 0.1-0.8 ms; a batch of hundreds costs about the same. Callers get a
``Future`` that completes after the commit (or fails with the database's error), so nothing is answered
before it is durable, and the request path never waits on a lock held by another request's commit.

Rows are turned into driver parameters by the caller (:class:`RawInsert`) and the writer hands whole
batches to the driver as multi-row INSERTs on a DBAPI connection of its own, held across batches: the
writer thread holds the GIL as little as possible, because every moment it does is a moment the request
path waits. (A SQLAlchemy transaction per batch cost about 100 us more than the driver's own begin and
commit; under HTTP load batches are a few rows, so that was a tenth of a request's CPU.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, Engine, Table, TypeDecorator

from risk_engine.storage.checkpoint import WAL_FRAMES_LIMIT, WalCheckpointer, checkpoint
from risk_engine.storage.rule_hits import HitTally, Tally

log = logging.getLogger(__name__)

SQLITE_AUTOCHECKPOINT_PAGES = 1_000  # SQLite's default, for connections other than the writer's
# the writer lingers for more rows only after a batch of at least this many: at 1,000 requests/s on one core the
# linger made half of an answer's 3.6 ms (1.5 ms without it), and under full load batches stay this big anyway
LINGER_FROM_ROWS = 6
# the longest sleep of a linger before the queue is looked at again (a stop, a full batch)
LINGER_SLICE_S = 0.002


class DuplicateRow(Exception):
    """The row collided with a unique constraint (written concurrently by someone else)."""


class WriteFailed(Exception):
    """The database refused or could not take the batch (down, locked, out of space): nothing was written.

    ``driver_error`` names the driver's exception class, for logs and answers; its text is not kept, since a
    driver may quote the parameters (and so the record) in it.
    """

    def __init__(self, driver_error: str) -> None:
        super().__init__(driver_error)
        self.driver_error = driver_error


class WriteUnconfirmed(Exception):
    """A write neither committed nor failed within the time its caller would wait: it may yet commit."""


class RawInsert:
    """A prebuilt INSERT for one table and dialect, and the conversion of a row to driver parameters."""

    def __init__(self, table: Table, engine: Engine) -> None:
        self.table = table
        self.columns = [c for c in table.columns if not (c.primary_key and c.autoincrement is not False)]
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        names = ", ".join(c.name for c in self.columns)
        self.head = f"INSERT INTO {table.name} ({names}) VALUES "
        self.group = "(" + ", ".join(marker for _ in self.columns) + ")"
        # told the ids of the rows each commit stored, in order, once committed (see ``report_ids``)
        self.on_committed: Callable[[list[int]], None] | None = None
        # how the ids are learned: SQLite numbers the rows of one INSERT one after another (it has one writer at
        # a time), so the statement's last row id tells them all; PostgreSQL's sequence need not, so it returns them
        self._sqlite_ids = engine.dialect.name == "sqlite"
        key = next((c.name for c in table.columns if c.primary_key and c.autoincrement is not False), None)
        self._returning = "" if self._sqlite_ids or key is None else f" RETURNING {key}"
        # rows per statement: stay under SQLite's 32,766 and PostgreSQL's 65,535 bound parameters
        self.rows_per_statement = max(1, 32_000 // len(self.columns))
        sqlite = engine.dialect.name == "sqlite"
        self._convert: list[Any] = []
        for column in self.columns:
            if isinstance(column.type, JSON):
                self._convert.append(_json_blob if sqlite else _json)
            elif _python_type(column) is datetime:
                self._convert.append(sqlite_time if sqlite else _utc)
            elif sqlite and _python_type(column) is bytes:
                self._convert.append(bytearray)
            else:
                self._convert.append(None)

    def report_ids(self, on_committed: Callable[[list[int]], None]) -> None:
        """Have the writer tell ``on_committed`` (in its thread) the ids of the rows each commit stored."""
        self.on_committed = on_committed

    def execute(self, cursor: Any, rows: Sequence[tuple[Any, ...]], ids: list[int] | None) -> None:
        """Insert ``rows`` in one statement; with ``ids``, append the ids they were given."""
        sql = self.head + ", ".join(self.group for _ in rows) + (self._returning if ids is not None else "")
        cursor.execute(sql, tuple(v for r in rows for v in r))
        if ids is None:
            return
        if self._sqlite_ids:
            last = cursor.lastrowid
            ids.extend(range(last - len(rows) + 1, last + 1))
        else:
            ids.extend(sorted(int(r[0]) for r in cursor.fetchall()))

    def params(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """Driver parameters for ``row`` (keyed by column name)."""
        out = []
        for column, convert in zip(self.columns, self._convert, strict=True):
            value = row.get(column.name)
            out.append(convert(value) if convert is not None and value is not None else value)
        return tuple(out)


def _python_type(column: Any) -> type | None:
    column_type = column.type
    while isinstance(column_type, TypeDecorator):  # UtcDateTime is a DateTime underneath: convert as one
        column_type = column_type.impl_instance
    try:
        result: type = column_type.python_type
    except NotImplementedError:
        return None
    return result


def _json_blob(value: Any) -> bytearray:
    # a bytearray, not bytes: sqlite3 binds int, float, str and bytearray directly, but looks anything else up
    # in its adapter registry first, at about a microsecond a parameter (an AttributeError raised and cleared)
    return bytearray(value if isinstance(value, bytes) else orjson.dumps(value))


def _json(value: Any) -> str:
    if isinstance(value, bytes):  # already serialized by the caller
        return value.decode()
    return orjson.dumps(value).decode()


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def sqlite_time(value: datetime) -> str:
    """A time as SQLite stores it: UTC text in the format SQLAlchemy's SQLite ``DateTime`` reads back (and
    compares correctly with, as text)."""
    # the text SQLAlchemy's SQLite DATETIME writes (years zero-padded to four digits, as strftime's %Y is not), cut
    # from orjson's RFC 3339 text ('"2026-11-22T10:15:00.123000+00:00"', microseconds left out when zero): half the
    # time of isoformat, which formats each field with C's sprintf
    text = orjson.dumps(value.astimezone(UTC)).decode()
    if len(text) == 34:
        return text[1:11] + " " + text[12:27]
    return text[1:11] + " " + text[12:20] + ".000000"


_TICKETS_LOCK = threading.Lock()


class Ticket:
    """The completion of one queued write, like a ``concurrent.futures.Future`` without its per-instance
    ``Condition`` (creating one costs more than scoring's velocity step): an ``Event`` is made only if some
    caller actually blocks."""

    __slots__ = ("_callbacks", "_done", "_error", "_event")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Ticket], None]] | None = None
        self._event: threading.Event | None = None

    def done(self) -> bool:
        """True once the write committed or failed."""
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; False on timeout."""
        if self._done:
            return True
        with _TICKETS_LOCK:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The write's error, or None once it committed."""
        if not self.wait(timeout):
            raise TimeoutError("write not committed in time")
        return self._error

    def result(self, timeout: float | None = None) -> None:
        """Return once committed; raise the write's error if it failed."""
        error = self.exception(timeout)
        if error is not None:
            raise error

    def add_done_callback(self, fn: Callable[[Ticket], None]) -> None:
        """Call ``fn(ticket)`` when done (at once if it already is)."""
        with _TICKETS_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def set_result(self, _: None = None) -> None:
        """Mark committed."""
        self._finish(None)

    def set_exception(self, error: BaseException) -> None:
        """Mark failed."""
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        with _TICKETS_LOCK:
            self._error = error
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:
                log.exception("write callback failed")
        if event is not None:
            event.set()


def done_ticket() -> Ticket:
    """A ticket that is already committed (for answers replayed from storage)."""
    ticket = Ticket()
    ticket.set_result(None)
    return ticket


@dataclass(slots=True)
class _Job:
    insert: RawInsert | None  # None: a barrier, done once everything queued before it is committed
    params: tuple[Any, ...]
    future: Ticket = field(default_factory=Ticket)
    tally: Tally | None = None  # the rule hits (and shadow decision) to count with the row
    counted_as: int = 0  # the number of the event the row stores, counted in the engine's state (0: none)


_STOP = object()


class _Refused(Exception):
    """The writer's precondition refused a transaction: ``error`` is what its rows' callers get."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class GroupCommitWriter:
    """Background writer: ``submit`` queues a row and returns a future resolved after commit."""

    def __init__(self, engine: Engine, batch_max: int = 1000, linger_s: float = 0.002) -> None:
        self.engine = engine
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.writing_since: float | None = None  # monotonic time the batch being written began; None when idle
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="risk-engine-writer", daemon=True)
        self._started = False
        self._conn: Any = None  # the writer's own DBAPI connection (pool proxied), opened on first use
        self._dbapi_errors: tuple[type[BaseException], ...] = (engine.dialect.loaded_dbapi.Error,)
        self._integrity_error: type[BaseException] = engine.dialect.loaded_dbapi.IntegrityError
        # the database cannot take writes (down, locked, out of space): every row of a batch would fail alike
        self._unavailable: tuple[type[Exception], ...] = (
            engine.dialect.loaded_dbapi.OperationalError,
            engine.dialect.loaded_dbapi.InterfaceError,
        )
        self.batches = 0
        self.rows = 0
        self.on_batch: Callable[[int], None] | None = None
        # a statement run inside every batch that writes one of ``announce_tables`` (see storage.announce)
        self.announce: tuple[str, tuple[Any, ...]] | None = None
        self.announce_tables: frozenset[str] = frozenset()
        # adds the rule hits of a batch's events in its transaction (storage.rule_hits)
        self.hits: HitTally | None = None
        # run in each transaction after its rows, before the commit, given a cursor: an error it returns fails the
        # whole batch (or the row written alone), rolled back (storage.blind_index_rotation.stale_chain_guard). On
        # SQLite the transaction then holds the write lock, so nothing another process commits can come in between
        self.precondition: Callable[[Any], BaseException | None] | None = None
        # SQLite: the log is copied back beside the commits, not inside one (see storage.checkpoint)
        self._checkpointer = WalCheckpointer(engine) if engine.dialect.name == "sqlite" else None
        # Rows of counted events (``counted_as``): each event was decided with those before it in the engine's
        # state, their writes still queued. When one fails for want of the database, every event decided before
        # the engine took it back out counted an event never stored, so those rows fail too (their callers get
        # 503 and a retry is decided anew), rather than store decisions made on it.
        self.failed_counted = 0  # rows of counted events failed so far (each after its ticket's callbacks ran)
        self._repaired_failures = 0  # how many of those the engine has taken back out (``state_repaired``)
        self._tainted_through = 0  # events numbered up to this were decided before that

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if not self._started:
            self._started = True
            self._thread.start()
            if self._checkpointer is not None:
                self._checkpointer.start()

    def submit(
        self,
        insert: RawInsert,
        row: dict[str, Any],
        ticket: Ticket | None = None,
        tally: Tally | None = None,
        counted_as: int = 0,
    ) -> Ticket:
        """Queue one insert; the ticket completes after its batch commits. ``tally``: rule hits and a shadow
        decision counted (by ``hits``) in the same transaction. ``counted_as``: the number of the event the row
        stores, which the caller counted in its state when it decided it (rows so numbered are queued in number
        order); such a row fails when an earlier one did and the caller has not yet said, by
        :meth:`state_repaired`, that it decided this one without it."""
        job = _Job(insert, insert.params(row), ticket if ticket is not None else Ticket(), tally, counted_as)
        self._queue.put(job)
        return job.future

    def state_repaired(self, failures: int, through: int) -> None:
        """The caller has taken the events of the first ``failures`` failed rows of counted events (as
        ``failed_counted`` read before it began) back out of its state; it had decided the events numbered up to
        ``through`` before that, so those still queued fail too. A retraction of no new failure (a duplicate of
        another worker's row, a policy swap's cut) taints nothing."""
        if failures > self._repaired_failures:
            self._tainted_through = max(self._tainted_through, through)  # first: the writer reads them in turn
            self._repaired_failures = failures

    def _tainted(self, job: _Job) -> bool:
        """Whether a counted event's row was decided with a failed one in the state."""
        return job.counted_as > 0 and (
            self.failed_counted > self._repaired_failures or job.counted_as <= self._tainted_through
        )

    def _fail(self, job: _Job, error: BaseException) -> None:
        """Fail a row whose write the database could not take (its failure taints the counted events after it)."""
        job.future.set_exception(error)
        if job.counted_as:
            self.failed_counted += 1

    def _without_tainted(self, batch: list[_Job]) -> list[_Job]:
        """The batch less the rows of events decided with a failed one counted, which fail."""
        kept = []
        for job in batch:
            if self._tainted(job):
                self._fail(job, WriteFailed("an earlier write failed"))
            else:
                kept.append(job)
        return kept

    def barrier(self) -> Ticket:
        """A ticket done once every write queued before it has committed (or failed)."""
        if not self._started:
            return done_ticket()
        job = _Job(None, ())
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, stop, and give the connection back."""
        if self._started:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._started = False
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._conn is not None and not self._thread.is_alive():
            conn, self._conn = self._conn, None
            try:
                if self._checkpointer is not None:  # back to the pool as other connections are
                    self._pragma(conn, f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT_PAGES}")
                conn.close()
            except Exception:
                log.debug("closing the writer's connection failed", exc_info=True)

    def _run(self) -> None:
        last_rows = 0
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Job] = [first]
            stop = False
            # linger only while writes come in together: a lone write, at a light load, commits at once
            deadline = time.monotonic() + (self.linger_s if last_rows >= LINGER_FROM_ROWS else 0.0)
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    # linger briefly so concurrent callers share one commit. Asleep, not waiting on the queue:
                    # a waiting thread is woken by every row queued, each time taking the core from the callers
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    time.sleep(min(wait, LINGER_SLICE_S))
                    continue
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            last_rows = len(batch)
            if self.failed_counted > self._repaired_failures or self._tainted_through:
                batch = self._without_tainted(batch)
            self.writing_since = time.monotonic()
            try:
                if batch:
                    self._write(batch)
            except Exception:  # a fault of ours, not the database's: this batch fails, and the writer carries on
                log.exception("group commit of %d rows failed unexpectedly", len(batch))
                for job in batch:
                    if not job.future.done():  # the batch was rolled back: each caller's event is taken out
                        self._fail(job, WriteFailed("internal error"))
            finally:
                self.writing_since = None
            if stop:
                return

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self.engine.raw_connection()
            if self._checkpointer is not None:
                self._pragma(conn, "PRAGMA wal_autocheckpoint=0")
            self._conn = conn
        return self._conn

    def stalled_s(self) -> float:
        """How long the batch being written has waited for the database so far (0 when none is)."""
        since = self.writing_since
        return time.monotonic() - since if since is not None else 0.0

    @staticmethod
    def _pragma(conn: Any, sql: str) -> None:
        cursor = conn.cursor()
        try:
            cursor.execute(sql)
        finally:
            cursor.close()

    def _checkpoint_if_long(self, conn: Any) -> None:
        """Between batches: if the log has grown past ``WAL_FRAMES_LIMIT`` pages (the checkpointer's copies never
        found it all copied back when a write began), checkpoint here, so the next write starts it over."""
        if self._checkpointer is not None and self._checkpointer.log_pages > WAL_FRAMES_LIMIT:
            try:
                log_pages, copied = checkpoint(conn)
            except self._dbapi_errors as exc:
                log.debug("WAL checkpoint failed: %s", type(exc).__name__)
                return
            # a reader holding older pages stopped it short: trying again after every batch would copy nothing
            # more, so the next try waits for the checkpointer's next turn to measure the log again
            self._checkpointer.log_pages = log_pages if copied == log_pages else 0

    def _drop_connection(self) -> None:
        """Forget a connection that failed: the next batch opens a fresh one (the database may be back)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
            except Exception:
                log.debug("invalidating the writer's connection failed", exc_info=True)

    def _failed(self, exc: Exception) -> Exception:
        """What a failed write's callers get: a driver error as :class:`WriteFailed` (the connection dropped, so
        the next batch reconnects); anything else as it is."""
        self._drop_connection()
        return WriteFailed(type(exc).__name__) if isinstance(exc, self._dbapi_errors) else exc

    def _write(self, batch: Sequence[_Job]) -> None:
        try:
            conn = self._connection()
            try:
                stored = self._insert_all(conn, batch)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        except _Refused as precondition:
            for job in batch:
                self._fail(job, precondition.error)
            return
        except self._unavailable as exc:
            error = self._failed(exc)
            log.error("group commit of %d rows failed: %s", len(batch), type(exc).__name__)
            for job in batch:
                self._fail(job, error)
            return
        except Exception:
            # a row the database refused (a duplicate, a value it cannot store) or the driver could not bind:
            # one bad row must not fail its neighbours
            self._write_one_by_one(batch)
            return
        self.batches += 1
        self.rows += len(batch)
        self._report(stored)
        for job in batch:
            job.future.set_result(None)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        self._checkpoint_if_long(conn)

    def _write_one_by_one(self, batch: Sequence[_Job]) -> None:
        """Each row in its own transaction, so only the rows at fault fail; then one announcement, if a row of a
        table that has one was committed."""
        announce = False
        for job in batch:
            if job.insert is None:
                job.future.set_result(None)
                continue
            if self._tainted(job):  # a row before it failed for want of the database
                self._fail(job, WriteFailed("an earlier write failed"))
                continue
            try:
                conn = self._connection()
                try:
                    cursor = conn.cursor()
                    ids: list[int] | None = [] if job.insert.on_committed is not None else None
                    job.insert.execute(cursor, [job.params], ids)
                    self._check_precondition(cursor)
                    if job.tally is not None and self.hits is not None:
                        self.hits.execute(cursor, [job.tally])
                    cursor.close()
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
            except _Refused as precondition:
                self._fail(job, precondition.error)
            except self._integrity_error as exc:  # stored by another worker: the event is counted all the same
                job.future.set_exception(DuplicateRow(type(exc).__name__))
            except self._unavailable as exc:
                self._fail(job, self._failed(exc))
            except Exception as exc:  # this row only: the connection is still good
                log.error("a row for %s was refused: %s", job.insert.table.name, type(exc).__name__)
                refused = WriteFailed(type(exc).__name__) if isinstance(exc, self._dbapi_errors) else exc
                job.future.set_exception(refused)
            else:
                if ids is not None:
                    self._report([(job.insert, ids)])
                announce = announce or job.insert.table.name in self.announce_tables
                job.future.set_result(None)
        if announce:
            self._announce_alone()

    def _announce_alone(self) -> None:
        """Announce rows already committed, in a transaction of its own; if that fails, the other workers' polls
        find the rows a little later."""
        if self.announce is None:
            return
        try:
            conn = self._connection()
            cursor = conn.cursor()
            try:
                cursor.execute(*self.announce)
            finally:
                cursor.close()
            conn.commit()
        except Exception as exc:
            log.debug("announcing rows written one by one failed: %s", type(exc).__name__)
            self._drop_connection()

    def _check_precondition(self, cursor: Any) -> None:
        if self.precondition is not None:
            error = self.precondition(cursor)
            if error is not None:
                raise _Refused(error)

    @staticmethod
    def _report(stored: Sequence[tuple[RawInsert, list[int]]]) -> None:
        for insert, ids in stored:
            if insert.on_committed is not None and ids:
                try:
                    insert.on_committed(ids)
                except Exception:  # a listener's failure is not the write's: the rows are committed
                    log.exception("reporting the ids stored in %s failed", insert.table.name)

    def _insert_all(self, conn: Any, batch: Sequence[_Job]) -> list[tuple[RawInsert, list[int]]]:
        """One multi-row INSERT per table (and per few thousand rows): one round trip to the driver; then the
        announcement, if the batch writes a table that has one. Returns the ids stored, for the inserts that
        report them."""
        by_insert: dict[int, tuple[RawInsert, list[tuple[Any, ...]]]] = {}
        for job in batch:
            if job.insert is not None:
                by_insert.setdefault(id(job.insert), (job.insert, []))[1].append(job.params)
        stored: list[tuple[RawInsert, list[int]]] = []
        cursor = conn.cursor()
        try:
            for insert, rows in by_insert.values():
                ids: list[int] | None = [] if insert.on_committed is not None else None
                step = insert.rows_per_statement
                for start in range(0, len(rows), step):
                    insert.execute(cursor, rows[start : start + step], ids)
                if ids is not None:
                    stored.append((insert, ids))
            self._check_precondition(cursor)
            if self.hits is not None:
                self.hits.execute(cursor, (job.tally for job in batch if job.tally is not None))
            if self.announce is not None and any(i.table.name in self.announce_tables for i, _ in by_insert.values()):
                cursor.execute(*self.announce)
        finally:
            cursor.close()
        return stored
