"""API keys over HTTP (admin only), on SQLite and PostgreSQL: create once per request id, list without secrets,
revoke so that the key is refused at once, never locking the last admin out."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, select

from risk_engine.api_keys import create_api_key, revoke_api_key
from risk_engine.engine import RiskEngine
from risk_engine.errors import Conflict
from risk_engine.service.app import bootstrap_admin_key
from risk_engine.storage import models as m
from risk_engine.storage.db import make_engine, migrate
from tests.conftest import Api, make_settings, payment
from tests.helpers import at_the_same_moment


def create(api: Api, role: str, request_id: str, name: str = "checkout", expect: int = 201) -> dict[str, Any]:
    response = api.client.post(
        "/v1/keys", json={"role": role, "name": name, "request_id": request_id}, headers=api.headers("admin")
    )
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


def stored_keys(api: Api) -> int:
    with api.engine.db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(m.ApiKey)).scalar_one())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_created_key_works_for_its_role_and_a_replayed_request_creates_no_second_key(api: Api) -> None:
    before = stored_keys(api)
    created = create(api, "scorer", "req_1")
    assert created["role"] == "scorer" and created["revoked_at"] is None
    assert created["key"].startswith(f"rk_{created['key_id']}_")
    assert api.client.post("/v1/payments/score", json=payment(), headers=bearer(created["key"])).status_code == 200
    # a scorer key is not an analyst's
    assert api.client.get("/v1/lists", headers=bearer(created["key"])).status_code == 403

    replay = create(api, "scorer", "req_1", expect=409)
    assert created["key_id"] in replay["message"] and created["key"] not in replay["message"]
    create(api, "admin", "req_1", expect=409)  # the same request id with another body creates nothing either
    assert stored_keys(api) == before + 1


def test_keys_are_listed_without_secrets(api: Api) -> None:
    created = create(api, "analyst", "req_list")
    listed = api.client.get("/v1/keys", headers=api.headers("admin")).json()
    mine = [k for k in listed if k["key_id"] == created["key_id"]]
    assert mine == [{k: created[k] for k in ("key_id", "role", "name", "created_at", "revoked_at")}]
    text = api.client.get("/v1/keys", headers=api.headers("admin")).text
    secret = created["key"].split("_", 2)[2]
    assert secret not in text and "secret_hash" not in text
    assert {k["role"] for k in listed} == {"scorer", "analyst", "admin"}


def test_only_an_admin_manages_keys(api: Api) -> None:
    for role in ("scorer", "analyst"):
        assert api.client.get("/v1/keys", headers=api.headers(role)).status_code == 403
        response = api.client.post(
            "/v1/keys", json={"role": "admin", "name": "x", "request_id": f"r_{role}"}, headers=api.headers(role)
        )
        assert response.status_code == 403
        own_id = (api.scorer_key if role == "scorer" else api.analyst_key).split("_")[1]
        assert api.client.post(f"/v1/keys/{own_id}/revoke", headers=api.headers(role)).status_code == 403


def test_a_revoked_key_is_refused_at_once_even_just_after_it_was_used(api: Api) -> None:
    created = create(api, "scorer", "req_revoke")
    key = created["key"]
    assert api.client.post("/v1/payments/score", json=payment(), headers=bearer(key)).status_code == 200  # cached
    response = api.client.post(f"/v1/keys/{created['key_id']}/revoke", headers=api.headers("admin"))
    assert response.status_code == 200, response.text
    revoked = response.json()
    assert revoked["revoked_at"] is not None
    for path in ("/v1/payments/score",):  # the fast path and the router both ask the same engine
        refused = api.client.post(path, json=payment(payment_id="pay_after"), headers=bearer(key))
        assert refused.status_code == 401, refused.text
    assert api.client.get("/v1/payments/pay_0001", headers=bearer(key)).status_code == 401
    # revoking again changes nothing
    again = api.client.post(f"/v1/keys/{created['key_id']}/revoke", headers=api.headers("admin")).json()
    assert again == revoked
    audit = api.client.get("/v1/audit", headers=api.headers("analyst")).json()
    actions = [(e["action"], e["target"]) for e in audit if e["target"] == f"key:{created['key_id']}"]
    assert actions == [("key.revoke", f"key:{created['key_id']}"), ("key.create", f"key:{created['key_id']}")]
    assert api.client.post("/v1/keys/000000000000/revoke", headers=api.headers("admin")).status_code == 404


def test_the_last_live_admin_key_cannot_be_revoked_over_http(api: Api) -> None:
    bootstrap_id = api.admin_key.split("_")[1]
    refused = api.client.post(f"/v1/keys/{bootstrap_id}/revoke", headers=api.headers("admin"))
    assert refused.status_code == 409, refused.text
    assert api.client.get("/v1/keys", headers=api.headers("admin")).status_code == 200
    # with a second admin, the first can go, and the second then cannot
    second = create(api, "admin", "req_admin2")
    assert api.client.post(f"/v1/keys/{bootstrap_id}/revoke", headers=bearer(second["key"])).status_code == 200
    assert api.client.get("/v1/keys", headers=api.headers("admin")).status_code == 401
    last = api.client.post(f"/v1/keys/{second['key_id']}/revoke", headers=bearer(second["key"]))
    assert last.status_code == 409


def test_a_key_request_is_checked(api: Api) -> None:
    for body, field in (
        ({"role": "root", "name": "x", "request_id": "r1"}, "role"),
        ({"role": "scorer", "name": "", "request_id": "r1"}, "name"),
        ({"role": "scorer", "name": "x"}, "request_id"),
        ({"role": "scorer", "name": "x", "request_id": "r 1"}, "request_id"),
        ({"role": "scorer", "name": "x", "request_id": "r1", "secret": "mine"}, "secret"),
    ):
        response = api.client.post("/v1/keys", json=body, headers=api.headers("admin"))
        assert response.status_code == 422, (body, response.text)
        assert [e["field"] for e in response.json()["errors"]] == [field], response.text


def revoke(db: Engine, key_id: str) -> str:
    """Revoke an admin key as the API does: whether it was revoked or refused."""
    try:
        revoke_api_key(db, key_id, "test", keep_an_admin=True)
    except Conflict:
        return "refused"
    return "revoked"


def test_two_workers_revoking_the_last_two_admin_keys_at_once_leave_one(tmp_path: Path, database_url: str) -> None:
    """Each revocation counts the live admin keys before revoking; two at once, through two workers' connections,
    must not both count two and leave none (SQLite read the count before its transaction began)."""
    databases = [make_engine(database_url), make_engine(database_url)]
    migrate(databases[0])
    try:
        live = [create_api_key(databases[0], "admin", "ops")[1]["key_id"]]
        for _ in range(12):
            live.append(create_api_key(databases[0], "admin", "ops")[1]["key_id"])
            outcomes = at_the_same_moment(*(partial(revoke, db, k) for db, k in zip(databases, live, strict=True)))
            with databases[0].connect() as conn:
                live = list(
                    conn.execute(
                        select(m.ApiKey.key_id).where(m.ApiKey.role == "admin", m.ApiKey.revoked_at.is_(None))
                    ).scalars()
                )
            assert sorted(outcomes) == ["refused", "revoked"] and len(live) == 1, (outcomes, live)
    finally:
        for db in databases:
            db.dispose()


def test_workers_starting_together_on_a_new_database_create_one_admin_key(tmp_path: Path, database_url: str) -> None:
    """Each start that finds no key creates the first admin key and writes it to the home's ``admin.key``; two
    starting at once used to create one each, and the one not left in the file was a live admin key nobody
    held. One is created, and the file holds it."""
    settings = make_settings(tmp_path / "var", database_url)
    engines = [RiskEngine.open(settings), RiskEngine.open(settings)]
    key_file = settings.home / "admin.key"
    try:
        for _ in range(8):
            with engines[0].db.begin() as conn:
                conn.execute(delete(m.ApiKey))
            key_file.unlink(missing_ok=True)
            outcomes = at_the_same_moment(*(partial(bootstrap_admin_key, engine) for engine in engines))
            assert [o for o in outcomes if o is not None] == []
            with engines[0].db.connect() as conn:
                stored = conn.execute(select(m.ApiKey.key_id, m.ApiKey.role)).all()
            assert len(stored) == 1 and stored[0].role == "admin", stored
            principal = engines[1].authenticate(key_file.read_text().strip())
            assert principal is not None and principal.key_id == stored[0].key_id
        assert engines[0].create_first_admin_key() is None  # a key exists: none is made
    finally:
        for engine in engines:
            engine.close()
