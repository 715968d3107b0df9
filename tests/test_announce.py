"""How a follower hears of other workers' commits (``storage.announce``): on PostgreSQL a listener, on an
SQLite file a watcher, each woken by another worker's commit and not by its own; without a database each
falls back to waiting out its timeout."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from risk_engine.storage.announce import (
    EventListener,
    SqliteCommitWatcher,
    commit_watch,
    events_channel,
    wait_to_follow,
)


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


def _events_file(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, origin TEXT)")
    return conn


def test_a_watcher_wakes_on_another_workers_commit_and_not_on_its_own(tmp_path: Path) -> None:
    other = _events_file(tmp_path / "risk.db")
    other.execute("INSERT INTO events (origin) VALUES ('worker_b')")  # before it watched: old news
    stopping = threading.Event()
    watcher = SqliteCommitWatcher(str(tmp_path / "risk.db"), "worker_a", stopping, interval_s=0.001)
    watcher.followed(1)  # a follow took another worker's events in: there are other workers
    try:
        assert watcher.wait(0.01) is False  # connects and reads where things stand
        other.execute("INSERT INTO events (origin) VALUES ('worker_a')")  # its own worker's writer
        assert watcher.wait(0.3) is False
        other.execute("BEGIN")
        other.execute("INSERT INTO events (origin) VALUES ('worker_c')")
        other.execute("ROLLBACK")  # never committed: no news
        assert watcher.wait(0.3) is False
        other.execute("INSERT INTO events (origin) VALUES ('worker_b')")
        assert watcher.wait(30) is True  # at once, long before the 30 s
        assert watcher.woken == 1
        assert watcher.wait(0.05) is False  # news once only
        other.execute("INSERT INTO events (origin) VALUES ('worker_a'), ('worker_b')")  # one batch, both
        assert watcher.wait(30) is True
    finally:
        watcher.close()
        other.close()


def test_a_watcher_watches_only_while_other_workers_events_are_being_taken_in(tmp_path: Path) -> None:
    other = _events_file(tmp_path / "risk.db")
    watcher = SqliteCommitWatcher(str(tmp_path / "risk.db"), "worker_a", threading.Event(), interval_s=0.001)
    try:
        watcher.followed(0)  # only its own events so far: one worker alone
        assert watcher.wait(0.01) is False and watcher._conn is None  # sleeps; never touches the file
        other.execute("INSERT INTO events (origin) VALUES ('worker_b')")
        assert watcher.wait(0.1) is False  # not watching: the follower's poll takes it in
        watcher.followed(1)  # ... as it did
        assert watcher.wait(0.05) is False  # watching from where things stand: that event was taken in
        other.execute("INSERT INTO events (origin) VALUES ('worker_b')")
        assert watcher.wait(30) is True
        watcher._engaged_until = time.monotonic()  # a minute without another worker's events
        other.execute("INSERT INTO events (origin) VALUES ('worker_b')")
        assert watcher.wait(0.1) is False
    finally:
        watcher.close()
        other.close()


def test_a_watcher_stops_waiting_once_stopping_is_set(tmp_path: Path) -> None:
    _events_file(tmp_path / "risk.db").close()
    stopping = threading.Event()
    watcher = SqliteCommitWatcher(str(tmp_path / "risk.db"), "worker_a", stopping)
    watcher.followed(1)
    answers: list[bool] = []
    waiting = threading.Thread(target=lambda: answers.append(watcher.wait(120)))
    waiting.start()
    stopping.set()
    waiting.join(30)
    assert not waiting.is_alive() and answers == [False]  # well before its two minutes
    watcher.close()


def test_a_watcher_of_an_unreadable_database_waits_out_its_timeout_and_says_no(tmp_path: Path) -> None:
    (tmp_path / "risk.db").write_bytes(b"not a database, " * 100)
    watcher = SqliteCommitWatcher(str(tmp_path / "risk.db"), "worker_a", threading.Event())
    watcher.followed(1)
    assert watcher.wait(0.05) is False
    assert watcher._conn is None and watcher._failed_at > 0


def test_each_database_gets_its_own_kind_of_watch(tmp_path: Path) -> None:
    stopping = threading.Event()
    on_file = commit_watch(create_engine(f"sqlite:///{tmp_path / 'risk.db'}"), "a", stopping)
    assert isinstance(on_file, SqliteCommitWatcher) and on_file.path == str(tmp_path / "risk.db")
    assert commit_watch(create_engine("sqlite://"), "a", stopping) is None  # in memory: one connection's own
    on_postgres = commit_watch(create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none"), "a", stopping)
    assert isinstance(on_postgres, EventListener)


def test_deployments_in_schemas_of_their_own_do_not_wake_each_other(pg_schema_url: str, tmp_path: Path) -> None:
    """A channel is shared by a whole PostgreSQL database: each schema's workers announce and listen on a
    channel of their own, so a busy deployment beside another does not wake its followers for nothing."""
    from risk_engine.engine import RiskEngine
    from tests.conftest import fresh_schema, make_settings

    with fresh_schema() as other_url:
        ours, theirs = create_engine(pg_schema_url), create_engine(other_url)
        listener = None
        try:
            channel = events_channel(ours)
            assert channel == events_channel(ours) != events_channel(theirs)  # the same on every connection
            listener = EventListener(ours, "worker_a", channel=channel)
            assert listener.wait(0.01) is False  # connects and listens
            with theirs.begin() as conn:
                conn.execute(text("SELECT pg_notify(:channel, 'worker_b')"), {"channel": events_channel(theirs)})
            assert listener.wait(0.3) is False
            with ours.begin() as conn:
                conn.execute(text("SELECT pg_notify(:channel, 'worker_b')"), {"channel": channel})
            assert listener.wait(30) is True
            engine = RiskEngine.open(make_settings(tmp_path / "var", pg_schema_url, policy_poll_s=0))
            try:
                assert engine.writer.announce is not None and engine.writer.announce[1][0] == channel
            finally:
                engine.close()
        finally:
            if listener is not None:
                listener.close()
            ours.dispose()
            theirs.dispose()
