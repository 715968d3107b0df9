"""Typed SQLAlchemy 2 models. Alembic migrations under ``migrations/`` create these tables.

No column holds PII in clear: ``events.record`` has blind indexes in its place, ``events.pii_blob`` the
AES-GCM-sealed originals, ``list_entries.token`` blind indexes for PII lists and ``display`` a masked form.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime, dict[str, Any]: JSON}


class DataKey(Base):
    """A data key wrapped under the master key."""

    __tablename__ = "data_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Event(Base):
    """A scored event of any subject with its decision: the engine's memory and its replay source."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("subject", "event_id", name="uq_events_subject_event_id"),
        Index("ix_events_subject_occurred_at", "subject", "occurred_at"),
        Index("ix_events_subject_ingest_seq", "subject", "ingest_seq"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(128))
    occurred_at: Mapped[datetime]
    ingest_seq: Mapped[int] = mapped_column(BigInteger)
    record: Mapped[dict[str, Any]]
    features: Mapped[dict[str, Any]]
    aggregates: Mapped[dict[str, Any]]
    pii_key_id: Mapped[str | None] = mapped_column(String(32))
    pii_blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    decision: Mapped[str] = mapped_column(String(16))
    score: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[str] = mapped_column(String(64))
    model_versions: Mapped[dict[str, Any]]
    model_scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # calibrated detector scores used
    shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # a shadow policy's decision, recorded only
    # the blind-index generation its request hash was computed under (None: the first); a retry after a
    # rotation is hashed under it again to be compared
    hash_generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict[str, Any]]
    request_hash: Mapped[str] = mapped_column(String(64))
    elapsed_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]
    origin: Mapped[str | None] = mapped_column(String(32))  # the worker process that stored it (0011)


class Label(Base):
    """A late outcome for an event: chargeback, confirmed fraud, legitimate, dispute outcome."""

    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_subject_event_id", "subject", "event_id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    label_id: Mapped[str] = mapped_column(String(128), unique=True)
    subject: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(32))
    is_fraud: Mapped[bool] = mapped_column(Boolean)
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime]
    source: Mapped[str | None] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))


class ApiKey(Base):
    """An API key: only its SHA-256 is kept."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("uq_api_keys_request_id", "request_id", unique=True),)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    request_id: Mapped[str | None] = mapped_column(String(128))  # POST /v1/keys idempotency key


class ListEntry(Base):
    """An entry of a named list: a plain value or a blind index, with a masked display form."""

    __tablename__ = "list_entries"
    __table_args__ = (
        UniqueConstraint("list_name", "token", name="uq_list_entries_list_token"),
        Index("ix_list_entries_list_id", "list_name", "id"),  # a list's entries a page at a time, by id
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    list_name: Mapped[str] = mapped_column(String(64))
    token: Mapped[str] = mapped_column(String(128))
    display: Mapped[str] = mapped_column(String(256))
    added_by: Mapped[str] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]


class ListChange(Base):
    """That an entry of a list was added, changed or removed: what workers follow, by id, to apply list edits
    made elsewhere (reading the entry's stored state), instead of reloading every list."""

    __tablename__ = "list_changes"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    list_name: Mapped[str] = mapped_column(String(64))
    token: Mapped[str] = mapped_column(String(128))
    # when it was recorded: changes older than a week are pruned (None: recorded before this column existed)
    changed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True, default=lambda: datetime.now(UTC))


class RuleHit(Base):
    """Hits of the rules with one reason code on one subject's events of one hour, counted by one worker, and how
    many of those events are labelled, and labelled fraud (``storage/rule_hits.py``)."""

    __tablename__ = "rule_hits"
    subject: Mapped[str] = mapped_column(String(32), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # Unix time // 3600
    code: Mapped[str] = mapped_column(Text, primary_key=True)  # the rules language sets no length on a code
    origin: Mapped[str] = mapped_column(String(32), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled: Mapped[int] = mapped_column(BigInteger, default=0)
    fraud: Mapped[int] = mapped_column(BigInteger, default=0)


class ShadowTally(Base):
    """How many stored events a shadow version decided one way while the live policy decided another (or the
    same), counted by one worker, and how many of those are labelled, and labelled fraud
    (``storage/shadow_tallies.py``)."""

    __tablename__ = "shadow_tallies"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)  # the shadow's label, e.g. payment:v2
    live: Mapped[str] = mapped_column(String(16), primary_key=True)  # the live decision
    shadow: Mapped[str] = mapped_column(String(16), primary_key=True)  # the shadow's decision
    origin: Mapped[str] = mapped_column(String(32), primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled: Mapped[int] = mapped_column(BigInteger, default=0)
    fraud: Mapped[int] = mapped_column(BigInteger, default=0)


class ShadowRuleHit(Base):
    """How many stored events a shadow version's rule fired on, counted by one worker."""

    __tablename__ = "shadow_rule_hits"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule: Mapped[str] = mapped_column(Text, primary_key=True)
    origin: Mapped[str] = mapped_column(String(32), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)


class BlindIndexKey(Base):
    """A generation of the blind-index key chain: the first key, then one row per rotation
    (``storage/blind_index_rotation.py``). Workers refuse to start, and stop scoring, unless their chain is the
    newest active one."""

    __tablename__ = "blind_index_keys"
    generation: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    fingerprint: Mapped[str] = mapped_column(String(80))  # ``Vault.blind_index_fingerprint``
    state: Mapped[str] = mapped_column(String(16))  # rotating | active
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # how far a rotation has rewritten the stored tokens: event and list-entry ids, up to and including
    events_through: Mapped[int] = mapped_column(BigInteger, default=0)
    entries_through: Mapped[int] = mapped_column(BigInteger, default=0)


class PolicyVersion(Base):
    """A version of a subject's policy text."""

    __tablename__ = "policy_versions"
    __table_args__ = (
        UniqueConstraint("subject", "version", name="uq_policy_versions_subject_version"),
        # one live version and at most one in shadow, a subject
        *(
            Index(
                f"uq_policy_versions_one_{status}",
                "subject",
                unique=True,
                sqlite_where=sql_text(f"status = '{status}'"),
                postgresql_where=sql_text(f"status = '{status}'"),
            )
            for status in ("published", "shadow")
        ),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # draft | shadow | published | archived
    text: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))  # file | api
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]


class IdempotencyKey(Base):
    """A state-changing request sent with an ``Idempotency-Key`` header, and the answer it got, so that the
    same request again (a client's retry) gets that answer instead of doing the work twice."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("key_id", "idempotency_key", name="uq_idempotency_keys_key_id_key"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(32))  # the API key that sent it: each key has its own keys
    idempotency_key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(1024))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)  # None while the first request is being answered
    content_type: Mapped[str | None] = mapped_column(String(128))
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class JobRecord(Base):
    """A background job (a backtest): its state, progress and report, in the database so that every worker can
    show it and cancel it, and a job whose worker died is seen to have stopped (its heartbeat goes stale)."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16))  # running | done | failed | cancelled
    processed: Mapped[int] = mapped_column(BigInteger)
    started_by: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(index=True)
    heartbeat_at: Mapped[datetime]  # the running worker's last word: stale, the job is lost
    finished_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class AuditEntry(Base):
    """Append-only record of every change: who, when, what, before and after."""

    __tablename__ = "audit_log"
    # the audit log's filters, newest first: by action (and the retention run's newest pii.expire) or by target
    __table_args__ = (
        Index("ix_audit_log_action_id", "action", "id"),
        Index("ix_audit_log_target_id", "target", "id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ModelFit(Base):
    """A population detector's fit (``risk-engine models fit``): signed pickled state, newest wins."""

    __tablename__ = "model_fits"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    digest: Mapped[str] = mapped_column(String(64))  # the spec it was fitted for
    events: Mapped[int] = mapped_column(Integer)
    fitted_at: Mapped[datetime]
    fitted_by: Mapped[str] = mapped_column(String(128))
    blob: Mapped[bytes] = mapped_column(LargeBinary)  # signature + pickled PopulationFit


class SellerCredit(Base):
    """A seller's credit score after each event that moved it: the score's history (derived from events)."""

    __tablename__ = "seller_credit"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    seller_id: Mapped[str] = mapped_column(String(128), index=True)
    subject: Mapped[str] = mapped_column(String(32))  # of the event that moved it
    event_id: Mapped[str] = mapped_column(String(128))
    occurred_at: Mapped[datetime]
    score: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(16))
    components: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]
