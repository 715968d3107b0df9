"""Shared fixtures: real SQLite files and a real PostgreSQL (one fresh schema per test)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from risk_engine.config import Settings
from risk_engine.service import create_app

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("RISK_ENGINE_TEST_POSTGRES_URL", "")

BASE_PAYMENT: dict[str, Any] = {
    "payment_id": "pay_0001",
    "occurred_at": "2026-11-22T10:15:00Z",
    "amount": {"value": 129900, "currency": "CNY"},
    "order_id": "ord_0001",
    "seller_id": "s_42",
    "buyer": {
        "id": "b_7",
        "created_at": "2025-03-01T00:00:00Z",
        "email": "li.wei@example.com",
        "phone": "+8613800138000",
        "name": "Li Wei",
        "verified": True,
    },
    "payment_method": {
        "type": "card",
        "card_bin": "622202",
        "card_last4": "4321",
        "card_fingerprint": "fp_9a8b",
        "issuer_country": "CN",
    },
    "device": {"id": "dev_1", "ip": "203.0.113.7", "user_agent": "Mozilla/5.0"},
    "shipping_address": {"country": "CN", "city": "Hangzhou", "postal_code": "310000", "line1": "1 Wenyi Rd"},
    "billing_country": "CN",
    "item_count": 1,
    "channel": "app",
    "attributes": {},
}


def payment(**overrides: Any) -> dict[str, Any]:
    """A valid payment; nested overrides use dotted keys: payment(**{"buyer.verified": False})."""
    body = copy.deepcopy(BASE_PAYMENT)
    for key, value in overrides.items():
        target = body
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if value is DELETE:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    return body


DELETE = object()

BASE_REVIEW: dict[str, Any] = {
    "review_id": "r_1",
    "order_id": "o_1",
    "item_id": "i_1",
    "seller_id": "s_42",
    "reviewer": {"id": "b_7", "created_at": "2024-01-01T00:00:00Z", "device_id": "dev_1", "ip": "198.51.100.7"},
    "rating": 5,
    "text": "Arrived on time, exactly as described.",
    "occurred_at": "2026-11-22T11:00:00Z",
}

BASE_ACCOUNT: dict[str, Any] = {
    "account_id": "acct_review_0001",
    "occurred_at": "2026-11-22T10:20:00Z",
    "subject_id": "s_42",
    "role": "seller",
    "created_at": "2026-11-22T02:00:00Z",
    "country": "CN",
    "attributes": {"sent_tnx": 3, "received_tnx": 40, "total_ether_balance": 12.5},
}


def account(**overrides: Any) -> dict[str, Any]:
    """A valid account event, top-level fields overridden."""
    return {**copy.deepcopy(BASE_ACCOUNT), **overrides}


def shared_data(name: str) -> Path:
    """A file of ../shared/data; a test that needs it skips when it is absent, and fails in CI."""
    path = DATA / name
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} is absent (../shared/data beside the project; it is read there, never copied)")
    return path


def _postgres_reachable() -> str | None:
    """None if PostgreSQL answers, else the reason."""
    if not PG_URL:
        return "RISK_ENGINE_TEST_POSTGRES_URL is not set"
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {type(exc).__name__}: {exc}"
    return None


_PG_PROBLEM: str | None = _postgres_reachable() if PG_URL or IN_CI else "RISK_ENGINE_TEST_POSTGRES_URL is not set"


def postgres_url_or_skip() -> str:
    """The PostgreSQL URL; in CI a missing PostgreSQL fails the run instead of skipping."""
    if _PG_PROBLEM is not None:
        if IN_CI:
            pytest.fail(f"CI requires PostgreSQL: {_PG_PROBLEM}", pytrace=False)
        pytest.skip(_PG_PROBLEM)
    return PG_URL


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A URL of the PostgreSQL whose search_path is a fresh, empty schema, dropped afterwards."""
    base = postgres_url_or_skip()
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A URL whose search_path is a fresh, empty schema, dropped afterwards."""
    with fresh_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on a real SQLite file and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'risk.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


def run_cli(
    *args: str, home: Path, cwd: Path = REPO, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``risk-engine`` command line as a user would, with its own data directory (and ``env`` added)."""
    base = {**os.environ, "RISK_ENGINE_HOME": str(home)}
    base.pop("RISK_ENGINE_DATABASE_URL", None)
    env = {**base, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "risk_engine.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_settings(home: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings pointing at the repository's rules and models and a private data directory."""
    values: dict[str, Any] = {
        "home": home,
        "database_url": database_url,
        "rules_dir": REPO / "rules",
        "models_dir": REPO / "models",
    }
    values.update(overrides)
    return Settings(**values)


class Api:
    """A TestClient with keys of each role."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.admin_key = (settings.home / "admin.key").read_text().strip()
        engine = client.app.state.engine  # type: ignore[attr-defined]
        self.engine = engine
        self.scorer_key, _ = engine.create_api_key("scorer", "tests")
        self.analyst_key, _ = engine.create_api_key("analyst", "tests")

    def headers(self, role: str = "scorer") -> dict[str, str]:
        key = {"scorer": self.scorer_key, "analyst": self.analyst_key, "admin": self.admin_key}[role]
        return {"Authorization": f"Bearer {key}"}

    def score(self, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
        response = self.client.post("/v1/payments/score", json=body, headers=self.headers())
        assert response.status_code == expect, response.text
        result: dict[str, Any] = response.json()
        return result


def open_api(settings: Settings) -> tuple[TestClient, Api]:
    """Start the app (lifespan included) and return the client and helpers."""
    client = TestClient(create_app(settings))
    client.__enter__()
    return client, Api(client, settings)


@contextmanager
def two_workers(settings: Settings) -> Iterator[tuple[Api, Api]]:
    """Two workers on one database, started in order (a, then b) and stopped in reverse."""
    client_a, a = open_api(settings)
    try:
        client_b, b = open_api(settings)
        try:
            yield a, b
        finally:
            client_b.__exit__(None, None, None)
    finally:
        client_a.__exit__(None, None, None)


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    """The service on a fresh database, on each backend."""
    client, helper = open_api(make_settings(tmp_path / "var", database_url))
    yield helper
    client.__exit__(None, None, None)


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    """The service on a fresh SQLite file only (for tests whose subject is not the backend)."""
    client, helper = open_api(make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}"))
    yield helper
    client.__exit__(None, None, None)
