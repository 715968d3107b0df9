"""Listing stored events (a review queue), on SQLite and PostgreSQL: by decision in the subject's words, only
those no label has resolved, newest first, page by page, with no PII."""

from __future__ import annotations

import threading
from typing import Any

from tests.conftest import BASE_REVIEW, Api, payment


def listing(api: Api, path: str = "/v1/payments", **query: Any) -> list[dict[str, Any]]:
    response = api.client.get(path, params=query, headers=api.headers("analyst"))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()
    return items


def test_a_review_queue_lists_what_is_undecided_newest_first_page_by_page(api: Api) -> None:
    api.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_bad"}, headers=api.headers("analyst"))
    decisions = {}
    for i in range(6):
        blocked = i % 3 == 0
        body = payment(
            payment_id=f"p{i}",
            occurred_at=f"2026-11-22T10:{10 + i}:00Z",
            **({"device.id": "dev_bad"} if blocked else {}),
        )
        decisions[f"p{i}"] = api.score(body)["decision"]
    assert decisions["p0"] == decisions["p3"] == "block"
    everything = listing(api)
    assert [e["payment_id"] for e in everything] == ["p5", "p4", "p3", "p2", "p1", "p0"]
    assert [e["decision"] for e in everything] == [decisions[e["payment_id"]] for e in everything]
    assert "BLOCKED_DEVICE" in everything[2]["reasons"] and "buyer" not in str(everything)  # codes, no PII
    assert [e["payment_id"] for e in listing(api, decision="block")] == ["p3", "p0"]
    api.client.post(
        "/v1/labels", json={"label_id": "l3", "payment_id": "p3", "label": "confirmed_fraud"}, headers=api.headers()
    )
    assert [e["payment_id"] for e in listing(api, decision="block", unlabelled=True)] == ["p0"]
    first = listing(api, limit=4)
    rest = listing(api, limit=4, before_id=first[-1]["id"])
    assert [e["payment_id"] for e in first + rest] == [e["payment_id"] for e in everything]
    assert (
        api.client.get("/v1/payments", params={"decision": "hold"}, headers=api.headers("analyst")).status_code == 422
    )
    assert api.client.get("/v1/payments", headers=api.headers("scorer")).status_code == 403


def test_a_review_queue_speaks_the_subjects_words(api: Api) -> None:
    answer = api.client.post("/v1/reviews/score", json=BASE_REVIEW, headers=api.headers()).json()
    listed = listing(api, "/v1/reviews", decision=answer["decision"])
    assert [(e["review_id"], e["decision"]) for e in listed] == [("r_1", answer["decision"])]
    other = "hold" if answer["decision"] != "hold" else "publish"
    assert listing(api, "/v1/reviews", decision=other) == []
    refused = api.client.get("/v1/reviews", params={"decision": "block"}, headers=api.headers("analyst"))
    assert refused.status_code == 422 and "publish" in refused.text
    assert listing(api, "/v1/accounts") == []


def test_a_queue_lists_the_events_where_one_rule_fired(api: Api) -> None:
    mismatched = []
    for i in range(7):
        billing = "US" if i % 3 == 0 else "CN"  # p0, p3, p6 fire GEO_BILLING_MISMATCH
        api.score(payment(payment_id=f"p{i}", occurred_at=f"2026-11-22T10:0{i}:00Z", billing_country=billing))
        if billing == "US":
            mismatched.append(f"p{i}")
    first = listing(api, rule="GEO_BILLING_MISMATCH", limit=2)
    assert [e["payment_id"] for e in first] == ["p6", "p3"]  # newest first
    assert all("GEO_BILLING_MISMATCH" in e["reasons"] for e in first)
    rest = listing(api, rule="GEO_BILLING_MISMATCH", limit=2, before_id=first[-1]["id"])
    assert [e["payment_id"] for e in rest] == ["p0"]
    api.engine.record_labels([("p6", "chargeback", None)], source="test")
    assert [e["payment_id"] for e in listing(api, rule="GEO_BILLING_MISMATCH", unlabelled="true")] == ["p3", "p0"]
    # every answer holds MODEL_PAYMENT_ANOMALY, a model's code: no rule fired with it, so nothing is listed
    assert listing(api, rule="MODEL_PAYMENT_ANOMALY", limit=2) == []
    assert listing(api, rule="NO_SUCH_RULE") == []
    bad = api.client.get("/v1/payments?rule=geo%25", headers=api.headers("analyst"))
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "rule"


def test_a_queue_by_rule_reads_only_the_hours_the_rule_fired_in(api: Api) -> None:
    """The hourly rule counts tell which hours to read: a rule that never fired reads no event at all, and the
    events of the hours it fired in are all listed, up to the edges of those hours."""
    fired = {"f1": "2026-11-20T09:00:00Z", "f2": "2026-11-20T09:59:59.999Z", "f3": "2026-11-22T10:00:00Z"}
    quiet = {f"q{i}": f"2026-11-{20 + i // 8}T{(i % 8) * 3:02d}:30:00Z" for i in range(24)}
    for pid, at in sorted({**fired, **quiet}.items(), key=lambda item: item[1]):
        api.score(
            payment(
                payment_id=pid,
                occurred_at=at,
                billing_country="US" if pid in fired else "CN",
                **{"payment_method.card_fingerprint": f"fp_{pid}", "device.id": f"d_{pid}"},
            )
        )
    assert [e["payment_id"] for e in listing(api, rule="GEO_BILLING_MISMATCH")] == ["f3", "f2", "f1"]
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not threading.current_thread().name.startswith("risk-engine-"):  # not the follower's reads, meanwhile
            statements.append(statement)

    from sqlalchemy import event

    event.listen(api.engine.db, "before_cursor_execute", seen)
    try:
        assert listing(api, rule="CARD_TESTING") == []
    finally:
        event.remove(api.engine.db, "before_cursor_execute", seen)
    assert statements and not any("FROM events" in s for s in statements)  # the counts alone answered
