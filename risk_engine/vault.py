"""The PII vault: envelope encryption (AES-256-GCM), keyed blind indexes and masking.

A master key (KEK) wraps data keys (DEKs); each ciphertext carries the id of the data key that sealed it,
and the data keys are stored wrapped, so rotating the master key means re-wrapping data keys only.
Equality look-ups use HMAC-SHA256 blind indexes under a separate key, with a domain per PII kind, so the
same e-mail always indexes to the same token while the token says nothing without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from xxhash import xxh3_128_digest

if TYPE_CHECKING:
    from risk_engine.config import Settings

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
BLIND_INDEX_MEMO = 65_536  # recent values' blind indexes kept, as tokens under a digest of the value
TOKEN_BYTES = 18  # of a blind index's HMAC, base64 in the token


class PiiKind(StrEnum):
    """The kinds of personal data the engine holds; each has its own blind-index domain."""

    EMAIL = "email"
    PHONE = "phone"
    NAME = "name"
    ADDRESS = "address"
    IP = "ip"
    CARD = "card"
    ID_NUMBER = "id_number"


_DOMAIN = {k: f"{k.value}\x1f".encode() for k in PiiKind}
_DOMAIN_OF = {k.value: d for k, d in _DOMAIN.items()}
_PREFIX = {k: f"bi:{k.value}:" for k in PiiKind}


class VaultKeyError(Exception):
    """A key is missing, malformed or does not open a ciphertext."""


class BlindIndexesRetired(Exception):
    """This worker's blind-index key chain is no longer the database's (a rotation began): nothing it would
    index may be stored or compared until it restarts with the new chain."""


def decode_key(text: str, name: str) -> bytes:
    """A key from its base64 text (a key file's or an environment variable's); ``VaultKeyError`` if malformed."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise VaultKeyError(f"{name} is not valid base64") from exc
    if len(raw) != KEY_BYTES:
        raise VaultKeyError(f"{name} must decode to {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def decode_key_chain(text: str, name: str) -> list[bytes]:
    """Keys from base64 texts separated by commas or new lines, oldest first (a blind-index key and the keys
    rotated in over it); ``VaultKeyError`` if there is none or one is malformed."""
    parts = [part for part in text.replace(",", "\n").split() if part]
    if not parts:
        raise VaultKeyError(f"{name} holds no key")
    return [decode_key(part, f"{name} #{i + 1}") for i, part in enumerate(parts)]


def read_key_file(path: Path) -> str:
    """A key file's text, with a warning if others can read it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("key file %s is readable by others (mode %o); chmod 600 it", path, mode)
    return path.read_text()


def load_or_create_key_chain(env_value: str | None, path: Path, name: str) -> list[bytes]:
    """The key chain of the environment or of its key file (one key a line), or a new one-key file."""
    if env_value:
        return decode_key_chain(env_value, name)
    if path.exists():
        return decode_key_chain(read_key_file(path), name)
    return [load_or_create_key(None, path, name)]


def load_or_create_key(env_value: str | None, path: Path, name: str) -> bytes:
    """Return a 32-byte key from the environment, or from a 0600 key file created on first use."""
    if env_value:
        return decode_key(env_value, name)
    if path.exists():
        return decode_key(read_key_file(path), name)
    key = secrets.token_bytes(KEY_BYTES)
    if write_key_file(path, key, name) != key:
        return decode_key(path.read_text(), name)  # another process wrote it first: its key
    log.warning(
        "generated %s in %s (embedded default); in production set RISK_ENGINE_%s from a secret store",
        name,
        path,
        name.upper(),
    )
    return key


def write_key_file(path: Path, key: bytes, name: str) -> bytes:
    """Write ``key`` to a new 0600 key file at ``path``; if the file exists already, leave it and return its
    key. Written whole under a temporary name, then linked into place (and synced): a process doing the same
    at the same moment either links first, and this one returns its key, or finds the file complete, never
    empty or half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _synced_key_file(path, [key])
    try:
        os.link(temporary, path)
    except FileExistsError:
        return decode_key(path.read_text(), name)
    finally:
        os.unlink(temporary)
    return key


def replace_key_chain_file(path: Path, chain: Sequence[bytes]) -> None:
    """Replace the key file at ``path`` with ``chain`` (oldest first, one key a line, 0600), whole or not at all."""
    os.replace(_synced_key_file(path, chain), path)


def _synced_key_file(path: Path, keys: Sequence[bytes]) -> str:
    """A new 0600 file beside ``path`` holding ``keys`` in base64, one a line, synced to disk: its path."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(base64.b64encode(key).decode() + "\n" for key in keys))
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


@dataclass(frozen=True, slots=True)
class WrappedDataKey:
    """A data key as stored: its id and its bytes sealed under the master key."""

    key_id: str
    wrapped: bytes


def wrap_data_key(master_key: bytes, key_id: str, dek: bytes) -> WrappedDataKey:
    """Seal a data key under a master key, bound to its id (a wrapped key cannot be passed off as another)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return WrappedDataKey(key_id, nonce + AESGCM(master_key).encrypt(nonce, dek, key_id.encode()))


def unwrap_data_key(master_key: bytes, stored: WrappedDataKey) -> bytes | None:
    """The data key ``stored`` seals, or None if it was not wrapped under ``master_key`` (or was altered)."""
    nonce, body = stored.wrapped[:NONCE_BYTES], stored.wrapped[NONCE_BYTES:]
    try:
        return AESGCM(master_key).decrypt(nonce, body, stored.key_id.encode())
    except Exception:  # cryptography raises InvalidTag
        return None


def rewrap_data_key(old_master_key: bytes, new_master_key: bytes, stored: WrappedDataKey) -> WrappedDataKey | None:
    """``stored`` wrapped under the new master key instead of the old; None if it is under the new one already.
    Raises ``VaultKeyError`` if it opens under neither."""
    if unwrap_data_key(new_master_key, stored) is not None:
        return None
    dek = unwrap_data_key(old_master_key, stored)
    if dek is None:
        raise VaultKeyError(f"data key {stored.key_id} opens under neither the current nor the new master key")
    return wrap_data_key(new_master_key, stored.key_id, dek)


def _normalize(kind: PiiKind, value: str) -> str:
    text = value.strip()
    if kind in (PiiKind.EMAIL, PiiKind.NAME, PiiKind.ADDRESS):
        return " ".join(text.lower().split())
    if kind is PiiKind.PHONE:
        return "".join(ch for ch in text if ch.isdigit() or ch == "+")
    if kind is PiiKind.IP:
        return text.lower()
    return text


class Vault:
    """Seals and opens PII, computes blind indexes. Holds keys in memory only."""

    def __init__(self, master_key: bytes, blind_index_keys: bytes | Sequence[bytes]) -> None:
        self._master_key = master_key
        # the blind-index key, then each key rotated in over it (``risk-engine vault rotate-blind-index-key``): a
        # token is the first key's HMAC of the value, then each later key's HMAC of the token before
        chain = [blind_index_keys] if isinstance(blind_index_keys, bytes) else list(blind_index_keys)
        if not chain:
            raise VaultKeyError("no blind-index key")
        self._bi_keys = chain
        self._bi_layers = [_hmac_pads(key) for key in chain]
        self._bi_inner, self._bi_outer = self._bi_layers[0]
        self._bi_later = self._bi_layers[1:]
        self._bi_retired: str | None = None
        # buyers, cards, devices and addresses come back again and again: their tokens are remembered, each
        # under a seeded 128-bit digest of its value (the memo keeps no PII in clear; a collision, 2^-128 a
        # pair, is not a concern at 65,536 entries), at a fifth of the HMAC's cost
        self._bi_seed = secrets.randbits(64)
        self._bi_memo: dict[bytes, str] = {}
        self._deks: dict[str, AESGCM] = {}
        self._active_id: str | None = None
        self._nonce_counter = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        """The vault of ``settings``: its keys from the environment, or from key files under the home (made,
        with a warning, on first use)."""
        master = load_or_create_key(settings.master_key, settings.home / "master.key", "master_key")
        blind = load_or_create_key_chain(settings.blind_index_key, settings.home / "blind_index.key", "blind_index_key")
        return cls(master, blind)

    # -- the blind-index key chain ---------------------------------------------------------------------
    @property
    def blind_index_keys(self) -> tuple[bytes, ...]:
        """The chain: the first blind-index key, then each rotated in over it."""
        return tuple(self._bi_keys)

    def retire_blind_indexes(self, reason: str) -> None:
        """From now on, refuse to compute a blind index (``BlindIndexesRetired``): the database's tokens moved to
        another key chain, and a token of this one must not be stored or compared."""
        self._bi_retired = reason

    @property
    def blind_indexes_retired(self) -> bool:
        """Whether ``retire_blind_indexes`` was called."""
        return self._bi_retired is not None

    @property
    def blind_index_generation(self) -> int:
        """How many keys the blind indexes are under: 1, plus one for each rotation."""
        return len(self._bi_keys)

    @property
    def blind_index_fingerprint(self) -> str:
        """Names the key chain without revealing it: the generation and an HMAC of a constant under the newest
        key. Stored in the database, so a worker with another chain is refused."""
        tag = hmac.new(self._bi_keys[-1], b"risk-engine blind-index key fingerprint", hashlib.sha256).hexdigest()
        return f"{self.blind_index_generation}:{tag[:32]}"

    def blind_indexes_of_generation(self, generation: int) -> Vault:
        """A vault computing the tokens of an earlier generation (no data keys): what a request scored before
        a rotation was hashed with."""
        if not 1 <= generation <= self.blind_index_generation:
            raise VaultKeyError(f"no blind-index generation {generation} here")
        return Vault(self._master_key, self._bi_keys[:generation])

    # -- data keys -------------------------------------------------------------------------------------
    def new_data_key(self) -> WrappedDataKey:
        """Create a data key, make it the active one, and return it wrapped for storage.

        Each process seals with a data key of its own, created at start, so the nonces under it can be a
        counter (NIST SP 800-38D, 8.2.1, deterministic construction): unique without drawing randomness.
        """
        key_id = "dk_" + secrets.token_hex(8)
        dek = secrets.token_bytes(KEY_BYTES)
        self._deks[key_id] = AESGCM(dek)
        self._active_id = key_id
        self._nonce_counter = 0
        return wrap_data_key(self._master_key, key_id, dek)

    def load_data_key(self, stored: WrappedDataKey) -> None:
        """Unwrap a stored data key so ciphertexts under it can be opened (never to seal: see new_data_key)."""
        dek = unwrap_data_key(self._master_key, stored)
        if dek is None:
            raise VaultKeyError(
                f"data key {stored.key_id} does not open under this master key (if it was rotated, give every "
                "worker the new one; an interrupted `risk-engine vault rotate-master-key` finishes when run again)"
            )
        self._deks[stored.key_id] = AESGCM(dek)

    def has_data_key(self, key_id: str) -> bool:
        """Whether the data key ``key_id`` is unwrapped here (a worker's own and those stored before it started)."""
        return key_id in self._deks

    @property
    def active_key_id(self) -> str:
        """Id of the data key new ciphertexts are sealed with."""
        if self._active_id is None:
            raise VaultKeyError("no active data key")
        return self._active_id

    # -- sealing ---------------------------------------------------------------------------------------
    def seal(self, fields: Mapping[str, str], associated: str) -> tuple[str, bytes]:
        """Encrypt a bundle of PII fields; ``associated`` (a row id) is bound as AAD. Returns (key id, blob)."""
        key_id = self.active_key_id
        self._nonce_counter += 1
        nonce = self._nonce_counter.to_bytes(NONCE_BYTES, "big")
        blob = nonce + self._deks[key_id].encrypt(nonce, orjson.dumps(dict(fields)), associated.encode())
        return key_id, blob

    def open(self, key_id: str, blob: bytes, associated: str) -> dict[str, str]:
        """Decrypt a bundle sealed by :meth:`seal`."""
        try:
            dek = self._deks[key_id]
        except KeyError:
            raise VaultKeyError(f"unknown data key {key_id}") from None
        try:
            plain = dek.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated.encode())
        except Exception as exc:
            raise VaultKeyError("ciphertext does not open: wrong key, row or tampered data") from exc
        result: dict[str, str] = orjson.loads(plain)
        return result

    # -- blind indexes ---------------------------------------------------------------------------------
    def blind_index(self, kind: PiiKind, value: str) -> str:
        """Keyed, deterministic token for equality look-ups on a PII value."""
        if self._bi_retired is not None:
            raise BlindIndexesRetired(self._bi_retired)
        domain = _DOMAIN[kind]
        memo_key = xxh3_128_digest(domain + value.encode(), self._bi_seed)
        token = self._bi_memo.get(memo_key)
        if token is None:
            inner = self._bi_inner.copy()
            inner.update(domain + _normalize(kind, value).encode())
            outer = self._bi_outer.copy()
            outer.update(inner.digest())
            raw = outer.digest()[:TOKEN_BYTES]
            for pads in self._bi_later:
                raw = _layer(pads, domain + raw)
            token = _PREFIX[kind] + base64.urlsafe_b64encode(raw).decode()
            if len(self._bi_memo) >= BLIND_INDEX_MEMO:
                self._bi_memo.clear()  # whole: cheaper than an LRU's bookkeeping on every hit
            self._bi_memo[memo_key] = token
        return token


def _hmac_pads(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) with the key's inner and outer pads hashed once: each blind index then costs two
    SHA-256 copies, half the time of copying an ``hmac.HMAC`` object; a test checks it against hmac."""
    key = key if len(key) <= 64 else hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return hashlib.sha256(bytes(b ^ 0x36 for b in key)), hashlib.sha256(bytes(b ^ 0x5C for b in key))


def _layer(pads: tuple[Any, Any], message: bytes) -> bytes:
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return bytes(outer.digest()[:TOKEN_BYTES])


class BlindIndexLayer:
    """What a new blind-index key adds over the chain: takes a stored token one generation further."""

    def __init__(self, key: bytes) -> None:
        self._pads = _hmac_pads(key)

    def __call__(self, token: str) -> str:
        """``token`` under the chain with this key added: the new key's HMAC of the token before."""
        prefix, _, encoded = token.rpartition(":")
        domain = _DOMAIN_OF.get(prefix.removeprefix("bi:")) if prefix.startswith("bi:") else None
        if domain is None:
            raise VaultKeyError("not a blind index")
        raw = base64.urlsafe_b64decode(encoded)
        return prefix + ":" + base64.urlsafe_b64encode(_layer(self._pads, domain + raw)).decode()


# -- masking -------------------------------------------------------------------------------------------


def mask_email(value: str) -> str:
    """``li.wei@example.com`` -> ``l****@example.com``."""
    local, _, domain = value.partition("@")
    return (local[:1] + "****@" + domain) if domain else "****"


def mask_phone(value: str) -> str:
    """Keep the last four digits."""
    digits = [c for c in value if c.isdigit()]
    return "*" * max(len(digits) - 4, 0) + "".join(digits[-4:])


def mask_name(value: str) -> str:
    """Keep each word's first letter."""
    return " ".join(word[:1] + "***" for word in value.split()) or "***"


def mask_ip(value: str) -> str:
    """Keep the network part only."""
    if ":" in value:
        return ":".join(value.split(":")[:2]) + ":****"
    parts = value.split(".")
    return ".".join([*parts[:2], "*", "*"]) if len(parts) == 4 else "****"


def mask_generic(value: str) -> str:
    """Keep two characters at each end of long values."""
    return value[:2] + "****" + value[-2:] if len(value) > 6 else "****"


MASKERS: dict[PiiKind, Callable[[str], str]] = {
    PiiKind.EMAIL: mask_email,
    PiiKind.PHONE: mask_phone,
    PiiKind.NAME: mask_name,
    PiiKind.IP: mask_ip,
    PiiKind.ADDRESS: lambda v: "****",
    PiiKind.CARD: mask_generic,
    PiiKind.ID_NUMBER: mask_generic,
}


def mask(kind: PiiKind, value: str) -> str:
    """Mask a PII value for a response or a log line."""
    return MASKERS[kind](value)
