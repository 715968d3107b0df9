"""API keys: who may call, with which role. Keys are stored as hashes; a caller's bearer token is checked against
them through a short cache (``KeyCache``), so a request costs no database read while its key is known."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine as SqlEngine
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from risk_engine.errors import Conflict, NotFound
from risk_engine.storage import models as m
from risk_engine.storage.audit import audit
from risk_engine.storage.db import DatabaseUnavailable, hold_rows

ROLES = ("scorer", "analyst", "admin")
ROLE_RANK = {role: i for i, role in enumerate(ROLES)}
KEY_CACHE_S = 5.0  # how long a process trusts what it read of a key: a revocation elsewhere takes this long
KEY_CACHE_SIZE = 10_000  # tokens remembered at most; past it the cache starts over (odd tokens cannot grow it)


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    key_id: str
    role: str
    name: str

    def can(self, role: str) -> bool:
        """Roles are ranked: admin > analyst > scorer."""
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def api_key_view(row: m.ApiKey) -> dict[str, Any]:
    """What may be shown of a key: never its secret or the secret's hash."""
    return {
        "key_id": row.key_id,
        "role": row.role,
        "name": row.name,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at is not None else None,
    }


def create_api_key(
    db: SqlEngine, role: str, name: str, actor: str = "cli", request_id: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Create a key in the database and return it with its view; only its hash is stored, and the creation is
    audited. With ``request_id`` (the API's idempotency key), a request id already used raises ``Conflict``
    naming the key it created: the secret is shown once, so a lost answer means revoking that key.

    Needs no running engine: ``risk-engine keys create`` calls it on a migrated database without rebuilding
    velocity and detectors from the stored history.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = m.ApiKey(
        key_id=key_id,
        secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
        role=role,
        name=name,
        created_at=datetime.now(UTC),
        revoked_at=None,
        request_id=request_id,
    )

    try:
        with Session(db, expire_on_commit=False) as s:
            s.add(row)
            audit(s, actor, "key.create", f"key:{key_id}", None, {"role": role, "name": name})
            s.commit()
    except IntegrityError:  # the request id's unique index: an earlier (or concurrent) attempt made the key
        if request_id is None:
            raise
        with Session(db) as s:
            earlier = s.scalars(select(m.ApiKey).where(m.ApiKey.request_id == request_id)).first()
        if earlier is None:
            raise
        raise Conflict(
            f"request_id {request_id} already created key {earlier.key_id}; its secret is shown only once: "
            "if that answer was lost, revoke the key and create another with a new request_id"
        ) from None
    return f"rk_{key_id}_{secret}", api_key_view(row)


# the request id of the first admin key a start creates: outside the API's id pattern, so no caller can take it
FIRST_ADMIN_REQUEST_ID = "first admin key (bootstrap)"


def create_first_admin_key(db: SqlEngine) -> str | None:
    """Create an admin key if the database holds no key at all, and return it; None if it holds one.

    Workers starting together on a new database all find it empty: the first key is created under one request
    id, whose unique index lets one of them create it, and the others get None (they used to create one each,
    each but the last written to ``admin.key`` then held by nobody).
    """
    if has_api_keys(db):
        return None
    try:
        key, _ = create_api_key(db, "admin", "bootstrap", actor="system", request_id=FIRST_ADMIN_REQUEST_ID)
    except Conflict:
        return None
    return key


def list_api_keys(db: SqlEngine, include_revoked: bool = True) -> list[dict[str, Any]]:
    """Every key's view, oldest first."""
    stmt = select(m.ApiKey).order_by(m.ApiKey.created_at, m.ApiKey.key_id)
    if not include_revoked:
        stmt = stmt.where(m.ApiKey.revoked_at.is_(None))
    with Session(db) as s:
        return [api_key_view(row) for row in s.scalars(stmt)]


def revoke_api_key(db: SqlEngine, key_id: str, actor: str, keep_an_admin: bool = False) -> dict[str, Any]:
    """Revoke a key (audited); revoking a revoked key changes nothing and answers the same view.

    ``keep_an_admin`` (the API) refuses to revoke the last live admin key, which would leave nobody able to
    manage keys over HTTP; the CLI, which can always create one, may. Raises ``NotFound`` or ``Conflict``.
    """
    with Session(db, expire_on_commit=False) as s:
        if keep_an_admin:
            # every live admin key held first, so that two revocations at once cannot both pass the count below
            hold_rows(s, m.ApiKey.role, m.ApiKey.role == "admin", m.ApiKey.revoked_at.is_(None))
        row = s.get(m.ApiKey, key_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no API key {key_id}")
        if row.revoked_at is not None:
            return api_key_view(row)
        if keep_an_admin and row.role == "admin":
            live_admins = s.scalars(
                select(m.ApiKey.key_id).where(m.ApiKey.role == "admin", m.ApiKey.revoked_at.is_(None))
            ).all()
            if set(live_admins) <= {key_id}:
                raise Conflict(f"key {key_id} is the last live admin key: create another admin key first")
        row.revoked_at = datetime.now(UTC)
        audit(s, actor, "key.revoke", f"key:{key_id}", {"revoked_at": None}, {"revoked_at": row.revoked_at.isoformat()})
        s.commit()
        return api_key_view(row)


def has_api_keys(db: SqlEngine) -> bool:
    """True once any key exists (revoked ones too)."""
    with Session(db) as s:
        return s.scalar(select(func.count()).select_from(m.ApiKey)) != 0


class KeyCache:
    """Bearer tokens to principals, each read of the database trusted for ``KEY_CACHE_S``. Thread-safe enough:
    a race between two threads only reads the same key twice."""

    def __init__(self, db: SqlEngine) -> None:
        self.db = db
        self._known: dict[str, tuple[float, Principal | None]] = {}

    def cached(self, token: str) -> tuple[bool, Principal | None]:
        """(whether the token was read within ``KEY_CACHE_S``, its principal or None): no database read, so an
        event loop may call it; on a miss, :meth:`authenticate` off the loop."""
        cached = self._known.get(token)
        if cached is not None and time.monotonic() - cached[0] < KEY_CACHE_S:
            return True, cached[1]
        return False, None

    def authenticate(self, token: str) -> Principal | None:
        """The principal behind a bearer token (``rk_<key id>_<secret>``), or None. Raises
        ``DatabaseUnavailable`` when the key must be read and cannot be."""
        known, principal = self.cached(token)
        if known:
            return principal
        now = time.monotonic()
        parts = token.split("_", 2)
        if len(parts) == 3 and parts[0] == "rk":
            key_id, secret = parts[1], parts[2]
            try:
                with Session(self.db) as s:
                    row = s.get(m.ApiKey, key_id)
            except OperationalError as exc:
                raise DatabaseUnavailable(type(exc).__name__) from exc
            if row is not None and row.revoked_at is None:
                digest = hashlib.sha256(secret.encode()).hexdigest()
                if secrets.compare_digest(digest, row.secret_hash):
                    principal = Principal(key_id, row.role, row.name)
        if len(self._known) > KEY_CACHE_SIZE:
            self._known.clear()
        self._known[token] = (now, principal)
        return principal

    def forget(self) -> None:
        """Read every key again at its next use (this process has just revoked one)."""
        self._known.clear()
