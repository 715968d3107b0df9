"""The analyst's loop, first part: checked drafts, versions, diff, publish, roll back, audit, hot reload."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from risk_engine.storage import models as m
from tests.conftest import REPO, Api, make_settings, open_api, payment

DEFAULT = (REPO / "rules" / "payment.rules").read_text()
NEW_RULE = """
rule seller_day_volume {
  description "Seller took over 100,000 in the past day"
  when sum(amount.major by seller_id within 1d) > 100000
  then review, reason SELLER_DAY_VOLUME
}
"""
V2 = DEFAULT + NEW_RULE


def draft(api: Api, text: str, role: str = "analyst") -> tuple[int, dict]:  # type: ignore[type-arg]
    r = api.client.post("/v1/policies/payment/drafts", json={"text": text}, headers=api.headers(role))
    return r.status_code, r.json()


def test_a_draft_that_does_not_check_is_refused_with_every_error(api: Api) -> None:
    bad = DEFAULT + "\nrule a { when buyer.acount_age < 7 then block }\nrule b { when channel > 1 then review }\n"
    status, body = draft(api, bad)
    assert status == 422
    errors = body["errors"]
    assert [e["code"] for e in errors] == ["type.unknown_field", "type.mismatch"]
    assert all(e["line"] > 190 and e["column"] > 0 for e in errors)
    assert "buyer.account_age" in errors[0]["suggestion"]
    versions = api.client.get("/v1/policies/payment", headers=api.headers("analyst")).json()
    assert [(v["version"], v["status"]) for v in versions] == [(1, "published")]


def test_versions_diff_publish_rollback_and_audit(api: Api) -> None:
    status, v2 = draft(api, V2)
    assert (status, v2["version"], v2["status"]) == (201, 2, "draft")
    assert draft(api, V2) == (200, v2)  # the same text again: the same draft
    listed = api.client.get("/v1/policies/payment", headers=api.headers("analyst")).json()
    assert [(v["version"], v["status"]) for v in listed] == [(2, "draft"), (1, "published")]
    text = api.client.get("/v1/policies/payment/versions/2", headers=api.headers("analyst")).json()["text"]
    assert text == V2
    diff = api.client.get("/v1/policies/payment/diff?from=1&to=2", headers=api.headers("analyst")).text
    assert "+rule seller_day_volume {" in diff and diff.startswith("--- payment:v1")

    # the seller's volume before the new rule exists still counts once it goes live
    for i in range(3):
        api.score(
            payment(
                payment_id=f"pre{i}",
                seller_id="s_big",
                occurred_at=f"2026-11-22T10:0{i}:00Z",
                **{"amount.value": 50_000 * 100},
            )
        )
    assert api.client.post("/v1/policies/payment/versions/2/publish", headers=api.headers()).status_code == 403
    published = api.client.post("/v1/policies/payment/versions/2/publish", headers=api.headers("analyst"))
    assert published.status_code == 200 and published.json()["status"] == "published"
    after = api.score(payment(payment_id="post", seller_id="s_big", occurred_at="2026-11-22T10:05:00Z"))
    assert after["policy_version"] == "payment:v2"
    assert "SELLER_DAY_VOLUME" in [r["code"] for r in after["reasons"]]

    back = api.client.post("/v1/policies/payment/rollback", json={"to_version": 1}, headers=api.headers("analyst"))
    assert back.status_code == 200
    again = api.score(payment(payment_id="post2", seller_id="s_big", occurred_at="2026-11-22T10:06:00Z"))
    assert again["policy_version"] == "payment:v1"
    assert "SELLER_DAY_VOLUME" not in [r["code"] for r in again["reasons"]]
    listed = api.client.get("/v1/policies/payment", headers=api.headers("analyst")).json()
    assert [(v["version"], v["status"]) for v in listed] == [(2, "archived"), (1, "published")]

    audit = api.client.get("/v1/audit", headers=api.headers("analyst")).json()
    actions = [(a["action"], a["target"]) for a in audit]
    assert actions[:3] == [
        ("policy.rollback", "payment:v1"),
        ("policy.publish", "payment:v2"),
        ("policy.draft", "payment:v2"),
    ]
    assert audit[0]["before"] == {"version": 2} and audit[0]["after"] == {"version": 1}
    assert audit[0]["actor"] == f"key:{api.analyst_key.split('_')[1]}"


def test_a_scorer_cannot_draft_or_publish(api: Api) -> None:
    assert draft(api, V2, role="scorer")[0] == 403
    assert (
        api.client.post("/v1/policies/payment/rollback", json={"to_version": 1}, headers=api.headers()).status_code
        == 403
    )


def test_publishing_a_version_that_no_longer_checks_is_impossible(api: Api) -> None:
    # a draft stored before (say) a list was removed: it must not go live
    with api.engine.db.begin() as conn:
        conn.execute(
            m.PolicyVersion.__table__.insert(),
            [
                {
                    "subject": "payment",
                    "version": 2,
                    "status": "draft",
                    "digest": "x" * 64,
                    "source": "api",
                    "text": 'subject payment\nrule a { when device.id in list("gone") then block }\n',
                    "created_by": "test",
                    "created_at": datetime.now(UTC),
                }
            ],
        )
    r = api.client.post("/v1/policies/payment/versions/2/publish", headers=api.headers("analyst"))
    assert r.status_code == 422
    assert r.json()["errors"][0]["code"] == "type.unknown_list"
    with api.engine.db.connect() as conn:
        live = conn.execute(select(m.PolicyVersion.version).where(m.PolicyVersion.status == "published")).scalar_one()
    assert live == 1
    assert api.score(payment())["policy_version"] == "payment:v1"


def test_a_second_worker_picks_up_a_publish_without_restart(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=0.2)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    try:
        assert b.score(payment(payment_id="w1"))["policy_version"] == "payment:v1"
        assert draft(a, V2)[0] == 201
        assert a.client.post("/v1/policies/payment/versions/2/publish", headers=a.headers("analyst")).status_code == 200
        deadline = time.monotonic() + 15
        while b.engine.subjects["payment"].policy.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.score(payment(payment_id="w2", occurred_at="2026-11-22T10:16:00Z"))["policy_version"] == "payment:v2"
        assert b.client.get("/healthz").json()["policies"] == {"payment": "payment:v2"}
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)
