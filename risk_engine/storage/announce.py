"""How a worker's follower hears that another worker committed events, so it takes them in as soon as they
commit instead of at its next poll (which stays as the fallback).

PostgreSQL: workers announce their commits (``NOTIFY``) on a channel of their schema's. The group-commit
writer adds ``pg_notify(channel, origin)`` to every batch that stores events; PostgreSQL delivers it when the
batch commits, and never for a batch rolled back (a batch written row by row after a refused row is announced
once, after its rows). Each worker's follower ``LISTEN``s on a connection of its own and wakes on an
announcement from another worker.

SQLite (a file): nothing is announced; a follower watches, while there are other workers. ``PRAGMA
data_version`` changes when another connection commits, and reading it touches no table, so the follower
reads it every ``WATCH_INTERVAL_S``; when it changed, one look at the events stored since tells another
worker's commit from this worker's own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import threading
import time
from typing import Any, Protocol

from sqlalchemy import Engine

from risk_engine.storage.db import sqlite_file

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "risk_engine_events"
ANNOUNCE_SQL = "SELECT pg_notify(%s, %s)"
RECONNECT_AFTER_S = 5.0
MIN_FOLLOW_GAP_S = 0.02  # between two follows an announcement starts
LISTEN_SLICE_S = 0.5  # how long a follower waits for an announcement before it looks whether to stop
WATCH_INTERVAL_S = 0.01  # SQLite: how often a follower reads data_version


class CommitWatch(Protocol):
    """What a follower waits on between polls: news that another worker committed events."""

    woken: int  # how many times another worker's commit woke it

    def wait(self, timeout: float) -> bool:
        """True as soon as another worker committed events; False after ``timeout`` without."""

    def followed(self, taken: int) -> None:
        """A follow just took ``taken`` of the other workers' events in."""

    def close(self) -> None:
        """Release the connection it holds."""


def announces(engine: Engine) -> bool:
    """True if this database can carry announcements (PostgreSQL through psycopg)."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


class EventListener:
    """Waits for another worker's announcement that it committed events.

    ``wait`` returns True as soon as one arrives, False when ``timeout`` passes without one (or while the
    database cannot be reached: it then sleeps the timeout, and reconnects after ``RECONNECT_AFTER_S``).
    Announcements from this worker's own ``origin`` are ignored.
    """

    def __init__(self, engine: Engine, origin: str, channel: str = EVENTS_CHANNEL) -> None:
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.origin = origin
        self.channel = channel
        self.woken = 0  # announcements from other workers that woke it
        self._conn: Any = None
        self._failed_at = 0.0

    def _connect(self) -> Any:
        if self._conn is None and time.monotonic() - self._failed_at >= RECONNECT_AFTER_S:
            import psycopg

            try:
                conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
                conn.execute(f'LISTEN "{self.channel}"')
            except psycopg.Error as exc:
                self._failed_at = time.monotonic()
                log.warning("cannot listen for other workers' commits (%s); polling only", type(exc).__name__)
                return None
            self._conn = conn
        return self._conn

    def wait(self, timeout: float) -> bool:
        """Block until another worker announces a commit (True) or ``timeout`` seconds pass (False)."""
        import psycopg

        conn = self._connect()
        if conn is None:
            time.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        woke = False
        try:
            while not woke and (left := deadline - time.monotonic()) > 0:
                notes = conn.notifies(timeout=left, stop_after=1)
                try:
                    woke = any(note.payload != self.origin for note in notes)
                finally:
                    notes.close()  # the generator holds the connection's lock until closed
            if woke:
                self._drain(conn)
                self.woken += 1
        except psycopg.Error as exc:
            log.warning("listening for other workers' commits failed (%s); polling only", type(exc).__name__)
            self.close()
            self._failed_at = time.monotonic()
        return woke

    def followed(self, taken: int) -> None:
        """Listening costs nothing while nothing is announced: it listens whatever a follow took in."""

    @staticmethod
    def _drain(conn: Any) -> None:
        """Drop the announcements already queued: one follow reads every event they announce."""
        notes = conn.notifies(timeout=0.0)
        try:
            for _ in notes:
                pass
        finally:
            notes.close()

    def close(self) -> None:
        """Stop listening."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the listening connection failed", exc_info=True)


class SqliteCommitWatcher:
    """Watches an SQLite database file for events another worker committed.

    ``wait`` reads ``PRAGMA data_version`` every ``interval_s`` on a connection of its own (autocommit, so it
    never holds a read transaction that would stop a checkpoint). When it changed, something committed: this
    worker's writer, another worker, or a checkpoint. The events stored since the last look tell which; SQLite
    commits one writer at a time, so ids commit in order and "stored since" is "id above the highest seen".

    Waking every 10 ms costs a few percent of a core here even when nothing happens, so it watches only while
    there are other workers: for ``ENGAGED_FOR_S`` after a follow took in another worker's events
    (:meth:`followed`). Otherwise ``wait`` sleeps out its timeout, as the poll alone would, and a single
    worker pays nothing. ``wait`` returns early, False, once ``stopping`` is set.
    """

    ENGAGED_FOR_S = 60.0

    def __init__(self, path: str, origin: str, stopping: threading.Event, interval_s: float = WATCH_INTERVAL_S) -> None:
        self.path = path
        self.origin = origin
        self.stopping = stopping
        self.interval_s = interval_s
        self.woken = 0
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None  # None: read where things stand at the next look
        self._highest_id = 0
        self._engaged_until = -math.inf
        self._failed_at = -RECONNECT_AFTER_S

    def followed(self, taken: int) -> None:
        """A follow took ``taken`` of the other workers' events in: if any, watch for the next minute."""
        if taken > 0:
            if not self.engaged:
                self._version = None  # what committed while it was not watching, that follow has read
            self._engaged_until = time.monotonic() + self.ENGAGED_FOR_S

    @property
    def engaged(self) -> bool:
        """Whether it is watching (another worker's events were taken in lately)."""
        return time.monotonic() < self._engaged_until

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is None and time.monotonic() - self._failed_at >= RECONNECT_AFTER_S:
            try:
                # used by one thread at a time: the follower's, then whichever closes it
                self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=1.0, check_same_thread=False)
            except sqlite3.Error as exc:
                self._failed_at = time.monotonic()
                log.warning("cannot watch for other workers' commits (%s); polling only", type(exc).__name__)
        return self._conn

    def _another_committed(self, conn: sqlite3.Connection) -> bool:
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if self._version is None:
            self._version = version
            self._highest_id = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            return False
        if version == self._version:
            return False
        self._version = version
        highest, others = conn.execute(
            "SELECT max(id), max(origin IS NOT ?) FROM events WHERE id > ?", (self.origin, self._highest_id)
        ).fetchone()
        if highest is not None:
            self._highest_id = highest
        return bool(others)

    def wait(self, timeout: float) -> bool:
        """Block until another worker has committed events (True), ``timeout`` passes or stopping is set
        (False)."""
        deadline = time.monotonic() + timeout
        conn = self._connect() if self.engaged else None
        if conn is None:
            self.stopping.wait(timeout)
            return False
        try:
            while not self._another_committed(conn):
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping.wait(min(self.interval_s, left)):
                    return False
        except sqlite3.Error as exc:  # the file is locked for long, or gone: poll until it reconnects
            log.warning("watching for other workers' commits failed (%s); polling only", type(exc).__name__)
            self.close()
            self._version = None
            self._failed_at = time.monotonic()
            return False
        self.woken += 1
        return True

    def close(self) -> None:
        """Stop watching."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def events_channel(engine: Engine) -> str:
    """The channel a deployment's workers announce on: one per schema (a channel is shared by a whole PostgreSQL
    database), so deployments in schemas of their own do not wake each other's followers. Reads the schema."""
    with engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
    if not schema:  # no schema of the search path exists yet: nothing can be stored to announce
        return EVENTS_CHANNEL
    return f"{EVENTS_CHANNEL}_{hashlib.sha256(str(schema).encode()).hexdigest()[:16]}"


def commit_watch(
    engine: Engine, origin: str, stopping: threading.Event, channel: str = EVENTS_CHANNEL
) -> CommitWatch | None:
    """What tells this database's follower of other workers' commits: a listener on PostgreSQL (psycopg) on
    ``channel``, a watcher on an SQLite file; None (the poll alone) elsewhere, as for an in-memory SQLite
    database."""
    if announces(engine):
        return EventListener(engine, origin, channel)
    database = sqlite_file(engine)
    if database is not None and not database.startswith("file:"):  # a URI: not a path sqlite3 would open
        return SqliteCommitWatcher(database, origin, stopping)
    return None


def wait_to_follow(listener: CommitWatch | None, stopping: threading.Event, poll_s: float, followed_at: float) -> bool:
    """Block until a follower's next follow is due: ``poll_s`` after the last one ended (``followed_at``, monotonic),
    or sooner when ``listener`` hears of another worker's commit, but no sooner than ``MIN_FOLLOW_GAP_S`` after
    the last one (under load every batch of every worker is news, and one follow takes them all in, where a
    follow per batch would query the database hundreds of times a second). False once ``stopping`` is set,
    which is noticed within ``LISTEN_SLICE_S``."""
    if listener is None:
        return not stopping.wait(max(0.0, followed_at + poll_s - time.monotonic()))
    due = followed_at + poll_s
    while not stopping.is_set():
        left = due - time.monotonic()
        if left <= 0:
            return True
        if listener.wait(min(LISTEN_SLICE_S, left)):
            rest = followed_at + MIN_FOLLOW_GAP_S - time.monotonic()
            return not (rest > 0 and stopping.wait(rest))
    return False
