"""PostgreSQL announcements between workers (``storage.announce``): a listener wakes on another worker's
commit, not on its own, and without a database it falls back to waiting out its timeout."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import create_engine, text

from risk_engine.storage.announce import EventListener, wait_to_follow


def test_a_listener_wakes_on_another_workers_announcement_and_not_on_its_own(pg_schema_url: str) -> None:
    engine = create_engine(pg_schema_url)
    channel = "t_" + uuid.uuid4().hex[:12]
    listener = EventListener(engine, "worker_a", channel=channel)

    def announce(origin: str) -> None:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:channel, :origin)"), {"channel": channel, "origin": origin})

    try:
        assert listener.wait(0.01) is False  # connects and listens
        announce("worker_a")
        assert listener.wait(0.3) is False  # its own commit
        announce("worker_b")
        assert listener.wait(30) is True  # at once, long before the 30 s
        assert listener.woken == 1
        with engine.begin() as conn:  # announced in a transaction rolled back: never delivered
            conn.execute(text("SELECT pg_notify(:channel, 'worker_c')"), {"channel": channel})
            conn.rollback()
        assert listener.wait(0.3) is False
    finally:
        listener.close()
        engine.dispose()


def test_a_listener_without_a_database_waits_out_its_timeout_and_says_no() -> None:
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    listener = EventListener(engine, "worker_a")
    assert listener.wait(0.05) is False
    assert listener._conn is None and listener._failed_at > 0
    engine.dispose()


def test_a_follow_is_due_at_its_poll_at_an_announcement_and_never_once_stopping(pg_schema_url: str) -> None:
    engine = create_engine(pg_schema_url)
    channel = "t_" + uuid.uuid4().hex[:12]
    listener = EventListener(engine, "worker_a", channel=channel)
    stopping = threading.Event()
    try:
        assert wait_to_follow(None, stopping, 0.01, time.monotonic())  # SQLite: the poll alone
        assert wait_to_follow(listener, stopping, 0.05, time.monotonic())  # no announcement: the poll
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:channel, 'worker_b')"), {"channel": channel})
        assert wait_to_follow(listener, stopping, 60.0, time.monotonic())  # long before the minute's poll
        stopping.set()
        assert not wait_to_follow(listener, stopping, 60.0, time.monotonic())
        assert not wait_to_follow(None, stopping, 60.0, time.monotonic())
    finally:
        listener.close()
        engine.dispose()
