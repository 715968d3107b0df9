"""``Idempotency-Key`` on the state-changing endpoints, on SQLite and PostgreSQL: a retry gets the first
answer and does nothing twice, even after the world moved on; a key reused for another request is a 409."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from risk_engine.storage import idempotency
from risk_engine.storage import models as m
from tests.conftest import REPO, Api, payment

POLICY = (REPO / "rules" / "payment.rules").read_text()


def keyed(api: Api, key: str, role: str = "analyst") -> dict[str, str]:
    return {**api.headers(role), "Idempotency-Key": key}


def stored_keys(api: Api) -> int:
    with api.engine.db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(m.IdempotencyKey)).scalar_one())


def test_a_retried_publish_answers_as_the_first_and_does_not_undo_a_later_one(api: Api) -> None:
    h = api.headers("analyst")
    for text in (POLICY + "\n", POLICY + "\n\n"):
        assert api.client.post("/v1/policies/payment/drafts", json={"text": text}, headers=h).status_code == 201
    first = api.client.post("/v1/policies/payment/versions/2/publish", headers=keyed(api, "publish-v2"))
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    assert api.client.post("/v1/policies/payment/versions/3/publish", headers=h).status_code == 200
    # the first publish's client never saw its answer and retries: v3 stays live
    retry = api.client.post("/v1/policies/payment/versions/2/publish", headers=keyed(api, "publish-v2"))
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json()
    assert api.engine.subjects["payment"].policy.version == 3
    audit = api.client.get("/v1/audit", headers=h).json()
    published = [e["target"] for e in audit if e["action"] == "policy.publish" and e["target"].startswith("payment")]
    assert published == ["payment:v3", "payment:v2", "payment:v1"]  # v2 once


def test_a_retried_backtest_starts_no_second_job(api: Api) -> None:
    api.score(payment())
    h = api.headers("analyst")
    assert api.client.post("/v1/policies/payment/drafts", json={"text": POLICY + "\n"}, headers=h).status_code == 201
    jobs_before = len(api.client.app.state.jobs.recent())  # type: ignore[attr-defined]
    answers = [
        api.client.post("/v1/policies/payment/drafts/2/backtest", json={"since": "30d"}, headers=keyed(api, "bt-1"))
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(api.client.app.state.jobs.recent()) == jobs_before + 1  # type: ignore[attr-defined]
    # the same key with another body, path or method is another request: refused, nothing started
    for method, path, body in (
        ("POST", "/v1/policies/payment/drafts/2/backtest", {"since": "7d"}),
        ("POST", "/v1/policies/payment/drafts/1/backtest", {"since": "30d"}),
    ):
        reused = api.client.request(method, path, json=body, headers=keyed(api, "bt-1"))
        assert reused.status_code == 409, reused.text
        assert "POST /v1/policies/payment/drafts/2/backtest" in reused.json()["message"]
    assert len(api.client.app.state.jobs.recent()) == jobs_before + 1  # type: ignore[attr-defined]


def test_each_api_key_has_its_own_idempotency_keys_and_errors_are_kept_too(api: Api) -> None:
    entry = {"value": "dev_9"}
    analyst = api.client.post("/v1/lists/blocked_devices/entries", json=entry, headers=keyed(api, "k"))
    admin = api.client.post("/v1/lists/blocked_devices/entries", json=entry, headers=keyed(api, "k", "admin"))
    assert analyst.status_code == admin.status_code == 201
    assert "idempotent-replayed" not in admin.headers  # another key's "k": answered afresh
    # a 4xx answer is the answer: kept and replayed
    missing = {"value": "not_there"}
    first = api.client.request("DELETE", "/v1/lists/blocked_devices/entries", json=missing, headers=keyed(api, "d"))
    again = api.client.request("DELETE", "/v1/lists/blocked_devices/entries", json=missing, headers=keyed(api, "d"))
    assert first.status_code == again.status_code == 404 and again.headers["idempotent-replayed"] == "true"
    # a scorer may not edit lists: the 403 is kept for that key, and a key that is not one is not looked at
    assert api.client.post("/v1/lists/x/entries", json=entry, headers=keyed(api, "s", "scorer")).status_code == 403
    unknown = {"Authorization": "Bearer rk_000000000000_nope", "Idempotency-Key": "u"}
    assert api.client.post("/v1/lists/blocked_devices/entries", json=entry, headers=unknown).status_code == 401
    assert stored_keys(api) == 4


def test_scoring_and_bad_keys_are_not_kept(api: Api) -> None:
    scored = api.client.post("/v1/payments/score", json=payment(), headers={**api.headers(), "Idempotency-Key": "p"})
    assert scored.status_code == 200
    for bad in (b"", b"x" * 256, b"caf\xe9"):
        response = api.client.post(
            "/v1/lists/blocked_devices/entries",
            json={"value": "dev_1"},
            headers={**{k: v.encode() for k, v in api.headers("analyst").items()}, b"Idempotency-Key": bad},
        )
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["errors"][0]["field"] == "Idempotency-Key"
    assert stored_keys(api) == 0
    assert api.client.get("/v1/lists/blocked_devices/entries", headers=api.headers("analyst")).json() == []


def test_a_claim_in_progress_refuses_a_retry_until_it_is_answered_or_abandoned(api: Api) -> None:
    db, now = api.engine.db, datetime.now(UTC)
    first = idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h1", now)
    assert first.outcome == "new" and first.row_id is not None
    assert idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h1", now).outcome == "in_progress"
    assert idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h2", now).outcome == "conflict"
    # the first request's process died: after ABANDONED_S one retry takes the claim over, and only one
    later = now + timedelta(seconds=idempotency.ABANDONED_S + 1)
    taken = idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h1", later)
    assert (taken.outcome, taken.row_id) == ("new", first.row_id)
    assert idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h1", later).outcome == "in_progress"
    idempotency.complete(db, first.row_id, 201, "application/json", b'{"ok":true}')
    replay = idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h1", later)
    assert (replay.outcome, replay.status, replay.body) == ("replay", 201, b'{"ok":true}')
    # a released claim (a 5xx) and an expired key are free again
    idempotency.release(db, first.row_id)
    assert idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h2", later).outcome == "new"
    expired = later + timedelta(seconds=idempotency.RETAIN_S + 1)
    assert idempotency.claim(db, "key1", "k", "POST", "/v1/x", "h3", expired).outcome == "new"
    assert idempotency.purge(db, expired + timedelta(seconds=idempotency.RETAIN_S + 1)) == 1


def test_a_created_keys_secret_is_never_kept_for_a_replay(api: Api) -> None:
    body = {"role": "scorer", "name": "checkout", "request_id": "rq_1"}
    created = api.client.post("/v1/keys", json=body, headers=keyed(api, "create-1", "admin"))
    assert created.status_code == 201, created.text
    secret = created.json()["key"].split("_", 2)[2]
    assert stored_keys(api) == 0  # nothing kept: the answer holds the secret
    again = api.client.post("/v1/keys", json=body, headers=keyed(api, "create-1", "admin"))
    assert again.status_code == 409 and secret not in again.text  # the request_id's own replay, no secret
    with api.engine.db.connect() as conn:
        bodies = conn.execute(select(m.IdempotencyKey.body)).scalars().all()
    assert all(secret.encode() not in (b or b"") for b in bodies)
    # revoking is kept as any other request: its answer holds no secret
    revoke = f"/v1/keys/{created.json()['key_id']}/revoke"
    first = api.client.post(revoke, headers=keyed(api, "revoke-1", "admin"))
    retry = api.client.post(revoke, headers=keyed(api, "revoke-1", "admin"))
    assert retry.headers["idempotent-replayed"] == "true" and retry.json() == first.json()
