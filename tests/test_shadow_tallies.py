"""The shadow report from counts kept as events and labels are stored: always what a scan of every shadowed event
(how it was computed before) gives, across workers, with labels arriving every way, after a backfill; and the
events it still reads, for its examples, are the newest few."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from risk_engine import policies as policies_module
from risk_engine.backtest import alert_quality
from risk_engine.engine import RiskEngine
from risk_engine.storage import models as m
from risk_engine.storage import shadow_tallies
from risk_engine.storage.labels import event_outcome
from risk_engine.storage.labels import outcome as label_outcome
from tests.conftest import Api, make_settings, two_workers
from tests.test_durability import traffic
from tests.test_policies import DEFAULT, STRICTER, draft

COUNTED = ("events", "agreed", "disagreed", "transitions", "rule_hits", "labelled", "fraud", "quality")


def rescan(engine: RiskEngine, version: str) -> dict[str, Any]:
    """The report's counts as a scan of every stored event that ``version`` decided in shadow."""
    transitions: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    decided: tuple[list[str], list[str]] = ([], [])
    fraud: list[bool] = []
    labelled = 0
    with Session(engine.db) as s:
        rows = s.execute(select(m.Event.decision, m.Event.shadow, event_outcome()).where(m.Event.shadow.is_not(None)))
        for live, shadow, labelled_as in rows:
            if shadow.get("version") != version:
                continue
            decided[0].append(live)
            decided[1].append(shadow["decision"])
            outcome = label_outcome(labelled_as)
            fraud.append(bool(outcome))
            labelled += outcome is not None
            hits.update(shadow["rules"])
            if shadow["decision"] != live:
                transitions[f"{live}->{shadow['decision']}"] += 1
    quality = {
        name: {
            "block": asdict(alert_quality([d == "block" for d in decisions], fraud)),
            "block_or_review": asdict(alert_quality([d in ("block", "review") for d in decisions], fraud)),
        }
        for name, decisions in zip(("live", "shadow"), decided, strict=True)
    }
    return {
        "events": len(fraud),
        "agreed": len(fraud) - sum(transitions.values()),
        "disagreed": sum(transitions.values()),
        "transitions": dict(transitions),
        "rule_hits": dict(hits),
        "labelled": labelled,
        "fraud": sum(fraud),
        "quality": quality,
    }


def reported(api: Api) -> dict[str, Any]:
    answer = api.client.get("/v1/policies/payment/shadow", headers=api.headers("analyst"))
    assert answer.status_code == 200, answer.text
    report: dict[str, Any] = answer.json()
    return report


def test_the_report_counts_what_a_scan_of_every_shadowed_event_counts(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)
    with two_workers(settings) as (a, b):
        assert draft(a, STRICTER)[0] == 201
        assert a.client.post("/v1/policies/payment/versions/2/shadow", headers=a.headers("analyst")).status_code == 200
        b.engine.refresh_policies()  # b records the shadow too
        assert b.engine.subjects["payment"].shadow is not None
        payments = traffic(120)
        answers = [(a if i % 3 else b).score(p) for i, p in enumerate(payments)]
        ids = [p["payment_id"] for p in payments]
        with Session(a.engine.db) as s:
            recorded = {event_id: shadow for event_id, shadow in s.execute(select(m.Event.event_id, m.Event.shadow))}
        disagreeing = [i for i, answer in enumerate(answers) if recorded[ids[i]]["decision"] != answer["decision"]]
        assert len(disagreeing) >= 4 and len(disagreeing) < len(ids)
        # labels that change outcomes every way (none -> legitimate, none -> fraud, legitimate -> fraud, and a
        # second fraud label that changes nothing), one at a time, in a batch, through either worker, retried
        x, y, z, w = (ids[i] for i in disagreeing[:4])
        u, v = [pid for pid in ids if pid not in (x, y, z, w)][:2]  # which events disagree depends on timing
        a.engine.record_labels([(x, "legitimate", None), (y, "chargeback", None)], source="t1")
        assert a.engine.record_label("l1", x, "chargeback", None, None)[1]
        assert b.engine.record_label("l2", y, "confirmed_fraud", None, None)[1]
        batch = b.client.post(
            "/v1/labels/batch",
            json={
                "labels": [
                    {"label_id": "l3", "payment_id": z, "label": "legitimate"},
                    {"label_id": "l4", "payment_id": z, "label": "chargeback"},
                    {"label_id": "l5", "payment_id": w, "label": "legitimate"},
                    {"label_id": "l6", "payment_id": u, "label": "chargeback"},
                    {"label_id": "l7", "payment_id": v, "label": "legitimate"},
                ]
            },
            headers=b.headers(),
        )
        assert batch.status_code == 201, batch.text
        assert not a.engine.record_label("l1", x, "chargeback", None, None)[1]  # a retry counts nothing twice

        expected = rescan(a.engine, "payment:v2")
        assert expected["labelled"] == 6 and expected["fraud"] == 4 and expected["disagreed"] == len(disagreeing)
        assert expected["quality"]["shadow"]["block_or_review"]["alerts"] > 0
        for worker in (a, b):
            report = reported(worker)
            assert {k: report[k] for k in COUNTED} == expected
        with Session(a.engine.db) as s:
            origins = set(s.scalars(select(m.ShadowTally.origin)))
        assert origins == {a.engine.origin, b.engine.origin}  # each worker counts in rows of its own

        # the migration's backfill, from the stored events and labels alone, counts the same
        with a.engine.db.begin() as conn:
            conn.execute(delete(m.ShadowTally))
            conn.execute(delete(m.ShadowRuleHit))
            shadow_tallies.backfill(conn)
        report = reported(a)
        assert {k: report[k] for k in COUNTED} == expected


def test_a_report_reads_events_only_for_its_examples_and_only_the_newest(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = api.headers("analyst")
    same = DEFAULT + "\n# the same rules: the shadow agrees with live on every event\n"
    assert draft(api, same)[0] == 201
    assert api.client.post("/v1/policies/payment/versions/2/shadow", headers=h).status_code == 200
    for p in traffic(30):
        api.score(p)
    read: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "FROM events" in statement and "shadow" in statement:  # not the follower's reads, meanwhile
            read.append(statement)

    event.listen(api.engine.db, "before_cursor_execute", seen)
    try:
        agreeing = reported(api)
    finally:
        event.remove(api.engine.db, "before_cursor_execute", seen)
    assert (agreeing["events"], agreeing["agreed"], agreeing["examples"]) == (30, 30, {})
    assert read == []  # nothing to show: no event is read, however many were shadowed

    # a stricter shadow: the examples are the newest of each transition, looked for among the newest events
    assert api.client.delete("/v1/policies/payment/shadow", headers=h).status_code == 200
    assert draft(api, STRICTER)[0] == 201
    assert api.client.post("/v1/policies/payment/versions/3/shadow", headers=h).status_code == 200
    payments = traffic(150, start=30)
    for p in payments:
        api.score(p)
    full = reported(api)
    with Session(api.engine.db) as s:
        rows = s.execute(select(m.Event.event_id, m.Event.decision, m.Event.shadow).order_by(m.Event.id)).all()
    in_order: dict[str, list[str]] = {}
    for event_id, live, shadow in rows:
        if shadow is not None and shadow["version"] == "payment:v3" and shadow["decision"] != live:
            in_order.setdefault(f"{live}->{shadow['decision']}", []).append(event_id)
    assert set(full["examples"]) == set(in_order) == set(full["transitions"])
    for transition, examples in full["examples"].items():
        assert [e["event_id"] for e in examples] == in_order[transition][-10:]
    newest = {p["payment_id"] for p in payments[-40:]}
    monkeypatch.setattr(policies_module, "EXAMPLE_SCAN_EVENTS", 40)
    bounded = reported(api)
    assert {k: bounded[k] for k in COUNTED} == {k: full[k] for k in COUNTED}  # the counts are all still there
    assert bounded["examples"] and all(
        e["event_id"] in newest for examples in bounded["examples"].values() for e in examples
    )
    for transition, examples in bounded["examples"].items():
        assert [e["event_id"] for e in examples] == [i for i in in_order[transition] if i in newest][-10:]
