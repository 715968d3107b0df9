"""PostgreSQL: workers announce their commits to each other (``NOTIFY``), so a follower takes another worker's
events in as soon as they commit instead of at its next poll.

The group-commit writer adds ``pg_notify(channel, origin)`` to every batch that stores events; PostgreSQL
delivers it when the batch commits, and never for a batch rolled back. Each worker's follower ``LISTEN``s on a
connection of its own and wakes on an announcement from another worker; its poll stays as the fallback (a lost
connection, a batch written row by row after a refused row). SQLite has no such channel: its workers poll.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Engine

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "risk_engine_events"
ANNOUNCE_SQL = "SELECT pg_notify(%s, %s)"
RECONNECT_AFTER_S = 5.0
MIN_FOLLOW_GAP_S = 0.02  # between two follows an announcement starts
LISTEN_SLICE_S = 0.5  # how long a follower waits for an announcement before it looks whether to stop


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


def wait_to_follow(
    listener: EventListener | None, stopping: threading.Event, poll_s: float, followed_at: float
) -> bool:
    """Block until a follower's next follow is due: ``poll_s`` after the last one ended (``followed_at``, monotonic),
    or sooner when another worker announces a commit, but no sooner than ``MIN_FOLLOW_GAP_S`` after the last
    one (under load every batch of every worker announces itself, and one follow takes them all in, where a
    follow per announcement would query the database hundreds of times a second). False once ``stopping``
    is set, which is noticed within ``LISTEN_SLICE_S``."""
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
