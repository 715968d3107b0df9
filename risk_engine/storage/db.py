"""Database connection and migrations (SQLite file by default, PostgreSQL when the URL says so)."""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, Engine, create_engine, event, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

MIGRATIONS = Path(__file__).parent / "migrations"
RACE_ATTEMPTS = 5  # tries at a write that concurrent writers may race for (a version number, seeded entries)


class DatabaseUnavailable(Exception):
    """The database cannot be reached or refused a write: answer 503, never a guess."""


def _sqlite_pragmas(busy_timeout_s: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _postgres_connect_args(busy_timeout_s: float) -> dict[str, int]:
    """libpq's settings for a connection that notices a dead server or network within about the busy timeout,
    where it would otherwise wait for the kernel's retransmissions to give up (a quarter of an hour): data sent
    and not acknowledged for that long ends it (``tcp_user_timeout``), and so do keepalive probes unanswered on
    a connection waiting for an answer. A server that is alive acknowledges both, however long its query runs."""
    seconds = max(1, round(busy_timeout_s))
    return {
        "connect_timeout": seconds,
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": seconds * 1000,
    }


def _postgres_session(busy_timeout_s: float) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # every statement waits for another transaction's lock at most the busy timeout, then fails (a 503), as
        # SQLite's busy timeout has every statement there; without it a write waits as long as the lock is held
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {max(1, round(busy_timeout_s * 1000))}")
        dbapi_connection.commit()

    return on_connect


def lock_wait_timed_out(exc: DBAPIError) -> bool:
    """Whether the database refused ``exc``'s statement because another client held a lock it waited for longer
    than the busy timeout (PostgreSQL's lock_not_available, SQLite's busy): a busy database, not an absent one."""
    if getattr(exc.orig, "sqlstate", None) == "55P03":
        return True
    return getattr(exc.orig, "sqlite_errorname", None) in ("SQLITE_BUSY", "SQLITE_LOCKED")


def make_engine(url: str, busy_timeout_s: float = 5.0) -> Engine:
    """A SQLAlchemy engine. SQLite gets WAL mode and its parent directory created; on either database a
    statement waits for a lock at most ``busy_timeout_s`` (migrations excepted: they wait their turn)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
        )
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_s))
        return engine
    engine = create_engine(
        url,
        connect_args=_postgres_connect_args(busy_timeout_s),
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )
    event.listen(engine, "connect", _postgres_session(busy_timeout_s))
    return engine


def alembic_config(engine: Engine) -> Config:
    """Alembic configuration pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # configparser treats % as interpolation: escape it (URLs carry %-encoded options)
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


# PostgreSQL advisory lock held while migrating ("riskeng1"): database-wide, released with the transaction
MIGRATION_LOCK = int.from_bytes(b"riskeng1", "big")


def sqlite_file(engine: Engine) -> str | None:
    """The database file of an SQLite engine; None for another database, or for SQLite in memory."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        return database
    return None


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. Processes starting together take turns, the first migrating
    and the rest finding the schema done (concurrent upgrades collided creating the same tables): on
    PostgreSQL under an advisory lock; on SQLite, whose driver runs DDL outside any transaction, under a lock
    on the file ``<database>.migrate-lock`` beside it."""
    database = sqlite_file(engine)
    if database is not None:
        with open(f"{database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            _upgrade(engine)
    else:
        _upgrade(engine)


def _upgrade(engine: Engine) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SET LOCAL lock_timeout = 0"))  # a concurrent migration may take a while
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


T = TypeVar("T")


def retry_on_race(write: Callable[[], T]) -> T:
    """Run ``write`` (one transaction) again when a concurrent writer took the unique value it wrote, a version
    number or a seeded entry, first: each attempt reads afresh what is stored (up to ``RACE_ATTEMPTS``)."""
    for _ in range(RACE_ATTEMPTS - 1):
        try:
            return write()
        except IntegrityError:
            continue
    return write()


def hold_rows(s: Session, column: InstrumentedAttribute[Any], *where: ColumnElement[bool]) -> None:
    """Hold the rows ``where`` selects, of ``column``'s table, until the session's transaction ends, before
    reading them to decide a write: two workers deciding at once then take turns, the second reading what the
    first wrote. PostgreSQL locks the rows, in the order of their primary key (so that two holders of
    overlapping sets cannot deadlock). SQLite has one write lock for the database, and its driver begins a
    transaction only at the first write, so that reads before it see a moment that another worker's write can
    follow: a write that changes nothing takes that lock here."""
    model = column.class_
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(model).where(*where).values({column.key: column}).execution_options(synchronize_session=False))
    else:
        key = inspect(model).primary_key[0]
        s.execute(select(key).where(*where).order_by(key).with_for_update())
