"""The PII vault: envelope encryption, AAD binding, tamper detection, blind indexes, masking, key files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from risk_engine.vault import _DOMAIN, _PREFIX, PiiKind, Vault, VaultKeyError, _normalize, load_or_create_key, mask

KEY_A = b"a" * 32
KEY_B = b"b" * 32


def test_seal_and_open_round_trip_bound_to_the_row() -> None:
    vault = Vault(KEY_A, KEY_B)
    wrapped = vault.new_data_key()
    key_id, blob = vault.seal({"email": "li.wei@example.com"}, "payment:p1")
    assert key_id == wrapped.key_id
    assert b"li.wei" not in blob
    assert vault.open(key_id, blob, "payment:p1") == {"email": "li.wei@example.com"}
    with pytest.raises(VaultKeyError):
        vault.open(key_id, blob, "payment:p2")  # moved to another row
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(VaultKeyError):
        vault.open(key_id, tampered, "payment:p1")


def test_data_keys_only_unwrap_under_their_master_key() -> None:
    vault = Vault(KEY_A, KEY_B)
    wrapped = vault.new_data_key()
    key_id, blob = vault.seal({"x": "y"}, "row")
    reopened = Vault(KEY_A, KEY_B)
    reopened.load_data_key(wrapped)
    assert reopened.open(key_id, blob, "row") == {"x": "y"}
    with pytest.raises(VaultKeyError):
        Vault(b"c" * 32, KEY_B).load_data_key(wrapped)


def test_blind_indexes_are_keyed_normalised_and_separated_by_kind() -> None:
    vault = Vault(KEY_A, KEY_B)
    a = vault.blind_index(PiiKind.EMAIL, "Li.Wei@Example.com ")
    assert a == vault.blind_index(PiiKind.EMAIL, "li.wei@example.com")
    assert a != vault.blind_index(PiiKind.NAME, "li.wei@example.com")
    assert a != Vault(KEY_A, b"z" * 32).blind_index(PiiKind.EMAIL, "li.wei@example.com")
    assert "li.wei" not in a
    assert vault.blind_index(PiiKind.PHONE, "+86 138-0013-8000") == vault.blind_index(PiiKind.PHONE, "+8613800138000")


def test_masking() -> None:
    assert mask(PiiKind.EMAIL, "li.wei@example.com") == "l****@example.com"
    assert mask(PiiKind.PHONE, "+8613800138000") == "*********8000"
    assert mask(PiiKind.IP, "203.0.113.7") == "203.0.*.*"
    assert mask(PiiKind.NAME, "Li Wei") == "L*** W***"


def test_generated_key_file_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    key = load_or_create_key(None, path, "master_key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(None, path, "master_key") == key
    with pytest.raises(VaultKeyError):
        load_or_create_key("not base64!", path, "master_key")


def test_processes_starting_together_on_a_fresh_home_share_one_key(tmp_path: Path) -> None:
    # each worker of a fresh embedded install creates the key files at the same moment: one key must win, whole
    # (before, the losers failed on the existing file, or read it empty before the winner had written it)
    for attempt in range(20):
        path = tmp_path / f"master{attempt}.key"
        barrier = threading.Barrier(6)

        def start(path: Path, barrier: threading.Barrier) -> bytes:
            barrier.wait()
            return load_or_create_key(None, path, "master_key")

        with ThreadPoolExecutor(6) as pool:
            keys = list(pool.map(start, [path] * 6, [barrier] * 6))
        assert len(set(keys)) == 1 and len(keys[0]) == 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"master{i}.key" for i in range(20))  # no leftovers


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=100),
    kind=st.sampled_from(list(PiiKind)),
    value=st.text(max_size=80),
)
def test_blind_index_is_hmac_sha256_of_the_normalized_value(key: bytes, kind: PiiKind, value: str) -> None:
    """The precomputed-pad HMAC gives exactly the standard library's HMAC-SHA256, for keys longer than a block too."""
    vault = Vault(b"m" * 32, key)
    mac = hmac.new(key, _DOMAIN[kind] + _normalize(kind, value).encode(), hashlib.sha256).digest()
    assert vault.blind_index(kind, value) == _PREFIX[kind] + base64.urlsafe_b64encode(mac[:18]).decode()


def test_remembered_blind_indexes_are_the_hmac_keep_no_value_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value seen before gets its token from the memo: the same HMAC as computed afresh, kept apart per kind,
    under a digest rather than the value; a full memo starts over instead of growing."""
    monkeypatch.setattr("risk_engine.vault.BLIND_INDEX_MEMO", 3)
    vault = Vault(KEY_A, KEY_B)

    def fresh(kind: PiiKind, value: str) -> str:
        mac = hmac.new(KEY_B, _DOMAIN[kind] + _normalize(kind, value).encode(), hashlib.sha256).digest()
        return _PREFIX[kind] + base64.urlsafe_b64encode(mac[:18]).decode()

    values = [(PiiKind.EMAIL, "li.wei@example.com"), (PiiKind.NAME, "li.wei@example.com"), (PiiKind.IP, "10.0.0.1")]
    for _ in range(3):
        for kind, value in values:
            assert vault.blind_index(kind, value) == fresh(kind, value)
    assert vault.blind_index(PiiKind.EMAIL, " Li.Wei@Example.com") == fresh(PiiKind.EMAIL, "li.wei@example.com")
    assert len(vault._bi_memo) <= 3
    computed: list[str] = []
    normalize = _normalize
    monkeypatch.setattr("risk_engine.vault._normalize", lambda k, v: computed.append(v) or normalize(k, v))
    vault.blind_index(PiiKind.PHONE, "+8613800138000")
    vault.blind_index(PiiKind.PHONE, "+8613800138000")
    assert computed == ["+8613800138000"]  # the second came from the memo, without an HMAC
    held = b"".join(vault._bi_memo) + "".join(vault._bi_memo.values()).encode()
    assert b"li.wei" not in held and b"10.0.0.1" not in held
    assert Vault(KEY_A, b"z" * 32).blind_index(PiiKind.EMAIL, "li.wei@example.com") != fresh(
        PiiKind.EMAIL, "li.wei@example.com"
    )
