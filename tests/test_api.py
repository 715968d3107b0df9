"""The payment path through HTTP, on SQLite and PostgreSQL: scoring, idempotency, labels, access, bad input."""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from risk_engine.engine import sha256_hex
from risk_engine.storage import models as m
from tests.conftest import DELETE, REPO, Api, account, payment


def stored_events(api: Api) -> int:
    with api.engine.db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(m.Event)).scalar_one())


def test_score_answers_the_contract(api: Api) -> None:
    result = api.score(payment())
    assert set(result) >= {"payment_id", "decision", "score", "reasons", "policy_version", "model_versions"}
    assert result["payment_id"] == "pay_0001"
    assert result["decision"] in ("allow", "challenge", "review", "block")
    assert 0 <= result["score"] <= 100
    assert result["policy_version"] == "payment:v1"
    assert "payment_anomaly" in result["model_versions"]
    assert all(r["source"] in ("rule", "model") for r in result["reasons"])
    assert result["elapsed_ms"] > 0
    assert stored_events(api) == 1


def test_same_payment_again_returns_the_stored_decision_and_counts_nothing_twice(api: Api) -> None:
    first = api.score(payment(payment_id="p1"))
    response = api.client.post("/v1/payments/score", json=payment(payment_id="p1"), headers=api.headers())
    assert response.status_code == 200
    assert response.headers["Idempotent-Replayed"] == "true"
    assert response.json() == first
    # a third payment on the same card sees exactly one earlier payment on it, not two
    third = api.client.get("/v1/payments/p1", headers=api.headers())
    assert third.status_code == 200
    api.score(payment(payment_id="p2", occurred_at="2026-11-22T10:16:00Z"))
    stored = api.client.get("/v1/payments/p2", headers=api.headers()).json()
    assert stored["aggregates"]["count(by payment_method.card_fingerprint within 10m)"] == 1
    assert stored_events(api) == 2


def test_same_payment_id_with_a_different_body_is_a_conflict(api: Api) -> None:
    api.score(payment(payment_id="p1"))
    response = api.client.post(
        "/v1/payments/score", json=payment(payment_id="p1", **{"amount.value": 5}), headers=api.headers()
    )
    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert stored_events(api) == 1


def test_a_replay_that_differs_only_in_pii_is_a_conflict(api: Api) -> None:
    api.score(payment(payment_id="p1"))
    for change in ({"buyer.email": "someone.else@example.com"}, {"shipping_address.line2": "Flat 2"}):
        response = api.client.post("/v1/payments/score", json=payment(payment_id="p1", **change), headers=api.headers())
        assert response.status_code == 409, change
    assert stored_events(api) == 1


def test_stored_payment_shows_pii_masked(api: Api) -> None:
    api.score(payment())
    body = api.client.get("/v1/payments/pay_0001", headers=api.headers()).json()
    masked = body["pii_masked"]
    assert masked["buyer.email"] == "l****@example.com"
    assert masked["buyer.phone"].endswith("8000") and "13800" not in masked["buyer.phone"]
    assert masked["device.ip"] == "203.0.*.*"
    assert "Li Wei" not in str(body) and "li.wei@example.com" not in str(body)


def test_unknown_payment_is_404(api: Api) -> None:
    response = api.client.get("/v1/payments/nope", headers=api.headers())
    assert response.status_code == 404


def test_labels_are_idempotent_on_label_id(api: Api) -> None:
    api.score(payment())
    label = {"label_id": "lbl_1", "payment_id": "pay_0001", "label": "chargeback", "source": "issuer"}
    first = api.client.post("/v1/labels", json=label, headers=api.headers())
    assert first.status_code == 201
    assert first.json()["is_fraud"] is True
    again = api.client.post("/v1/labels", json=label, headers=api.headers())
    assert again.status_code == 200
    assert again.json() == first.json()
    different = api.client.post("/v1/labels", json={**label, "label": "legitimate"}, headers=api.headers())
    assert different.status_code == 409
    missing = api.client.post(
        "/v1/labels", json={**label, "label_id": "lbl_2", "payment_id": "zz"}, headers=api.headers()
    )
    assert missing.status_code == 404
    with api.engine.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(m.Label)).scalar_one() == 1


def test_each_subject_takes_the_labels_that_mean_something_for_it(api: Api) -> None:
    api.score(payment())
    for body in (
        {"label": "fake"},  # a review's word
        {"label": "genuine"},
        {"label": "dispute_lost", "subject": "account"},  # a payment's
        {"label": "chargeback", "subject": "review"},
        {"label": "chargeback", "subject": "merchant"},
    ):
        response = api.client.post(
            "/v1/labels", json={"label_id": "l1", "payment_id": "pay_0001", **body}, headers=api.headers()
        )
        assert response.status_code == 422, (body, response.text)
        [error] = response.json()["errors"]
        assert error["field"] == "label" and f"not {body['label']}" in error["reason"], error
    with api.engine.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(m.Label)).scalar_one() == 0
    ok = api.client.post(
        "/v1/labels", json={"label_id": "l1", "payment_id": "pay_0001", "label": "dispute_lost"}, headers=api.headers()
    )
    assert ok.status_code == 201 and ok.json()["is_fraud"] is True
    with pytest.raises(ValueError, match=r"a payment takes .*, not fake"):
        api.engine.record_labels([("pay_0001", "fake", None)], source="test")


def test_a_stored_payment_shows_the_labels_received_for_it(api: Api) -> None:
    api.score(payment())
    api.score(payment(payment_id="pay_other"))
    assert api.client.get("/v1/payments/pay_0001", headers=api.headers()).json()["labels"] == []
    first = {"label_id": "lbl_a", "payment_id": "pay_0001", "label": "chargeback", "source": "issuer"}
    second = {"label_id": "lbl_b", "payment_id": "pay_0001", "label": "legitimate", "source": "analyst"}
    elsewhere = {"label_id": "lbl_c", "payment_id": "pay_other", "label": "confirmed_fraud"}
    answers = [api.client.post("/v1/labels", json=b, headers=api.headers()).json() for b in (first, second, elsewhere)]
    shown = api.client.get("/v1/payments/pay_0001", headers=api.headers()).json()["labels"]
    assert shown == answers[:2]  # oldest first, only this payment's
    # an account scored under the same id has labels of its own
    scored = api.client.post("/v1/accounts/score", json=account(account_id="pay_0001"), headers=api.headers())
    assert scored.status_code == 200
    account_label = {**elsewhere, "label_id": "lbl_d", "subject": "account", "payment_id": "pay_0001"}
    labelled = api.client.post("/v1/labels", json=account_label, headers=api.headers())
    assert labelled.status_code == 201, labelled.text
    assert api.client.get("/v1/payments/pay_0001", headers=api.headers()).json()["labels"] == answers[:2]
    assert api.client.get("/v1/accounts/pay_0001", headers=api.headers()).json()["labels"] == [labelled.json()]


def test_every_endpoint_but_health_and_metrics_needs_a_key(api: Api) -> None:
    assert api.client.post("/v1/payments/score", json=payment()).status_code == 401
    bad = {"Authorization": "Bearer rk_000000000000_nope"}
    assert api.client.post("/v1/payments/score", json=payment(), headers=bad).status_code == 401
    assert api.client.get("/v1/models").status_code == 401
    assert api.client.post("/v1/labels", json={}).status_code == 401
    assert api.client.get("/healthz").status_code == 200
    assert api.client.get("/metrics").status_code == 200
    assert stored_events(api) == 0


def test_roles_are_enforced(api: Api) -> None:
    entry = {"value": "dev_bad"}
    scorer = api.client.post("/v1/lists/blocked_devices/entries", json=entry, headers=api.headers("scorer"))
    assert scorer.status_code == 403
    analyst = api.client.post("/v1/lists/blocked_devices/entries", json=entry, headers=api.headers("analyst"))
    assert analyst.status_code == 201


def test_keys_are_stored_hashed(api: Api) -> None:
    with api.engine.db.connect() as conn:
        hashes = [row.secret_hash for row in conn.execute(select(m.ApiKey))]
    secret = api.scorer_key.split("_", 2)[2]
    assert hashes and all(secret not in h for h in hashes)


def test_metrics_count_decisions_and_rule_hits(api: Api) -> None:
    api.score(payment(**{"billing_country": "US"}))
    text = api.client.get("/metrics").text
    assert "risk_engine_request_seconds_bucket" in text
    assert 'risk_engine_rule_hits_total{rule="billing_shipping_mismatch"} 1.0' in text
    assert "risk_engine_decisions_total" in text
    # the payment's row was committed before it was answered: one group commit holds it
    counts = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("risk_engine_group_commits_total", "risk_engine_group_commit_rows_total"))
    }
    assert counts["risk_engine_group_commits_total"] >= 1
    assert counts["risk_engine_group_commit_rows_total"] >= 1
    assert (
        api.client.post(
            "/v1/labels",
            json={"label_id": "l1", "payment_id": "pay_0001", "label": "chargeback"},
            headers=api.headers(),
        ).status_code
        == 201
    )
    learned = [
        line
        for line in api.client.get("/metrics").text.splitlines()
        if line.startswith("risk_engine_model_labels_seen")
    ]
    by_model = {line.split('model="')[1].split('"')[0]: float(line.split()[-1]) for line in learned}
    assert by_model["payment_fraud"] == 1.0 and by_model["review_text"] == 0.0  # one per supervised detector
    assert "payment_anomaly" not in by_model


def test_metrics_show_the_garbage_collectors_pauses(api: Api) -> None:
    gc.collect(1)  # a middle collection, measured (the engine installed the collector's tuning)
    lines = api.client.get("/metrics").text.splitlines()
    middle = [line for line in lines if line.startswith('risk_engine_gc_pause_seconds_count{generation="1"}')]
    assert middle and float(middle[0].split()[-1]) >= 1
    assert any(line.startswith('risk_engine_gc_pause_seconds_bucket{generation="1",le="+Inf"}') for line in lines)
    frozen = [line for line in lines if line.startswith("risk_engine_gc_frozen_objects ")]
    assert frozen and float(frozen[0].split()[-1]) > 0


def test_a_detector_that_raises_adds_nothing_and_the_rules_still_decide(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    detector = next(d for d in api.engine.subjects["payment"].detectors if d.name == "payment_anomaly")

    def raising(*_: Any, **__: Any) -> Any:
        raise ValueError("the value 4111 of a field")  # an exception's text may quote the event: never logged

    added = api.client.post(
        "/v1/lists/blocked_devices/entries", json={"value": "dev_1"}, headers=api.headers("analyst")
    )
    assert added.status_code == 201
    learned = detector.events_seen
    monkeypatch.setattr(detector, "score_one", raising)
    answer = api.score(payment())
    assert answer["decision"] == "block"  # the rules still decide
    reason = next(r for r in answer["reasons"] if r["code"] == "MODEL_PAYMENT_ANOMALY")
    assert "could not score" in reason["text"] and reason["score_delta"] == 0
    assert detector.events_seen == learned  # an event it could not score, it does not learn either
    assert api.client.get("/v1/payments/pay_0001", headers=api.headers()).status_code == 200
    monkeypatch.undo()
    monkeypatch.setattr(detector, "learn_one", raising)
    assert api.score(payment(payment_id="pay_0002"))["decision"] == "block"
    supervised = next(d for d in api.engine.subjects["payment"].detectors if d.name == "payment_fraud")
    monkeypatch.setattr(supervised, "learn_label", raising)
    label = {"label_id": "l1", "payment_id": "pay_0001", "label": "chargeback"}
    assert api.client.post("/v1/labels", json=label, headers=api.headers()).status_code == 201
    assert supervised.labels_seen == 0 and not supervised.wants_label(1)  # read, not asked for again
    metrics = api.client.get("/metrics").text
    assert 'risk_engine_model_failures_total{model="payment_anomaly",phase="score"} 1.0' in metrics
    assert 'risk_engine_model_failures_total{model="payment_anomaly",phase="learn"} 1.0' in metrics
    assert 'risk_engine_model_failures_total{model="payment_fraud",phase="learn_label"} 1.0' in metrics
    logged = [r.getMessage() for r in caplog.records if " raised " in r.getMessage()]
    assert len(logged) == 3 and all("ValueError" in m and "4111" not in m for m in logged)


def test_models_endpoint_lists_the_detectors(api: Api) -> None:
    api.score(payment())
    api.client.post(
        "/v1/labels", json={"label_id": "l1", "payment_id": "pay_0001", "label": "legitimate"}, headers=api.headers()
    )
    models = {d["name"]: d for d in api.client.get("/v1/models", headers=api.headers()).json()}
    assert {"payment_anomaly", "payment_fraud", "account_fraud", "account_population"} <= set(models)
    assert {d["subject"] for d in models.values() if d["name"].startswith("payment_")} == {"payment"}
    assert models["account_population"]["kind"] == "population" and not models["account_population"]["calibrated"]
    assert models["payment_anomaly"]["events_seen"] == 1 and models["payment_anomaly"]["labels_seen"] == 0
    assert models["payment_fraud"]["labels_seen"] == 1


WEEK_AHEAD = (datetime.now(UTC) + timedelta(days=7)).isoformat()
BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("negative amount", payment(**{"amount.value": -1}), "amount.value"),
    ("float amount", payment(**{"amount.value": 12.5}), "amount.value"),
    ("amount as string", payment(**{"amount.value": "100"}), "amount.value"),
    ("unknown currency", payment(**{"amount.currency": "XYZ"}), "amount.currency"),
    ("missing buyer", payment(buyer=DELETE), "buyer"),
    ("naive time", payment(occurred_at="2026-11-22T10:15:00"), "occurred_at"),
    ("wrong type", payment(item_count="many"), "item_count"),
    ("cvv sent", payment(**{"payment_method.cvv": "123"}), "payment_method.cvv"),
    ("full card number", payment(**{"payment_method.card_number": "4111111111111111"}), "payment_method.card_number"),
    (
        "PAN as fingerprint",
        payment(**{"payment_method.card_fingerprint": "4111 1111 1111 1111"}),
        "payment_method.card_fingerprint",
    ),
    ("PAN in an attribute", payment(attributes={"V1": 0.5, "V2": "4111-1111-1111-1111"}), "attributes.V2"),
    ("bad ip", payment(**{"device.ip": "999.1.1.1"}), "device.ip"),
    ("bad email", payment(**{"buyer.email": "not-an-email"}), "buyer.email"),
    ("undeclared attribute", payment(attributes={"mystery": 1}), "attributes.mystery"),
    ("attribute of wrong type", payment(attributes={"V1": "high"}), "attributes.V1"),
    # JSON's NaN and Infinity, which the parser takes, or a huge value would stay in the detectors' running means
    ("NaN attribute", payment(attributes={"V1": 0.5, "V2": float("nan")}), "attributes.V2"),
    ("infinite attribute", payment(attributes={"V1": float("-inf")}), "attributes.V1"),
    ("attribute too large", payment(attributes={"V1": 1e300}), "attributes.V1"),
    ("attribute past 64 bits", payment(attributes={"V1": 10**30}), "attributes.V1"),
    ("time past the year 9999 in UTC", payment(occurred_at="9999-12-31T23:59:59-05:00"), "occurred_at"),
    ("time before 1970 in UTC", payment(occurred_at="1970-01-01T04:00:00+05:00"), "occurred_at"),
    ("account created in the year 1", payment(**{"buyer.created_at": "0001-01-01T00:00:00+05:00"}), "buyer.created_at"),
    # stored, it would be the latest event, and a restart rebuilds velocity from the 90 days before it: none
    (
        "time a week ahead of the clock",
        payment(occurred_at=(datetime.now(UTC) + timedelta(days=7)).isoformat()),
        "occurred_at",
    ),
    ("unknown top-level field", payment(cardholder="x"), "cardholder"),
    # pydantic alone would read these as Unix times, guessing seconds or milliseconds: 0 would be 1970-01-01
    ("time as a number", payment(occurred_at=1732270500), "occurred_at"),
    ("time as digits", payment(occurred_at="1732270500000"), "occurred_at"),
    ("account created at 0", payment(**{"buyer.created_at": 0}), "buyer.created_at"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_422_with_field_and_reason_and_nothing_stored(api: Api, case: str, body: Any, field: str) -> None:
    # json.dumps writes NaN and Infinity as such, as some clients' encoders do
    content, json_type = json.dumps(body).encode(), {"content-type": "application/json"}
    response = api.client.post("/v1/payments/score", content=content, headers={**api.headers(), **json_type})
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert field in [e["field"] for e in errors], errors
    assert all(e["reason"] for e in errors)
    assert stored_events(api) == 0


def test_largest_attribute_numbers_and_earliest_time_are_accepted(api: Api) -> None:
    body = payment(attributes={"V1": -1e15, "V2": 10**15}, occurred_at="1970-01-01T05:00:00+05:00")
    response = api.client.post("/v1/payments/score", json=body, headers=api.headers())
    assert response.status_code == 200, response.text
    assert stored_events(api) == 1


T = "2026-11-22T10:15:00Z"


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", "/v1/payments/pay%00x", None, "payment_id"),  # PostgreSQL's text cannot hold NUL
        ("POST", "/v1/merchants/s%00x/events", {"event_id": "e1", "occurred_at": T, "type": "login"}, "seller_id"),
        ("POST", "/v1/labels", {"label_id": "l1", "payment_id": "pay\x00x", "label": "chargeback"}, "payment_id"),
        ("POST", "/v1/lists/blocked_devices/entries", {"value": "dev\x00x"}, "value"),
        ("GET", f"/v1/policies/payment/versions/{2**31}", None, "version"),  # past the 32-bit column
        ("POST", "/v1/policies/payment/rollback", {"to_version": 10**30}, "to_version"),
        ("GET", f"/v1/audit?before_id={2**63}", None, "before_id"),
        ("POST", "/v1/merchants/rollup", {"day": "9999-12-31"}, "day"),  # no day follows it
        ("POST", "/v1/merchants/rollup", {"day": 0}, "day"),  # a number, which pydantic would take as 1970-01-01
        ("POST", "/v1/accounts/score", {"account_id": "a1", "occurred_at": T, "created_at": 0}, "created_at"),
        (
            "POST",
            "/v1/labels",
            {"label_id": "l", "payment_id": "p", "label": "legitimate", "occurred_at": 1},
            "occurred_at",
        ),
        ("GET", "/v1/jobs/backtest_%00", None, "job_id"),
        ("DELETE", "/v1/jobs/backtest_%00", None, "job_id"),
        ("GET", "/v1/policies/payment/versions/1/evaluate/pay%00x", None, "event_id"),
    ],
)
def test_ids_text_numbers_and_days_out_of_range_are_422(
    api: Api, method: str, path: str, body: dict[str, Any] | None, field: str
) -> None:
    content = None if body is None else json.dumps(body)  # a NUL goes as JSON's \\u0000
    response = api.client.request(
        method, path, content=content, headers={**api.headers("admin"), "content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]]
    assert stored_events(api) == 0


def test_malformed_json_is_422(api: Api) -> None:
    response = api.client.post(
        "/v1/payments/score",
        content=b'{"payment_id": "x",',
        headers={**api.headers(), "content-type": "application/json"},
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["errors"][0]["reason"]
    # the offset FastAPI reports is in the reason; the field is the body, not a field named "19"
    assert response.json()["errors"][0]["field"] == "body"
    assert "at character 19" in response.json()["errors"][0]["reason"]
    assert stored_events(api) == 0


@pytest.mark.parametrize("path", ["/v1/payments/score", "/v1/labels", "/v1/lists/blocked_devices/entries"])
def test_a_body_that_is_not_utf8_or_not_json_is_refused_with_the_reason(api: Api, path: str) -> None:
    role = "analyst" if "lists" in path else "scorer"
    json_type = {**api.headers(role), "content-type": "application/json"}
    latin1 = json.dumps(payment(**{"buyer.name": "L\u00ef W\u00e9i"}), ensure_ascii=False).encode("latin-1")
    assert b"\xef" in latin1  # a Latin-1 byte, not UTF-8
    not_utf8 = api.client.post(path, content=latin1, headers=json_type)
    assert not_utf8.status_code == 422, not_utf8.text
    assert not_utf8.json()["errors"] == [
        {"field": "body", "reason": not_utf8.json()["errors"][0]["reason"], "type": "json_invalid"}
    ]
    assert "not UTF-8 text (byte 0xef at " in not_utf8.json()["errors"][0]["reason"]
    body = json.dumps(payment()).encode()
    for headers, message in (
        ({"content-type": "application/x-www-form-urlencoded"}, "Content-Type must be application/json, not"),
        ({"content-type": "text/plain; charset=utf-8"}, "not text/plain"),
        ({"content-type": "application/json", "content-encoding": "gzip"}, "Content-Encoding gzip is not accepted"),
    ):
        refused = api.client.post(path, content=body, headers={**api.headers(role), **headers})
        assert refused.status_code == 415, refused.text
        assert refused.json()["error"] == "unsupported_media_type" and message in refused.json()["message"]
    # JSON under its other names is read as JSON; a request with no body needs no type
    vendor = api.client.post(
        path, content=b"{}", headers={**api.headers(role), "content-type": "application/problem+json"}
    )
    assert vendor.status_code == 422 and vendor.json()["errors"][0]["type"] == "missing"
    assert stored_events(api) == 0


def test_a_post_without_a_body_needs_no_content_type(api: Api) -> None:
    drafted = api.client.post(
        "/v1/policies/payment/drafts",
        json={"text": (REPO / "rules" / "payment.rules").read_text() + "\n"},
        headers=api.headers("analyst"),
    )
    assert drafted.status_code == 201, drafted.text
    published = api.client.post(
        "/v1/policies/payment/versions/2/publish",
        headers={**api.headers("analyst"), "content-type": "application/x-www-form-urlencoded"},
    )
    assert published.status_code == 200, published.text


def test_an_unknown_query_parameter_is_422_naming_it_and_what_the_endpoint_takes(api: Api) -> None:
    api.score(payment(payment_id="pay_known"))
    # a misspelt page size would be ignored, and the caller paging with it would read the first page for ever
    misspelt = api.client.get("/v1/audit?limit=1&limt=1", headers=api.headers("analyst"))
    assert misspelt.status_code == 422, misspelt.text
    assert misspelt.json()["errors"] == [
        {
            "field": "limt",
            "reason": "unknown query parameter; this endpoint takes action, actor, before_id, limit, target",
            "type": "unknown_query_parameter",
        }
    ]
    assert api.client.get("/v1/audit?limit=1", headers=api.headers("analyst")).status_code == 200
    # parameters declared by a shared dependency (the listing's) are known too
    assert api.client.get("/v1/payments?limit=1&unlabelled=true", headers=api.headers("analyst")).status_code == 200
    # the scoring endpoint takes none: not answered by the fast path, nothing scored or stored
    scored = api.client.post("/v1/payments/score?dry_run=1", json=payment(payment_id="pay_q"), headers=api.headers())
    assert scored.status_code == 422, scored.text
    assert scored.json()["errors"][0]["field"] == "dry_run"
    assert scored.json()["errors"][0]["reason"] == "unknown query parameter; this endpoint takes none"
    assert stored_events(api) == 1
    assert api.client.get("/v1/payments/pay_q", headers=api.headers("analyst")).status_code == 404
    # the key is checked first: a caller without one learns only that it needs one
    assert api.client.get("/v1/audit?limt=1").status_code == 401
    # the probes' endpoints carry no parameters a caller could misspell into a wrong answer: left alone
    assert api.client.get("/healthz?probe=lb").status_code == 200


def test_oversized_body_is_413(api: Api) -> None:
    huge = payment(attributes={f"x{i}": "y" * 200 for i in range(400)})
    response = api.client.post("/v1/payments/score", json=huge, headers=api.headers())
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert stored_events(api) == 0


def test_an_ip_entry_matches_the_address_however_either_side_writes_it(api: Api) -> None:
    h = api.headers("analyst")
    added = api.client.post("/v1/lists/blocked_ips/entries", json={"value": " 2001:0DB8:0000::0001 "}, headers=h)
    assert added.status_code == 201, added.text
    blocked = api.score(payment(payment_id="v6", **{"device.ip": "2001:db8:0:0::1"}))
    assert "BLOCKED_IP" in [r["code"] for r in blocked["reasons"]]
    removed = api.client.request("DELETE", "/v1/lists/blocked_ips/entries", json={"value": "2001:db8::1"}, headers=h)
    assert removed.status_code == 200
    not_an_ip = api.client.post("/v1/lists/blocked_ips/entries", json={"value": "2001:db8::g"}, headers=h)
    assert not_an_ip.status_code == 422 and not_an_ip.json()["errors"][0]["field"] == "value"


def test_an_ipv4_client_matches_in_its_dual_stack_form_too(api: Api) -> None:
    # a server listening on IPv6 reports an IPv4 client as ::ffff:a.b.c.d: the same client, the same /24
    h = api.headers("analyst")
    for entry in ("203.0.113.9", "::ffff:198.51.100.9"):
        assert api.client.post("/v1/lists/blocked_ips/entries", json={"value": entry}, headers=h).status_code == 201
    mapped = api.score(payment(payment_id="m1", **{"device.ip": "::ffff:203.0.113.9"}))
    plain = api.score(payment(payment_id="m2", **{"device.ip": "198.51.100.9"}))
    assert "BLOCKED_IP" in [r["code"] for r in mapped["reasons"]]
    assert "BLOCKED_IP" in [r["code"] for r in plain["reasons"]]
    assert api.engine.get_payment("m1")["pii_masked"]["device.ip"] == "203.0.*.*"  # stored as the IPv4 address


def test_lists_can_be_read_and_edited_and_every_edit_is_audited(api: Api) -> None:
    h = api.headers("analyst")
    added = api.client.post("/v1/lists/blocked_emails/entries", json={"value": "Bad.Actor@Example.com"}, headers=h)
    assert added.status_code == 201 and added.json()["entry"] == "B****@Example.com"
    entries = api.client.get("/v1/lists/blocked_emails/entries", headers=h).json()
    assert [e["entry"] for e in entries] == ["B****@Example.com"]
    assert "bad.actor" not in str(entries).lower()
    bad_range = api.client.post("/v1/lists/blocked_ip_ranges/entries", json={"value": "10.0.0.0/8"}, headers=h)
    assert bad_range.status_code == 422 and "broader than /12" in bad_range.json()["errors"][0]["reason"]
    assert (
        api.client.post("/v1/lists/blocked_ip_ranges/entries", json={"value": "203.0.112.0/23"}, headers=h).status_code
        == 201
    )
    blocked = api.score(payment(payment_id="r1"))  # 203.0.113.7 is inside 203.0.112.0/23
    assert blocked["decision"] == "block" and "BLOCKED_IP_RANGE" in [r["code"] for r in blocked["reasons"]]
    removed = api.client.request(
        "DELETE", "/v1/lists/blocked_ip_ranges/entries", json={"value": "203.0.112.0/23"}, headers=h
    )
    assert removed.status_code == 200
    after = api.score(payment(payment_id="r2", occurred_at="2026-11-22T10:16:00Z"))
    assert "BLOCKED_IP_RANGE" not in [r["code"] for r in after["reasons"]]
    again = api.client.request(
        "DELETE", "/v1/lists/blocked_ip_ranges/entries", json={"value": "203.0.112.0/23"}, headers=h
    )
    assert again.status_code == 404
    actions = [a["action"] for a in api.client.get("/v1/audit?limit=5", headers=h).json()]
    assert actions[:3] == ["list.remove", "list.add", "list.add"]


def test_key_creation_is_audited_without_the_secret(api: Api) -> None:
    audit = api.client.get("/v1/audit?limit=50", headers=api.headers("analyst")).json()
    created = [a for a in audit if a["action"] == "key.create"]
    assert {a["after"]["role"] for a in created} == {"admin", "scorer", "analyst"}
    secret = api.scorer_key.split("_", 2)[2]
    assert secret not in str(audit)


@given(st.binary(max_size=9000))
def test_request_hashes_fed_in_chunks_are_plain_sha256(data: bytes) -> None:
    # stored request hashes must keep matching across releases: the chunked digest is SHA-256 of the whole
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


def _luhn_reference(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if any(not (c.isdigit() or c in " -\t\n") for c in text) or not 13 <= len(digits) <= 19:
        return False
    doubled = [sum(divmod(d * 2, 10)) if i % 2 else d for i, d in enumerate(reversed(digits))]
    return sum(doubled) % 10 == 0


@given(st.text(alphabet="0123456789 -x", min_size=0, max_size=24))
def test_card_number_check_agrees_with_a_plain_luhn(text: str) -> None:
    from risk_engine.payments import looks_like_card_number

    assert looks_like_card_number(text) == _luhn_reference(text)


def test_known_card_numbers_are_caught_with_separators() -> None:
    from risk_engine.payments import looks_like_card_number

    assert looks_like_card_number("4111 1111 1111 1111") and looks_like_card_number("4111-1111-1111-1111")
    assert not looks_like_card_number("4111 1111 1111 1112") and not looks_like_card_number("fp_4111")


ATTRIBUTE_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2e15, max_value=2e15),
    st.integers(min_value=-(10**17), max_value=10**17),
    st.integers(),
    st.booleans(),
    st.text(alphabet="ab1", max_size=4),
)


@given(st.dictionaries(st.text(alphabet="xyz", min_size=1, max_size=3), ATTRIBUTE_VALUES, max_size=40))
def test_attribute_numbers_are_taken_exactly_when_each_is_finite_and_within_the_limit(values: dict[str, Any]) -> None:
    # the check's fast path judges the numbers as one vector; it must agree with judging each one
    from risk_engine.payments import ATTRIBUTE_NUMBER_LIMIT, _check_attribute_values

    numbers = [v for v in values.values() if not isinstance(v, str)]
    expected = all(-ATTRIBUTE_NUMBER_LIMIT <= v <= ATTRIBUTE_NUMBER_LIMIT for v in numbers)
    try:
        _check_attribute_values(values)
        taken = True
    except ValueError:
        taken = False
    assert taken == expected


@pytest.mark.parametrize(
    ("path", "method_name"),
    [
        ("/v1/policies/payment/rules/stats", "rule_statistics"),  # hourly counts and a few hours of events
        ("/v1/audit", "audit"),
    ],
)
def test_a_slow_analyst_read_never_holds_up_scoring(
    api: Api, monkeypatch: pytest.MonkeyPatch, path: str, method_name: str
) -> None:
    from risk_engine.policies import PolicyWorkflow

    reading, release = threading.Event(), threading.Event()
    held_up: list[bool] = []
    original = getattr(PolicyWorkflow, method_name)

    def slow(self: PolicyWorkflow, *args: Any, **kwargs: Any) -> Any:
        reading.set()  # the read is under way (a long scan, a database waiting on a lock)
        held_up.append(not release.wait(20))  # True: scoring could not get through while it ran
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PolicyWorkflow, method_name, slow)
    h = api.headers("analyst")
    reader = threading.Thread(target=lambda: api.client.get(path, headers=h))
    reader.start()
    assert reading.wait(10)
    scored = api.score(payment(payment_id="during_a_slow_read"))  # served while the read still runs
    release.set()
    reader.join(30)
    assert scored["payment_id"] == "during_a_slow_read" and held_up == [False]


def test_a_batch_of_labels_is_stored_whole_or_not_at_all(api: Api) -> None:
    for i in range(3):
        api.score(payment(payment_id=f"p{i}", occurred_at=f"2026-11-22T10:0{i}:00Z"))
    account_answer = api.client.post("/v1/accounts/score", json=account(), headers=api.headers())
    assert account_answer.status_code == 200

    def labels_seen() -> int:
        models = api.client.get("/v1/models", headers=api.headers()).json()
        return next(d["labels_seen"] for d in models if d["name"] == "payment_fraud")

    def send(labels: list[dict[str, Any]]) -> Any:
        return api.client.post("/v1/labels/batch", json={"labels": labels}, headers=api.headers())

    day = [
        {"label_id": "cb_1", "payment_id": "p0", "label": "chargeback", "source": "issuer"},
        {"label_id": "ok_1", "payment_id": "p1", "label": "legitimate"},
        {"label_id": "acct_1", "subject": "account", "payment_id": account()["account_id"], "label": "confirmed_fraud"},
    ]
    first = send(day)
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["created"], body["replayed"]) == (3, 0)
    assert [(v["label_id"], v["payment_id"], v["is_fraud"]) for v in body["labels"]] == [
        ("cb_1", "p0", True),
        ("ok_1", "p1", False),
        ("acct_1", account()["account_id"], True),
    ]
    assert labels_seen() == 2  # the payment model learned both payment labels at once
    again = send(day)  # the same file sent twice: nothing counts twice
    assert again.status_code == 200 and (again.json()["created"], again.json()["replayed"]) == (0, 3)
    assert again.json()["labels"] == body["labels"] and labels_seen() == 2

    wrong = send(
        [
            {"label_id": "cb_2", "payment_id": "p2", "label": "chargeback"},
            {"label_id": "cb_3", "payment_id": "nope", "label": "chargeback"},
            {"label_id": "cb_1", "payment_id": "p0", "label": "legitimate"},
            {"label_id": "cb_4", "payment_id": "p2", "label": "chargeback"},
            {"label_id": "cb_4", "payment_id": "p2", "label": "legitimate"},
        ]
    )
    assert wrong.status_code == 422
    assert {e["field"]: e["reason"] for e in wrong.json()["errors"]} == {
        "labels.1.payment_id": "no payment nope",
        "labels.2.label_id": "cb_1 was already used for a different label",
        "labels.4.label_id": "cb_4 is label 3 too, with another label",
    }
    stored = api.client.get("/v1/payments/p2", headers=api.headers()).json()
    assert stored["labels"] == [] and labels_seen() == 2  # the good ones of a wrong batch are not kept either
    too_many = send([{"label_id": f"l{i}", "payment_id": "p0", "label": "chargeback"} for i in range(501)])
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "labels"
    assert send([]).status_code == 422


def test_labels_sent_at_once_are_all_learned_in_their_order(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(2):
        api.score(payment(payment_id=f"p{i}", occurred_at=f"2026-11-22T10:0{i}:00Z"))
    fraud_model = next(d for d in api.engine.subjects["payment"].detectors if d.name == "payment_fraud")
    learn = api.engine._learn_from_labels
    first_paused, second_learned = threading.Event(), threading.Event()
    learned: list[int] = []

    def slow_first(labels: list[tuple[int, str, str, bool]]) -> int:
        if not learned:  # the first request has committed its label and pauses before teaching it
            learned.append(labels[0][0])
            first_paused.set()
            second_learned.wait(2)  # the second request, if it can run meanwhile, commits and teaches its own
        else:
            learned.append(labels[0][0])
        taught = learn(labels)
        if len(learned) == 2:
            second_learned.set()
        return taught

    monkeypatch.setattr(api.engine, "_learn_from_labels", slow_first)
    h = api.headers()
    send = [
        threading.Thread(
            target=lambda i=i: api.client.post(
                "/v1/labels", json={"label_id": f"l{i}", "payment_id": f"p{i}", "label": "chargeback"}, headers=h
            )
        )
        for i in range(2)
    ]
    send[0].start()
    assert first_paused.wait(10)
    send[1].start()
    for t in send:
        t.join(30)
    # one at a time: each label is learned right after it is stored, so none is learned after a later one
    # (the model reads labels in id order: one learned after a later one is first taken for a missing id)
    assert learned == sorted(learned) and fraud_model.labels_seen == 2
