"""The analyst's loop, first part: checked drafts, versions, diff, publish, roll back, audit, hot reload."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from risk_engine.errors import Conflict
from risk_engine.payments import PaymentIn
from risk_engine.policies import PolicyWorkflow
from risk_engine.storage import models as m
from risk_engine.subjects import SUBJECT_KINDS
from tests.conftest import REPO, Api, make_settings, open_api, payment
from tests.helpers import at_the_same_moment

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
    # a rollback returns to a version that was live; a draft goes live only by being published (and audited so)
    unpublished = api.client.post(
        "/v1/policies/payment/rollback", json={"to_version": 2}, headers=api.headers("analyst")
    )
    assert unpublished.status_code == 409 and "never published" in unpublished.json()["message"]
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
        live = conn.execute(
            select(m.PolicyVersion.version).where(
                m.PolicyVersion.subject == "payment", m.PolicyVersion.status == "published"
            )
        ).scalar_one()
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
        policies = b.client.get("/healthz").json()["policies"]
        assert policies["payment"] == "payment:v2" and set(policies) == set(SUBJECT_KINDS)
        assert all(label == f"{subject}:v1" for subject, label in policies.items() if subject != "payment")
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


STRICTER = DEFAULT.replace("challenge at 35", "challenge at 10").replace("review at 60", "review at 30") + NEW_RULE


def test_a_shadow_version_is_scored_and_recorded_but_never_decides(api: Api) -> None:
    from tests.test_durability import traffic

    assert draft(api, STRICTER)[0] == 201
    assert api.client.post("/v1/policies/payment/versions/2/shadow", headers=api.headers()).status_code == 403
    for i in range(3):  # volume before the shadow starts: its new aggregate must still see it
        api.score(
            payment(
                payment_id=f"pre{i}",
                seller_id="s_big",
                occurred_at=f"2026-11-22T07:0{i}:00Z",
                **{"amount.value": 50_000 * 100},
            )
        )
    windows_before = dict(api.engine.subjects["payment"].velocity._windows)
    started = api.client.post("/v1/policies/payment/versions/2/shadow", headers=api.headers("analyst"))
    assert started.status_code == 200 and started.json()["status"] == "shadow"
    windows_after = api.engine.subjects["payment"].velocity._windows
    assert set(windows_after) > set(windows_before)  # the shadow's new aggregate is kept from now on
    assert all(windows_after[k] is w for k, w in windows_before.items())  # and only it was replayed
    live = [api.score(p) for p in traffic(150)]
    assert {r["policy_version"] for r in live} == {"payment:v1"}  # the shadow never decides
    big = api.score(payment(payment_id="big", seller_id="s_big", occurred_at="2026-11-22T07:05:00Z"))
    assert "SELLER_DAY_VOLUME" not in [r["code"] for r in big["reasons"]]

    report = api.client.get("/v1/policies/payment/shadow", headers=api.headers("analyst")).json()
    assert (report["shadow"], report["live"], report["events"]) == ("payment:v2", "payment:v1", 151)
    assert report["disagreed"] > 0 and report["agreed"] + report["disagreed"] == 151
    order = ["allow", "challenge", "review", "block"]
    for transition in report["transitions"]:
        before, after = transition.split("->")
        assert order.index(after) > order.index(before), transition
    assert report["rule_hits"]["seller_day_volume"] >= 1
    with api.engine.db.connect() as conn:
        recorded = conn.execute(select(m.Event.shadow).where(m.Event.event_id == "big")).scalar_one()
        rows = conn.execute(
            select(m.Event.event_id, m.Event.decision, m.Event.shadow).order_by(m.Event.ingest_seq)
        ).all()
    disagreeing: dict[str, list[str]] = {}
    for event_id, decision, shadow in rows:
        if shadow is not None and shadow["decision"] != decision:
            disagreeing.setdefault(f"{decision}->{shadow['decision']}", []).append(event_id)
    assert {t: len(ids) for t, ids in disagreeing.items()} == report["transitions"]
    for transition, examples in report["examples"].items():  # the latest ten of each, to open one by one
        assert [e["event_id"] for e in examples] == disagreeing[transition][-10:]
    assert any(len(ids) > 10 for ids in disagreeing.values())
    (big_example,) = [e for kept in report["examples"].values() for e in kept if e["event_id"] == "big"]
    assert "seller_day_volume" in big_example["shadow_rules"]  # what the shadow saw that live did not
    assert (big_example["live_score"], big_example["shadow_score"]) == (big["score"], recorded["score"])

    # labels come in: the report measures both versions against them, as a backtest would
    in_shadow = [(e, d, sh["decision"]) for e, d, sh in rows if sh is not None and sh["version"] == "payment:v2"]
    frauds = {e for e, live, shadow in in_shadow if shadow in ("block", "review")}
    frauds = set(sorted(frauds)[: max(1, len(frauds) // 2)]) | {"big"}
    api.engine.record_labels([(e, "chargeback", None) for e in frauds], source="test")
    api.engine.record_labels([(in_shadow[0][0], "legitimate", None)], source="test")
    labelled = api.client.get("/v1/policies/payment/shadow", headers=api.headers("analyst")).json()
    assert (labelled["labelled"], labelled["fraud"]) == (len(frauds | {in_shadow[0][0]}), len(frauds))
    for column, version in ((1, "live"), (2, "shadow")):
        for name, alerting in (("block", {"block"}), ("block_or_review", {"block", "review"})):
            alerts = [e for e, *decisions in in_shadow if decisions[column - 1] in alerting]
            caught = len(set(alerts) & frauds)
            quality = labelled["quality"][version][name]
            assert quality["alerts"] == len(alerts), (version, name)
            assert quality["precision"] == (round(caught / len(alerts), 4) if alerts else None), (version, name)
            assert quality["recall"] == round(caught / len(frauds), 4), (version, name)
    (big_labelled,) = [e for kept in labelled["examples"].values() for e in kept if e["event_id"] == "big"]
    assert big_labelled["label"] == "fraud"
    assert recorded["version"] == "payment:v2" and "seller_day_volume" in recorded["rules"]

    stopped = api.client.delete("/v1/policies/payment/shadow", headers=api.headers("analyst"))
    assert stopped.status_code == 200 and stopped.json()["status"] == "draft"
    assert api.client.get("/v1/policies/payment/shadow", headers=api.headers("analyst")).status_code == 404
    actions = [a["action"] for a in api.client.get("/v1/audit", headers=api.headers("analyst")).json()]
    assert actions[:2] == ["policy.shadow_stop", "policy.shadow"]


def test_publishing_the_shadow_version_ends_the_shadow(api: Api) -> None:
    draft(api, STRICTER)
    api.client.post("/v1/policies/payment/versions/2/shadow", headers=api.headers("analyst"))
    assert api.engine.subjects["payment"].shadow is not None
    api.client.post("/v1/policies/payment/versions/2/publish", headers=api.headers("analyst"))
    assert api.engine.subjects["payment"].shadow is None
    assert api.score(payment())["policy_version"] == "payment:v2"
    assert api.client.get("/v1/policies/payment/shadow", headers=api.headers("analyst")).status_code == 404


def test_a_shadow_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", policy_poll_s=0)
    client, api = open_api(settings)
    draft(api, STRICTER)
    api.client.post("/v1/policies/payment/versions/2/shadow", headers=api.headers("analyst"))
    client.__exit__(None, None, None)
    client, api = open_api(settings)
    try:
        shadow = api.engine.subjects["payment"].shadow
        assert shadow is not None and shadow.label == "payment:v2"
    finally:
        client.__exit__(None, None, None)


def test_rule_statistics_count_hits_by_age_and_the_share_labelled_fraud(api: Api) -> None:
    # three geo-mismatch payments: two days ago, two hours ago, just now; two of them later turn out fraud
    for pid, at in (("g1", "2026-11-20T12:00:00Z"), ("g2", "2026-11-22T10:00:00Z"), ("g3", "2026-11-22T12:00:00Z")):
        api.score(
            payment(
                payment_id=pid,
                occurred_at=at,
                billing_country="US",
                **{"payment_method.card_fingerprint": f"fp_{pid}", "device.id": f"d_{pid}"},
            )
        )
    api.score(payment(payment_id="ok", occurred_at="2026-11-22T12:00:30Z", **{"payment_method.card_fingerprint": "x"}))
    api.engine.record_labels(
        [("g1", "chargeback", None), ("g2", "legitimate", None), ("g3", "confirmed_fraud", None)], source="test"
    )
    stats = api.client.get("/v1/policies/payment/rules/stats", headers=api.headers("analyst")).json()
    by_rule = {r["rule"]: r for r in stats["rules"]}
    geo = by_rule["billing_shipping_mismatch"]
    assert (geo["hits_1h"], geo["hits_1d"], geo["hits_30d"]) == (1, 2, 3)
    assert (geo["labelled"], geo["labelled_fraud"], geo["fraud_share"]) == (3, 2, 0.6667)
    assert by_rule["blocked_device"]["hits_30d"] == 0 and by_rule["blocked_device"]["fraud_share"] is None
    assert stats["policy"] == "payment:v1"
    assert api.client.get("/v1/policies/payment/rules/stats", headers=api.headers()).status_code == 403


def test_drafts_and_seeded_versions_written_at_the_same_moment_each_get_a_number(api: Api, tmp_path: Path) -> None:
    # both take the next version number as max + 1: writers racing for it collided on (subject, version)
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from risk_engine.policies import PolicyWorkflow

    workflow = PolicyWorkflow(api.engine)
    barrier = threading.Barrier(4)

    def write_draft(i: int) -> int:
        barrier.wait()
        view, created = workflow.create_draft("payment", DEFAULT + f"\n# draft {i}\n", "test")
        assert created
        return int(view["version"])

    with ThreadPoolExecutor(4) as pool:
        versions = sorted(pool.map(write_draft, range(4)))
    assert versions == [2, 3, 4, 5]

    # workers starting together with a changed rules/ file: one publishes it, the others find it stored
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "payment.rules").write_text(DEFAULT + "\n# edited on disk\n")
    api.engine.settings.rules_dir = rules

    def seed(_: int) -> None:
        barrier.wait()
        api.engine._seed_policies(api.engine.environments)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(seed, range(4)))
    with api.engine.db.connect() as conn:
        rows = conn.execute(
            select(m.PolicyVersion.version, m.PolicyVersion.status, m.PolicyVersion.source)
            .where(m.PolicyVersion.subject == "payment")
            .order_by(m.PolicyVersion.version)
        ).all()
    assert [tuple(r) for r in rows] == [
        (1, "archived", "file"),
        *((v, "draft", "api") for v in (2, 3, 4, 5)),
        (6, "published", "file"),
    ]


def test_the_audit_log_is_filtered_by_action_target_and_actor(api: Api) -> None:
    h = api.headers("analyst")
    for value in ("dev_a", "dev_b"):
        api.client.post("/v1/lists/blocked_devices/entries", json={"value": value}, headers=h)
    api.client.request("DELETE", "/v1/lists/blocked_devices/entries", json={"value": "dev_a"}, headers=h)
    api.client.post("/v1/lists/blocked_emails/entries", json={"value": "x@example.com"}, headers=api.headers("admin"))
    assert draft(api, V2)[0] == 201

    def actions(**query: str) -> list[tuple[str, str]]:
        response = api.client.get("/v1/audit", params=query, headers=h)
        assert response.status_code == 200, response.text
        return [(e["action"], e["target"]) for e in response.json()]

    devices = "list:blocked_devices"
    assert actions(target=devices) == [("list.remove", devices), ("list.add", devices), ("list.add", devices)]
    assert actions(action="list.") == [("list.add", "list:blocked_emails"), *actions(target=devices)]
    assert actions(action="list.remove") == [("list.remove", devices)]
    assert actions(action="list") == []  # an action is exact unless it ends with "."
    admin_id = api.admin_key.split("_")[1]
    assert actions(actor=f"key:{admin_id}") == [("list.add", "list:blocked_emails")]
    assert actions(action="policy.draft", target="payment:v2") == [("policy.draft", "payment:v2")]
    for bad in ({"target": "a\x00b"}, {"action": "LIST"}, {"actor": ""}):
        assert api.client.get("/v1/audit", params=bad, headers=h).status_code == 422, bad


POSTCODE_BURST = """
rule postcode_burst {
  description "Three or more payments shipping to one postal code within the hour"
  when count(by shipping.postal_code within 1h) >= 3
  then block, reason POSTCODE_BURST
}
"""


def test_a_version_is_evaluated_on_one_stored_event_with_the_windows_it_saw(api: Api) -> None:
    h = api.headers("analyst")
    for minute in range(5):  # the fourth (10:03) saw three before it; the fifth, later, must not count for it
        api.score(
            payment(
                payment_id=f"pc{minute}",
                occurred_at=f"2026-11-22T10:0{minute}:00Z",
                **{"buyer.id": f"b_pc{minute}", "shipping_address.postal_code": "999001"},
            )
        )
    api.score(
        payment(
            payment_id="pc_far",
            occurred_at="2026-11-22T12:00:00Z",
            **{"buyer.id": "b_far", "shipping_address.postal_code": "999001"},
        )
    )
    risky = api.score(
        payment(
            payment_id="risky", occurred_at="2026-11-22T12:05:00Z", **{"amount.value": 900_000, "buyer.verified": False}
        )
    )
    api.engine.record_labels([("risky", "chargeback", None)], source="test")

    live = api.client.get("/v1/policies/payment/versions/1/evaluate/risky", headers=h)
    assert live.status_code == 200, live.text
    same = live.json()  # the live version on a stored event decides as live did, for the same reasons
    assert (
        (same["decision"], same["score"])
        == (risky["decision"], risky["score"])
        == (
            same["live"]["decision"],
            same["live"]["score"],
        )
    )
    assert [r["code"] for r in same["reasons"]] == same["live"]["rule_codes"] != []
    assert same["rebuilt_aggregates"] == [] and same["label"] == "fraud" and same["version"] == "payment:v1"

    assert draft(api, DEFAULT + POSTCODE_BURST)[0] == 201
    fourth = api.client.get("/v1/policies/payment/versions/2/evaluate/pc3", headers=h).json()
    assert fourth["rebuilt_aggregates"] == ["count(by shipping.postal_code within 1h)"]
    assert fourth["decision"] == "block" and "POSTCODE_BURST" in [r["code"] for r in fourth["reasons"]]
    assert fourth["live"]["decision"] != "block" and fourth["label"] is None
    third = api.client.get("/v1/policies/payment/versions/2/evaluate/pc2", headers=h).json()
    assert "POSTCODE_BURST" not in [r["code"] for r in third["reasons"]]  # two before it, not the ones after
    far = api.client.get("/v1/policies/payment/versions/2/evaluate/pc_far", headers=h).json()
    assert "POSTCODE_BURST" not in [r["code"] for r in far["reasons"]]  # the burst is out of its window

    assert api.client.get("/v1/policies/payment/versions/2/evaluate/nope", headers=h).status_code == 404
    assert api.client.get("/v1/policies/payment/versions/9/evaluate/pc3", headers=h).status_code == 404
    assert api.client.get("/v1/policies/payment/versions/2/evaluate/pc3", headers=api.headers()).status_code == 403


@pytest.mark.parametrize("left", [500, 0], ids=["final-catch-up-only", "catch-up-rounds"])
def test_a_publish_that_needs_a_new_aggregate_replays_it_while_scoring_goes_on(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, left: int
) -> None:
    """The new aggregate's windows are replayed from storage without the state lock (scoring used to wait the
    whole replay: seconds at a deployment's volume); under the lock only the events scored meanwhile are added.
    Payments scored during the replay, here and by another worker, count in the new window once, as a restart's
    rebuild counts them."""
    import threading

    from risk_engine import engine as engine_module

    monkeypatch.setattr(engine_module, "CATCH_UP_LEFT", left)  # 0: rounds without the lock until one reads none
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)
    client, api = open_api(settings)
    engine = api.engine
    aggregate = "sum(amount.major by seller_id within 1d)"

    def pay(i: int) -> dict[str, Any]:
        return payment(payment_id=f"v{i}", seller_id="s_vol", occurred_at=f"2026-11-22T08:{i:02d}:00Z")

    reading, resume = threading.Event(), threading.Event()
    stored_rows = engine._stored_rows

    reads: list[int] = []
    mid = payment(payment_id="v_mid", seller_id="s_vol", occurred_at="2026-11-22T08:03:45Z")

    def paused(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("where") is not None:  # a replay: the first without the lock; then rounds, or the last
            reads.append(1)
            if len(reads) == 1:
                reading.set()
                assert resume.wait(30)
            elif len(reads) == 2 and left == 0:  # a round's read: a payment scored after its cut
                assert engine.score_payment(PaymentIn.model_validate(mid)).committed.exception(10) is None
        return stored_rows(*args, **kwargs)

    monkeypatch.setattr(engine, "_stored_rows", paused)
    other_client, other = open_api(settings)  # another worker, scoring for the same seller meanwhile
    try:
        for i in range(3):
            api.score(pay(i))
        assert draft(api, V2)[0] == 201
        publish = threading.Thread(
            target=lambda: api.client.post("/v1/policies/payment/versions/2/publish", headers=api.headers("analyst"))
        )
        publish.start()
        assert reading.wait(30)
        during = api.score(pay(3))  # scored while the replay is under way: the lock is free
        assert during["policy_version"] == "payment:v1"
        other.score(payment(payment_id="v_other", seller_id="s_vol", occurred_at="2026-11-22T08:03:30Z"))
        resume.set()
        publish.join(30)
        assert engine.subjects["payment"].policy.version == 2
        after = api.score(pay(4))
        assert after["policy_version"] == "payment:v2"
        seen = api.client.get("/v1/payments/v4", headers=api.headers("analyst")).json()["aggregates"][aggregate]
        # v0-v3, the other worker's (and v_mid) once each: v0-v2 read at the first cut, the others after
        expected = 5 + (left == 0)
        assert seen == expected * 1299.0
        # the first read, then rounds (v3 and v_other; v_mid; none), then the last, under the lock
        assert len(reads) == (5 if left == 0 else 2)
    finally:
        other_client.__exit__(None, None, None)
        client.__exit__(None, None, None)
    # a restart rebuilds every window from storage: the same sum
    client, api = open_api(settings)
    try:
        api.score(pay(5))
        rebuilt = api.client.get("/v1/payments/v5", headers=api.headers("analyst")).json()["aggregates"][aggregate]
        assert rebuilt == (expected + 1) * 1299.0
    finally:
        client.__exit__(None, None, None)


def test_a_new_aggregate_prepared_on_an_empty_store_counts_what_was_scored_before_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing stored when the replay starts (so it reads nothing and has no time to start from), a payment
    scored before the swap: the swap's catch-up still reads it."""
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", policy_poll_s=3600)
    client, api = open_api(settings)
    engine = api.engine
    prepare = engine._prepare_windows

    def then_a_payment(*args: Any) -> Any:
        prepared = prepare(*args)
        between = payment(payment_id="v_between", seller_id="s_new", occurred_at="2026-11-22T08:00:00Z")
        assert engine.score_payment(PaymentIn.model_validate(between)).committed.exception(10) is None
        return prepared

    monkeypatch.setattr(engine, "_prepare_windows", then_a_payment)
    try:
        assert draft(api, V2)[0] == 201
        published = api.client.post("/v1/policies/payment/versions/2/publish", headers=api.headers("analyst"))
        assert published.status_code == 200, published.text
        api.score(payment(payment_id="v_after", seller_id="s_new", occurred_at="2026-11-22T08:01:00Z"))
        aggregates = api.client.get("/v1/payments/v_after", headers=api.headers("analyst")).json()["aggregates"]
        assert aggregates["sum(amount.major by seller_id within 1d)"] == 1299.0
    finally:
        client.__exit__(None, None, None)


def test_reports_over_many_stored_events_hold_a_bounded_number_of_them_at_once(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule statistics (N days of events) and the shadow report (every shadowed event) decoded every row at
    once: about 7 KB an event, gigabytes at a deployment's volume, enough to take the scoring worker down.
    They read in batches now: with batches of 50, 2,000 events' reports stay far under what 2,000 decoded rows
    take (14 MB)."""
    import tracemalloc

    from risk_engine import policies as policies_module
    from risk_engine.policies import PolicyWorkflow

    api, engine = sqlite_api, sqlite_api.engine
    assert draft(api, STRICTER)[0] == 201
    assert api.client.post("/v1/policies/payment/versions/2/shadow", headers=api.headers("analyst")).status_code == 200
    last = None
    for i in range(2_000):
        body = payment(
            payment_id=f"r{i}",
            occurred_at=f"2026-11-2{i // 1440}T{(i % 1440) // 60:02d}:{i % 60:02d}:00Z",
            **{"buyer.id": f"b{i % 300}"},
        )
        last = engine.score_payment(PaymentIn.model_validate(body)).committed
    assert last is not None and last.exception(30) is None
    monkeypatch.setattr(policies_module, "STREAMED_ROWS", 50, raising=False)
    workflow = PolicyWorkflow(engine)
    for report in (lambda: workflow.rule_statistics("payment", 30), lambda: workflow.shadow_report("payment")):
        tracemalloc.start()
        try:
            result = report()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result  # the report itself is checked by the tests above
        assert peak < 4_000_000, peak
    assert workflow.shadow_report("payment")["events"] == 2_000


def test_a_shadow_report_reads_only_the_events_stored_since_the_version_first_went_into_shadow(api: Api) -> None:
    """Its examples are looked for among the events stored since the version first went into shadow, not the
    subject's whole history: the audit entry of the shadow's start records the newest event id then. (Its counts
    are read from tallies: tests/test_shadow_tallies.py.)"""
    assert draft(api, STRICTER)[0] == 201
    before = [api.score(payment(payment_id=f"old{i}", occurred_at=f"2026-11-22T07:0{i}:00Z")) for i in range(3)]
    assert len(before) == 3
    h = api.headers("analyst")
    assert api.client.post("/v1/policies/payment/versions/2/shadow", headers=h).status_code == 200
    for i in range(4):  # a billing country that is not the shipping one: the stricter shadow challenges them
        api.score(payment(payment_id=f"new{i}", occurred_at=f"2026-11-22T08:0{i}:00Z", billing_country="US"))
    # stopped and started again: the report still counts the first run's events
    assert api.client.delete("/v1/policies/payment/shadow", headers=h).status_code == 200
    assert api.client.post("/v1/policies/payment/versions/2/shadow", headers=h).status_code == 200
    api.score(payment(payment_id="later", occurred_at="2026-11-22T09:00:00Z", billing_country="US"))
    statements: list[tuple[str, list[Any]]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "FROM events" in statement and "shadow" in statement:
            statements.append((statement, list(parameters.values() if isinstance(parameters, dict) else parameters)))

    from sqlalchemy import event

    event.listen(api.engine.db, "before_cursor_execute", seen)
    try:
        report = api.client.get("/v1/policies/payment/shadow", headers=h).json()
    finally:
        event.remove(api.engine.db, "before_cursor_execute", seen)
    assert report["events"] == 5 and report["disagreed"] > 0
    shown = {e["event_id"] for kept in report["examples"].values() for e in kept}
    assert len(shown) == report["disagreed"] and shown <= {f"new{i}" for i in range(4)} | {"later"}
    assert statements and all("events.id >" in statement for statement, _ in statements)  # a range of ids
    with Session(api.engine.db) as s:
        starts = [
            a.after["from_event_id"]
            for a in s.scalars(select(m.AuditEntry).where(m.AuditEntry.action == "policy.shadow"))
        ]
        first_new = s.scalar(select(m.Event.id).where(m.Event.event_id == "new0"))
    assert len(starts) == 2 and min(starts) < first_new  # the first run's start bounds the read
    assert all(min(starts) in parameters for _, parameters in statements)


def _live_and_shadow(api: Api, subject: str = "payment") -> tuple[list[int], list[int]]:
    with api.engine.db.connect() as conn:
        rows = conn.execute(
            select(m.PolicyVersion.version, m.PolicyVersion.status).where(m.PolicyVersion.subject == subject)
        ).all()
    return sorted(v for v, s in rows if s == "published"), sorted(v for v, s in rows if s == "shadow")


def test_two_workers_changing_the_live_version_at_once_leave_one_live_version_both_follow(
    tmp_path: Path, database_url: str
) -> None:
    """Two analysts publish at the same moment through two workers, or one publishes a version as the other
    puts it in shadow: one change wins whole, never two live versions (PostgreSQL kept both, and every worker's
    poll then switched between them, ending on whichever its query returned last) nor none."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=0, follow_poll_s=0)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    try:
        a_flow, b_flow = PolicyWorkflow(a.engine), PolicyWorkflow(b.engine)
        versions = [
            a_flow.create_draft("payment", DEFAULT.replace("challenge at 35", f"challenge at {11 + i}"), "t")[0][
                "version"
            ]
            for i in range(24)
        ]
        failures: list[BaseException] = []

        def at_once(*changes: Callable[[], object]) -> None:
            for outcome in at_the_same_moment(*changes):
                # a Conflict (publishing what just went live, or shadowing it) is a refusal, and fine
                if isinstance(outcome, BaseException) and not isinstance(outcome, Conflict):
                    failures.append(outcome)

        for first, second in zip(versions[::2], versions[1::2], strict=True):
            if first % 4:  # two publishes
                at_once(
                    lambda v=first: a_flow.publish("payment", v, "t"),
                    lambda v=second: b_flow.publish("payment", v, "t"),
                )
            else:  # one version published on one worker and put in shadow on the other
                at_once(
                    lambda v=first: a_flow.publish("payment", v, "t"),
                    lambda v=first: b_flow.start_shadow("payment", v, "t"),
                )
            live, shadow = _live_and_shadow(a)
            assert len(live) == 1 and len(shadow) <= 1 and not set(live) & set(shadow), (first, live, shadow)
            for api in (a, b):
                api.engine.refresh_policies()
                rt = api.engine.subjects["payment"]
                assert rt.policy.version == live[0]
                assert (rt.shadow.version if rt.shadow else None) == (shadow[0] if shadow else None)
            if shadow:
                a_flow.stop_shadow("payment", "t")
        assert failures == []
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_two_publishes_at_once_in_one_worker_leave_it_scoring_with_the_version_that_won(
    tmp_path: Path, database_url: str
) -> None:
    """Two analysts publish through the same worker at once: the database takes one change after the other, and
    the worker must end on the one that came last, without waiting for its next poll. Each publish used to
    activate its own version once committed, so a long policy, slow to compile, committed first and activated
    after a short one that followed it, and the worker scored with a version no longer live until its poll."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=0, follow_poll_s=0)
    client, api = open_api(settings)
    try:
        flow = PolicyWorkflow(api.engine)
        extra = "".join(
            f"\nrule extra_{i} {{\n  when amount.major > {1_000_000 + i} and buyer.account_age < {i + 1}d\n"
            f"  then score +1, reason EXTRA_{i}\n}}\n"
            for i in range(1000)
        )
        wrong = []
        switching = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)  # the threads take turns at the interpreter often, as they would on more cores
        for i in range(6):
            slow = flow.create_draft(
                "payment", DEFAULT.replace("challenge at 35", f"challenge at {20 + i}") + extra, "t"
            )
            quick = flow.create_draft("payment", DEFAULT.replace("challenge at 35", f"challenge at {40 + i}"), "t")

            def publish_quick_while_the_slow_one_activates(quick: int, slow: int) -> None:
                while _live_and_shadow(api)[0] != [slow]:  # the slow one committed: it now compiles to activate
                    time.sleep(0.001)
                flow.publish("payment", quick, "t")

            at_the_same_moment(
                partial(flow.publish, "payment", slow[0]["version"], "t"),
                partial(publish_quick_while_the_slow_one_activates, quick[0]["version"], slow[0]["version"]),
            )
            live, _ = _live_and_shadow(api)
            active = api.engine.subjects["payment"].policy.version
            if active != live[0]:
                wrong.append((active, live[0]))
        assert wrong == []
    finally:
        sys.setswitchinterval(switching)
        client.__exit__(None, None, None)
