"""The group-commit writer on a real database: one bad row fails alone, a failed batch writes nothing, and the
writer recovers once the database takes writes again."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, UniqueConstraint, func, select

from risk_engine.service.commits import CommitWaiter
from risk_engine.storage.checkpoint import checkpoint
from risk_engine.storage.db import make_engine
from risk_engine.storage.writer import DuplicateRow, GroupCommitWriter, RawInsert, Ticket, WriteFailed, sqlite_time
from tests.helpers import wait_until

metadata = MetaData()
items = Table(
    "writer_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(32), nullable=False),
    Column("value", Integer, nullable=False),
    UniqueConstraint("name", name="uq_writer_items_name"),
)


def _names(engine: object) -> list[str]:
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return list(conn.execute(select(items.c.name).order_by(items.c.name)).scalars())


@contextmanager
def _writer(
    database_url: str, linger_s: float = 0.05, busy_timeout_s: float = 5.0
) -> Iterator[tuple[Engine, RawInsert, GroupCommitWriter]]:
    """A started writer on the ``writer_items`` table, which is dropped afterwards."""
    engine = make_engine(database_url, busy_timeout_s=busy_timeout_s)
    metadata.create_all(engine)
    writer = GroupCommitWriter(engine, linger_s=linger_s)
    writer.start()
    try:
        yield engine, RawInsert(items, engine), writer
    finally:
        writer.close()
        metadata.drop_all(engine)
        engine.dispose()


def test_a_duplicate_fails_alone_and_its_batch_neighbours_commit(database_url: str) -> None:
    with _writer(database_url) as (engine, insert, writer):
        writer.submit(insert, {"name": "a", "value": 1}).result(10)
        # queued together, so the writer takes them as one batch
        tickets = [writer.submit(insert, {"name": n, "value": i}) for i, n in enumerate(["b", "a", "c"])]
        results = []
        for ticket in tickets:
            error = ticket.exception(10)
            results.append(type(error) if error else None)
        assert results == [None, DuplicateRow, None]
        assert _names(engine) == ["a", "b", "c"]
        with engine.connect() as conn:
            assert conn.execute(select(items.c.value).where(items.c.name == "a")).scalar_one() == 1  # not replaced


def test_a_fault_in_the_writer_thread_does_not_stop_it(database_url: str) -> None:
    """The writer thread must outlive a fault of its own code, here a batch listener that raises once the batch
    has committed: the thread died of it, and every later write waited forever, the service answering nothing."""
    with _writer(database_url) as (engine, insert, writer):
        faults = iter([RuntimeError("a listener's fault")])

        def listener(_: int) -> None:
            fault = next(faults, None)
            if fault is not None:
                raise fault

        writer.on_batch = listener
        assert writer.submit(insert, {"name": "a", "value": 1}).exception(10) is None  # it committed before
        assert writer.submit(insert, {"name": "b", "value": 2}).exception(10) is None  # the writer carried on
        assert _names(engine) == ["a", "b"]


def test_the_ids_of_committed_rows_are_reported_and_only_theirs(database_url: str) -> None:
    with _writer(database_url) as (engine, insert, writer):
        reported: list[list[int]] = []
        insert.report_ids(reported.append)
        tickets = [writer.submit(insert, {"name": f"n{i}", "value": i}) for i in range(40)]  # batched
        for ticket in tickets:
            ticket.result(10)
        # a batch with a duplicate is written row by row: the refused row's id is not reported
        tickets = [writer.submit(insert, {"name": n, "value": 0}) for n in ["x", "n3", "y"]]
        assert [type(t.exception(10)) for t in tickets] == [type(None), DuplicateRow, type(None)]
        with engine.connect() as conn:
            stored = dict(conn.execute(select(items.c.name, items.c.id)).all())
        ids = [i for batch in reported for i in batch]
        assert ids == sorted(ids) and all(batch == sorted(batch) for batch in reported)
        assert ids == sorted(stored.values())  # each committed row once, none other
        assert stored["y"] in reported[-1] and stored["x"] in ids


def test_rows_written_one_by_one_are_announced_once_committed(pg_schema_url: str) -> None:
    """A batch with a refused row is written row by row; the rows that commit are still announced, so other
    workers' followers take them in at once rather than at their next poll."""
    import uuid

    from risk_engine.storage.announce import ANNOUNCE_SQL, EventListener

    channel = "t_" + uuid.uuid4().hex[:12]
    with _writer(pg_schema_url) as (engine, insert, writer):
        writer.announce = (ANNOUNCE_SQL, (channel, "worker_a"))
        writer.announce_tables = frozenset({items.name})
        writer.submit(insert, {"name": "a", "value": 1}).result(10)
        listener = EventListener(engine, "worker_b", channel=channel)
        try:
            assert listener.wait(0.01) is False  # connects and listens
            tickets = [writer.submit(insert, {"name": n, "value": 0}) for n in ["b", "a", "c"]]  # one batch
            assert [type(t.exception(10)) for t in tickets] == [type(None), DuplicateRow, type(None)]
            assert listener.wait(5) is True
            refused = writer.submit(insert, {"name": "a", "value": 2})  # alone, refused: nothing to announce
            assert type(refused.exception(10)) is DuplicateRow
            assert listener.wait(0.3) is False
        finally:
            listener.close()


def test_a_row_the_database_cannot_store_fails_alone(database_url: str) -> None:
    # 2**70 does not fit an INTEGER: sqlite3 refuses to bind it, PostgreSQL answers "integer out of range"
    with _writer(database_url) as (engine, insert, writer):
        tickets = [writer.submit(insert, {"name": n, "value": v}) for n, v in [("p", 1), ("q", 2**70), ("r", 3)]]
        errors = [ticket.exception(10) for ticket in tickets]
        assert errors[0] is None and errors[2] is None, errors
        assert errors[1] is not None
        assert _names(engine) == ["p", "r"]
        writer.submit(insert, {"name": "s", "value": 4}).result(10)  # and the writer goes on
        assert _names(engine) == ["p", "r", "s"]


def test_a_refusing_precondition_fails_the_whole_batch_and_writes_none_of_it(database_url: str) -> None:
    """The precondition runs in each transaction after its rows (it counts them, uncommitted): what it returns is
    every row's error, and the rows are rolled back."""
    refusal = RuntimeError("the chain moved")
    seen: list[int] = []

    def refuse(cursor: object) -> BaseException | None:
        cursor.execute(f"SELECT count(*) FROM {items.name}")  # type: ignore[attr-defined]
        seen.append(int(cursor.fetchone()[0]))  # type: ignore[attr-defined]
        return refusal

    with _writer(database_url) as (engine, insert, writer):
        writer.submit(insert, {"name": "a", "value": 1}).result(10)
        writer.precondition = refuse
        tickets = [writer.submit(insert, {"name": n, "value": i}) for i, n in enumerate(["b", "c", "d"])]
        assert [ticket.exception(10) for ticket in tickets] == [refusal] * 3
        assert _names(engine) == ["a"]
        assert seen and all(count > 1 for count in seen), seen  # its batch's rows, inside its transaction
        writer.precondition = lambda cursor: None
        writer.submit(insert, {"name": "e", "value": 5}).result(10)
        assert _names(engine) == ["a", "e"]


@contextmanager
def _sqlite_writer_and_locker(
    path: Path, busy_timeout_s: float, linger_s: float = 0.05
) -> Iterator[tuple[Engine, RawInsert, GroupCommitWriter, sqlite3.Connection]]:
    """A started writer on an SQLite file, and another connection to take its write lock with."""
    with _writer(f"sqlite:///{path}", linger_s=linger_s, busy_timeout_s=busy_timeout_s) as (engine, insert, writer):
        locker = sqlite3.connect(path, timeout=5)
        try:
            yield engine, insert, writer, locker
        finally:
            locker.close()


def test_a_locked_database_fails_the_batch_whole_and_the_writer_recovers(tmp_path: Path) -> None:
    with _sqlite_writer_and_locker(tmp_path / "w.db", busy_timeout_s=0.1) as (engine, insert, writer, locker):
        writer.submit(insert, {"name": "before", "value": 0}).result(10)
        locker.execute("BEGIN EXCLUSIVE")
        failed = [writer.submit(insert, {"name": f"x{i}", "value": i}) for i in range(3)]
        errors = [t.exception(10) for t in failed]
        assert all(isinstance(e, WriteFailed) for e in errors), errors
        assert {e.driver_error for e in errors if isinstance(e, WriteFailed)} == {"OperationalError"}
        locker.rollback()
        writer.submit(insert, {"name": "after", "value": 9}).result(10)
        assert _names(engine) == ["after", "before"]  # none of the failed batch, half or whole
        assert writer.rows == 2


def test_counted_rows_decided_while_a_failed_one_was_counted_fail_too_and_no_others(tmp_path: Path) -> None:
    """Rows of counted events (numbered) queued behind one that fails for want of the database fail with it
    until the engine says it took that one back out (``state_repaired``); a row not counted, a row numbered
    after that, and rows queued while the engine applies a retraction of no failed row (a duplicate's) commit."""
    with _sqlite_writer_and_locker(tmp_path / "t.db", busy_timeout_s=2, linger_s=0.0) as (
        engine,
        insert,
        writer,
        locker,
    ):

        def stalled_then(*rows: tuple[str, int]) -> list[Ticket]:
            """The first row's batch waits for the lock; the others queue behind it."""
            first = writer.submit(insert, {"name": rows[0][0], "value": 0}, counted_as=rows[0][1])
            assert wait_until(lambda: writer.writing_since is not None, timeout=10)
            return [first] + [writer.submit(insert, {"name": n, "value": 0}, counted_as=c) for n, c in rows[1:]]

        writer.submit(insert, {"name": "a", "value": 0}, counted_as=1).result(10)
        locker.execute("BEGIN EXCLUSIVE")
        b, c = stalled_then(("b", 2), ("c", 3))
        writer.state_repaired(writer.failed_counted, 3)  # a duplicate's retraction applied: no failure among them
        locker.rollback()  # before the busy timeout: b commits
        assert b.exception(10) is None and c.exception(10) is None
        locker.execute("BEGIN EXCLUSIVE")
        d, e, uncounted = stalled_then(("d", 4), ("e", 5), ("g", 0))
        assert isinstance(d.exception(10), WriteFailed)
        locker.rollback()  # e could be written now, but it was decided with d counted
        error = e.exception(10)
        assert isinstance(error, WriteFailed) and error.driver_error == "an earlier write failed"
        assert uncounted.exception(10) is None
        writer.state_repaired(writer.failed_counted, 5)  # d and e taken back out; 6 on decided without them
        writer.submit(insert, {"name": "f", "value": 0}, counted_as=6).result(10)
        assert _names(engine) == ["a", "b", "c", "f", "g"]


def test_a_barrier_waits_for_what_was_queued_before_it(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    metadata.create_all(engine)
    insert = RawInsert(items, engine)
    writer = GroupCommitWriter(engine, linger_s=0.2)
    writer.start()
    try:
        for i in range(50):
            writer.submit(insert, {"name": f"n{i}", "value": i})
        assert writer.barrier().wait(10)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(items)).scalar_one() == 50
    finally:
        writer.close()
        engine.dispose()


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5))])))
def test_sqlite_time_is_the_text_sqlalchemy_writes(when: datetime) -> None:
    from sqlalchemy.dialects.sqlite import DATETIME, dialect

    sqlalchemy_text = DATETIME().bind_processor(dialect())
    assert sqlite_time(when) == sqlalchemy_text(when.astimezone(UTC).replace(tzinfo=None))


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        datetime(2026, 11, 22, 18, 0, 0, 123, tzinfo=timezone(timedelta(hours=8))),
    ],
)
def test_times_are_stored_in_the_format_sqlalchemy_reads_back(tmp_path: Path, when: datetime) -> None:
    from sqlalchemy import DateTime

    table = Table("writer_times", MetaData(), Column("id", Integer, primary_key=True), Column("at", DateTime()))
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    table.metadata.create_all(engine)
    writer = GroupCommitWriter(engine)
    writer.start()
    try:
        writer.submit(RawInsert(table, engine), {"at": when}).result(10)
        with engine.connect() as conn:
            assert conn.execute(select(table.c.at)).scalar_one() == when.astimezone(UTC).replace(tzinfo=None)
    finally:
        writer.close()
        engine.dispose()


def test_sqlite_checkpoints_run_beside_the_commits_not_inside_them(tmp_path: Path) -> None:
    """The writer's commits do not copy the log back (its connection checkpoints nothing by itself); the
    checkpointer thread does, so the rows reach the database file; the writer's connection goes back to the
    pool checkpointing as SQLite does by default."""
    path = tmp_path / "w.db"
    engine = make_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    writer = GroupCommitWriter(engine, linger_s=0.05)
    writer.start()
    try:
        insert = RawInsert(items, engine)
        writer.submit(insert, {"name": "first", "value": 0}).result(10)
        own = writer._connection().dbapi_connection
        assert own.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        before = path.stat().st_size
        tickets = [writer.submit(insert, {"name": f"{'x' * 30}{i}", "value": i}) for i in range(20_000)]
        for ticket in tickets:
            ticket.result(30)
        checkpointer = writer._checkpointer
        assert checkpointer is not None
        turns = checkpointer.checkpoints
        deadline = time.monotonic() + 30
        while checkpointer.checkpoints < turns + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size > before + 500_000  # copied back from the log by the checkpointer
    finally:
        writer.close()
    assert own.execute("PRAGMA wal_autocheckpoint").fetchone() == (1_000,)  # back in the pool as the others are
    metadata.drop_all(engine)
    engine.dispose()


def test_a_log_past_its_limit_is_checkpointed_by_the_writer_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer busy without pause leaves the checkpointer no moment when the whole log is copied back, so the
    log would never start over: past the limit the writer checkpoints itself after a batch."""
    path = tmp_path / "w.db"
    with _writer(f"sqlite:///{path}") as (_, insert, writer):
        checkpointer = writer._checkpointer
        assert checkpointer is not None
        checkpointer.stop()  # by hand below
        monkeypatch.setattr("risk_engine.storage.writer.WAL_FRAMES_LIMIT", 10**9)
        tickets = [writer.submit(insert, {"name": f"{'x' * 30}{i}", "value": i}) for i in range(5_000)]
        for ticket in tickets:
            ticket.result(30)
        in_log_only = path.stat().st_size
        checkpointer.log_pages = 1
        writer.submit(insert, {"name": "under", "value": 0}).result(10)
        writer.barrier().result(10)  # a batch of its own: after the one before it has checkpointed, or not
        assert path.stat().st_size == in_log_only  # under the limit: the writer leaves the log alone
        monkeypatch.setattr("risk_engine.storage.writer.WAL_FRAMES_LIMIT", 0)
        writer.submit(insert, {"name": "past", "value": 0}).result(10)
        writer.barrier().result(10)
        assert path.stat().st_size > in_log_only + 100_000  # past it: the writer copied the log back


def test_a_checkpoint_a_reader_holds_back_is_not_retried_after_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long read (a backtest streaming rows) keeps the log from being copied back whole: the writer then
    tries once, and leaves the next try to the checkpointer's next look at the log, not to every batch."""
    import risk_engine.storage.writer as writer_module

    path = tmp_path / "w.db"
    tries: list[tuple[int, int]] = []

    def counted(conn: object) -> tuple[int, int]:
        tries.append(checkpoint(conn))
        return tries[-1]

    with _writer(f"sqlite:///{path}") as (_, insert, writer):
        checkpointer = writer._checkpointer
        assert checkpointer is not None
        checkpointer.stop()  # by hand below
        writer.submit(insert, {"name": "before", "value": 0}).result(10)
        reader = sqlite3.connect(path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM writer_items").fetchone()  # holds the log as it is now
        try:
            for i in range(50):
                writer.submit(insert, {"name": f"{'x' * 30}{i}", "value": i}).result(10)
            monkeypatch.setattr(writer_module, "WAL_FRAMES_LIMIT", 0)
            monkeypatch.setattr(writer_module, "checkpoint", counted)
            checkpointer.log_pages = 1
            for name in ("a", "b", "c"):
                writer.submit(insert, {"name": name, "value": 0}).result(10)
                writer.barrier().result(10)
            assert len(tries) == 1 and tries[0][1] < tries[0][0]  # stopped short by the reader, tried once
        finally:
            reader.rollback()
            reader.close()


def test_a_lone_write_is_committed_without_waiting_for_company(tmp_path: Path) -> None:
    """The linger is for writes that come in together: one at a time, each commits at once, however long the
    linger (here a minute, which a lingering writer would wait out before each of these commits)."""
    with _writer(f"sqlite:///{tmp_path / 'lone.db'}", linger_s=60.0) as (_, insert, writer):
        for i in range(3):
            assert writer.submit(insert, {"name": f"n{i}", "value": i}).wait(30)
        assert writer.batches == 3


def test_a_commit_wait_ends_with_its_commit_or_its_timeout_and_no_wait_is_kept_after() -> None:
    """The service's waits for commits: each ends when its write is done, or after the timeout with the write
    still pending; the waits are forgotten either way (kept, each request would leak one)."""

    async def run() -> None:
        waiter = CommitWaiter(asyncio.get_running_loop(), timeout_s=0.3)
        committed = [Ticket() for _ in range(200)]
        stalled = Ticket()
        waits = [waiter.wait(t) for t in committed] + [waiter.wait(stalled)]
        for ticket in committed:
            ticket.set_result(None)
        await asyncio.wait_for(asyncio.gather(*waits[:-1]), 5)
        assert not waits[-1].done() and waiter.timed_out == 0  # the commits did not end the stalled wait
        await asyncio.wait_for(waits[-1], 5)
        assert not stalled.done() and waiter.timed_out == 1  # ended by the timeout, the write left pending
        assert not waiter._waiters and not waiter._deadlines and not waiter._sweeping
        late = Ticket()
        wait = waiter.wait(late)  # the timer starts again for a new wait
        late.set_result(None)
        await asyncio.wait_for(wait, 5)
        await asyncio.sleep(0.5)
        assert waiter.timed_out == 1 and not waiter._waiters and not waiter._sweeping

    asyncio.run(run())
