"""The migrations build exactly the schema the typed models describe, on SQLite and PostgreSQL: a column, type,
index or constraint added to one and not the other fails here, not in production."""

from __future__ import annotations

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
