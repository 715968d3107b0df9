"""The blind-index key chain in the database: which generation workers must hold, and rotating it.

A blind index is an HMAC of a PII value under the blind-index key. The clear values of erased or expired
events and of list entries are gone, so a new key cannot index them again from scratch; instead a rotation adds
a layer: the new key's HMAC of each stored token. Workers then hold the chain (the first key and every key
rotated in since) and compute a value's token through all of it, so stored and new tokens match, and a token
can be tested against a guessed value only with every key of the chain.

``blind_index_keys`` has a row per generation. A worker registers its chain's fingerprint at start if the
table is empty, and refuses to start unless its chain is the newest generation's and that generation is
active; its poller checks again every second and stops its scoring (503) once a rotation has begun, so no
token of the old generation is stored after the rewrite passed it. Its writes check too, in their transactions
(``stale_chain_guard`` for group commits, ``session_chain_check`` for list edits): a worker that missed a whole
rotation, suspended from before it began until after it ended, has its first write rolled back.

A rotation (``rotate``) records the new generation as ``rotating``, waits for running workers to stop scoring,
then rewrites the stored tokens (event records, list entries, list changes) in transactions of
``ROWS_PER_TRANSACTION``, keeping its progress in the row: interrupted, it carries on from there when run again.
Then it marks the generation active. The request hashes stay as they were: each event keeps the generation it
was hashed under (``events.hash_generation``), and a retry is hashed again under that generation to compare.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from risk_engine.schema import FieldType
from risk_engine.storage import models as m
from risk_engine.storage.audit import audit
from risk_engine.subjects import SUBJECT_KINDS
from risk_engine.vault import BlindIndexesRetired, BlindIndexLayer, PiiKind, Vault, VaultKeyError

ROWS_PER_TRANSACTION = 1_000
# a token, whole or at the end of a value after a colon (``seller_shipping_address`` is "seller:token")
TOKEN = re.compile(r"(?:^|(?<=:))bi:(?:" + "|".join(k.value for k in PiiKind) + r"):[A-Za-z0-9_-]{24}$")
# the record fields that hold a token, by subject: its PII fields, and the keys built from one; never a field the
# caller gives as it is (an id, an attribute), however it looks
TOKEN_FIELDS: dict[str, frozenset[str]] = {
    name: frozenset(path for path, spec in kind.schema.fields.items() if spec.type is FieldType.PII)
    | ({"seller_shipping_address"} if name == "review" else set())
    for name, kind in SUBJECT_KINDS.items()
}


class BlindIndexKeyMismatch(VaultKeyError):
    """This worker's blind-index key chain is not the one the database's tokens are under (at start)."""


@dataclass(frozen=True)
class RotationReport:
    """What a rotation rewrote."""

    generation: int
    events: int  # event records with at least one token rewritten
    list_entries: int
    list_changes: int


def register(db: Engine, vault: Vault) -> None:
    """At a worker's start: record its chain if the database has none; raise ``BlindIndexKeyMismatch`` unless
    its chain is the newest generation's and that generation is active."""
    with Session(db) as s:
        if s.scalar(select(m.BlindIndexKey.generation).limit(1)) is None:
            s.add(
                m.BlindIndexKey(
                    generation=vault.blind_index_generation,
                    fingerprint=vault.blind_index_fingerprint,
                    state="active",
                    started_at=datetime.now(UTC),
                    finished_at=datetime.now(UTC),
                    events_through=0,
                    entries_through=0,
                )
            )
            try:
                s.commit()
            except IntegrityError:  # another worker registered first: checked against it below
                s.rollback()
    reason = mismatch(db, vault)
    if reason is not None:
        raise BlindIndexKeyMismatch(reason)


def mismatch(db: Engine, vault: Vault) -> str | None:
    """Why this worker must not compute blind indexes for storage, or None if its chain is the current one."""
    with Session(db) as s:
        newest = s.scalars(select(m.BlindIndexKey).order_by(m.BlindIndexKey.generation.desc()).limit(1)).first()
    if newest is None:
        return None
    return _mismatch_of(newest.generation, newest.state, newest.fingerprint, vault)


def _mismatch_of(generation: int, state: str, fingerprint: str, vault: Vault) -> str | None:
    """``mismatch`` for the newest generation's row."""
    if state != "active":
        return (
            f"a rotation of the blind-index key to generation {generation} is under way (or was "
            "interrupted: run `risk-engine vault rotate-blind-index-key` again to finish it); restart the workers "
            "with the new key chain once it is done"
        )
    if fingerprint != vault.blind_index_fingerprint:
        return (
            f"the stored blind indexes are under key generation {generation}, and this worker's "
            f"RISK_ENGINE_BLIND_INDEX_KEY is generation {vault.blind_index_generation} or another chain: give it "
            "every key of the current chain, oldest first, separated by commas"
        )
    return None


NEWEST_GENERATION_SQL = (
    f"SELECT generation, state, fingerprint FROM {m.BlindIndexKey.__tablename__} ORDER BY generation DESC LIMIT 1"
)


def stale_chain_guard(vault: Vault) -> Callable[[Any], BaseException | None]:
    """The group-commit writer's precondition (``GroupCommitWriter.precondition``): run in each transaction
    before its commit, it refuses the whole batch once the database's chain is not this worker's, and retires
    the worker's blind indexes. Its poller finds that within a second; this covers a worker that missed the whole
    rotation (suspended, say) and would otherwise store tokens of the old chain after the rewrite passed them."""

    def check(cursor: Any) -> BaseException | None:
        cursor.execute(NEWEST_GENERATION_SQL)
        return _refusal(cursor.fetchone(), vault)

    return check


def session_chain_check(vault: Vault) -> Callable[[Session], None]:
    """``stale_chain_guard`` for a write through a session (a list edit): call it just before the commit; it
    flushes what is pending (on SQLite the transaction then holds the write lock), and raises
    ``BlindIndexesRetired``, with nothing committed, once the chain is not this worker's."""

    def check(s: Session) -> None:
        s.flush()
        refusal = _refusal(s.connection().exec_driver_sql(NEWEST_GENERATION_SQL).first(), vault)
        if refusal is not None:
            raise refusal

    return check


def _refusal(newest: Any, vault: Vault) -> BlindIndexesRetired | None:
    """What to refuse a write with, given the newest generation's ``(generation, state, fingerprint)`` row."""
    reason = None if newest is None else _mismatch_of(int(newest[0]), str(newest[1]), str(newest[2]), vault)
    if reason is None:
        return None
    vault.retire_blind_indexes(reason)
    return BlindIndexesRetired(reason)


def relayer_record(subject: str, record: dict[str, Any], layer: Callable[[str], str]) -> bool:
    """Take every token in a ``subject`` event's ``record`` one generation further, in place; whether any was."""
    changed = False
    for name in TOKEN_FIELDS.get(subject, ()):
        value = record.get(name)
        if isinstance(value, str):
            found = TOKEN.search(value)
            if found is not None:
                record[name] = value[: found.start()] + layer(found.group(0))
                changed = True
    return changed


def rotate(
    db: Engine,
    vault: Vault,
    new_key: bytes,
    actor: str,
    pii_lists: Collection[str],
    settle_s: float = 3.0,
    progress: Callable[[str, int], None] | None = None,
) -> RotationReport:
    """Add ``new_key`` to the chain of ``vault`` (the current one) and rewrite every stored token under it: in
    event records, and in the entries and changes of the lists named in ``pii_lists`` (those of a PII kind; a
    string list keeps its values as given). Resumes an interrupted rotation to the same key. ``settle_s``: how
    long running workers get to notice and stop scoring (their pollers look every second) before the rewrite
    starts."""
    if new_key in vault.blind_index_keys:
        raise VaultKeyError("the new blind-index key is already in the chain")
    target = Vault(b"\0" * 32, [*vault.blind_index_keys, new_key])
    generation, fingerprint = target.blind_index_generation, target.blind_index_fingerprint
    with Session(db) as s, s.begin():
        newest = s.scalars(select(m.BlindIndexKey).order_by(m.BlindIndexKey.generation.desc()).limit(1)).first()
        resuming = newest is not None and newest.generation == generation and newest.state == "rotating"
        if resuming:
            assert newest is not None
            if newest.fingerprint != fingerprint:
                raise VaultKeyError(
                    f"an interrupted rotation to generation {generation} was to another key: finish it with that key"
                )
        else:
            if newest is not None and (newest.generation, newest.fingerprint) != (
                vault.blind_index_generation,
                vault.blind_index_fingerprint,
            ):
                raise BlindIndexKeyMismatch(mismatch(db, vault) or "the current key chain is not this one")
            s.add(
                m.BlindIndexKey(
                    generation=generation,
                    fingerprint=fingerprint,
                    state="rotating",
                    started_at=datetime.now(UTC),
                    events_through=0,
                    entries_through=0,
                )
            )
            audit(s, actor, "vault.rotate_blind_index_key", f"generation {generation}", None, {"state": "rotating"})
    if not resuming:
        time.sleep(settle_s)  # workers still scoring stop within their next poll; their last commits land
    layer = BlindIndexLayer(new_key)
    events = _rewrite_events(db, generation, layer, progress)
    entries = _rewrite_list_entries(db, generation, layer, list(pii_lists), progress)
    with Session(db) as s, s.begin():
        changes = 0
        for change in s.scalars(select(m.ListChange).where(m.ListChange.list_name.in_(list(pii_lists)))):
            if TOKEN.fullmatch(change.token):
                change.token = layer(change.token)
                changes += 1
        row = s.get(m.BlindIndexKey, generation)
        assert row is not None
        row.state = "active"
        row.finished_at = datetime.now(UTC)
        audit(
            s,
            actor,
            "vault.rotate_blind_index_key",
            f"generation {generation}",
            {"state": "rotating"},
            {"state": "active", "events": events, "list_entries": entries, "list_changes": changes},
        )
    return RotationReport(generation, events, entries, changes)


def _rewrite_events(
    db: Engine, generation: int, layer: Callable[[str], str], progress: Callable[[str, int], None] | None
) -> int:
    rewritten = 0
    events: Table = m.Event.__table__  # type: ignore[assignment]
    stmt = update(events).where(events.c.id == bindparam("row_id")).values(record=bindparam("new_record"))
    while True:
        with Session(db) as s, s.begin():
            row = s.get(m.BlindIndexKey, generation, with_for_update=True)
            assert row is not None
            batch = s.execute(
                select(m.Event.id, m.Event.subject, m.Event.record)
                .where(m.Event.id > row.events_through)
                .order_by(m.Event.id)
                .limit(ROWS_PER_TRANSACTION)
            ).all()
            if not batch:
                return rewritten
            changed = []
            for row_id, subject, record in batch:
                if relayer_record(subject, record, layer):
                    changed.append({"row_id": row_id, "new_record": record})
            if changed:
                s.execute(stmt, changed)
            row.events_through = batch[-1][0]
            rewritten += len(changed)
        if progress is not None:
            progress("events", rewritten)


def _rewrite_list_entries(
    db: Engine,
    generation: int,
    layer: Callable[[str], str],
    pii_lists: list[str],
    progress: Callable[[str, int], None] | None,
) -> int:
    rewritten = 0
    while True:
        with Session(db) as s, s.begin():
            row = s.get(m.BlindIndexKey, generation, with_for_update=True)
            assert row is not None
            entries = s.scalars(
                select(m.ListEntry)
                .where(m.ListEntry.id > row.entries_through, m.ListEntry.list_name.in_(pii_lists))
                .order_by(m.ListEntry.id)
                .limit(ROWS_PER_TRANSACTION)
            ).all()
            if not entries:
                return rewritten
            for entry in entries:
                if TOKEN.fullmatch(entry.token):
                    entry.token = layer(entry.token)
                    rewritten += 1
            row.entries_through = entries[-1].id
        if progress is not None:
            progress("list entries", rewritten)
