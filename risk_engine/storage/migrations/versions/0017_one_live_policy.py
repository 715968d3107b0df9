"""policy_versions: one published version and at most one in shadow a subject, held by the database

Two workers publishing at the same moment could leave two versions published on PostgreSQL (every poll then
switched each worker between them). The upgrade first keeps, of each subject's published versions, the one last
audited as published or rolled back to (the highest number when none was), archiving the others; and of its
versions in shadow, the one last put in shadow, making the others drafts again.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _keep_one(status: str, actions: tuple[str, ...], others_become: str) -> None:
    bind = op.get_bind()
    by_subject: dict[str, list[int]] = {}
    for subject, version in bind.execute(
        sa.text("SELECT subject, version FROM policy_versions WHERE status = :status"), {"status": status}
    ):
        by_subject.setdefault(subject, []).append(version)
    for subject, versions in by_subject.items():
        if len(versions) < 2:
            continue
        targets = {f"{subject}:v{v}": v for v in versions}
        last = bind.execute(
            sa.text(
                "SELECT target FROM audit_log WHERE action IN :actions AND target IN :targets ORDER BY id DESC LIMIT 1"
            ).bindparams(sa.bindparam("actions", expanding=True), sa.bindparam("targets", expanding=True)),
            {"actions": list(actions), "targets": list(targets)},
        ).scalar()
        keep = targets[last] if last is not None else max(versions)
        bind.execute(
            sa.text(
                "UPDATE policy_versions SET status = :others WHERE subject = :subject AND status = :status "
                "AND version <> :keep"
            ),
            {"others": others_become, "subject": subject, "status": status, "keep": keep},
        )


def upgrade() -> None:
    _keep_one("published", ("policy.publish", "policy.rollback"), "archived")
    _keep_one("shadow", ("policy.shadow",), "draft")
    for status in ("published", "shadow"):
        where = sa.text(f"status = '{status}'")
        op.create_index(
            f"uq_policy_versions_one_{status}",
            "policy_versions",
            ["subject"],
            unique=True,
            sqlite_where=where,
            postgresql_where=where,
        )


def downgrade() -> None:
    for status in ("published", "shadow"):
        op.drop_index(f"uq_policy_versions_one_{status}", table_name="policy_versions")
