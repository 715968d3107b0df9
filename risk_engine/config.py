"""Settings, read from the environment (prefix ``RISK_ENGINE_``) with embedded defaults."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the engine needs to start. All paths the embedded default writes live under ``home``."""

    model_config = SettingsConfigDict(env_prefix="RISK_ENGINE_", extra="ignore")

    home: Path = Field(default=Path("var"), description="Data directory: database, key files, snapshots.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite under home if unset.")
    rules_dir: Path = Field(default=Path("rules"), description="Default policies (*.rules) and lists.toml.")
    models_dir: Path = Field(default=Path("models"), description="Detector specs (*.toml).")
    subjects_file: Path | None = Field(
        default=None, description="Attribute declarations per subject; rules_dir/subjects.toml if unset."
    )
    master_key: str | None = Field(default=None, description="Base64 32-byte key wrapping the data keys.")
    new_master_key: str | None = Field(
        default=None,
        description="Base64 32-byte key: the master key `risk-engine vault rotate-master-key` re-wraps the data keys "
        "under (needed when master_key is set; else one is generated).",
    )
    blind_index_key: str | None = Field(
        default=None,
        description="Base64 32-byte key for blind indexes; after rotations, every key of the chain, oldest first, "
        "separated by commas.",
    )
    new_blind_index_key: str | None = Field(
        default=None,
        description="Base64 32-byte key `risk-engine vault rotate-blind-index-key` adds to the chain (needed when "
        "blind_index_key is set; else one is generated).",
    )
    signing_key: str | None = Field(default=None, description="Base64 32-byte key signing model snapshots.")
    pii_retention_days: int | None = Field(
        default=None,
        ge=1,
        le=36_500,
        description="Days an event's sealed PII is kept after the event (unset: kept until erased). Every worker "
        "drops older PII once a day; records keep their blind indexes, so decisions, velocity and backtests "
        "are unchanged. `risk-engine pii expire` runs it at once.",
    )
    max_body_bytes: int = Field(default=64 * 1024, description="Larger request bodies get HTTP 413.")
    max_future_s: float = Field(
        default=86_400.0,
        ge=0,
        description="How far ahead of this server's clock an event's occurred_at may be (clock skew, a local time "
        "sent as UTC); later is a 422. Raise it for a simulation that scores events dated ahead.",
    )
    snapshot_every: int = Field(default=5000, description="Snapshot detectors every N learned events.")
    state_snapshot_every_s: float = Field(
        default=600.0,
        ge=0,
        description="Save the velocity and cross-subject state while serving this often (seconds; 0: only at a "
        "clean stop), from a forked copy of the process, so that a start after a crash replays only the events "
        "stored since. Where os.fork is missing, only at a clean stop.",
    )
    writer_batch_max: int = Field(default=1000, description="Largest group commit.")
    db_busy_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a statement waits on another's lock before failing (SQLite's busy timeout, "
        "PostgreSQL's lock_timeout), and about how soon a dead PostgreSQL server or network is noticed.",
    )
    commit_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a scoring answer waits for its row's commit before answering 503 (the write may "
        "still commit: a retry with the same id is answered from it, or scored anew if the write failed).",
    )
    policy_poll_s: float = Field(default=1.0, description="How often a worker looks for newly published policies.")
    follow_poll_s: float = Field(
        default=0.25,
        ge=0,
        description="How often a worker takes the events other workers stored into its velocity windows and "
        "cross-subject state (0: never; nor when policy_poll_s is 0, as for one-off commands).",
    )
    scoring_fast_path: bool = Field(
        default=True,
        description="Answer well-formed scoring requests before FastAPI's routing (service/fastpath.py).",
    )
    gc_tuning: bool = Field(
        default=True,
        description="Keep the garbage collector's pauses short: freeze what start-up built and what survives each "
        "middle collection, and collect the young generation often (risk_engine/collector.py).",
    )
    gc_full_every_hours: float = Field(
        default=24.0,
        ge=0,
        description="With gc_tuning, how often a worker walks all it holds once, to free reference cycles among "
        "frozen objects: one pause proportional to the state held (0: never).",
    )
    velocity_max_events_per_key: int = Field(
        default=100_000, description="Cap per aggregate key; beyond it the oldest entries are dropped."
    )

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``home``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'risk_engine.db').resolve()}"

    @property
    def resolved_subjects_file(self) -> Path:
        """Where attribute declarations are read from."""
        return self.subjects_file or self.rules_dir / "subjects.toml"

    @property
    def snapshot_dir(self) -> Path:
        """Where detector snapshots are written."""
        return self.home / "snapshots"


def configure_logging(level: int = logging.INFO) -> None:
    """The log format of the CLI's commands and of each worker process ``serve --workers`` starts."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
