"""Stored list entries: add (idempotent on the value), remove, read, each change audited.

These need only the database, so ``risk-engine lists`` edits a list without opening an engine (which would
rebuild velocity and detectors from the whole history). Every change also appends a row to ``list_changes`` in
its transaction: running engines follow those (``changes_after``) and read back only the entries they name
(``entry_states``), however long the lists are. Changes older than ``CHANGES_KEPT`` are pruned
(``prune_changes``); a worker that fell further behind than that reloads every list (``changes_pruned_past``).
What is stored for a value (itself, or a blind index) is
decided by the caller (``features.lists.list_value_token``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, delete, func, insert, or_, select
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.audit import audit
from risk_engine.storage.db import hold_rows, retry_on_race
from risk_engine.watermark import MAX_GAPS, IdWatermark

STATE_BATCH = 500  # entries read back per statement (bound parameters stay far below both databases' limits)
IMPORT_BATCH = 1_000  # values imported per transaction
CHANGES_KEPT = timedelta(days=7)  # a running worker follows changes within a second; one stopped reloads lists


# called with an edit's session just before it commits; raising stores nothing of the edit
# (``blind_index_rotation.session_chain_check``: no token of a retired key chain)
SessionCheck = Callable[[Session], None]


def _session(db: Engine) -> Session:
    return Session(db, expire_on_commit=False)


def _commit(s: Session, check: SessionCheck | None) -> None:
    if check is not None:
        check(s)
    s.commit()


def add_entry(
    db: Engine,
    list_name: str,
    token: str,
    display: str,
    actor: str,
    expires_at: datetime | None = None,
    note: str | None = None,
    check: SessionCheck | None = None,
) -> m.ListEntry:
    """Store ``token`` on ``list_name``; the stored row. The same value again changes nothing, unless it states
    another expiry (``None``: never) or a note, which then replace the stored ones (audited as ``list.update``).
    ``check``: called before the commit, it may raise to store nothing (``SessionCheck``)."""

    def write() -> m.ListEntry:
        with _session(db) as s:
            hold_rows(s, m.ListEntry.token, m.ListEntry.list_name == list_name, m.ListEntry.token == token)
            row = s.scalars(
                select(m.ListEntry).where(m.ListEntry.list_name == list_name, m.ListEntry.token == token)
            ).first()
            stated = {"display": display, "expires_at": expires_at.isoformat() if expires_at else None}
            if row is None:
                row = m.ListEntry(**_new_row(list_name, token, display, actor, expires_at, note))
                s.add(row)
                s.add(m.ListChange(list_name=list_name, token=token))
                audit(s, actor, "list.add", f"list:{list_name}", None, stated)
                _commit(s, check)
            elif row.expires_at != expires_at or (note is not None and note != row.note):
                before = {
                    "display": row.display,
                    "expires_at": row.expires_at.isoformat() if row.expires_at else None,
                    "note": row.note,
                }
                row.expires_at = expires_at
                row.note = note if note is not None else row.note
                s.add(m.ListChange(list_name=list_name, token=token))
                audit(s, actor, "list.update", f"list:{list_name}", before, {**stated, "note": row.note})
                _commit(s, check)
            return row

    return retry_on_race(write)  # two processes adding the same value at once: the second finds the first's


def remove_entry(db: Engine, list_name: str, token: str, actor: str, check: SessionCheck | None = None) -> bool:
    """Remove ``token`` from ``list_name`` (audited). False if it was not there. ``check``: as ``add_entry``'s."""
    with _session(db) as s:
        # held, as add_entry holds it: an update of the entry at the same moment comes wholly before or after
        hold_rows(s, m.ListEntry.token, m.ListEntry.list_name == list_name, m.ListEntry.token == token)
        row = s.scalars(
            select(m.ListEntry).where(m.ListEntry.list_name == list_name, m.ListEntry.token == token)
        ).first()
        if row is None:
            return False
        audit(s, actor, "list.remove", f"list:{list_name}", {"display": row.display}, None)
        s.delete(row)
        s.add(m.ListChange(list_name=list_name, token=token))
        _commit(s, check)
    return True


def entry_view(row: m.ListEntry) -> dict[str, Any]:
    """How an entry is shown (PII lists: masked)."""
    return {
        "id": row.id,
        "entry": row.display,
        "added_by": row.added_by,
        "note": row.note,
        "created_at": row.created_at.isoformat(),
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


def entry_views(
    db: Engine, list_name: str, limit: int | None = None, before_id: int | None = None, oldest_first: bool = False
) -> Iterator[dict[str, Any]]:
    """A list's entries as stored, newest first (or oldest), from before ``before_id``, at most ``limit``: read
    in batches, so a whole list can be streamed."""
    order = m.ListEntry.id.asc() if oldest_first else m.ListEntry.id.desc()
    stmt = select(m.ListEntry).where(m.ListEntry.list_name == list_name).order_by(order)
    if before_id is not None:
        stmt = stmt.where(m.ListEntry.id < before_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    with _session(db) as s:
        for row in s.scalars(stmt.execution_options(yield_per=STATE_BATCH)):
            yield entry_view(row)


def find_entry(db: Engine, list_name: str, token: str) -> dict[str, Any] | None:
    """The entry ``token`` is on ``list_name``, as ``entry_views`` shows it; None if it is not on it."""
    with _session(db) as s:
        row = s.scalars(
            select(m.ListEntry).where(m.ListEntry.list_name == list_name, m.ListEntry.token == token)
        ).first()
    return entry_view(row) if row is not None else None


def live_entries(db: Engine) -> Iterator[tuple[str, str, datetime | None]]:
    """Every stored entry of every list as ``(list, token, expiry)``, streamed."""
    stmt = select(m.ListEntry.list_name, m.ListEntry.token, m.ListEntry.expires_at)
    with _session(db) as s:
        yield from s.execute(stmt.execution_options(yield_per=10_000))


def changes_start(db: Engine) -> IdWatermark:
    """Where a worker that reads every entry now starts following changes: past the newest change, with the
    ids below it not (yet) committed kept as gaps, since their entries may be missing from what it reads."""
    with _session(db) as s:
        top = s.scalar(select(func.max(m.ListChange.id))) or 0
        present = set(s.scalars(select(m.ListChange.id).where(m.ListChange.id > top - MAX_GAPS)))
    return IdWatermark(top, (i for i in range(max(1, top - MAX_GAPS + 1), top) if i not in present))


def changes_after(db: Engine, read: IdWatermark, limit: int) -> list[tuple[int, str, str]]:
    """The changes ``read`` has not read, ``(id, list, token)`` in id order, at most ``limit``."""
    wanted = m.ListChange.id > read.last
    if read.gaps:
        wanted = wanted | m.ListChange.id.in_(sorted(read.gaps))
    stmt = select(m.ListChange.id, m.ListChange.list_name, m.ListChange.token).where(wanted)
    with _session(db) as s:
        return [(i, name, token) for i, name, token in s.execute(stmt.order_by(m.ListChange.id).limit(limit))]


def changes_pruned_past(db: Engine, read: IdWatermark) -> bool:
    """Whether changes ``read`` has not read may have been pruned: the oldest change kept is past the next one it
    would read. (A gap in the ids there, from a rolled-back change, reads as pruned too: a needless reload.)"""
    with _session(db) as s:
        oldest = s.scalar(select(func.min(m.ListChange.id)))
    return oldest is not None and oldest > read.last + 1


def prune_changes(db: Engine, now: datetime, kept: timedelta = CHANGES_KEPT) -> int:
    """Delete the changes recorded before ``now - kept`` (and those from before their time was recorded), keeping
    the newest change whatever its age: SQLite numbers a new row one past the highest id present, so deleting
    the highest would have the next change reuse an id that followers have already read past. Returns how many
    were deleted."""
    horizon = now - kept
    with _session(db) as s:
        top = s.scalar(select(func.max(m.ListChange.id)))
        if top is None:
            return 0
        old = or_(m.ListChange.changed_at.is_(None), m.ListChange.changed_at < horizon)
        cut = s.scalar(select(func.max(m.ListChange.id)).where(old))
        if cut is None:
            return 0
        deleted = cast(
            CursorResult[Any], s.execute(delete(m.ListChange).where(m.ListChange.id <= min(cut, top - 1)))
        ).rowcount
        s.commit()
    return int(deleted or 0)


def entry_states(db: Engine, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], datetime | None]:
    """The stored entries among ``(list, token)`` keys, with their expiries; a key not in it is not stored.
    Asked a list at a time (``list_name = ? AND token IN (...)``), which both databases answer from the unique
    index, as SQLite does not a row-value ``IN``."""
    by_list: dict[str, list[str]] = {}
    for list_name, token in set(keys):
        by_list.setdefault(list_name, []).append(token)
    found: dict[tuple[str, str], datetime | None] = {}
    with _session(db) as s:
        for list_name, tokens in by_list.items():
            for start in range(0, len(tokens), STATE_BATCH):
                stmt = select(m.ListEntry.token, m.ListEntry.expires_at).where(
                    m.ListEntry.list_name == list_name, m.ListEntry.token.in_(tokens[start : start + STATE_BATCH])
                )
                for token, expires_at in s.execute(stmt):
                    found[list_name, token] = expires_at
    return found


def seed_entries(db: Engine, seeds: Mapping[str, Sequence[str]], actor: str) -> int:
    """Store the seeded values of string lists (``lists.toml``) not stored yet; how many were."""

    def write() -> int:
        added = 0
        with _session(db) as s:
            for list_name, values in seeds.items():
                stored = select(m.ListEntry.token).where(
                    m.ListEntry.list_name == list_name, m.ListEntry.token.in_(values)
                )
                present = set(s.scalars(stored))
                for value in dict.fromkeys(values):
                    if value not in present:
                        s.add(m.ListEntry(**_new_row(list_name, value, value, actor, None, None)))
                        s.add(m.ListChange(list_name=list_name, token=value))
                        added += 1
            s.commit()
        return added

    return retry_on_race(write)  # another worker starting at once may seed them first


def _new_row(
    list_name: str, token: str, display: str, actor: str, expires_at: datetime | None, note: str | None
) -> dict[str, Any]:
    """A new entry's columns."""
    return {
        "list_name": list_name,
        "token": token,
        "display": display,
        "added_by": actor,
        "note": note,
        "created_at": datetime.now(UTC),
        "expires_at": expires_at,
    }


@dataclass
class ImportCounts:
    """What an import did: values added, values already there whose expiry or note it restated, and values
    already there as it states them."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0


def import_entries(
    db: Engine,
    list_name: str,
    values: Sequence[tuple[str, str]],
    actor: str,
    expires_at: datetime | None = None,
    note: str | None = None,
    source: str = "",
    check: SessionCheck | None = None,
) -> ImportCounts:
    """Put ``(token, display)`` values on ``list_name``, as ``add_entry`` does each, in transactions of
    ``IMPORT_BATCH``: a value already there has its expiry (and note, if one is given) restated. Each batch is
    audited once (``list.import``, with its counts and ``source``). Interrupted, it leaves whole batches stored;
    running it again finishes it, as values already stored as stated are left alone."""
    counts = ImportCounts()
    unique = list(dict(values).items())  # a value twice in the input is imported once
    for start in range(0, len(unique), IMPORT_BATCH):
        batch = unique[start : start + IMPORT_BATCH]

        def write(batch: list[tuple[str, str]] = batch) -> ImportCounts:
            done = ImportCounts()
            with _session(db) as s:
                tokens = [token for token, _ in batch]
                stored = {
                    row.token: row
                    for row in s.scalars(
                        select(m.ListEntry).where(m.ListEntry.list_name == list_name, m.ListEntry.token.in_(tokens))
                    )
                }
                new = []
                changed = []
                for token, display in batch:
                    row = stored.get(token)
                    if row is None:
                        new.append(_new_row(list_name, token, display, actor, expires_at, note))
                    elif row.expires_at != expires_at or (note is not None and note != row.note):
                        row.expires_at = expires_at
                        row.note = note if note is not None else row.note
                        changed.append(token)
                    else:
                        done.unchanged += 1
                if new:
                    s.execute(insert(m.ListEntry), new)
                touched = [row["token"] for row in new] + changed
                if touched:
                    s.execute(insert(m.ListChange), [{"list_name": list_name, "token": t} for t in touched])
                    done.added, done.updated = len(new), len(changed)
                    stated = {"added": done.added, "updated": done.updated, "unchanged": done.unchanged}
                    audit(
                        s,
                        actor,
                        "list.import",
                        f"list:{list_name}",
                        None,
                        {**stated, "source": source, "expires_at": expires_at.isoformat() if expires_at else None},
                    )
                _commit(s, check)
            return done

        done = retry_on_race(write)  # a value another process added meanwhile is then found stored
        counts.added += done.added
        counts.updated += done.updated
        counts.unchanged += done.unchanged
    return counts
