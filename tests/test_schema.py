"""The migrations build exactly the schema the typed models describe, on SQLite and PostgreSQL: a column, type,
index or constraint added to one and not the other fails here, not in production."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from risk_engine.storage.db import make_engine, migrate
from risk_engine.storage.models import Base


def test_migrations_match_the_models(database_url: str) -> None:
    db = make_engine(database_url)
    try:
        migrate(db)
        with db.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        db.dispose()
    assert differences == []


def test_the_upgrade_keeps_one_live_and_one_shadow_version_of_those_a_race_left(database_url: str) -> None:
    """Databases from before revision 0017 may hold two published versions of a subject (two workers publishing
    at once on PostgreSQL): the upgrade keeps the one last audited as published or rolled back to, and of two in
    shadow the one last put in shadow; then the database refuses a second of either."""
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from risk_engine.storage.db import alembic_config

    db = make_engine(database_url)
    try:
        cfg = alembic_config(db)
        with db.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0016")
        statuses = {
            ("payment", 1): "archived",
            ("payment", 2): "published",  # rolled back to last: kept
            ("payment", 3): "published",  # published before that: archived
            ("payment", 4): "shadow",
            ("payment", 5): "shadow",  # put in shadow last: kept
            ("review", 1): "published",  # no audit entry for either: the higher number is kept
            ("review", 2): "published",
            ("account", 1): "published",  # alone: untouched
        }
        audits = [("policy.publish", "payment:v3"), ("policy.rollback", "payment:v2"), ("policy.publish", "review:v9")]
        audits += [("policy.shadow", "payment:v4"), ("policy.shadow", "payment:v5"), ("policy.publish", "payment:v4")]
        with db.begin() as conn:
            for (subject, version), status in statuses.items():
                conn.execute(
                    text(
                        "INSERT INTO policy_versions (subject, version, status, text, digest, source, created_by, "
                        "created_at) VALUES (:subject, :version, :status, 't', :digest, 'api', 'a', :at)"
                    ),
                    {
                        "subject": subject,
                        "version": version,
                        "status": status,
                        "digest": f"{subject}{version}",
                        "at": "2026-12-07 10:00:00.000000",
                    },
                )
            for action, target in audits:
                conn.execute(
                    text("INSERT INTO audit_log (at, actor, action, target) VALUES (:at, 'a', :action, :target)"),
                    {"at": "2026-12-07 10:00:00.000000", "action": action, "target": target},
                )
        migrate(db)
        with db.connect() as conn:
            after = {
                (s, v): st for s, v, st in conn.execute(text("SELECT subject, version, status FROM policy_versions"))
            }
        assert after == statuses | {("payment", 3): "archived", ("payment", 4): "draft", ("review", 1): "archived"}
        for status in ("published", "shadow"):
            with pytest.raises(IntegrityError), db.begin() as conn:
                conn.execute(
                    text("UPDATE policy_versions SET status = :s WHERE subject = 'payment' AND version = 1"),
                    {"s": status},
                )
    finally:
        db.dispose()
