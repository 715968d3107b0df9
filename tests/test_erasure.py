"""Erasure on request: a person's sealed PII leaves every stored event that carries their id or PII value, audited
without the value, while decisions, velocity and backtests, which read blind indexes, stay as they were."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from risk_engine import engine as engine_module
from risk_engine.errors import InvalidInput
from risk_engine.policies import PolicyWorkflow
from risk_engine.storage import models as m
from tests.conftest import BASE_REVIEW, REPO, Api, make_settings, open_api, payment, run_cli

OTHER = {"buyer.id": "b_8", "buyer.email": "zhang.san@example.com", "buyer.phone": "+8613900139000"}


def blobs(api: Api) -> dict[str, bytes | None]:
    with api.engine.db.connect() as conn:
        return dict(conn.execute(select(m.Event.event_id, m.Event.pii_blob)).all())


def erase(api: Api, kind: str, value: str, role: str = "admin") -> Any:
    return api.client.post("/v1/pii/erase", json={"kind": kind, "value": value}, headers=api.headers(role))


def test_a_persons_pii_is_erased_from_every_event_that_carries_it(api: Api) -> None:
    p1 = api.score(payment(payment_id="p1", occurred_at="2026-11-22T10:00:00Z"))
    api.score(payment(payment_id="p2", occurred_at="2026-11-22T10:05:00Z", **{"device.ip": "198.51.100.9"}))
    api.score(payment(payment_id="p3", occurred_at="2026-11-22T10:10:00Z", **OTHER))
    assert all(blobs(api).values())

    assert erase(api, "email", "Li.Wei@example.com ", role="analyst").status_code == 403
    done = erase(api, "email", "Li.Wei@example.com ")  # as the blind index normalizes it: case and spaces
    assert done.status_code == 200, done.text
    assert done.json() == {"kind": "email", "events": 2, "by_subject": {"payment": 2}}
    assert [k for k, blob in blobs(api).items() if blob is None] == ["p1", "p2"]
    shown = api.client.get("/v1/payments/p1", headers=api.headers()).json()
    assert shown["pii_masked"] == {} and shown["decision"] == p1  # the decision stays, the PII is gone
    assert shown["pii_erased"] is True
    other = api.client.get("/v1/payments/p3", headers=api.headers()).json()
    assert other["pii_masked"] != {} and other["pii_erased"] is False

    audit = api.client.get("/v1/audit?action=pii.erase", headers=api.headers("analyst")).json()
    assert [(a["target"], a["after"]["events"]["payment"]) for a in audit] == [("pii:email", 2)]
    assert "li.wei" not in str(audit).lower()  # the value asked for is never kept
    assert erase(api, "email", "li.wei@example.com").json()["events"] == 0  # again: nothing more

    by_id = erase(api, "buyer_id", "b_8")
    assert by_id.json()["events"] == 1 and blobs(api)["p3"] is None
    assert erase(api, "ip", "not-an-ip").status_code == 422
    assert erase(api, "passport", "x").status_code == 422

    # the records keep their blind indexes: the live policy replays exactly as it decided
    policy = (REPO / "rules" / "payment.rules").read_text()
    report = PolicyWorkflow(api.engine).backtest("payment", policy, "same", since_s=86400)
    assert report.events == 3 and report.live_mismatches == 0


def test_erasure_by_ip_and_by_person_reaches_reviews_too(api: Api) -> None:
    api.score(payment(payment_id="p1", order_id="o_1", **{"device.ip": "2001:db8::1"}))
    scored = api.client.post("/v1/reviews/score", json=BASE_REVIEW, headers=api.headers())
    assert scored.status_code == 200, scored.text
    api.score(payment(payment_id="p2", **OTHER))
    by_ip = erase(api, "ip", "2001:0DB8:0:0::0001")  # another spelling of the payment's address
    assert by_ip.json()["by_subject"]["payment"] == 1 and blobs(api)["p1"] is None
    reviewer = BASE_REVIEW["reviewer"]["id"]
    by_person = erase(api, "buyer_id", reviewer)  # the reviewer b_7 is the buyer b_7 of p1
    assert by_person.json()["by_subject"]["review"] == 1 and blobs(api)[BASE_REVIEW["review_id"]] is None
    assert blobs(api)["p2"] is not None


def test_a_sellers_erasure_reaches_its_merchant_events_and_not_its_buyers_payments(api: Api) -> None:
    """Sellers are people too: erasing a seller by id takes the sealed PII (login IPs) of its merchant events,
    while the payments it was paid, whose PII is the buyers', keep theirs."""
    api.score(payment(payment_id="p1", seller_id="s_9"))
    login = {"event_id": "m1", "occurred_at": "2026-11-22T09:00:00Z", "type": "login", "ip": "203.0.113.50"}
    other = {**login, "event_id": "m2"}
    for seller, body in (("s_9", login), ("s_10", other)):
        scored = api.client.post(f"/v1/merchants/{seller}/events", json=body, headers=api.headers())
        assert scored.status_code == 200, scored.text
    assert all(blobs(api).values())
    done = erase(api, "seller_id", "s_9")
    assert done.status_code == 200, done.text
    assert done.json()["by_subject"] == {"merchant": 1}
    assert [k for k, blob in blobs(api).items() if blob is None] == ["m1"]
    assert erase(api, "buyer_id", "s_10").json()["events"] == 0  # another namespace: no seller is a buyer id


def test_every_kind_of_person_id_a_subject_declares_can_be_asked_for() -> None:
    from typing import get_args

    from risk_engine.service.routers.pii import ErasureIn
    from risk_engine.subjects import PERSON_ID_KINDS

    assert set(PERSON_ID_KINDS) == {"buyer_id", "seller_id"}
    assert set(PERSON_ID_KINDS) <= set(get_args(ErasureIn.model_fields["kind"].annotation))


def test_erasure_by_an_ipv4_address_finds_events_stored_with_its_mapped_form(api: Api) -> None:
    # events stored before ::ffff:a.b.c.d was unwrapped to a.b.c.d hold the blind index of the mapped form
    from sqlalchemy.orm import Session

    from risk_engine.vault import PiiKind

    api.score(payment(payment_id="p1", **{"device.ip": "203.0.113.9"}))
    api.score(payment(payment_id="p2", occurred_at="2026-11-22T10:20:00Z", **{"device.ip": "203.0.113.10"}))
    legacy = api.engine.vault.blind_index(PiiKind.IP, "::ffff:203.0.113.9")
    with Session(api.engine.db) as s:
        row = s.scalars(select(m.Event).where(m.Event.event_id == "p1")).one()
        assert row.record["device.ip"] != legacy
        row.record = {**row.record, "device.ip": legacy}  # as an earlier version stored it
        s.commit()
    done = erase(api, "ip", "203.0.113.9")
    assert done.json()["events"] == 1 and blobs(api)["p1"] is None and blobs(api)["p2"] is not None


def dated(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def test_pii_past_the_retention_period_is_dropped_and_each_run_reads_only_what_the_last_one_left(api: Api) -> None:
    bodies = {pid: payment(payment_id=pid, occurred_at=dated(days)) for pid, days in (("p500", 500), ("p100", 100))}
    old = {pid: api.score(body) for pid, body in bodies.items()}
    api.score(payment(payment_id="p10", occurred_at=dated(10), **OTHER))
    with pytest.raises(InvalidInput):
        api.engine.expire_pii("test")  # no retention period set, none given

    done = api.engine.expire_pii("test", days=90)
    assert (done["events"], done["by_subject"]["payment"]) == (2, 2)
    assert [k for k, blob in blobs(api).items() if blob is None] == ["p500", "p100"]
    shown = api.client.get("/v1/payments/p100", headers=api.headers()).json()
    assert shown["pii_masked"] == {} and shown["pii_expired"] is True and shown["pii_erased"] is False
    assert shown["decision"] == old["p100"]
    kept = api.client.get("/v1/payments/p10", headers=api.headers()).json()
    assert kept["pii_masked"] != {} and kept["pii_expired"] is False
    # the retry still replays (the same body: its time taken once, not again a second later)
    retried = api.client.post("/v1/payments/score", json=bodies["p500"], headers=api.headers())
    assert retried.status_code == 200 and retried.headers["Idempotent-Replayed"] == "true"

    # a backfill dated before the last cutoff, stored after that run, is found by id; an earlier cutoff is the last
    api.score(payment(payment_id="p200", occurred_at=dated(200)))
    api.score(payment(payment_id="p95", occurred_at=dated(95)))
    assert api.engine.expire_pii("test", days=365)["events"] == 2
    assert blobs(api)["p200"] is None and blobs(api)["p95"] is None and blobs(api)["p10"] is not None
    assert api.engine.expire_pii("test", days=90)["events"] == 0
    audit = api.client.get("/v1/audit?action=pii.expire", headers=api.headers("analyst")).json()
    assert [a["after"]["events"]["payment"] for a in audit] == [0, 2, 2]

    # the records keep their blind indexes: the live policy replays exactly as it decided
    policy = (REPO / "rules" / "payment.rules").read_text()
    report = PolicyWorkflow(api.engine).backtest("payment", policy, "same", since_s=600 * 86400)
    assert report.events == 5 and report.live_mismatches == 0


def test_pii_expire_from_the_command_line_and_daily_in_every_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "var"
    client, api = open_api(make_settings(home, f"sqlite:///{home}/risk.db"))
    try:
        api.score(payment(payment_id="p100", occurred_at=dated(100)))
        api.score(payment(payment_id="p40", occurred_at=dated(40)))
    finally:
        client.__exit__(None, None, None)
    env = {"RISK_ENGINE_DATABASE_URL": f"sqlite:///{home}/risk.db"}
    unset = run_cli("pii", "expire", home=home, env=env)
    assert unset.returncode == 1 and "no retention period" in unset.stderr
    done = run_cli("pii", "expire", "--older-than-days", "90", home=home, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["by_subject"]["payment"] == 1

    monkeypatch.setattr(engine_module, "PII_EXPIRY_S", 0.0)  # the day's run at the first poll
    client, api = open_api(make_settings(home, f"sqlite:///{home}/risk.db", pii_retention_days=30, policy_poll_s=0.05))
    try:
        deadline = time.monotonic() + 30
        while blobs(api)["p40"] is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert blobs(api) == {"p100": None, "p40": None}
    finally:
        client.__exit__(None, None, None)
