"""Rotating the master key: every data key re-wrapped under the new one, no PII re-encrypted, nothing lost,
an interrupted rotation finished by running it again, a worker left on the old key refused at start."""

from __future__ import annotations

import base64
import secrets
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from risk_engine.engine import RiskEngine
from risk_engine.storage import models as m
from risk_engine.storage.data_keys import rotate_master_key
from risk_engine.storage.db import make_engine, migrate
from risk_engine.vault import (
    VaultKeyError,
    WrappedDataKey,
    rewrap_data_key,
    unwrap_data_key,
    wrap_data_key,
    write_key_file,
)
from tests.conftest import make_settings, open_api, payment, run_cli


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def stored(database_url: str) -> tuple[dict[str, bytes], dict[str, bytes | None], list[m.AuditEntry]]:
    """(data key id -> wrapped, event id -> sealed PII, rotation audit entries)."""
    db = make_engine(database_url)
    try:
        with db.connect() as conn:
            keys = {k: w for k, w in conn.execute(select(m.DataKey.key_id, m.DataKey.wrapped))}
            blobs = {e: b for e, b in conn.execute(select(m.Event.event_id, m.Event.pii_blob))}
            audits = list(conn.execute(select(m.AuditEntry).where(m.AuditEntry.action == "vault.rotate_master_key")))
    finally:
        db.dispose()
    return keys, blobs, audits  # type: ignore[return-value]


def score_in_a_new_worker(settings: Any, payment_id: str) -> dict[str, Any]:
    """Start a worker (it makes a data key of its own), score one payment, show it (PII masked), stop."""
    client, api = open_api(settings)
    try:
        api.score(payment(payment_id=payment_id))
        shown: dict[str, Any] = api.client.get(f"/v1/payments/{payment_id}", headers=api.headers("analyst")).json()
        return shown["pii_masked"]
    finally:
        client.__exit__(None, None, None)


def shown_pii(settings: Any, payment_id: str) -> dict[str, Any]:
    client, api = open_api(settings)
    try:
        answer = api.client.get(f"/v1/payments/{payment_id}", headers=api.headers("analyst"))
        assert answer.status_code == 200, answer.text
        return answer.json()["pii_masked"]  # type: ignore[no-any-return]
    finally:
        client.__exit__(None, None, None)


def test_the_key_files_master_key_is_rotated_and_every_payment_still_opens(tmp_path: Path, database_url: str) -> None:
    home = tmp_path / "var"
    settings = make_settings(home, database_url)
    masked = {p: score_in_a_new_worker(settings, p) for p in ("pay_1", "pay_2")}  # two workers, two data keys
    old = base64.b64decode((home / "master.key").read_text())
    keys_before, blobs_before, _ = stored(settings.resolved_database_url)
    assert len(keys_before) == 2 and all(unwrap_data_key(old, WrappedDataKey(k, w)) for k, w in keys_before.items())

    rotated = run_cli("vault", "rotate-master-key", home=home, env={"RISK_ENGINE_DATABASE_URL": database_url})
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 2 data keys under the new master key (0 were under it already)" in rotated.stdout
    assert "restart every worker" in rotated.stdout

    new = base64.b64decode((home / "master.key").read_text())
    assert new != old and len(new) == 32
    assert stat.S_IMODE((home / "master.key").stat().st_mode) == 0o600
    assert not (home / "master.key.next").exists()
    keys_after, blobs_after, audits = stored(settings.resolved_database_url)
    assert keys_after.keys() == keys_before.keys()
    for key_id, wrapped in keys_after.items():  # the same data key, under the new master key only
        assert unwrap_data_key(old, WrappedDataKey(key_id, wrapped)) is None
        assert unwrap_data_key(new, WrappedDataKey(key_id, wrapped)) == unwrap_data_key(
            old, WrappedDataKey(key_id, keys_before[key_id])
        )
    assert blobs_after == blobs_before  # no PII was decrypted or re-encrypted
    assert [a.after for a in audits] == [{"rewrapped": sorted(keys_before)}]  # key ids, never a key
    assert {p: shown_pii(settings, p) for p in masked} == masked  # a restarted worker opens them all


def test_with_the_master_key_in_the_environment_the_new_one_is_given_and_the_old_one_refused(
    tmp_path: Path, database_url: str
) -> None:
    home = tmp_path / "var"
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    masked = score_in_a_new_worker(make_settings(home, database_url, master_key=b64(old)), "pay_env")
    env = {"RISK_ENGINE_DATABASE_URL": database_url, "RISK_ENGINE_MASTER_KEY": b64(old)}

    missing = run_cli("vault", "rotate-master-key", home=home, env=env)
    assert missing.returncode == 1
    assert "set RISK_ENGINE_NEW_MASTER_KEY to the new master key" in missing.stderr
    same = run_cli("vault", "rotate-master-key", home=home, env={**env, "RISK_ENGINE_NEW_MASTER_KEY": b64(old)})
    assert same.returncode == 1 and "the new master key is the current one" in same.stderr

    rotated = run_cli("vault", "rotate-master-key", home=home, env={**env, "RISK_ENGINE_NEW_MASTER_KEY": b64(new)})
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 1 data keys" in rotated.stdout
    assert "make RISK_ENGINE_NEW_MASTER_KEY every worker's RISK_ENGINE_MASTER_KEY" in rotated.stdout
    assert not (home / "master.key").exists()  # the environment's key is never written to a file

    # a worker restarted on the old key is refused at start, saying why; on the new one it opens everything
    with pytest.raises(VaultKeyError, match=r"does not open under this master key \(if it was rotated"):
        RiskEngine.open(make_settings(home, database_url, master_key=b64(old)))
    assert shown_pii(make_settings(home, database_url, master_key=b64(new)), "pay_env") == masked


def test_an_interrupted_rotation_is_finished_by_running_it_again(tmp_path: Path, database_url: str) -> None:
    home = tmp_path / "var"
    settings = make_settings(home, database_url)
    masked = score_in_a_new_worker(settings, "pay_1")
    old = base64.b64decode((home / "master.key").read_text())
    # the command died after re-wrapping the data keys, before moving master.key.next over master.key
    new = write_key_file(home / "master.key.next", secrets.token_bytes(32), "new master key")
    db = make_engine(settings.resolved_database_url)
    try:
        assert rotate_master_key(db, old, new, actor="test").rewrapped == 1
    finally:
        db.dispose()
    with pytest.raises(VaultKeyError, match="finishes when run again"):
        RiskEngine.open(settings)

    env = {"RISK_ENGINE_DATABASE_URL": database_url}
    other = run_cli("vault", "rotate-master-key", home=home, env={**env, "RISK_ENGINE_NEW_MASTER_KEY": b64(old[::-1])})
    assert other.returncode == 1 and "an interrupted rotation's key is in" in other.stderr
    finished = run_cli("vault", "rotate-master-key", home=home, env=env)
    assert finished.returncode == 0, finished.stderr
    assert "re-wrapped 0 data keys under the new master key (1 were under it already)" in finished.stdout
    assert base64.b64decode((home / "master.key").read_text()) == new
    assert not (home / "master.key.next").exists()
    assert shown_pii(settings, "pay_1") == masked


def test_a_data_key_under_neither_master_key_stops_the_rotation_with_nothing_changed(
    tmp_path: Path, database_url: str
) -> None:
    db = make_engine(database_url)
    migrate(db)
    old, new, stranger = (secrets.token_bytes(32) for _ in range(3))
    try:
        with db.begin() as conn:
            for key_id, kek in (("dk_a", old), ("dk_b", stranger), ("dk_c", old)):
                wrapped = wrap_data_key(kek, key_id, secrets.token_bytes(32))
                conn.execute(
                    m.DataKey.__table__.insert(),
                    {"key_id": key_id, "wrapped": wrapped.wrapped, "created_at": datetime.now(UTC), "active": False},
                )
        before = stored(database_url)
        with pytest.raises(VaultKeyError, match="dk_b opens under neither"):
            rotate_master_key(db, old, new, actor="test")
        assert stored(database_url) == before  # dk_a was re-wrapped in the pass, then rolled back with it
    finally:
        db.dispose()


def test_rewrapping_moves_a_data_key_to_the_new_master_key_bound_to_its_id() -> None:
    old, new, dek = secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32)
    wrapped = wrap_data_key(old, "dk_1", dek)
    moved = rewrap_data_key(old, new, wrapped)
    assert moved is not None and moved.key_id == "dk_1"
    assert unwrap_data_key(new, moved) == dek and unwrap_data_key(old, moved) is None
    assert rewrap_data_key(old, new, moved) is None  # under the new key already: left as it is
    assert unwrap_data_key(new, WrappedDataKey("dk_2", moved.wrapped)) is None  # bound to its id
    with pytest.raises(VaultKeyError, match="opens under neither"):
        rewrap_data_key(secrets.token_bytes(32), secrets.token_bytes(32), wrapped)
