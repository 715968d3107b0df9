"""The engine: one object that scores events of every subject through the same pipeline.

For each event: validate -> idempotency check -> flatten (PII to blind indexes) -> under the state lock:
aggregates as they were before the event, detector features and scores, rules, decision; then the event
is added to the velocity windows and taught to the detectors -> PII sealed -> the row goes to the group
commit writer, and the caller answers once it is committed. If the commit fails the event is taken back
out of the velocity windows and the caller answers 503.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial, wraps
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
from sqlalchemy import ColumnElement, case, func, select, true, update
from sqlalchemy import Engine as SqlEngine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from risk_engine import __version__
from risk_engine import labels as label_store
from risk_engine.api_keys import (
    KeyCache,
    Principal,
    create_api_key,
    create_first_admin_key,
    list_api_keys,
    revoke_api_key,
)
from risk_engine.backtest import StoredEvent
from risk_engine.collector import TUNING
from risk_engine.config import Settings
from risk_engine.credit import CreditScore, score_view
from risk_engine.detectors import SnapshotError, StreamingDetector, read_snapshot
from risk_engine.detectors.combine import CombineSpec, DetectorOutput, combine
from risk_engine.detectors.population import PopulationDetector, fit_population
from risk_engine.detectors.snapshot import (
    encode_state,
    open_signed,
    open_state,
    remove_stale_scratch,
    sign_encoded,
    snapshot_state,
    write_encoded,
)
from risk_engine.detectors.spec import ModelsConfig, SpecError, compile_spec_features, load_models
from risk_engine.detectors.vectors import VectorPacker, stored_vector, stored_vectors
from risk_engine.dsl import (
    CompiledPolicy,
    Environment,
    aggregate_union,
    compile_policy,
    read_policy_file,
)
from risk_engine.dsl.errors import did_you_mean
from risk_engine.errors import Conflict, InvalidInput, NotFound
from risk_engine.features.lists import (
    ListDecl,
    ListEntry,
    ListMatcher,
    canonical_ip,
    list_value_display,
    list_value_token,
    list_value_tokens,
    load_list_declarations,
)
from risk_engine.features.velocity import GRACE_S, VelocityState
from risk_engine.forked import FORK_AVAILABLE, exit_code, fork_and_run
from risk_engine.known_ids import KnownIds
from risk_engine.labels import LabelRequest
from risk_engine.marketplace import MarketplaceState, PlacedOrder
from risk_engine.merchants import rollup
from risk_engine.money import BaseCurrency, load_base_currency
from risk_engine.payments import PaymentIn
from risk_engine.pipeline import ModelScore, Verdict, decide, decision_for
from risk_engine.schema import FieldType, SubjectSchema, load_attribute_declarations
from risk_engine.storage import blind_index_rotation, erasure, event_listing, idempotency, list_entries
from risk_engine.storage import models as m
from risk_engine.storage.announce import (
    ANNOUNCE_SQL,
    EVENTS_CHANNEL,
    CommitWatch,
    announces,
    commit_watch,
    events_channel,
    wait_to_follow,
)
from risk_engine.storage.audit import audit
from risk_engine.storage.db import DatabaseUnavailable, make_engine, migrate, retry_on_race
from risk_engine.storage.event_listing import EventListing
from risk_engine.storage.labels import EVENT_OUTCOME_SQL
from risk_engine.storage.labels import outcome as label_outcome
from risk_engine.storage.rule_hits import HitTally, Tally, hour_of, rule_codes
from risk_engine.storage.shadow_tallies import ShadowOutcome
from risk_engine.storage.writer import (
    DuplicateRow,
    GroupCommitWriter,
    RawInsert,
    Ticket,
    WriteFailed,
    done_ticket,
    sqlite_time,
)
from risk_engine.subjects import PERSON_ID_KINDS, SUBJECT_KINDS, SubjectKind
from risk_engine.vault import PiiKind, Vault, WrappedDataKey, load_or_create_key, mask
from risk_engine.watermark import MAX_GAPS, IdWatermark

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger(__name__)

BASE_SCHEMAS: dict[str, SubjectSchema] = {name: kind.schema for name, kind in SUBJECT_KINDS.items()}
Detector = StreamingDetector | PopulationDetector
RECENT_CACHE = 50_000
# 2: orders carry their shipping address; 3: the state is of the events it has read by id, from every worker;
# 4: velocity windows keep their times in arrays
# 5: orders as tuples (marketplace._Order); 6: a seller's devices bounded, in order; 7: credit windows cut in
# bulk; 8: merchant flags kept when not ok, with each decision's latest time; 9: velocity windows keep where the
# entries dropped by the cap end
STATE_SNAPSHOT_FORMAT = 9
COMMITTED = done_ticket()  # the ticket of every remembered answer whose write is done (never changes again)
ORDERS_KEPT_S = 180 * 86_400.0  # payments whose orders a restart reloads for the review link
# a new aggregate's windows are replayed without the state lock in up to this many rounds after the first, until
# one reads no more than CATCH_UP_LEFT events: what scoring waits for is the replay of what the last one left
CATCH_UP_ROUNDS = 3
CATCH_UP_LEFT = 500
MARKETPLACE_RETRY_S = 1.0  # after a failed rebuild of the cross-subject state, the next is tried no sooner
KNOWN_IDS_MIN_CAPACITY = 1_000_000  # the id filter's first layer: about 2 MB
KNOWN_IDS_RETRY_S = 5.0  # after a failed read of the stored ids, the next is tried
IDEMPOTENCY_PURGE_S = 3600.0  # how often a worker deletes expired idempotency keys
PII_EXPIRY_S = 86_400.0  # how often a worker drops the PII past its retention (pii_retention_days), when set


FOLLOW_CHUNK = 200  # other workers' events taken in per hold of the state lock
FOLLOW_LIMIT = 5_000  # rows read per follow
STREAMED_ROWS = 5_000  # stored rows a roll-up (a day's events) or a label replay holds decoded at once
LIST_CHANGES_PER_READ = 10_000  # list changes other processes made, read per statement
LIST_CHANGES_PER_HOLD = 1_000  # of them applied per hold of the state lock
OWN_IDS_KEPT = 100_000  # ids of this worker's committed events awaiting the follower (see _note_own_events)


def _in_label_order(method: Callable[Concatenate[RiskEngine, P], R]) -> Callable[Concatenate[RiskEngine, P], R]:
    """Run a label-recording method under the engine's labels lock (see ``RiskEngine.__init__``)."""

    @wraps(method)
    def locked(engine: RiskEngine, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with engine._labels_lock:
            return method(engine, *args, **kwargs)

    return locked


_ATTRIBUTE_OK: dict[FieldType | None, Any] = {
    None: lambda v: False,
    FieldType.NUMBER: lambda v: type(v) in (int, float),
    FieldType.STRING: lambda v: type(v) is str,
    FieldType.BOOL: lambda v: type(v) is bool,
}


def load_environments(
    settings: Settings, check_estimators: bool = True
) -> tuple[dict[str, Environment], ModelsConfig, dict[str, ListDecl]]:
    """Type-checking environments of every subject, from subjects.toml, lists.toml and models/ (no database).

    ``check_estimators=False`` leaves the detectors' estimator parameters unchecked (see ``load_models``): for
    checking policies, which need the detectors' names only; start-up and ``models check`` check them.
    """
    list_decls = load_list_declarations(settings.rules_dir / "lists.toml")
    models = (
        load_models(settings.models_dir, check_params=check_estimators)
        if settings.models_dir.exists()
        else ModelsConfig([], {})
    )
    specs = models.specs
    for subject in models.combine:
        if subject not in BASE_SCHEMAS:
            hint = did_you_mean(subject, BASE_SCHEMAS)
            raise SpecError(f"[combine.{subject}] names unknown subject '{subject}'" + (f" ({hint})" if hint else ""))
    for spec in specs:
        if spec.subject not in BASE_SCHEMAS:
            raise SpecError(f"{spec.source}: detector '{spec.name}' names unknown subject '{spec.subject}'")
    attributes = load_attribute_declarations(settings.resolved_subjects_file)
    lists = {name: d.kind for name, d in list_decls.items()}
    envs = {
        subject: Environment(
            schema.with_attributes(attributes.get(subject, {})),
            lists,
            frozenset(s.name for s in specs if s.subject == subject),
        )
        for subject, schema in BASE_SCHEMAS.items()
    }
    for spec in specs:
        fields = envs[spec.subject].schema.fields if spec.subject in envs else {}
        if spec.per and spec.per not in fields:
            hint = did_you_mean(spec.per, fields)
            raise SpecError(
                f"{spec.source}: detector '{spec.name}': per = '{spec.per}' is not a field of {spec.subject}"
                + (f" ({hint})" if hint else "")
            )
    for spec in specs:  # a spec whose features do not type-check is refused at start-up
        compile_spec_features(spec, envs[spec.subject])
    return envs, models, list_decls


# how long a state snapshot saved while serving waits for the writer's commits, under the state lock
SAVE_COMMIT_WAIT_S = 1.0


def tune_garbage_collector() -> None:
    """Keep the cyclic GC's pauses short whatever the state held: freeze what start-up built, collect the young
    generation at ``collector.YOUNG_OBJECTS`` and freeze what survives each middle collection
    (``risk_engine.collector``); ``gc_full_every_hours`` sets how often everything is walked once."""
    TUNING.install()


def now_utc() -> datetime:
    """The wall-clock time, aware."""
    return datetime.now(UTC)


_GIL_HELD_CHUNK = 2047  # hashlib lets the GIL go for inputs of 2,048 bytes or more (HASHLIB_GIL_MINSIZE)


def request_hash_of(kind: SubjectKind, record: dict[str, Any], event: Any) -> str:
    """The hash of a request: the record carries every field of the request, PII as keyed blind indexes, so
    hashing it is hashing the request, and the stored hash derives from no PII in clear."""
    return sha256_hex(orjson.dumps([record, kind.beyond_record(event)], option=orjson.OPT_SORT_KEYS))


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` in hex, fed in chunks small enough that hashlib keeps the GIL.

    Letting it go for the 2 µs a request hash takes hands the lock to the writer thread, and the request then
    waits for the writer's turn to end: that cost reviews, whose texts make records of several KB, 10% of
    their time in ``bench/reviews.py``.
    """
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), _GIL_HELD_CHUNK):
        digest.update(view[start : start + _GIL_HELD_CHUNK])
    return digest.hexdigest()


@dataclass
class ActivePolicy:
    """The compiled policy a subject is scored with, and its version label."""

    compiled: CompiledPolicy
    version: int

    @property
    def label(self) -> str:
        """``payment:v3``."""
        return f"{self.compiled.subject}:v{self.version}"


@dataclass
class StateSnapshot:
    """Velocity and cross-subject state saved at a clean stop: of the stored events ``read`` covers (by id,
    every worker's), ``events`` of them."""

    read: IdWatermark
    events: int
    velocity: dict[str, VelocityState]
    marketplace: MarketplaceState | None


@dataclass
class SubjectRuntime:
    """Per-subject state: schema, policy, detectors, velocity."""

    schema: SubjectSchema
    environment: Environment
    policy: ActivePolicy
    detectors: list[Detector]
    velocity: VelocityState
    combine: CombineSpec
    shadow: ActivePolicy | None = None
    packer: VectorPacker = field(init=False)  # the detectors' vectors as the ``features`` column stores them

    def __post_init__(self) -> None:
        self.packer = VectorPacker(self.detectors)


@dataclass(slots=True)
class Evaluation:
    """One event through the pipeline: the verdict and what it was made from."""

    verdict: Verdict
    aggregates: dict[str, Any]
    vectors: dict[str, dict[str, float]]
    scores: list[ModelScore]
    model_score: float
    shadow: dict[str, Any] | None


# A decision made in this process: (its request's hash, its answer as JSON bytes). The cache holds tens of
# thousands of them, so they are plain tuples of a str and bytes, which the garbage collector stops tracking at
# their first collection (a tuple subclass it tracks for good; an object each, with its write's ticket, made
# collections pauses of tens of milliseconds). The ticket of an answer not yet committed is kept apart
# (``RiskEngine._in_flight``).
Pending = tuple[str, bytes]


@dataclass(frozen=True)
class PreparedWindows:
    """Windows of aggregates a policy needs, replayed from storage without the state lock (``_prepare_windows``):
    of the stored events the state held at ``cut`` (other workers' events it had followed) and ``cut_seq``
    (its own scored by then)."""

    ids: frozenset[str]
    velocity: VelocityState
    cut: IdWatermark
    cut_seq: int
    since: float | None  # the oldest time read; None when nothing was stored at the cut


@dataclass
class ScoreOutcome:
    """What the caller answers with once ``committed`` is done."""

    body: bytes  # the answer, as JSON
    committed: Ticket
    replayed: bool = False
    model_scores: tuple[ModelScore, ...] = ()  # raw and calibrated detector outputs (not for replays)
    model_score: float = 0.0  # the detectors combined (not for replays)
    identity: tuple[str, str, str] | None = None  # (subject, id, request hash) while its write is due: ``settle``

    @property
    def response(self) -> dict[str, Any]:
        """The answer as a dict."""
        result: dict[str, Any] = orjson.loads(self.body)
        return result

    def raise_if_not_stored(self) -> None:
        """After ``committed`` is done: raise :class:`DatabaseUnavailable` or :class:`Conflict` if the write failed."""
        exc = self.committed.exception()
        if exc is None:
            return
        if isinstance(exc, DuplicateRow):
            raise Conflict("the same id was written concurrently by another worker") from exc
        if isinstance(exc, WriteFailed):
            raise DatabaseUnavailable(exc.driver_error) from exc
        if isinstance(exc, DBAPIError):
            raise DatabaseUnavailable(type(exc.orig).__name__ if exc.orig else type(exc).__name__) from exc
        raise exc


@dataclass
class _Counters:
    decisions: dict[str, int] = field(default_factory=dict)
    rule_hits: dict[str, int] = field(default_factory=dict)
    followed: dict[str, int] = field(default_factory=dict)  # events other workers stored, taken in by subject
    detector_failures: dict[tuple[str, str], int] = field(default_factory=dict)  # (detector, phase): raised
    state_saves: dict[str, int] = field(default_factory=dict)  # state snapshots saved while serving, by outcome
    state_saved_at: float = 0.0  # Unix time of the last one saved (0: none yet)
    state_save_pause_s: float = 0.0  # how long the last one held scoring up


class RiskEngine:
    """Scores events, records labels, manages keys and lists. Thread-safe."""

    def __init__(self, settings: Settings, db: SqlEngine, vault: Vault, signing_key: bytes) -> None:
        self.settings = settings
        self.db = db
        self.vault = vault
        self.signing_key = signing_key
        self.writer = GroupCommitWriter(db, settings.writer_batch_max)
        self.writer.precondition = blind_index_rotation.stale_chain_guard(vault)  # no token of a retired chain
        self._list_check = blind_index_rotation.session_chain_check(vault)  # nor in a list edit
        self.subjects: dict[str, SubjectRuntime] = {}
        self.list_decls: dict[str, ListDecl] = {}
        self.lists = ListMatcher({})
        self.base_currency: BaseCurrency | None = None
        self._lists_read = IdWatermark()  # the list changes (``list_changes``) applied
        self._lists_refresh = threading.Lock()
        self._lists_edits = 0  # this process's own list edits, so a poll that read states before one does not
        self._lists_edited: dict[tuple[str, str], int] = {}  # undo it: the entries edited, at which edit
        self.counters = _Counters()
        self._lock = threading.RLock()
        self._refreshing = threading.Lock()  # policy refreshes take turns (refresh_policies)
        # labels are stored and learned one request at a time, so the detectors learn them in id order (one
        # learned after a later one would be a gap to look for again: see risk_engine.watermark)
        self._labels_lock = threading.RLock()
        self._recent: OrderedDict[str, Pending] = OrderedDict()
        # the tickets of the answers in ``_recent`` not yet committed: a committed one leaves in the writer thread
        # (a dict's pop needs no lock), a failed one when its failure is applied (``_apply_retractions``)
        self._in_flight: dict[str, Ticket] = {}
        self._seq = 0
        self._start_seq = 0
        self._since_snapshot = 0
        self.keys = KeyCache(self.db)
        self.environments: dict[str, Environment] = {}
        self._poller: threading.Thread | None = None
        self._follower: threading.Thread | None = None
        self._snapshot_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="risk-engine-snapshot")
        self._state_saving = threading.Lock()  # held while a state snapshot is saved beside serving
        self.state_save_offset_s = 0.0  # how far into its first period the poller's first save comes early
        # what the last state saved while serving held: (the last own event's number, the followed watermark)
        self._state_saved_of = (0, 0)
        self._stopping = threading.Event()
        self._closed = False
        self._event_insert = RawInsert(m.Event.__table__, db)  # type: ignore[arg-type]
        self._credit_insert = RawInsert(m.SellerCredit.__table__, db)  # type: ignore[arg-type]
        self.marketplace = MarketplaceState()
        self._marketplace_stale = False  # it learned from an event whose write failed: to be rebuilt
        self._marketplace_rebuilder: threading.Thread | None = None
        self._marketplace_rebuilt = threading.Event()  # clear while a rebuild runs beside scoring
        self._marketplace_rebuilt.set()
        self._marketplace_failed_at = float("-inf")
        self._fit_ids: dict[str, int] = {}  # the stored fit each population detector scores with
        self._known_ids = KnownIds(KNOWN_IDS_MIN_CAPACITY)
        self._known_while_loading: list[str] | None = None  # ids marked here while the stored ones are read
        self._known_ids_whole = threading.Event()  # set once the stored ids are all in the filter
        self._known_loader: threading.Thread | None = None
        # this process's mark on the events it stores, and how far it has followed those other workers stored
        self.origin = secrets.token_hex(8)
        self._events_read = IdWatermark()
        # ids of this worker's events as they commit, for the follower to note read (``_note_own_events``):
        # appended by the writer thread without the state lock, which a caller may hold while it waits for the
        # writer (a barrier); bounded, as nothing drains it while no one follows
        self._own_committed: deque[int] = deque(maxlen=OWN_IDS_KEPT)
        self._event_insert.report_ids(self._own_committed.extend)
        self.writer.hits = HitTally(db, self.origin)
        # events whose write failed, to take back out of velocity: queued by the writer thread, which must not wait
        # for the state lock either, and applied by the next holder of the lock before velocity is read
        self._retractions: deque[tuple[SubjectRuntime, dict[str, Any], float, str, Ticket, PlacedOrder | None]] = (
            deque()
        )
        self._listener: CommitWatch | None = None
        self._events_channel = EVENTS_CHANNEL

    def _announce_on(self, channel: str) -> None:
        """Announce each batch of events on ``channel``, and listen there for other workers' (PostgreSQL)."""
        self._events_channel = channel
        self.writer.announce = (ANNOUNCE_SQL, (channel, self.origin))
        self.writer.announce_tables = frozenset({m.Event.__tablename__})

    # -- start and stop ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings) -> RiskEngine:
        """Connect, migrate, load keys, policies, lists and detectors, and rebuild state from storage."""
        settings.home.mkdir(parents=True, exist_ok=True)
        db = make_engine(settings.resolved_database_url, settings.db_busy_timeout_s)
        try:
            migrate(db)
            channel = events_channel(db) if announces(db) else None
        except OperationalError as exc:
            raise DatabaseUnavailable(f"cannot reach the database: {type(exc).__name__}") from exc
        vault = Vault.from_settings(settings)
        try:
            blind_index_rotation.register(db, vault)  # its chain must be the one the stored tokens are under
        except OperationalError as exc:
            raise DatabaseUnavailable(f"cannot reach the database: {type(exc).__name__}") from exc
        signing = load_or_create_key(settings.signing_key, settings.home / "signing.key", "signing_key")
        engine = cls(settings, db, vault, signing)
        if channel is not None:  # other workers' followers wake when a batch of events commits
            engine._announce_on(channel)
        engine._load_data_keys()
        engine._load_subjects()
        engine._load_lists()
        engine._rebuild_state()
        for rt in engine.subjects.values():  # serving from here: per-key models are pickled as they learn
            for det in rt.detectors:
                if isinstance(det, StreamingDetector):
                    det.pickle_on_learn = True
        engine._snapshot_as_started()
        engine.writer.start()
        engine.refresh_policies()  # a version put in shadow before this start
        if settings.gc_tuning:
            tune_garbage_collector()
        if settings.policy_poll_s > 0:
            engine._start_policy_poller()
            if settings.follow_poll_s > 0:
                engine._start_follower()
        return engine

    def _snapshot_as_started(self) -> None:
        """Snapshot the streaming detectors as the start restored them, under this worker's name.

        A restored detector replays what the worker that wrote its snapshot scored after it (``_restore_detector``).
        Were this worker to die before its first snapshot, the next start would restore the snapshot this one
        started from, which names another worker, and the events this one scored would never be learned. From
        this snapshot on, they are: they are this worker's, after its start."""
        remove_stale_scratch(self.settings.snapshot_dir)
        with self._lock:
            for rt in self.subjects.values():
                for det in rt.detectors:
                    if isinstance(det, StreamingDetector):
                        det.last_seq, det.last_origin = self._start_seq, self.origin
            self.snapshot_detectors()  # on disk before the first event is scored

    def close(self) -> None:
        """Flush writes, snapshot detectors, velocity and cross-subject state. Again: nothing."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        for thread in (self._poller, self._follower, self._known_loader, self._marketplace_rebuilder):
            if thread is not None:
                thread.join(5)
        self.writer.close()
        with self._lock:
            self.snapshot_detectors()
            self.flush_snapshots()  # a state snapshot saved while serving lands before this one, never after
            try:
                self._write_state_snapshot()
            except (OSError, OperationalError) as exc:  # the next start rebuilds from the stored events
                log.error("could not write the state snapshot: %s", type(exc).__name__)
        self._snapshot_writer.shutdown(wait=True)
        self.db.dispose()

    def _session(self) -> Session:
        return Session(self.db, expire_on_commit=False)

    def _load_data_keys(self) -> None:
        """Unwrap stored data keys (to open old rows) and start a fresh one for this process to seal with."""
        with self._session() as s:
            for k in s.scalars(select(m.DataKey)).all():
                self.vault.load_data_key(WrappedDataKey(k.key_id, k.wrapped))
            s.execute(update(m.DataKey).values(active=False))
            wrapped = self.vault.new_data_key()
            s.add(m.DataKey(key_id=wrapped.key_id, wrapped=wrapped.wrapped, created_at=now_utc(), active=True))
            s.commit()

    def _load_data_key(self, key_id: str) -> None:
        """Unwrap one stored data key: another worker's, which it made when it started after this one did."""
        try:
            with self._session() as s:
                stored = s.get(m.DataKey, key_id)
        except OperationalError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        if stored is not None:  # else ``open`` says the key is unknown
            self.vault.load_data_key(WrappedDataKey(stored.key_id, stored.wrapped))

    def _load_subjects(self) -> None:
        envs, models, self.list_decls = load_environments(self.settings)
        self.environments = envs
        self.base_currency = load_base_currency(self.settings.rules_dir / "currencies.toml")
        self._seed_policies(envs)
        for subject, env in envs.items():
            policy = self._published_policy(subject, envs)
            detectors: list[Detector] = []
            for spec in (s for s in models.specs if s.subject == subject):
                features = compile_spec_features(spec, env)
                kind = PopulationDetector if spec.kind == "population" else StreamingDetector
                detectors.append(kind(spec, features))
            aggs = aggregate_union(policy.compiled.aggregates, *(d.features.aggregates for d in detectors))
            velocity = VelocityState(aggs, self.settings.velocity_max_events_per_key)
            self.subjects[subject] = SubjectRuntime(
                env.schema, env, policy, detectors, velocity, models.combine_for(subject)
            )

    def _seed_policies(self, envs: Mapping[str, Environment]) -> None:
        """Store each ``rules/*.rules`` file as a published version when its text is new."""
        for path in sorted(self.settings.rules_dir.glob("*.rules")):
            text = read_policy_file(path)
            compiled = compile_policy(text, envs, str(path))
            # another worker starting at the same moment may store a version first
            retry_on_race(partial(self._seed_policy, path, text, compiled))

    def _seed_policy(self, path: Path, text: str, compiled: CompiledPolicy) -> None:
        with self._session() as s:
            # the number first, then the text: a writer that stored this text under a lower number had committed
            # before this read of the number, so the look-up that follows finds it
            latest = (
                s.scalar(select(func.max(m.PolicyVersion.version)).where(m.PolicyVersion.subject == compiled.subject))
                or 0
            )
            known = s.scalar(
                select(m.PolicyVersion.id).where(
                    m.PolicyVersion.subject == compiled.subject, m.PolicyVersion.digest == compiled.digest
                )
            )
            if known is not None:
                return
            s.execute(
                update(m.PolicyVersion)
                .where(m.PolicyVersion.subject == compiled.subject, m.PolicyVersion.status == "published")
                .values(status="archived")
            )
            s.add(
                m.PolicyVersion(
                    subject=compiled.subject,
                    version=latest + 1,
                    status="published",
                    text=text,
                    digest=compiled.digest,
                    source="file",
                    created_by=f"file:{path.name}",
                    created_at=now_utc(),
                )
            )
            self._audit(
                s,
                "system",
                "policy.publish",
                f"{compiled.subject}:v{latest + 1}",
                None,
                {"source": str(path), "digest": compiled.digest},
            )
            s.commit()
            log.info("published %s as %s:v%d", path, compiled.subject, latest + 1)

    def _published_policy(self, subject: str, envs: Mapping[str, Environment]) -> ActivePolicy:
        with self._session() as s:
            row = s.scalars(
                select(m.PolicyVersion)
                .where(m.PolicyVersion.subject == subject, m.PolicyVersion.status == "published")
                .order_by(m.PolicyVersion.version.desc())
            ).first()
        if row is None:
            text = f"subject {subject}\n"
            return ActivePolicy(compile_policy(text, envs, "<empty>"), 0)
        return ActivePolicy(compile_policy(row.text, envs, f"{subject}:v{row.version}"), row.version)

    # -- policy activation (hot reload) ------------------------------------------------------------------
    def _aggregates_needed(
        self, subject: str, policies: Sequence[CompiledPolicy]
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(every aggregate these policies and the subject's detectors need, those the running state lacks)."""
        rt = self.subjects[subject]
        needed = aggregate_union(*(p.aggregates for p in policies), *(d.features.aggregates for d in rt.detectors))
        kept = {a.id for a in rt.velocity.specs}
        return tuple(needed), tuple(a for a in needed if a.id not in kept)

    def _cut(self) -> tuple[IdWatermark, int]:
        """Where the state stands (lock held): every event this worker scored stored, the other workers' taken
        in. Returns (the other workers' events taken in, the sequence number of the last one it scored)."""
        self.writer.barrier().wait(30)
        self._apply_retractions()  # after the barrier: the writes it waited for that failed are taken out too
        self.refresh_events()
        return IdWatermark(self._events_read.last, self._events_read.gaps), self._seq

    def _held_at_sql(self, cut: IdWatermark, seq: int) -> tuple[str, list[Any]]:
        """The stored events the state held at a cut: those its watermark covers and this worker's own scored by
        then, as SQL text with its parameters."""
        marker = self._marker()
        covered, params = self._covered_sql(cut, marker)
        return f"({covered} OR (origin = {marker} AND ingest_seq <= {marker}))", [*params, self.origin, seq]

    def _taken_in_between_sql(
        self, cut: IdWatermark, seq: int, later: IdWatermark, later_seq: int | None
    ) -> tuple[str, list[Any]]:
        """The stored events taken in after one cut and by a later one (``later_seq`` None: by now), as SQL text
        with its parameters: other workers' the later watermark covers and the earlier did not, and this
        worker's own scored after the earlier cut."""
        marker = self._marker()
        unread, params = self._unread_sql(cut, marker)
        covered, more = self._covered_sql(later, marker)
        own = f"origin = {marker} AND ingest_seq > {marker}" + (
            "" if later_seq is None else f" AND ingest_seq <= {marker}"
        )
        return (
            f"(({unread} AND {covered} AND origin <> {marker}) OR ({own}))",
            [*params, *more, self.origin, self.origin, seq, *([] if later_seq is None else [later_seq])],
        )

    def _prepare_windows(self, subject: str, *policies: CompiledPolicy) -> PreparedWindows | None:
        """The windows of the aggregates these policies need and the running state lacks, replayed from storage
        without the state lock, so scoring goes on meanwhile: of the events the state held at a cut taken under
        the lock, then, in a few rounds, of those taken in since, each round shorter than the one before.
        ``_ensure_velocity`` adds, under the lock, only what the last round left. None: none lacking."""
        with self._lock:
            _, missing = self._aggregates_needed(subject, policies)
            if not missing:
                return None
            cut, seq = self._cut()
            latest = self._latest_occurred(subject)
        velocity = VelocityState(missing, self.settings.velocity_max_events_per_key)
        if latest is None:
            return PreparedWindows(frozenset(a.id for a in missing), velocity, cut, seq, None)
        since = latest - velocity.longest_window - GRACE_S
        read = velocity.replay(r[:2] for r in self._stored_rows(subject, since, where=self._held_at_sql(cut, seq)))

        def take(cut: IdWatermark, seq: int, later: IdWatermark, later_seq: int) -> int:
            between = self._taken_in_between_sql(cut, seq, later, later_seq)
            return velocity.replay(r[:2] for r in self._stored_rows(subject, since, where=between))

        cut, seq = self._catch_up(cut, seq, read, take)
        return PreparedWindows(frozenset(a.id for a in missing), velocity, cut, seq, since)

    def _catch_up(
        self, cut: IdWatermark, seq: int, read: int, take: Callable[[IdWatermark, int, IdWatermark, int], int]
    ) -> tuple[IdWatermark, int]:
        """After a read of ``read`` events as of a cut, rounds without the state lock of what was taken in since:
        each takes a later cut under the lock and reads the events in between with ``take`` (how many), until a
        round reads ``CATCH_UP_LEFT`` or fewer, at most ``CATCH_UP_ROUNDS``. Returns the last cut, from which
        the caller reads the rest under the lock."""
        for _ in range(CATCH_UP_ROUNDS):
            if read <= CATCH_UP_LEFT:
                break
            with self._lock:
                later, later_seq = self._cut()
            read = take(cut, seq, later, later_seq)
            cut, seq = later, later_seq
        return cut, seq

    def _ensure_velocity(
        self, subject: str, *policies: CompiledPolicy, prepared: PreparedWindows | None = None
    ) -> None:
        """Give velocity the aggregates these policies need that it does not keep, replayed from storage, and drop
        those no longer needed (lock held). The windows kept stay as they are. With ``prepared`` windows of
        exactly the aggregates lacking, only the events taken in since its cut are read (scoring waits meanwhile);
        else every event of the aggregates' longest window is."""
        rt = self.subjects[subject]
        needed, missing = self._aggregates_needed(subject, policies)
        if {a.id for a in needed} == {a.id for a in rt.velocity.specs}:
            return
        added = None
        if missing:
            self._cut()  # the reads below go up to here, the follow on from here
            if prepared is not None and prepared.ids == {a.id for a in missing}:
                added = prepared.velocity
                # (with nothing stored at the cut, no time bound: whatever was stored since is new)
                since_cut = self._taken_in_between_sql(prepared.cut, prepared.cut_seq, self._events_read, None)
                added.replay(r[:2] for r in self._stored_rows(subject, prepared.since, where=since_cut))
            else:
                added = self._rebuilt_velocity(subject, missing, self._events_read)
        else:
            self._apply_retractions()  # the windows kept go into the new state as they are
        sources = [rt.velocity] + ([added] if added is not None else [])
        rt.velocity = VelocityState.assembled(needed, sources, self.settings.velocity_max_events_per_key)

    def set_shadow(self, subject: str, text: str | None, version: int | None) -> ActivePolicy | None:
        """Score live events with this version too (recording its decisions only); None stops the shadow."""
        rt = self.subjects[subject]
        shadow = None
        if text is not None and version is not None:
            shadow = ActivePolicy(compile_policy(text, self.environments, f"{subject}:v{version}"), version)
        prepared = self._prepare_windows(subject, rt.policy.compiled, *([shadow.compiled] if shadow else []))
        with self._lock:
            policies = [rt.policy.compiled] + ([shadow.compiled] if shadow else [])
            self._ensure_velocity(subject, *policies, prepared=prepared)
            rt.shadow = shadow
        return shadow

    def activate_policy(self, subject: str, text: str, version: int) -> ActivePolicy:
        """Make a stored version the one this process scores with, without a restart.

        When the new policy names aggregates the running state does not keep, their windows are replayed from
        the stored events while scoring goes on (``_prepare_windows``); then, under the state lock, the events
        taken in meanwhile are added and the policy swapped in.
        """
        compiled = compile_policy(text, self.environments, f"{subject}:v{version}")
        active = ActivePolicy(compiled, version)
        rt = self.subjects[subject]
        shadow = rt.shadow
        prepared = self._prepare_windows(
            subject, compiled, *([shadow.compiled] if shadow is not None and shadow.version != version else [])
        )
        with self._lock:
            if rt.shadow is not None and rt.shadow.version == version:
                rt.shadow = None  # a shadow that goes live stops shadowing
            policies = [compiled] + ([rt.shadow.compiled] if rt.shadow else [])
            self._ensure_velocity(subject, *policies, prepared=prepared)
            rt.policy = active
        log.info("now scoring %s with %s", subject, active.label)
        return active

    def _rebuilt_velocity(self, subject: str, specs: tuple[Any, ...], seen: IdWatermark) -> VelocityState:
        """Windows of ``specs`` from the stored events this worker has taken in as of ``seen``."""
        velocity = VelocityState(specs, self.settings.velocity_max_events_per_key)
        latest = self._latest_occurred(subject)
        if latest is not None and specs:
            since = latest - velocity.longest_window - GRACE_S
            velocity.replay((record, ts) for record, ts, _, _ in self._stored_rows(subject, since_ts=since, seen=seen))
        return velocity

    def refresh_policies(self) -> list[str]:
        """Score with the versions the database holds live and in shadow, whoever changed them (a change made
        here, by another worker or another thread). Returns the labels newly activated.

        Refreshes take turns, each reading the database once it has its turn: the last one reads the newest
        state, so this process ends on it. (Activating what each change had made left it on the one whose
        activation, a long policy's compile, say, ended last.)"""
        with self._refreshing:
            return self._refresh_policies()

    def _refresh_policies(self) -> list[str]:
        with self._session() as s:
            rows = s.execute(
                select(
                    m.PolicyVersion.subject, m.PolicyVersion.version, m.PolicyVersion.text, m.PolicyVersion.status
                ).where(m.PolicyVersion.status.in_(("published", "shadow")))
            ).all()
        changed = []
        shadows = {subject: (text, version) for subject, version, text, status in rows if status == "shadow"}
        for subject, version, text, status in rows:
            rt = self.subjects.get(subject)
            if status == "published" and rt is not None and rt.policy.version != version:
                changed.append(self.activate_policy(subject, text, version).label)
        for subject, rt in self.subjects.items():
            wanted = shadows.get(subject)
            current = rt.shadow.version if rt.shadow else None
            if (wanted[1] if wanted else None) != current:
                shadow = self.set_shadow(subject, *(wanted if wanted else (None, None)))
                changed.append(f"shadow {shadow.label}" if shadow else f"shadow {subject} stopped")
        return changed

    def _start_policy_poller(self) -> None:
        purged_at = float("-inf")  # the first poll purges
        pii_expired_at = time.monotonic()  # ... but leaves the PII to the day's run (or ``risk-engine pii expire``)
        collected_at = time.monotonic()
        full_every_s = self.settings.gc_full_every_hours * 3600.0 if self.settings.gc_tuning else 0.0
        # the first save comes at a random point of the first period: workers started together (serve --workers)
        # then fork their copies for saving at different moments, not all at once, each copy the process's size
        self.state_save_offset_s = random.uniform(0.0, self.settings.state_snapshot_every_s)
        state_saved_at = time.monotonic() - self.state_save_offset_s
        self._state_saved_of = (self._seq, self._events_read.last)

        def poll() -> None:
            nonlocal purged_at, pii_expired_at, collected_at, state_saved_at
            while not self._stopping.wait(self.settings.policy_poll_s):
                try:
                    self.check_blind_index_key()
                    self.refresh_policies()
                    self.refresh_fits()
                    self.refresh_lists()
                    self.refresh_labels()
                    if time.monotonic() - purged_at > IDEMPOTENCY_PURGE_S:
                        idempotency.purge(self.db, now_utc())  # keys past their 24 h
                        list_entries.prune_changes(self.db, now_utc())  # list changes past a week
                        purged_at = time.monotonic()
                    if self.settings.pii_retention_days and time.monotonic() - pii_expired_at > PII_EXPIRY_S:
                        pii_expired_at = time.monotonic()
                        self.expire_pii("retention")
                    if full_every_s and time.monotonic() - collected_at > full_every_s:
                        collected_at = time.monotonic()
                        self.collect_garbage_fully()
                    every_s = self.settings.state_snapshot_every_s
                    held = (self._seq, self._events_read.last)
                    if every_s and time.monotonic() - state_saved_at > every_s and held != self._state_saved_of:
                        state_saved_at = time.monotonic()
                        self.save_state_snapshot()
                except Exception as exc:  # a bad poll must not kill the worker; the next one retries
                    log.warning("policy refresh failed: %s", type(exc).__name__)

        self._poller = threading.Thread(target=poll, name="risk-engine-policy-poller", daemon=True)
        self._poller.start()

    def check_blind_index_key(self) -> None:
        """Stop indexing PII (so scoring, list edits and erasures answer 503) once the database's blind-index key
        chain is no longer this worker's: a rotation has begun (``storage/blind_index_rotation.py``)."""
        reason = blind_index_rotation.mismatch(self.db, self.vault)
        if reason is not None and not self.vault.blind_indexes_retired:
            log.error("blind indexes stopped: %s", reason)
            self.vault.retire_blind_indexes(reason)

    def collect_garbage_fully(self) -> dict[str, Any]:
        """One full garbage collection (frozen objects included), logged with its pause: what the poller runs
        every ``gc_full_every_hours``. Not under the state lock: the collector stops every thread anyway."""
        full = TUNING.collect_fully()
        log.info(
            "full garbage collection: %d unreachable objects freed in %.1f ms; %d objects held",
            full.freed,
            full.pause_s * 1e3,
            full.frozen_after,
        )
        return {"freed": full.freed, "pause_ms": round(full.pause_s * 1e3, 3), "held": full.frozen_after}

    def _start_follower(self) -> None:
        """Take in other workers' events every ``follow_poll_s``: more often than the policy poll, because a
        burst spread over workers is counted whole only once its events are followed. On PostgreSQL, also as
        soon as another worker announces a commit; on an SQLite file, within ``WATCH_INTERVAL_S`` of it once
        other workers' events are seen (``storage.announce``)."""

        listener = self._listener = commit_watch(self.db, self.origin, self._stopping, self._events_channel)
        poll_s = self.settings.follow_poll_s

        def follow() -> None:
            followed_at = time.monotonic()
            try:
                while wait_to_follow(listener, self._stopping, poll_s, followed_at):
                    try:
                        self.refresh_events()
                    except Exception as exc:  # the next poll retries
                        log.warning("following other workers' events failed: %s", type(exc).__name__)
                    followed_at = time.monotonic()
            finally:
                if listener is not None:
                    listener.close()

        self._follower = threading.Thread(target=follow, name="risk-engine-follower", daemon=True)
        self._follower.start()

    def _load_lists(self) -> None:
        seeds = {d.name: d.entries for d in self.list_decls.values() if d.entries}
        if seeds:
            list_entries.seed_entries(self.db, seeds, "file:lists.toml")
        self.lists, self._lists_read = self._read_lists()

    def _read_lists(self) -> tuple[ListMatcher, IdWatermark]:
        """Every list as stored, and where to follow changes from: read before the entries, so a change made in
        between is read again."""
        read = list_entries.changes_start(self.db)
        lists = ListMatcher(self.list_decls)
        lists.load((ListEntry(*row) for row in list_entries.live_entries(self.db)), now_utc())
        return lists, read

    def refresh_lists(self, limit: int = LIST_CHANGES_PER_READ) -> bool:
        """Apply the list changes other processes (workers, ``risk-engine lists``) stored since the last read,
        each as its entry is stored now, ``limit`` changes a read until none is left. True if any was read (or,
        behind changes already pruned, every list was read again)."""
        with self._lists_refresh:  # one reader at a time: it owns ``_lists_read``
            read = self._lists_read
            if list_entries.changes_pruned_past(self.db, read):
                # behind by more than the changes kept (suspended for a week, say): every list read again
                log.warning("list changes this worker had not read were pruned: reloading every list")
                lists, read = self._read_lists()
                with self._lock:
                    self.lists, self._lists_read = lists, read
                reloaded = True
            else:
                reloaded = False
            read.expire()
            found = reloaded
            while True:
                with self._lock:
                    edits = self._lists_edits
                changes = list_entries.changes_after(self.db, read, limit)
                if not changes:
                    return found
                found = True
                stored = list_entries.entry_states(self.db, ((name, token) for _, name, token in changes))
                keys = list(dict.fromkeys((name, token) for _, name, token in changes))
                for start in range(0, len(keys), LIST_CHANGES_PER_HOLD):
                    now = now_utc()
                    with self._lock:
                        for key in keys[start : start + LIST_CHANGES_PER_HOLD]:
                            if self._lists_edited.get(key, -1) >= edits:
                                continue  # edited here since its state was read: the matcher holds the newer one
                            if key in stored:
                                self.lists.add(ListEntry(*key, stored[key]), now)
                            else:
                                self.lists.remove(*key)
                for change_id, _, _ in changes:
                    read.note(change_id)
                with self._lock:
                    self._lists_edited = {k: n for k, n in self._lists_edited.items() if n >= edits}
                if len(changes) < limit:
                    return found

    def _note_list_edit(self, list_name: str, token: str) -> None:
        """Count an edit made here (under the state lock), so a poll that read the entry's state before it
        does not undo it."""
        self._lists_edited[list_name, token] = self._lists_edits
        self._lists_edits += 1

    def _load_known_ids(self) -> None:
        """Start reading the ids of stored events into the stored-id filter (``known_ids.py``), in the
        background: a new id (the common case) then needs no database look-up. At a large deployment's volume
        the read takes minutes, so the worker serves meanwhile: until the filter is whole, an id it has not
        marked itself is looked up in the database. Called once the rebuild has taken its watermark, so an id
        committed after the read's snapshot is this worker's own or one the follower takes in (and marks)."""
        self._known_ids = KnownIds(KNOWN_IDS_MIN_CAPACITY)  # what this worker marks while the stored ids are read
        self._known_while_loading = []
        self._known_ids_whole.clear()
        self._known_loader = threading.Thread(target=self._read_known_ids, name="risk-engine-known-ids", daemon=True)
        self._known_loader.start()

    def _read_known_ids(self) -> None:
        """The background read of ``_load_known_ids``; a failed read (the database went away) is tried again
        every ``KNOWN_IDS_RETRY_S`` until it is whole or the engine stops, every id looked up meanwhile."""
        while not self._stopping.is_set():
            try:
                known = self._stored_ids()
            except Exception as exc:
                log.warning("could not read the stored ids (%s): scoring looks each id up", type(exc).__name__)
                self._stopping.wait(KNOWN_IDS_RETRY_S)
                continue
            if known is None:  # stopping
                return
            with self._lock:
                for key in self._known_while_loading or ():
                    known.add(key)
                for key in self._recent:  # in flight, maybe not committed yet ("subject\x1fevent id")
                    known.add(key)
                self._known_ids = known
                self._known_while_loading = None
            self._known_ids_whole.set()
            return

    def _stored_ids(self) -> KnownIds | None:
        """A filter of every stored event id (None if the engine stops meanwhile)."""
        with self._session() as s:
            top = s.scalar(select(func.max(m.Event.id))) or 0  # at least as many as are stored
            known = KnownIds(max(KNOWN_IDS_MIN_CAPACITY, 2 * top))  # sized for twice that; it grows past it
            stmt = select(m.Event.subject, m.Event.event_id).execution_options(yield_per=10_000)
            for subject, event_id in s.execute(stmt):
                if self._stopping.is_set():
                    return None
                known.add(f"{subject}\x1f{event_id}")
        return known

    def _mark_known(self, subject: str, event_id: str) -> None:
        key = f"{subject}\x1f{event_id}"
        self._known_ids.add(key)
        waiting = self._known_while_loading
        if waiting is not None:
            waiting.append(key)

    def _rebuild_state(self) -> None:
        """Velocity and cross-subject state from the state snapshot of the last clean stop plus the events
        stored after it, or from the stored events; detectors from their snapshots plus the events after them.

        The state is of the stored events up to the newest id now, less the ids below it not yet committed
        (another worker's transaction): those, and every event stored from now on, are the follower's. So an
        event committed during the rebuild is counted once, by the follower, and one read from the snapshot
        is not read again."""
        with self._session() as s:
            self._seq = s.scalar(select(func.max(m.Event.ingest_seq))) or 0
            self._start_seq = self._seq  # this worker numbers its own events from here on
            top = s.scalar(select(func.max(m.Event.id))) or 0
            present = set(s.scalars(select(m.Event.id).where(m.Event.id > top - MAX_GAPS)))
        start = IdWatermark(top, (i for i in range(max(1, top - MAX_GAPS + 1), top) if i not in present))
        self._load_known_ids()
        snapshot = self._read_state_snapshot()
        if snapshot is not None:
            log.info(
                "velocity and cross-subject state from the state snapshot of %d events, and the events after it",
                snapshot.events,
            )
        for subject, rt in self.subjects.items():
            velocity = snapshot.velocity.get(subject) if snapshot is not None else None
            if (
                snapshot is not None
                and velocity is not None
                and {a.id for a in velocity.specs} == {a.id for a in rt.velocity.specs}
                and velocity.cap == self.settings.velocity_max_events_per_key
            ):
                velocity.replay(
                    (record, ts) for record, ts, _, _ in self._stored_rows(subject, seen=start, unread=snapshot.read)
                )
                rt.velocity = velocity
            else:
                rt.velocity = self._rebuilt_velocity(subject, rt.velocity.specs, start)
            for det in rt.detectors:
                self._restore_detector(subject, det)
        if snapshot is not None and snapshot.marketplace is not None:
            self.marketplace = self._rebuilt_marketplace(start, snapshot.marketplace, unread=snapshot.read)
        else:
            self.marketplace = self._rebuilt_marketplace(start)
        self._events_read = start

    @property
    def state_snapshot_path(self) -> Path:
        """Where the velocity and cross-subject state are saved at a clean stop."""
        return self.settings.snapshot_dir / "state.snapshot"

    def _covered(self, read: IdWatermark) -> ColumnElement[bool]:
        """The stored events ``read`` covers: ids up to its last, less its gaps."""
        covered = m.Event.id <= read.last
        return covered & m.Event.id.not_in(sorted(read.gaps)) if read.gaps else covered

    def _seen(self, read: IdWatermark) -> ColumnElement[bool]:
        """The stored events this worker's state holds when it has followed to ``read``: those it covers, and
        this worker's own (the follower only notes them: they were taken in when scored)."""
        return self._covered(read) | (m.Event.origin == self.origin)

    def _marker(self) -> str:
        """The driver's parameter marker, for SQL text sent through it."""
        return "?" if self.db.dialect.paramstyle == "qmark" else "%s"

    @staticmethod
    def _covered_sql(read: IdWatermark, marker: str) -> tuple[str, list[Any]]:
        """:meth:`_covered` as SQL text with its parameters."""
        sql = f"id <= {marker}"
        if read.gaps:
            sql += f" AND id NOT IN ({', '.join(marker for _ in read.gaps)})"
        return f"({sql})", [read.last, *sorted(read.gaps)]

    def _seen_sql(self, read: IdWatermark, marker: str) -> tuple[str, list[Any]]:
        """:meth:`_seen` as SQL text with its parameters, for statements sent through the driver."""
        covered, params = self._covered_sql(read, marker)
        return f"({covered} OR origin = {marker})", [*params, self.origin]

    @staticmethod
    def _unread_sql(read: IdWatermark, marker: str) -> tuple[str, list[Any]]:
        """The stored events ``read`` does not cover, as SQL text with its parameters."""
        sql = f"id > {marker}"
        if read.gaps:
            sql += f" OR id IN ({', '.join(marker for _ in read.gaps)})"
        return f"({sql})", [read.last, *sorted(read.gaps)]

    def _stored_counts(self, read: IdWatermark) -> dict[str, int]:
        """How many stored events of each subject ``read`` covers."""
        with self._session() as s:
            counts = s.execute(
                select(m.Event.subject, func.count()).where(self._covered(read)).group_by(m.Event.subject)
            )
            return {subject: count for subject, count in counts}

    def _newest_read(self, read: IdWatermark) -> tuple[int, str, str] | None:
        """``(id, subject, event id)`` of the event at ``read``'s last id, which ties a snapshot to its database."""
        with self._session() as s:
            row = s.execute(
                select(m.Event.id, m.Event.subject, m.Event.event_id).where(m.Event.id == read.last)
            ).first()
        return (int(row[0]), str(row[1]), str(row[2])) if row is not None else None

    def _write_state_snapshot(self) -> None:
        """Save velocity and cross-subject state, signed, at a clean stop (writer closed, lock held).

        Every write has committed or failed (failed ones are taken back out of velocity here; the cross-subject
        state that saw one is not saved). The other workers' events
        are followed up to now first, so the state holds exactly the stored events the follow watermark covers:
        the header keeps that watermark, how many events of each subject it covers and the event at its last
        id, so a start can check that the snapshot belongs to this database and still fits it, and read only
        the events it does not cover."""
        read, state = self._state_to_save()
        payload = encode_state(state)
        write_encoded(self.state_snapshot_path, encode_state((self._state_header(read), payload)), self.signing_key)

    def _state_to_save(self) -> tuple[IdWatermark, dict[str, Any]]:
        """(lock held, every write committed or failed) Follow the other workers' events up to now and take failed
        writes back out: the follow watermark, and the state that holds exactly the stored events it covers."""
        while self._follow()[0] == FOLLOW_LIMIT:  # until a read comes back short: caught up
            pass
        self._apply_retractions()
        read = self._events_read
        current = not self._marketplace_stale and self._marketplace_rebuilt.is_set()  # else the next start rebuilds
        state = {
            "velocity": {subject: rt.velocity for subject, rt in self.subjects.items()},
            "marketplace": self.marketplace if current else None,
        }
        return IdWatermark(read.last, read.gaps), state

    def _state_header(self, read: IdWatermark) -> dict[str, Any]:
        """What a state snapshot of the events ``read`` covers says of them (queries stored events: no lock needed,
        as events are never rewritten under a watermark)."""
        return {
            "format": STATE_SNAPSHOT_FORMAT,
            "version": __version__,
            "read": {"last": read.last, "gaps": sorted(read.gaps)},
            "counts": self._stored_counts(read),
            "newest": self._newest_read(read),
            "blind_index": self.vault.blind_index_fingerprint,  # its windows are keyed by tokens of this chain
        }

    def _count_state_save(self, outcome: str) -> None:
        saves = self.counters.state_saves
        saves[outcome] = saves.get(outcome, 0) + 1

    def save_state_snapshot(self, wait: bool = False) -> bool:
        """Save the velocity and cross-subject state while serving, so that a crash replays only the events stored
        after it (a clean stop saves it too). Under the lock only while the writer commits what is queued, the
        other workers' events are followed and the process forks: a forked copy pickles the state (see
        ``risk_engine.forked``), and the snapshot thread signs it, with its header, and replaces the file.

        False if nothing was started: no ``os.fork`` here, or a save still under way. ``wait``: return once the
        file is written (True) or the save failed (False)."""
        if not FORK_AVAILABLE or not self._state_saving.acquire(blocking=False):
            return False
        started = time.perf_counter()
        # this process's own: workers sharing a home save their states at the same moments
        scratch = self.state_snapshot_path.with_suffix(f".{os.getpid()}.{self.origin}.pickle.tmp")
        scratch.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.writer.barrier().wait(SAVE_COMMIT_WAIT_S)  # off the lock: what is queued now commits
            with self._lock:
                paused = time.perf_counter()
                # and what was scored since: the state must hold no event whose write may yet fail. Bounded, as
                # every payment waits meanwhile: a database that cannot take writes now is tried at the next save
                if not self.writer.barrier().wait(SAVE_COMMIT_WAIT_S):
                    log.warning("state not saved: the writer did not commit within %.1f s", SAVE_COMMIT_WAIT_S)
                    self._count_state_save("writer_busy")
                    self._state_saving.release()
                    return False
                read, state = self._state_to_save()
                pid = fork_and_run(lambda: scratch.write_bytes(encode_state(state)))
                self._state_saved_of = (self._seq, read.last)
                paused_ms = (time.perf_counter() - paused) * 1000
        except BaseException:
            self._count_state_save("failed")
            self._state_saving.release()
            raise
        self.counters.state_save_pause_s = paused_ms / 1000

        def finish() -> bool:
            saved = False
            try:
                code = exit_code(pid)
                if code != 0:
                    log.error("the state snapshot's forked copy exited with %d; the last snapshot stays", code)
                    return False
                payload = scratch.read_bytes()
                write_encoded(
                    self.state_snapshot_path, encode_state((self._state_header(read), payload)), self.signing_key
                )
                log.info(
                    "state snapshot of the events up to id %d saved while serving (scoring paused %.1f ms, %.0f ms "
                    "in all, %d bytes)",
                    read.last,
                    paused_ms,
                    (time.perf_counter() - started) * 1000,
                    len(payload),
                )
                saved = True
                self.counters.state_saved_at = time.time()
                return True
            except (OSError, OperationalError) as exc:  # the last snapshot stays; a crash replays from it
                log.error("could not save the state snapshot: %s", type(exc).__name__)
                return False
            finally:
                self._count_state_save("saved" if saved else "failed")
                scratch.unlink(missing_ok=True)
                self._state_saving.release()

        saved = self._snapshot_writer.submit(finish)  # in order with the detector snapshots' writes
        return saved.result() if wait else True

    def _read_state_snapshot(self) -> StateSnapshot | None:
        """The last saved state (at a clean stop or while serving), if it verifies and matches the stored events;
        else None (rebuild)."""
        path = self.state_snapshot_path
        if not path.exists():
            return None
        try:
            header, payload = read_snapshot(path, self.signing_key)
        except SnapshotError as exc:
            log.error("REFUSED state snapshot: %s; rebuilding velocity and cross-subject state", exc)
            return None
        except Exception as exc:  # truncated or from an incompatible release: rebuild, never fail the start
            log.warning("state snapshot %s unreadable (%s); rebuilding", path, type(exc).__name__)
            return None
        if header.get("format") != STATE_SNAPSHOT_FORMAT or header.get("version") != __version__:
            log.info("state snapshot from another release; rebuilding velocity and cross-subject state")
            return None
        read = IdWatermark(int(header["read"]["last"]), header["read"]["gaps"])
        counts: dict[str, int] = header["counts"]
        newest = header["newest"]
        if header.get("blind_index") != self.vault.blind_index_fingerprint:
            log.info("state snapshot under another blind-index key chain; rebuilding velocity and cross-subject state")
            return None
        if self._stored_counts(read) != counts or (newest is not None and self._newest_read(read) != tuple(newest)):
            # events it holds were deleted since, or it is another database's snapshot
            log.info("state snapshot does not match the stored events; rebuilding velocity and cross-subject state")
            return None
        try:
            state = open_state(payload)
        except Exception as exc:
            log.warning("state snapshot %s unreadable (%s); rebuilding", path, type(exc).__name__)
            return None
        return StateSnapshot(read, sum(counts.values()), state["velocity"], state["marketplace"])

    def _note_own_events(self, read: IdWatermark) -> None:
        """Note read this worker's events committed since the last call (lock held), as far as they continue
        the watermark with no other worker's event before them: the follower need not read them back (a lone
        worker's follower reads nothing). From the first that does not, the follower reads them as before, so
        another worker's event in between is never skipped."""
        own = self._own_committed
        committed = [own.popleft() for _ in range(len(own))]  # the writer may append meanwhile: those wait
        for row_id in committed:
            if row_id <= read.last and row_id not in read.gaps:
                continue  # already read
            if row_id != read.last + 1 or read.gaps:
                return
            read.note(row_id)

    def refresh_events(self, limit: int = FOLLOW_LIMIT) -> int:
        """Take the events other workers stored since the last poll into this worker's velocity windows and
        cross-subject state (orders, seller devices, texts, credit tallies, merchant flags), so a burst spread
        over several workers behind a load balancer is counted by each of them within a poll. Detectors keep
        learning from this worker's own events only. Returns how many were taken in."""
        return self._follow(limit)[1]

    def _follow(self, limit: int = FOLLOW_LIMIT) -> tuple[int, int]:
        """:meth:`refresh_events`, returning how many rows it read (its own among them) and took in."""
        marker = "?" if self.db.dialect.paramstyle == "qmark" else "%s"
        read = self._events_read
        with self._lock:  # the watermark changes under the lock only
            self._note_own_events(read)
            read.expire()
            wanted, unread = self._unread_sql(read, marker)
        params: list[Any] = [self.origin, self.origin, *unread]
        # this worker's own rows only move the watermark: their JSON is not sent
        sql = (
            "SELECT id, subject, event_id, occurred_at, decision, score,"
            f" CASE WHEN origin = {marker} THEN NULL ELSE record END,"
            f" CASE WHEN origin = {marker} OR subject NOT IN ('merchant', 'merchant_day') THEN NULL"
            f" ELSE response END FROM events WHERE {wanted} ORDER BY id LIMIT {int(limit)}"
        )
        with self.db.connect() as conn:
            rows = conn.exec_driver_sql(sql, tuple(params)).all()
        sqlite = self.db.dialect.name == "sqlite"
        decoded: list[tuple[int, str, str, float, str, int, dict[str, Any] | None, list[str]]] = []
        for row_id, subject, event_id, occurred, decision, score, record, response in rows:  # outside the lock
            ts = 0.0
            codes: list[str] = []
            if record is not None:
                if isinstance(record, bytes | str):
                    record = orjson.loads(record)
                ts = (datetime.fromisoformat(occurred).replace(tzinfo=UTC) if sqlite else occurred).timestamp()
                answer = orjson.loads(response) if isinstance(response, bytes | str) else (response or {})
                codes = [r["code"] for r in answer.get("reasons", ()) if r.get("source") == "rule"]
            decoded.append((row_id, subject, event_id, ts, decision, score, record, codes))
        taken = 0
        for start in range(0, len(decoded), FOLLOW_CHUNK):  # scoring waits for one chunk at most
            with self._lock:
                for row_id, subject, event_id, ts, decision, score, record, codes in decoded[
                    start : start + FOLLOW_CHUNK
                ]:
                    if not read.wants(row_id):  # taken in meanwhile (a rebuild catching up)
                        continue
                    read.note(row_id)
                    rt = self.subjects.get(subject)
                    if record is None or rt is None:  # stored here, or a subject this worker does not score
                        continue
                    rt.velocity.add(record, ts)
                    if not self._marketplace_stale:
                        self.marketplace.observe(subject, record, ts, decision, score, codes)
                    self._mark_known(subject, event_id)
                    self.counters.followed[subject] = self.counters.followed.get(subject, 0) + 1
                    taken += 1
        if self._listener is not None:
            self._listener.followed(taken)
        return len(rows), taken

    def _rebuilt_marketplace(
        self,
        seen: IdWatermark | None = None,
        state: MarketplaceState | None = None,
        unread: IdWatermark | None = None,
        where: ColumnElement[bool] | None = None,
    ) -> MarketplaceState:
        """Sellers' credit facts and merchant flags from every stored review and merchant event, and the orders
        of the payments of the last 180 days (a review is about a recent order); or, given the ``state`` of a
        snapshot, that state with the events its watermark ``unread`` does not cover. With ``seen``, of the
        events this worker has taken in as of that watermark only (see :meth:`_seen`); with ``where``, of the
        events it selects only."""
        if state is None:
            state = MarketplaceState()
            latest = self._latest_occurred("payment")
            recent_payments = datetime.fromtimestamp((latest or 0.0) - ORDERS_KEPT_S, UTC)
            which: ColumnElement[bool] = (m.Event.subject != "payment") | (m.Event.occurred_at >= recent_payments)
        else:
            which = ~self._covered(unread) if unread is not None else true()
        if seen is not None:
            which = which & self._seen(seen)
        if where is not None:
            which = which & where
        self._observe_stored(state, which)
        return state

    def _observe_stored(self, state: MarketplaceState, which: ColumnElement[bool]) -> int:
        """Fold the stored events of the cross-subject subjects that ``which`` selects into ``state``, in the
        order they were scored; how many."""
        read = 0
        stmt = (
            select(
                m.Event.subject,
                m.Event.record,
                m.Event.occurred_at,
                m.Event.decision,
                m.Event.score,
                case(
                    (m.Event.subject.in_(("merchant", "merchant_day")), m.Event.response), else_=None
                ),  # flags' reasons
            )
            .where(m.Event.subject.in_(MarketplaceState.SUBJECTS), which)
            .order_by(m.Event.ingest_seq)
            .execution_options(yield_per=5000)
        )
        with self._session() as s:
            for subject, record, occurred, decision, score, response in s.execute(stmt):
                ts = (occurred.replace(tzinfo=UTC) if occurred.tzinfo is None else occurred).timestamp()
                answer = orjson.loads(response) if isinstance(response, bytes | str) else (response or {})
                codes = (r["code"] for r in answer.get("reasons", ()) if r.get("source") == "rule")
                state.observe(subject, record, ts, decision, score, codes)
                read += 1
        return read

    def _refresh_marketplace(self) -> None:
        """After a failed write of an event it learned from, start rebuilding the cross-subject state from
        storage beside scoring (lock held; ``_rebuild_marketplace_beside``), unless a rebuild is under way or
        one failed within ``MARKETPLACE_RETRY_S``. Scoring goes on meanwhile with the state as it is, which saw
        the lost event: the rebuild reads every review and merchant event and 180 days of payments, minutes at
        a large deployment's volume, which scoring used to wait for."""
        rebuilder = self._marketplace_rebuilder
        if rebuilder is not None and rebuilder.is_alive():
            return
        if time.monotonic() - self._marketplace_failed_at < MARKETPLACE_RETRY_S:
            return
        self._marketplace_stale = False  # a write that fails from here on marks it again: rebuilt once more
        self._marketplace_rebuilt.clear()
        rebuilder = threading.Thread(
            target=self._rebuild_marketplace_beside, name="risk-engine-marketplace-rebuild", daemon=True
        )
        self._marketplace_rebuilder = rebuilder
        rebuilder.start()

    def _held_at(self, cut: IdWatermark, seq: int) -> ColumnElement[bool]:
        """The stored events the state held at a cut (as ``_held_at_sql``)."""
        return self._covered(cut) | ((m.Event.origin == self.origin) & (m.Event.ingest_seq <= seq))

    def _taken_in_between(
        self, cut: IdWatermark, seq: int, later: IdWatermark, later_seq: int | None
    ) -> ColumnElement[bool]:
        """The stored events taken in after one cut and by a later one (as ``_taken_in_between_sql``)."""
        own = (m.Event.origin == self.origin) & (m.Event.ingest_seq > seq)
        if later_seq is not None:
            own = own & (m.Event.ingest_seq <= later_seq)
        others = ~self._covered(cut) & self._covered(later) & (m.Event.origin != self.origin)
        return others | own

    def _rebuild_marketplace_beside(self) -> None:
        """The cross-subject state rebuilt without the state lock, as new windows are (``_prepare_windows``): of
        the events the state held at a cut, then in a few rounds of those taken in since, each shorter; then,
        under the lock, of the last few, and swapped in."""
        try:
            self.writer.barrier().wait(30)  # without the lock: the cut's own barrier then finds little to wait for
            with self._lock:
                cut, seq = self._cut()
            state = self._rebuilt_marketplace(where=self._held_at(cut, seq))

            def take(cut: IdWatermark, seq: int, later: IdWatermark, later_seq: int) -> int:
                return self._observe_stored(state, self._taken_in_between(cut, seq, later, later_seq))

            # the rebuild read the whole history, and scoring went on meanwhile: one round at least
            cut, seq = self._catch_up(cut, seq, CATCH_UP_LEFT + 1, take)
            with self._lock:
                self._cut()
                self._observe_stored(state, self._taken_in_between(cut, seq, self._events_read, None))
                self.marketplace = state
        except Exception as exc:  # the database went away: retried at a scoring after MARKETPLACE_RETRY_S
            self._marketplace_failed_at = time.monotonic()
            self._marketplace_stale = True
            log.warning("could not rebuild the cross-subject state: %s", type(exc).__name__)
        finally:
            self._marketplace_rebuilt.set()

    def seller_credit(self, seller_id: str, history: int = 100) -> dict[str, Any]:
        """A seller's credit score, each component's contribution and the score's history (newest first)."""
        with self._lock:
            credit = self.marketplace.credit(seller_id)
        if credit is None:
            raise NotFound(f"no events for seller {seller_id}")
        with self._session() as s:
            rows = s.execute(
                select(
                    m.SellerCredit.occurred_at,
                    m.SellerCredit.score,
                    m.SellerCredit.tier,
                    m.SellerCredit.subject,
                    m.SellerCredit.event_id,
                )
                .where(m.SellerCredit.seller_id == seller_id)
                .order_by(m.SellerCredit.id.desc())
                .limit(history)
            ).all()
        view = score_view(seller_id, credit)
        view["as_of"] = datetime.fromtimestamp(credit.as_of, UTC).isoformat()
        view["history"] = [
            {"at": at.isoformat(), "score": score, "tier": tier, "event": f"{subject}:{event_id}"}
            for at, score, tier, subject, event_id in rows
        ]
        return view

    def recompute_credit(self, seller_id: str) -> CreditScore | None:
        """The seller's score recomputed from every stored event (what the live score must equal)."""
        return self._rebuilt_marketplace().credit(seller_id)

    def rollup_merchants(self, day: date | None = None) -> dict[str, Any]:
        """Roll up each merchant's day (default: the last full day before the latest stored event) and score
        the roll-ups through the ``merchant_day`` policy and detectors. Running it again for the same day
        returns the stored answers; a day whose figures changed since is reported, not scored twice."""
        self.writer.barrier().wait(30)
        if day is None:
            latest = self._latest_occurred("payment") or self._latest_occurred("merchant")
            if latest is None:
                raise NotFound("no payments or merchant events to roll up")
            day = (datetime.fromtimestamp(latest, UTC) - timedelta(days=1)).date()
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = start + timedelta(days=1)
        stmt = (
            select(m.Event.subject, m.Event.record, m.Event.decision)
            .where(
                m.Event.subject.in_(("payment", "merchant")), m.Event.occurred_at >= start, m.Event.occurred_at < end
            )
            .order_by(m.Event.ingest_seq)
            .execution_options(yield_per=STREAMED_ROWS)
        )
        with self._session() as s:  # a day of a marketplace's events, folded as they stream: never all at once
            rolled_up = rollup(day.isoformat(), end - timedelta(microseconds=1), s.execute(stmt))
        results, changed = [], []
        outcomes = []
        for rolled in rolled_up:
            try:
                outcome = self.score_event("merchant_day", rolled)
            except Conflict:
                changed.append(rolled.seller_id)
                continue
            outcomes.append((rolled, outcome))
        for rolled, outcome in outcomes:
            outcome.committed.wait(30)
            outcome = self.settle(outcome)
            answer = outcome.response
            results.append(
                {
                    "seller_id": rolled.seller_id,
                    "flag": answer["decision"],
                    "score": answer["score"],
                    "reasons": [r["code"] for r in answer["reasons"] if r["score_delta"] or r["source"] == "rule"],
                    "replayed": outcome.replayed,
                }
            )
        return {
            "day": day.isoformat(),
            "merchants": len(results),
            "flagged": [r for r in results if r["flag"] != "ok"],
            "changed_since_rolled_up": changed,
        }

    def merchant_risk(self, seller_id: str) -> dict[str, Any]:
        """A merchant's current flag (the strictest in the last 7 days), its reasons and its flag history."""
        with self._lock:
            view = self.marketplace.merchant_view(seller_id)
        if view is None:
            raise NotFound(f"no merchant events for seller {seller_id}")
        return view

    def _latest_occurred(self, subject: str) -> float | None:
        with self._session() as s:
            latest = s.scalar(select(func.max(m.Event.occurred_at)).where(m.Event.subject == subject))
        if latest is None:
            return None
        return latest.replace(tzinfo=UTC).timestamp() if latest.tzinfo is None else latest.timestamp()

    def _stored_rows(
        self,
        subject: str,
        since_ts: float | None = None,
        after_seq: int | None = None,
        features: bool = False,
        seen: IdWatermark | None = None,
        unread: IdWatermark | None = None,
        origin: str | None = None,
        where: tuple[str, list[Any]] | None = None,
    ) -> Iterator[tuple[dict[str, Any], float, int, dict[str, Any]]]:
        """``(record, occurred_at timestamp, ingest_seq, features)`` of stored events, in scoring order: those
        this worker has taken in as of ``seen`` (see :meth:`_seen`), and not covered by ``unread``, if given;
        with ``origin``, only those the worker of that origin scored.

        What start-up replays (velocity, detectors after their snapshots), read through the driver with only
        the columns it needs: loading whole ``Event`` rows decoded seven JSON columns per event, and that cost
        as much as the replay itself. ``features`` is ``{}`` unless asked for. ``where``: a condition of its own,
        SQL text with its parameters (written with :meth:`_marker`).
        """
        marker = self._marker()
        columns = "record, occurred_at, ingest_seq" + (", features" if features else "")
        sql = f"SELECT {columns} FROM events WHERE subject = {marker}"
        params: list[Any] = [subject]
        if since_ts is not None:
            sql += f" AND occurred_at >= {marker}"
            params.append(self._bound_time(datetime.fromtimestamp(since_ts, UTC)))
        if after_seq is not None:
            sql += f" AND ingest_seq > {marker}"
            params.append(after_seq)
        if origin is not None:
            sql += f" AND origin = {marker}"
            params.append(origin)
        for which, more in (
            self._seen_sql(seen, marker) if seen is not None else ("", []),
            self._unread_sql(unread, marker) if unread is not None else ("", []),
            where if where is not None else ("", []),
        ):
            if which:
                sql += f" AND {which}"
                params.extend(more)
        sql += " ORDER BY ingest_seq"
        sqlite = self.db.dialect.name == "sqlite"
        with self.db.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=5000).exec_driver_sql(sql, tuple(params))
            for row in rows:
                record, occurred, seq = row[0], row[1], row[2]
                stored = row[3] if features else None
                if sqlite:  # text in SQLAlchemy's format, UTC; JSON as text
                    ts = datetime.fromisoformat(occurred).replace(tzinfo=UTC).timestamp()
                    record = orjson.loads(record)
                    stored = orjson.loads(stored) if stored is not None else None
                else:  # the driver parses timestamps and JSON itself
                    ts = occurred.timestamp()
                yield record, ts, seq, stored or {}

    def _bound_time(self, at: datetime) -> Any:
        """A time as a driver parameter compared with stored ones (SQLite keeps SQLAlchemy's text format)."""
        return sqlite_time(at) if self.db.dialect.name == "sqlite" else at

    def backtest_events(self, subject: str, since_ts: float, warmup_s: float) -> Iterator[StoredEvent]:
        """Stored events from ``since_ts - warmup_s`` on, in scoring order, with their labels (if any).

        Rows are read through the driver, not the ORM: a backtest reads every row of the period, and the
        per-column result processing cost as much as the replay itself.
        """
        sqlite = self.db.dialect.name == "sqlite"
        marker = "?" if self.db.dialect.paramstyle == "qmark" else "%s"
        since = datetime.fromtimestamp(max(since_ts - warmup_s, 0.0), UTC)  # stored times start in 1970
        sql = (
            "SELECT event_id, record, occurred_at, ingest_seq, model_scores, policy_version, decision, score, "
            f"{EVENT_OUTCOME_SQL} FROM events WHERE subject = {marker} AND occurred_at >= {marker} ORDER BY ingest_seq"
        )
        bound = self._bound_time(since)
        with self.db.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=5000).exec_driver_sql(sql, (subject, bound))
            for event_id, record, occurred, seq, stored, policy, decision, score, labelled_as in rows:
                if sqlite:  # text in SQLAlchemy's format, UTC
                    ts = datetime.fromisoformat(occurred).replace(tzinfo=UTC).timestamp()
                    record = orjson.loads(record)
                    stored = orjson.loads(stored) if stored is not None else {}
                else:  # the driver parses timestamps and JSON itself
                    ts = occurred.timestamp()
                    stored = stored or {}
                yield StoredEvent(
                    event_id,
                    record,
                    ts,
                    seq,
                    stored.get("scores", {}),
                    float(stored.get("points", 0.0)),
                    policy,
                    decision,
                    score,
                    label_outcome(labelled_as),
                )

    def stored_event(self, subject: str, event_id: str) -> tuple[StoredEvent, dict[str, Any], dict[str, Any]]:
        """A stored event as a backtest sees it, with the aggregates it was scored with and its answer."""
        with self._session() as s:
            row = s.scalars(select(m.Event).where(m.Event.subject == subject, m.Event.event_id == event_id)).first()
            if row is None:
                raise NotFound(f"no {subject} {event_id}")
            labels = list(
                s.scalars(select(m.Label.is_fraud).where(m.Label.subject == subject, m.Label.event_id == event_id))
            )
        stored = row.model_scores or {}
        event = StoredEvent(
            event_id,
            row.record,
            row.occurred_at.timestamp(),
            row.ingest_seq,
            stored.get("scores", {}),
            float(stored.get("points", 0.0)),
            row.policy_version,
            row.decision,
            row.score,
            any(labels) if labels else None,
        )
        return event, row.aggregates, row.response

    def latest_event_time(self, subject: str) -> float | None:
        """Time of the subject's latest stored event."""
        return self._latest_occurred(subject)

    def snapshot_path(self, det: Detector) -> Any:
        """Where a detector's snapshot lives."""
        return self.settings.snapshot_dir / f"{det.name}.snapshot"

    def _restore_detector(self, subject: str, det: Detector) -> None:
        if isinstance(det, PopulationDetector):
            self._restore_population(subject, det)
            return
        path = self.snapshot_path(det)
        restored = False
        if path.exists():
            try:
                restored = det.restore(snapshot_state(read_snapshot(path, self.signing_key)))
                if not restored:
                    log.warning("snapshot %s was made for another version of %s; rebuilding", path, det.name)
            except SnapshotError as exc:
                log.error("REFUSED detector snapshot: %s; rebuilding %s from stored events", exc, det.name)
        if restored:
            # what the worker that wrote the snapshot learned after it: its own events with a later sequence
            # (other workers number theirs from their own starts, and this detector never learned theirs)
            rows = self._stored_rows(subject, after_seq=det.last_seq, origin=det.last_origin, features=True)
            for record, _, seq, features in rows:
                det.select(record.get(det.spec.per))
                x = stored_vector(features, det.name, record, det.features.names) or {}
                try:
                    raw, _ = det.score_one(x)
                    det.learn_one(x, raw, seq, record.get("sample_weight", 1.0))
                except Exception as exc:
                    self._detector_failed(det, "rebuild", exc)
            if det.supervised:
                self._replay_labels(subject, det)
            return
        # full rebuild: recompute features from stored records with a private velocity state
        velocity = VelocityState(det.features.aggregates, self.settings.velocity_max_events_per_key)
        for record, ts, seq, _ in self._stored_rows(subject):
            aggs = velocity.query(record, ts)
            det.select(record.get(det.spec.per))
            try:
                x = det.features.compute(record, aggs, self.lists.sets, {})
                raw, _ = det.score_one(x)
                det.learn_one(x, raw, seq, record.get("sample_weight", 1.0))
            except Exception as exc:  # one event a detector cannot take must not keep the service from starting
                self._detector_failed(det, "rebuild", exc)
            velocity.add(record, ts)
        if det.supervised:
            self._replay_labels(subject, det)

    def _restore_population(self, subject: str, det: PopulationDetector) -> None:
        """A population detector's fit comes from the database; its event counter from storage."""
        self._load_fit(det)
        with self._session() as s:
            count, last = s.execute(
                select(func.count(), func.max(m.Event.ingest_seq)).where(m.Event.subject == subject)
            ).one()
        det.events_seen, det.last_seq = int(count or 0), int(last if last is not None else -1)

    def _load_fit(self, det: PopulationDetector) -> bool:
        """Use the newest stored fit of ``det`` if it is newer than the one in use. True if it changed."""
        with self._session() as s:
            row = s.execute(
                select(m.ModelFit.id, m.ModelFit.digest, m.ModelFit.blob)
                .where(m.ModelFit.name == det.name)
                .order_by(m.ModelFit.id.desc())
                .limit(1)
            ).first()
        if row is None or row[0] == self._fit_ids.get(det.name):
            return False
        fit_id, digest, blob = row
        self._fit_ids[det.name] = fit_id
        if digest != det.spec.digest:
            log.warning("the stored fit of %s was made for another version of its spec; refit it", det.name)
            return False
        try:
            fit = open_signed(blob, self.signing_key, f"model_fits[{fit_id}]")
        except SnapshotError as exc:
            log.error("REFUSED fit of %s: %s", det.name, exc)
            return False
        with self._lock:
            return det.use_fit(fit)

    def refresh_fits(self) -> list[str]:
        """Pick up population fits made since (by `risk-engine models fit` or another worker)."""
        changed = []
        for rt in self.subjects.values():
            for det in rt.detectors:
                if isinstance(det, PopulationDetector) and self._load_fit(det):
                    changed.append(det.version)
        return changed

    def detector(self, name: str) -> tuple[str, Detector]:
        """``(subject, detector)`` by name."""
        for subject, rt in self.subjects.items():
            for det in rt.detectors:
                if det.name == name:
                    return subject, det
        raise NotFound(f"no detector {name}")

    def fit_detector(self, name: str, actor: str, max_events: int | None = None) -> dict[str, Any]:
        """Fit a population detector on its subject's most recent stored events, store the fit (every worker
        picks it up) and start scoring with it. Returns what was fitted."""
        subject, det = self.detector(name)
        if not isinstance(det, PopulationDetector):
            raise InvalidInput(
                [
                    {
                        "field": "name",
                        "reason": f"{name} is not a population detector but {det.spec.kind}; only population "
                        "detectors are fitted",
                    }
                ]
            )
        limit = max_events or det.spec.fit_events
        self.writer.barrier().wait(30)  # what was scored before this call is part of the population
        rows: list[list[float]] = []
        stmt = (
            select(m.Event.record, m.Event.features, m.Event.aggregates)
            .where(m.Event.subject == subject)
            .order_by(m.Event.ingest_seq.desc())
            .limit(limit)
        )
        names = list(det.spec.features)
        lists = self.lists.sets
        with self._session() as s:
            for record, features, aggs in s.execute(stmt):
                x = stored_vector(features, name, record, det.features.names)
                if x is None:  # stored before this detector existed: its features from the stored record
                    try:
                        x = det.features.compute(record, aggs or {}, lists, {})
                    except KeyError:
                        continue
                rows.append([float(x.get(f, 0.0)) for f in names])
        if len(rows) < 10:
            raise InvalidInput(
                [
                    {
                        "field": "name",
                        "reason": f"{name} needs at least 10 stored {subject} events to fit; found {len(rows)}",
                    }
                ]
            )
        import numpy as np

        fit = fit_population(det.spec, np.asarray(rows[::-1]), now_utc())
        blob = sign_encoded(encode_state(fit), self.signing_key)
        with self._session() as s:
            row = m.ModelFit(
                name=name,
                digest=det.spec.digest,
                events=fit.events,
                fitted_at=fit.fitted_at,
                fitted_by=actor,
                blob=blob,
            )
            s.add(row)
            self._audit(s, actor, "model.fit", f"model:{name}", None, {"events": fit.events, "digest": det.spec.digest})
            s.commit()
            fit_id = row.id
        with self._lock:
            det.use_fit(fit)
            self._fit_ids[name] = fit_id
        return {
            "name": name,
            "subject": subject,
            "version": det.version,
            "estimator": det.spec.estimator,
            "events": fit.events,
            "fitted_at": fit.fitted_at.isoformat(),
            "score_quantiles": det.quantiles(),
        }

    def snapshot_detectors(self, background: bool = False) -> None:
        """Write every detector's signed snapshot (call with the state lock held).

        The state is pickled here, under the lock, so it is consistent; with ``background`` the signing,
        writing and fsync happen on a thread, off the request path.
        """
        encoded = []
        for rt in self.subjects.values():
            for det in rt.detectors:  # each streaming one names this worker since its start (_snapshot_as_started)
                state = det.state()
                per_key = state.pop("per_key", None)  # the changes since the last: applied off the lock
                encoded.append((self.snapshot_path(det), encode_state(state), per_key))
        self._since_snapshot = 0

        def write() -> None:
            for path, payload, per_key in encoded:
                if per_key is not None:
                    view = per_key.apply()
                    if view is None:  # taken over by a later snapshot, which writes this detector
                        continue
                    payload = encode_state({"state": payload, "per_key": view})
                try:
                    write_encoded(path, payload, self.signing_key)
                except OSError as exc:  # the next snapshot retries; restart replays from the last good one
                    log.error("could not write snapshot %s: %s", path, exc)

        if background:
            self._snapshot_writer.submit(write)  # one thread, in order: writes never interleave
        else:
            self.flush_snapshots()
            write()

    def flush_snapshots(self) -> None:
        """Wait until snapshots queued for writing are on disk."""
        self._snapshot_writer.submit(lambda: None).result()

    # -- scoring ---------------------------------------------------------------------------------------------
    def _check_attributes(self, schema: SubjectSchema, attributes: Mapping[str, Any]) -> None:
        declared = schema.attribute_types
        if not attributes:
            return
        numbers = schema.number_attributes
        if attributes.keys() <= numbers and {type(v) for v in attributes.values()} <= {int, float}:
            return  # the common case: every attribute a declared number
        if all(_ATTRIBUTE_OK[declared.get(k)](v) for k, v in attributes.items()):
            return
        errors = []
        for name, value in attributes.items():
            ftype = declared.get(name)
            where = f"attributes.{name}"
            if ftype is None:
                errors.append(
                    {
                        "field": where,
                        "reason": f"attribute '{name}' is not declared for subject "
                        f"{schema.name} (declare it in subjects.toml)",
                    }
                )
            elif ftype is FieldType.NUMBER and (isinstance(value, bool) or not isinstance(value, int | float)):
                errors.append({"field": where, "reason": "must be a number"})
            elif ftype is FieldType.STRING and not isinstance(value, str):
                errors.append({"field": where, "reason": "must be a string"})
            elif ftype is FieldType.BOOL and not isinstance(value, bool):
                errors.append({"field": where, "reason": "must be true or false"})
        if errors:
            raise InvalidInput(errors)

    def _lookup_stored(self, subject: str, event_id: str) -> tuple[str, dict[str, Any], int] | None:
        """(request hash, answer, the blind-index generation of the hash) of a stored event."""
        try:
            with self.db.connect() as conn:
                row = conn.execute(
                    select(m.Event.request_hash, m.Event.response, m.Event.hash_generation).where(
                        m.Event.subject == subject, m.Event.event_id == event_id
                    )
                ).first()
        except OperationalError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return (row[0], row[1], row[2] or 1) if row is not None else None

    def _request_hash_under(self, kind: SubjectKind, event: Any, generation: int) -> str:
        """The request's hash under an earlier generation of the blind-index key chain: a retry of a request
        stored before a rotation is compared under the generation it was hashed with."""
        record, _ = kind.flatten(event, self.vault.blind_indexes_of_generation(generation))
        return request_hash_of(kind, record, event)

    def _replay(self, kind: SubjectKind, event_id: str, request_hash: str, event: Any = None) -> ScoreOutcome | None:
        key = f"{kind.name}\x1f{event_id}"
        with self._lock:
            pending = self._recent.get(key)
        if pending is not None:
            if pending[0] != request_hash:
                raise Conflict(f"{kind.id_field} {event_id} was already scored with a different request")
            # its write in flight may yet collide with another worker's row: settled as the first caller's is
            identity = (kind.name, event_id, request_hash)
            return ScoreOutcome(pending[1], self._ticket_of(key), replayed=True, identity=identity)
        if key not in self._known_ids and self._known_ids_whole.is_set():
            return None
        stored = self._lookup_stored(kind.name, event_id)
        if stored is not None:
            stored_hash, answer, generation = stored
            if generation != self.vault.blind_index_generation and event is not None:
                request_hash = self._request_hash_under(kind, event, generation)
            if stored_hash != request_hash:
                raise Conflict(f"{kind.id_field} {event_id} was already scored with a different request")
            return ScoreOutcome(orjson.dumps(answer), done_ticket(), replayed=True)
        return None

    def score_payment(self, payment: PaymentIn, request_hash: str | None = None) -> ScoreOutcome:
        """Score a payment; the same payment id again returns the stored decision and counts nothing."""
        return self.score_event("payment", payment, request_hash)

    def score_event(self, subject: str, event: Any, request_hash: str | None = None) -> ScoreOutcome:
        """Score an event of any subject (a validated model of its contract) through the one pipeline.

        The same id again returns the stored answer and counts nothing; with a different request, a conflict.
        """
        started = time.perf_counter()
        kind = SUBJECT_KINDS[subject]
        rt = self.subjects[subject]
        self._check_attributes(rt.schema, event.attributes)
        event_id = kind.event_id(event)
        occurred_at: datetime = event.occurred_at
        ts = occurred_at.timestamp()
        if ts > time.time() + self.settings.max_future_s:
            # stored, it would become the latest event, and a restart rebuilds velocity from the days before that
            raise InvalidInput(
                [
                    {
                        "field": "occurred_at",
                        "reason": f"is more than {self.settings.max_future_s / 3600:g} h ahead of this server's "
                        "clock; send the time the event happened, in UTC or with its offset",
                    }
                ]
            )
        record, pii = kind.flatten(event, self.vault)
        if request_hash is None:
            request_hash = request_hash_of(kind, record, event)
        replay = self._replay(kind, event_id, request_hash, event)
        if replay is not None:
            return replay
        if self.writer.writing_since is not None and self.writer.stalled_s() > self.settings.commit_wait_s:
            # the database has stalled: refused at once, before anything is counted, not queued behind the stall
            raise DatabaseUnavailable("writes stalled")
        key = f"{subject}\x1f{event_id}"
        with self._lock:
            pending = self._recent.get(key)
            if pending is not None:  # a concurrent twin got here first
                if pending[0] != request_hash:
                    raise Conflict(f"{kind.id_field} {event_id} was already scored with a different request")
                identity = (subject, event_id, request_hash)
                return ScoreOutcome(pending[1], self._ticket_of(key), replayed=True, identity=identity)
            if self._retractions:
                self._apply_retractions()
            if self._marketplace_stale:
                self._refresh_marketplace()
            self._seq += 1  # after the retractions: the writer fails the events numbered before them
            seq = self._seq
            self.marketplace.enrich(subject, record, ts)  # seller credit, flag, order link: stored with the record
            if self.base_currency is not None and "amount.major" in record:
                # after the request hash, as the enrichment: new rates do not make a replay a conflict
                base = self.base_currency.convert(record["amount.major"], record["amount.currency"])
                if base is not None:
                    record["amount.base"] = base
            ev = self._evaluate(rt, record, ts, seq)
            verdict, aggs, vectors, scores = ev.verdict, ev.aggregates, ev.vectors, ev.scores
            elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
            response = self._response(kind, event_id, verdict, rt, scores, ev.model_score, elapsed_ms)
            committed = Ticket()  # completed by the writer once the row is committed
            body = orjson.dumps(response)
            self._in_flight[key] = committed
            self._remember(key, (request_hash, body))
            fired = (r.code for r in verdict.reasons if r.source == "rule")
            moved, placed = None, None
            if subject == "payment":  # its only effect is its order: one a failed write can take back out
                placed = self.marketplace.place_order(record, ts, verdict.decision.value, verdict.score, fired)
            else:
                moved = self.marketplace.observe(subject, record, ts, verdict.decision.value, verdict.score, fired)
            self._mark_known(subject, event_id)
            self._count(verdict)
            self._since_snapshot += 1
            if self._since_snapshot >= self.settings.snapshot_every:
                self.snapshot_detectors(background=True)
        committed.add_done_callback(lambda f: self._after_write(f, rt, key, record, ts, placed))
        try:
            key_id, blob = self.vault.seal(pii, f"{subject}:{event_id}") if pii else (None, None)
            row = {
                "subject": subject,
                "event_id": event_id,
                "occurred_at": occurred_at,
                "ingest_seq": seq,
                "record": record,
                "features": rt.packer.pack(vectors),
                "aggregates": aggs,
                "pii_key_id": key_id,
                "pii_blob": blob,
                "decision": verdict.decision.value,
                "score": verdict.score,
                "policy_version": rt.policy.label,
                "model_versions": response["model_versions"],
                "model_scores": {
                    "scores": {m.name: m.score for m in scores},
                    "points": sum(m.contribution for m in scores),
                    "model_score": ev.model_score,
                },
                "shadow": ev.shadow,
                "response": body,
                "request_hash": request_hash,
                "hash_generation": self.vault.blind_index_generation,
                "elapsed_ms": elapsed_ms,
                "created_at": now_utc(),
                "origin": self.origin,
            }
            tally = Tally(
                subject, hour_of(ts), rule_codes(response), ShadowOutcome.of(verdict.decision.value, ev.shadow)
            )
            self.writer.submit(self._event_insert, row, committed, tally, counted_as=seq)
        except BaseException as exc:
            # the answer is remembered with this ticket: failing it takes the event back out and lets a
            # replay fail as this call does, instead of waiting for a write that will never come
            committed.set_exception(exc)
            raise
        if moved is not None:  # the seller's score or tier changed: its history row (derived; see credit.py)
            seller_id, credit = moved
            self.writer.submit(
                self._credit_insert,
                {
                    "seller_id": seller_id,
                    "subject": subject,
                    "event_id": event_id,
                    "occurred_at": occurred_at,
                    "score": credit.score,
                    "tier": credit.tier,
                    "components": score_view(seller_id, credit)["components"],
                    "created_at": now_utc(),
                },
            )
        return ScoreOutcome(
            body,
            committed,
            model_scores=tuple(scores),
            model_score=ev.model_score,
            identity=(subject, event_id, request_hash),
        )

    def settle(self, outcome: ScoreOutcome) -> ScoreOutcome:
        """The answer to give once ``outcome``'s write is done: itself, once stored. If another worker stored the
        same id first (a retry that reached a worker before its follower took the first one in), that worker's
        answer, as a replay, or a conflict if it was another request. Else what ``raise_if_not_stored`` raises."""
        if isinstance(outcome.committed.exception(), DuplicateRow) and outcome.identity is not None:
            subject, event_id, request_hash = outcome.identity
            stored = self._lookup_stored(subject, event_id)
            if stored is not None:
                if stored[0] != request_hash:
                    id_field = SUBJECT_KINDS[subject].id_field
                    raise Conflict(f"{id_field} {event_id} was already scored with a different request")
                return ScoreOutcome(orjson.dumps(stored[1]), done_ticket(), replayed=True)
        outcome.raise_if_not_stored()
        return outcome

    def _evaluate(self, rt: SubjectRuntime, record: dict[str, Any], ts: float, seq: int) -> Evaluation:
        aggs = rt.velocity.query(record, ts)
        lists = self.lists.current(now_utc())
        vectors: dict[str, dict[str, float]] = {}
        raws: list[float] = []
        outputs: list[DetectorOutput] = []
        failed: set[str] | None = None
        for det in rt.detectors:
            if det.spec.per:
                det.select(record.get(det.spec.per))
            try:
                x = det.features.compute(record, aggs, lists, {})
                raw, calibrated = det.score_one(x)
            except Exception as exc:
                # a detector that raises adds nothing to this event and does not learn it: the rules still
                # decide, where a 500 would stop every payment until the detector is mended
                self._detector_failed(det, "score", exc)
                failed = (failed or set()) | {det.name}
                vectors[det.name] = {}
                raws.append(0.0)
                outputs.append(DetectorOutput(det.spec.weight, 0.0, True, not det.supervised, False))
                continue
            vectors[det.name] = x
            raws.append(raw)
            outputs.append(
                DetectorOutput(det.spec.weight, calibrated, det.warming_up, not det.supervised, det.has_opinion)
            )
        combined, points = combine(rt.combine, outputs)
        scores: list[ModelScore] = []
        for det, out, share in zip(rt.detectors, outputs, points, strict=True):
            # explained only when the detector leans towards fraud and adds a point or more: when an analyst needs
            # to know why (payment and review models add points from 0, and most events need no explaining)
            top: tuple[tuple[str, float], ...] = ()
            if share >= 1.0 and out.score > 0.5:
                try:
                    top = tuple(det.explain(vectors[det.name]))
                except Exception as exc:  # the score stands, unexplained
                    self._detector_failed(det, "explain", exc)
            scores.append(
                ModelScore(
                    det.name,
                    det.version,
                    raws[len(scores)],
                    out.score,
                    share,
                    explanation=f"driven by {', '.join(n for n, _ in top)}" if top else None,
                    warming_up=out.warming_up,
                    top_features=top,
                    failed=failed is not None and det.name in failed,
                )
            )
        model_values = {s.name: s.score for s in scores}
        hits = rt.policy.compiled.evaluate(record, aggs, lists, model_values)
        verdict = decide(rt.policy.compiled, hits, scores)
        shadow_record = None
        shadow = rt.shadow
        if shadow is not None:
            shadow_hits = shadow.compiled.evaluate(record, aggs, lists, model_values)
            decision, score = decision_for(shadow.compiled, shadow_hits, sum(points))
            shadow_record = {
                "version": shadow.label,
                "decision": decision.value,
                "score": score,
                "rules": [shadow.compiled.rules[i].name for i in shadow_hits],
            }
        rt.velocity.add(record, ts)
        weight = record.get("sample_weight", 1.0)  # what a sampled stream's event stands for
        for det, raw in zip(rt.detectors, raws, strict=True):
            if failed is not None and det.name in failed:
                continue
            try:
                det.learn_one(vectors[det.name], raw, seq, weight)
            except Exception as exc:  # the decision stands; the detector has missed one event
                self._detector_failed(det, "learn", exc)
        return Evaluation(verdict, aggs, vectors, scores, combined, shadow_record)

    def _response(
        self,
        kind: SubjectKind,
        event_id: str,
        verdict: Verdict,
        rt: SubjectRuntime,
        scores: list[ModelScore],
        model_score: float,
        elapsed_ms: float,
    ) -> dict[str, Any]:
        decision = verdict.decision.value
        return {
            kind.id_field: event_id,
            "decision": kind.decision_names[decision] if kind.decision_names else decision,
            "score": verdict.score,
            "reasons": [
                {"code": r.code, "text": r.text, "source": r.source, "score_delta": r.score_delta}
                for r in verdict.reasons
            ],
            "tags": list(verdict.tags),
            "model_score": round(model_score, 4),
            "models": [
                {
                    "name": s.name,
                    "score": round(s.score, 4),
                    "points": round(s.contribution, 2),
                    "warming_up": s.warming_up,
                    "top_features": [{"feature": f, "effect": e} for f, e in s.top_features],
                }
                for s in scores
            ],
            "policy_version": rt.policy.label,
            "model_versions": {s.name: s.version for s in scores},
            "elapsed_ms": elapsed_ms,
            **kind.answer_fields(verdict.score),
        }

    def _ticket_of(self, key: str) -> Ticket:
        """The ticket of a remembered answer: its write's while in flight, else one already committed (a failed
        write takes the answer out of ``_recent`` before its ticket leaves ``_in_flight``)."""
        return self._in_flight.get(key) or COMMITTED

    def _remember(self, event_id: str, pending: Pending) -> None:
        self._recent[event_id] = pending
        self._recent.move_to_end(event_id)
        while len(self._recent) > RECENT_CACHE:
            self._recent.popitem(last=False)

    def _count(self, verdict: Verdict) -> None:
        c = self.counters
        c.decisions[verdict.decision.value] = c.decisions.get(verdict.decision.value, 0) + 1
        for rule in verdict.fired:
            c.rule_hits[rule.name] = c.rule_hits.get(rule.name, 0) + 1

    def _after_write(
        self,
        write: Ticket,
        rt: SubjectRuntime,
        key: str,
        record: dict[str, Any],
        ts: float,
        placed: PlacedOrder | None = None,
    ) -> None:
        """Runs in the writer thread (or in the caller's, when the write could not be queued): a failed write's
        event is taken back out of velocity and its answer forgotten, so a retry is scored anew.

        Takes no lock: a caller may hold the state lock while it waits for the writer (a policy swap's or a
        rebuild's barrier), so waiting for that lock here would stall both. The failure is queued, then the
        answer leaves the cache (one operation on a built-in container each): a retry that finds the answer
        gone finds the failure queued too, and the next holder of the lock applies it before scoring, taking the
        failed ticket out of ``_in_flight`` there; until then a replay that still finds the answer gets that
        ticket, never a made-up success."""
        if write.exception() is None:
            self._in_flight.pop(key, None)
            return
        self._retractions.append((rt, record, ts, key, write, placed))
        subject = key.split("\x1f", 1)[0]
        if subject != "payment" and subject in MarketplaceState.SUBJECTS:
            # it learned from an event that was not stored: rebuild it (a payment's order is taken back out
            # instead: a rebuild reads every review and merchant event, and 180 days of payments)
            self._marketplace_stale = True
        self._recent.pop(key, None)

    def _apply_retractions(self) -> None:
        """Take the events of failed writes back out of velocity, and their tickets out of ``_in_flight`` unless a
        retry's has taken their place (lock held). Then the writer fails the writes of the events decided
        before, which counted them."""
        failures = self.writer.failed_counted  # read first: each failure it counts has queued its retraction
        while self._retractions:
            rt, record, ts, key, write, placed = self._retractions.popleft()
            rt.velocity.retract(record, ts)
            if placed is not None and not self.marketplace.unplace(placed):
                self._marketplace_stale = True  # the order changed since: rebuilt before the next scoring
            if self._in_flight.get(key) is write:
                del self._in_flight[key]
        self.writer.state_repaired(failures, self._seq)

    # -- reading back -----------------------------------------------------------------------------------------
    def _detectors_of(self, subject: str) -> Sequence[Detector]:
        rt = self.subjects.get(subject)
        return rt.detectors if rt is not None else ()

    def get_payment(self, payment_id: str) -> dict[str, Any]:
        """The stored decision and the payment's PII, masked."""
        return self.get_event("payment", payment_id)

    def get_event(self, subject: str, event_id: str) -> dict[str, Any]:
        """A stored event's decision, features, PII (masked) and the labels received for it, oldest first."""
        kind = SUBJECT_KINDS[subject]
        try:
            with self._session() as s:
                row = s.scalars(select(m.Event).where(m.Event.subject == subject, m.Event.event_id == event_id)).first()
                stored_labels = s.scalars(
                    select(m.Label)
                    .where(m.Label.subject == subject, m.Label.event_id == event_id)
                    .order_by(m.Label.received_at, m.Label.id)
                ).all()
        except OperationalError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        if row is None:
            raise NotFound(f"no {subject} {event_id}")
        masked: dict[str, str] = {}
        if row.pii_blob is not None and row.pii_key_id is not None:
            if not self.vault.has_data_key(row.pii_key_id):
                self._load_data_key(row.pii_key_id)  # another worker's, made after this one started
            pii = self.vault.open(row.pii_key_id, row.pii_blob, f"{subject}:{event_id}")
            masked = {k: mask(kind.pii_kinds.get(k, PiiKind.ADDRESS), v) for k, v in pii.items()}
        return {
            kind.id_field: event_id,
            "occurred_at": row.occurred_at.isoformat(),
            "decision": row.response,
            "pii_masked": masked,
            "pii_erased": row.pii_key_id == erasure.ERASED,
            "pii_expired": row.pii_key_id == erasure.EXPIRED,
            "aggregates": row.aggregates,
            "features": stored_vectors(
                row.features, row.record, {d.name: d.features.names for d in self._detectors_of(subject)}
            ),
            "labels": [label_store.label_view(label) for label in stored_labels],
        }

    def list_events(self, subject: str, query: EventListing | None = None) -> list[dict[str, Any]]:
        """Stored events of ``subject``, newest first, as a review queue lists them (``storage.event_listing``).
        No PII is read."""
        return event_listing.list_events(self.db, SUBJECT_KINDS[subject], query or EventListing())

    # -- labels -------------------------------------------------------------------------------------------------
    @_in_label_order
    def record_label(
        self,
        label_id: str,
        payment_id: str,
        label: str,
        occurred_at: datetime | None,
        source: str | None,
        subject: str = "payment",
    ) -> tuple[dict[str, Any], bool]:
        """Store an outcome for an event (a payment unless ``subject`` says otherwise), idempotently on
        ``label_id`` (``storage.labels.store_label``), and teach it to the detectors. Returns (label, created)."""
        request = LabelRequest(label_id, payment_id, label, occurred_at, source, subject)
        view, new = label_store.store_label(self._session, request, self.origin)
        if new is not None:
            self._learn_from_labels([new])
        return view, new is not None

    @_in_label_order
    def record_label_batch(self, requests: Sequence[LabelRequest]) -> tuple[list[dict[str, Any]], int]:
        """Store many outcomes in one transaction, all or none (``storage.labels.store_label_batch``), and teach
        the new ones to the detectors; returns every label's view, in order, and how many were new."""
        views, new = label_store.store_label_batch(self._session, requests, self.origin)
        self._learn_from_labels(new)
        return views, len(new)

    @_in_label_order
    def refresh_labels(self, limit: int = 10_000) -> int:
        """Teach this worker's supervised detectors the labels other workers stored since the last ones they
        read (at most ``limit`` a call, in id order): each worker's models learn every label, not only those
        sent to it. Label ids are shared by every subject, so the labels are read once for all of them, and
        every detector notes each id it reads, learning only its own subject's: its gaps are then ids really
        missing (a late commit), not another subject's labels. Returns how many were learned."""
        readers = [d for rt in self.subjects.values() for d in rt.detectors if d.supervised]
        if not readers:
            return 0
        after = min(d.last_label_id for d in readers)
        gaps: set[int] = set()
        for det in readers:
            det.expire_label_gaps()
            gaps.update(det.label_gaps)
        return self._learn_from_labels(label_store.labels_after(self._session, after, gaps, limit))

    def _learn_from_labels(self, labels: list[tuple[int, str, str, bool]]) -> int:
        """Take labels ``(label id, subject, event id, fraud)`` in label order: each supervised detector that
        has not read one learns it, with the features its event was scored with, if it is of its subject, and
        only notes its id otherwise. Returns how many labels some detector learned."""
        learners = {subject: [d for d in rt.detectors if d.supervised] for subject, rt in self.subjects.items()}
        readers = [d for ds in learners.values() for d in ds]
        if not readers or not labels:
            return 0
        new = [
            (label_id, subject, event_id, fraud)
            for label_id, subject, event_id, fraud in sorted(labels)
            if any(d.wants_label(label_id) for d in readers)
        ]
        wanted: dict[str, list[str]] = {}
        for label_id, subject, event_id, _ in new:
            if any(d.wants_label(label_id) for d in learners.get(subject, ())):
                wanted.setdefault(subject, []).append(event_id)
        rows: dict[tuple[str, str], tuple[dict[str, Any] | None, dict[str, Any]]] = {}
        with self._session() as s:
            for subject, event_ids in wanted.items():
                for event_id, features, record in s.execute(
                    select(m.Event.event_id, m.Event.features, m.Event.record).where(
                        m.Event.subject == subject, m.Event.event_id.in_(event_ids)
                    )
                ):
                    rows[subject, event_id] = (features, record)
        learned = 0
        with self._lock:
            for label_id, subject, event_id, fraud in new:
                own = learners.get(subject, [])
                features, record = rows.get((subject, event_id), (None, {}))
                taught = False
                for det in readers:
                    if not det.wants_label(label_id):
                        continue
                    if det in own:
                        x = stored_vector(features, det.name, record, det.features.names) or {}
                        taught = self._teach_label(det, x, fraud, label_id) or taught
                    else:
                        det.skip_label(label_id)
                learned += taught
        for subject in wanted:  # a batch refit (tens of ms to a second) must not hold up scoring
            for det in learners[subject]:
                if isinstance(det, StreamingDetector):
                    det.complete_refit(self._lock)
        return learned

    def _teach_label(self, det: Detector, x: dict[str, float], fraud: bool, label_id: int) -> bool:
        """``det.learn_label``; False, with the label noted as read (not asked for again), if the detector raised."""
        try:
            det.learn_label(x, fraud, label_id, defer_refit=True)
        except Exception as exc:
            self._detector_failed(det, "learn_label", exc)
            det.skip_label(label_id)
            return False
        return True

    def _detector_failed(self, det: Detector, phase: str, exc: Exception) -> None:
        """Count a detector's exception (``risk_engine_model_failures``) and log it by type only, as its text
        may quote the event's values: on the first failure of each detector and phase, then every 1,000th."""
        key = (det.name, phase)
        n = self.counters.detector_failures.get(key, 0) + 1
        self.counters.detector_failures[key] = n
        if n == 1 or n % 1000 == 0:
            log.error(
                "detector %s raised %s in %s (%d times so far); it adds nothing to those events",
                det.name,
                type(exc).__name__,
                phase,
                n,
            )

    def _replay_labels(self, subject: str, det: Detector) -> None:
        """Labels received after a supervised detector's snapshot, learned again in order."""
        stmt = (
            select(m.Label.id, m.Label.is_fraud, m.Event.features, m.Event.record)
            .join(m.Event, (m.Event.subject == m.Label.subject) & (m.Event.event_id == m.Label.event_id))
            .where(
                m.Label.subject == subject,
                (m.Label.id > det.last_label_id) | m.Label.id.in_(sorted(det.label_gaps)),
            )
            .order_by(m.Label.id)
            .execution_options(yield_per=STREAMED_ROWS)  # a detector with no snapshot learns every label
        )
        with self._session() as s:
            top = s.scalar(select(func.max(m.Label.id))) or 0  # read first: a label stored after is read later
            for label_id, fraud, features, record in s.execute(stmt):
                # a refit that falls due is only noted: the last one noted is computed once, at the end, and is
                # the fit the live run ended with (a restart replaying many labels fits once, not at each)
                x = stored_vector(features, det.name, record, det.features.names) or {}
                self._teach_label(det, x, fraud, label_id)
        # the other subjects' labels up to here are not this detector's: the label poll need not read them
        # again (ids below that commit late are gaps, and are read: see risk_engine.watermark)
        det.skip_label(top)
        if isinstance(det, StreamingDetector):
            det.complete_refit(self._lock)

    @_in_label_order
    def record_labels(
        self, outcomes: list[tuple[str, str, datetime | None]], source: str, subject: str = "payment"
    ) -> int:
        """Store many outcomes ``(event id, label, occurred_at)`` in one transaction, idempotently, each under
        the label id ``source:event id`` (``storage.labels.store_source_labels``), and teach the new ones to the
        detectors. Returns how many were new."""
        new = label_store.store_source_labels(self._session, outcomes, source, subject, self.origin)
        self._learn_from_labels(new)
        return len(new)

    # -- erasure ------------------------------------------------------------------------------------------------
    def erase_pii(self, kind: str, value: str, actor: str) -> dict[str, Any]:
        """Erase a person's PII from every stored event that carries ``value``: a person id (``buyer_id``: a
        payment's buyer, a review's reviewer, an account; ``seller_id``: a merchant event's seller; see each
        subject's ``person_ids``) or a PII value of ``kind`` (compared by its blind index). Records keep their
        blind indexes; the sealed PII goes (see ``storage.erasure``)."""
        if kind in PERSON_ID_KINDS:
            fields = {name: list(k.person_ids[kind]) for name, k in SUBJECT_KINDS.items() if kind in k.person_ids}
            tokens = [value.strip()]
        else:
            pii = PiiKind(kind)
            fields = {
                name: [path for path, spec in k.schema.fields.items() if spec.pii_kind is pii]
                for name, k in SUBJECT_KINDS.items()
            }
            fields = {name: paths for name, paths in fields.items() if paths}
            try:
                normalized = canonical_ip(value.strip()) if pii is PiiKind.IP else value
            except ValueError as exc:
                raise InvalidInput([{"field": "value", "reason": str(exc)}]) from None
            tokens = [self.vault.blind_index(pii, normalized)]
            if pii is PiiKind.IP and ":" not in normalized:
                # events stored before IPv4-mapped addresses were unwrapped (canonical_ip) hold this address's
                # blind index in its ::ffff: form: an erasure must find them too
                tokens.append(self.vault.blind_index(pii, f"::ffff:{normalized}"))
        try:
            erased = erasure.erase(self.db, fields, tokens, actor, f"pii:{kind}")
        except OperationalError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return {"kind": kind, "events": sum(erased.values()), "by_subject": erased}

    def expire_pii(self, actor: str, days: int | None = None) -> dict[str, Any]:
        """Drop the sealed PII of the events dated more than ``days`` (the ``pii_retention_days`` setting if not
        given) ago (see ``storage.erasure.expire``), audited as ``pii.expire``."""
        days = days if days is not None else self.settings.pii_retention_days
        if days is None:
            raise InvalidInput([{"field": "days", "reason": "no retention period: set pii_retention_days"}])
        before = now_utc() - timedelta(days=days)
        try:
            expired = erasure.expire(self.db, SUBJECT_KINDS, before, actor)
        except OperationalError as exc:
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return {"before": before.isoformat(), "events": sum(expired.values()), "by_subject": expired}

    # -- API keys ----------------------------------------------------------------------------------------------
    def create_api_key(
        self, role: str, name: str, actor: str = "cli", request_id: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Create a key and return it with its view; only its hash is stored (see ``api_keys.create_api_key``)."""
        return create_api_key(self.db, role, name, actor, request_id)

    def api_keys(self, include_revoked: bool = True) -> list[dict[str, Any]]:
        """Every key's view (no secrets), oldest first."""
        return list_api_keys(self.db, include_revoked)

    def revoke_api_key(self, key_id: str, actor: str, keep_an_admin: bool = True) -> dict[str, Any]:
        """Revoke a key. This process refuses it at once; other processes within ``KEY_CACHE_S``."""
        view = revoke_api_key(self.db, key_id, actor, keep_an_admin)
        self.keys.forget()
        return view

    def create_first_admin_key(self) -> str | None:
        """An admin key, created if the database holds no key; None if it holds one (``api_keys``)."""
        return create_first_admin_key(self.db)

    def authenticate(self, token: str) -> Principal | None:
        """The principal behind a bearer token, or None (``api_keys.KeyCache``)."""
        return self.keys.authenticate(token)

    # -- lists ---------------------------------------------------------------------------------------------------
    def add_list_entry(
        self, list_name: str, value: str, actor: str, expires_at: datetime | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Add a value to a declared list (PII kinds stored as blind indexes only), audited; idempotent on the
        value, a restated expiry or note replacing the stored ones (``storage.list_entries.add_entry``)."""
        decl, token = self._list_token(list_name, value)
        display = list_value_display(decl, value, token)
        row = list_entries.add_entry(self.db, list_name, token, display, actor, expires_at, note, self._list_check)
        with self._lock:
            self.lists.add(ListEntry(list_name, token, row.expires_at), now_utc())
            self._note_list_edit(list_name, token)
        return {
            "list": list_name,
            "entry": display,
            "added_by": row.added_by,
            "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        }

    def import_list_entries(
        self,
        list_name: str,
        values: Sequence[str],
        actor: str,
        expires_at: datetime | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Put many values on a list at once (``storage.list_entries.import_entries``): all are checked first,
        and one refused refuses them all, with nothing stored. Enforced here at once, elsewhere at the next poll."""
        decl = self.list_decls.get(list_name)
        if decl is None:
            raise NotFound(f"no list {list_name}")
        pairs, refused = list_value_tokens(decl, values, self.vault)
        if refused:
            raise InvalidInput([{"field": f"values.{i}", "reason": reason} for i, reason in refused])
        counts = list_entries.import_entries(
            self.db, list_name, pairs, actor, expires_at, note, source="api", check=self._list_check
        )
        now = now_utc()
        for start in range(0, len(pairs), LIST_CHANGES_PER_HOLD):
            with self._lock:
                for token, _ in pairs[start : start + LIST_CHANGES_PER_HOLD]:
                    self.lists.add(ListEntry(list_name, token, expires_at), now)
                    self._note_list_edit(list_name, token)
        return {"list": list_name, "added": counts.added, "updated": counts.updated, "unchanged": counts.unchanged}

    def list_snapshot(self) -> dict[str, frozenset[str]]:
        """The lists' live entries now, frozen: for a backtest or replay, which must not see them change."""
        with self._lock:
            self.lists.current(now_utc())  # drops the expired ones
        return self.lists.snapshot()

    def _list_token(self, list_name: str, value: str) -> tuple[ListDecl, str]:
        """The list's declaration and what is stored for ``value`` on it (a blind index for PII lists)."""
        decl = self.list_decls.get(list_name)
        if decl is None:
            raise NotFound(f"no list {list_name}")
        try:
            return decl, list_value_token(decl, value, self.vault)
        except ValueError as exc:
            raise InvalidInput([{"field": "value", "reason": str(exc)}]) from None

    def list_entries(self, list_name: str, limit: int, before_id: int | None = None) -> list[dict[str, Any]]:
        """A page of a list's entries as stored, newest first (PII lists show masked values only)."""
        if list_name not in self.list_decls:
            raise NotFound(f"no list {list_name}")
        return list(list_entries.entry_views(self.db, list_name, limit, before_id))

    def find_list_entry(self, list_name: str, value: str) -> dict[str, Any]:
        """Whether ``value`` is on a list (a PII value: by its blind index), and its stored entry if it is: what
        an analyst asks of a list whose values are shown masked. An entry past its expiry is on it, not live."""
        _, token = self._list_token(list_name, value)
        entry = list_entries.find_entry(self.db, list_name, token)
        live = entry is not None and (
            entry["expires_at"] is None or datetime.fromisoformat(entry["expires_at"]) > now_utc()
        )
        return {"list": list_name, "on_list": entry is not None, "live": live, "entry": entry}

    def remove_list_entry(self, list_name: str, value: str, actor: str) -> bool:
        """Remove a value from a list (audited). False if it was not there."""
        _, token = self._list_token(list_name, value)
        if not list_entries.remove_entry(self.db, list_name, token, actor, self._list_check):
            return False
        with self._lock:
            self.lists.remove(list_name, token)
            self._note_list_edit(list_name, token)
        return True

    # -- audit and introspection -------------------------------------------------------------------------------
    _audit = staticmethod(audit)

    def models_info(self) -> list[dict[str, Any]]:
        """Detectors with versions, events seen and the current raw-score distribution (a population
        detector's: that of the population it was fitted on)."""
        out = []
        with self._lock:
            for subject, rt in self.subjects.items():
                for det in rt.detectors:
                    out.append(
                        {
                            "name": det.name,
                            "subject": subject,
                            "version": det.version,
                            "kind": det.spec.kind,
                            "estimator": det.spec.estimator,
                            "weight": det.spec.weight,
                            "events_seen": det.events_seen,
                            "labels_seen": det.labels_seen,
                            "features": list(det.features.names),
                            "score_quantiles": det.quantiles(),
                            "calibrated": not det.warming_up,
                        }
                    )
        return out

    def ping(self) -> bool:
        """True if the database answers."""
        try:
            with self.db.connect() as conn:
                conn.execute(select(1))
            return True
        except OperationalError:
            return False
