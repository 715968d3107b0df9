"""Stored data keys: rotating the master key that wraps them.

Rotation re-wraps each data key (32 bytes) under the new master key; no PII is decrypted or re-encrypted, so
it takes a moment however many events are stored. It needs only the database, like ``risk-engine lists``.

Each pass is one transaction: every data key under the old master key is re-wrapped, or, if one opens under
neither key, none is. Passes repeat until one finds nothing left to re-wrap, so a worker that started during
the rotation and stored its own data key under the old master key is caught too. A key already under the new
master key is left as it is: a rotation that was interrupted, or run again, finishes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from risk_engine.storage import models as m
from risk_engine.storage.audit import audit
from risk_engine.vault import VaultKeyError, WrappedDataKey, rewrap_data_key

MAX_PASSES = 10  # each pass after the first finds only keys stored while the one before it ran


@dataclass(frozen=True)
class Rotation:
    """What a rotation did."""

    rewrapped: int  # data keys moved from the old master key to the new
    already: int  # data keys found under the new master key (a rotation run again; a worker started with it)


def rotate_master_key(db: Engine, old_master_key: bytes, new_master_key: bytes, actor: str) -> Rotation:
    """Re-wrap every stored data key under ``new_master_key`` (audited, by key id). Raises ``VaultKeyError``,
    with nothing of that pass changed, when a data key opens under neither master key."""
    if old_master_key == new_master_key:
        raise VaultKeyError("the new master key is the current one")
    rewrapped = 0
    for _ in range(MAX_PASSES):
        with Session(db) as s, s.begin():
            rows = s.scalars(select(m.DataKey).order_by(m.DataKey.key_id).with_for_update()).all()
            moved: list[str] = []
            for row in rows:
                fresh = rewrap_data_key(old_master_key, new_master_key, WrappedDataKey(row.key_id, row.wrapped))
                if fresh is not None:
                    row.wrapped = fresh.wrapped
                    moved.append(row.key_id)
            if moved:
                audit(s, actor, "vault.rotate_master_key", "data_keys", None, {"rewrapped": moved})
        rewrapped += len(moved)
        if not moved:
            return Rotation(rewrapped, len(rows) - rewrapped)
    raise VaultKeyError(f"data keys were still being stored under the old master key after {MAX_PASSES} passes")
