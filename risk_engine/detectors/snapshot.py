"""Signed detector snapshots: HMAC-SHA256 over the pickled state, checked before anything is unpickled."""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

MAGIC = b"RESNAP1\n"
SIG_BYTES = 32


class SnapshotError(Exception):
    """A snapshot is missing its signature, was signed with another key, or was altered."""


def encode_state(state: Any) -> bytes:
    """The pickled state (take it while the state is consistent; signing and writing can wait)."""
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def write_snapshot(path: Path, state: Any, key: bytes) -> None:
    """Pickle ``state``, sign it, and replace ``path`` atomically."""
    write_encoded(path, encode_state(state), key)


def sign_encoded(payload: bytes, key: bytes) -> bytes:
    """An encoded state with its signature in front: what is written to a file or a database row."""
    return MAGIC + hmac.new(key, payload, hashlib.sha256).digest() + payload


def write_encoded(path: Path, payload: bytes, key: bytes) -> None:
    """Sign an encoded state and replace ``path`` atomically (fsynced).

    Through a scratch file of its own: workers sharing a home write the same snapshots, and two writing one
    scratch file at once mixed their bytes, then one renamed the mix into place and the other failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(sign_encoded(payload, key))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


SCRATCH_KEPT_S = 3600.0  # a scratch file this old belongs to no write under way: its writer died


def remove_stale_scratch(directory: Path, older_than_s: float = SCRATCH_KEPT_S) -> int:
    """Delete the scratch files that writers which died mid-write left in ``directory`` (another worker's
    write under way is younger). Returns how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    for scratch in directory.glob("*.tmp") if directory.is_dir() else ():
        try:
            if scratch.stat().st_mtime < cutoff:
                scratch.unlink()
                removed += 1
        except FileNotFoundError:  # another worker's start removed it first
            continue
    return removed


def read_snapshot(path: Path, key: bytes) -> Any:
    """Verify and load a snapshot. Raises :class:`SnapshotError` if it does not verify."""
    return open_signed(path.read_bytes(), key, str(path))


def snapshot_state(opened: Any) -> Any:
    """A detector's state from an opened snapshot: as written, or, for a per-key detector whose models were
    pickled apart (``{"state": bytes, "per_key": ...}``), the state with its ``per_key`` put back."""
    if isinstance(opened, dict) and isinstance(opened.get("state"), bytes) and "per_key" in opened:
        state = open_state(opened["state"])
        if isinstance(state, dict):
            state["per_key"] = opened["per_key"]
        return state
    return opened


def open_state(payload: bytes) -> Any:
    """Unpickle a state nested in a snapshot whose signature has already been verified."""
    return pickle.loads(payload)


def open_signed(blob: bytes, key: bytes, path: str) -> Any:
    """Verify a signed state (``path`` names it in errors) and unpickle it only then."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + SIG_BYTES:
        raise SnapshotError(f"{path} is not a risk-engine snapshot")
    signature = blob[len(MAGIC) : len(MAGIC) + SIG_BYTES]
    payload = blob[len(MAGIC) + SIG_BYTES :]
    expected = hmac.new(key, payload, hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise SnapshotError(f"{path} failed its signature check: tampered, or signed with another key")
    return pickle.loads(payload)  # only after the signature verified
