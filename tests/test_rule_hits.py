"""Rule statistics from hourly counts kept as events and labels are stored: always what a scan of every event
in the window (how they were counted before) gives, at the windows' edges, across workers, after a backfill."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from risk_engine.engine import RiskEngine
from risk_engine.labels import LabelRequest
from risk_engine.policies import PolicyWorkflow, RuleStat
from risk_engine.storage import models as m
from risk_engine.storage import rule_hits
from risk_engine.storage.labels import event_outcome
from risk_engine.storage.labels import outcome as label_outcome
from risk_engine.storage.shadow_tallies import ShadowOutcome
from tests.conftest import REPO, Api, make_settings, payment, two_workers
from tests.helpers import wait_until

# seconds before the latest payment, each at an edge of a window or beside one
AGES = (0, 10, 1799, 3599, 3600, 3601, 7200, 43_200, 86_399, 86_400, 86_401, 172_800, 2_592_000, 2_592_001)


def recount(engine: RiskEngine, subject: str, window_days: int) -> dict[str, dict[str, Any]]:
    """The statistics as a scan of every stored event of the window."""
    policy = engine.subjects[subject].policy
    codes = {r.code: r.name for r in policy.compiled.rules}
    stats = {r.name: RuleStat(r.name, r.code) for r in policy.compiled.rules}
    with Session(engine.db) as s:
        latest = s.scalar(select(func.max(m.Event.occurred_at)).where(m.Event.subject == subject))
        assert latest is not None
        since = latest - timedelta(days=window_days)
        rows = s.execute(
            select(m.Event.occurred_at, m.Event.response, event_outcome()).where(
                m.Event.subject == subject, m.Event.occurred_at >= since
            )
        )
        for occurred_at, response, labelled_as in rows:
            for reason in response["reasons"]:
                name = codes.get(reason["code"]) if reason["source"] == "rule" else None
                if name is not None:
                    stats[name].count((latest - occurred_at).total_seconds(), label_outcome(labelled_as))
    return {name: asdict(stat) for name, stat in stats.items()}


def counted(engine: RiskEngine, subject: str, window_days: int) -> dict[str, dict[str, Any]]:
    """The statistics as the service gives them, in ``recount``'s shape."""
    out = {}
    for rule in PolicyWorkflow(engine).rule_statistics(subject, window_days)["rules"]:
        rule["hits_window"] = rule.pop(f"hits_{window_days}d")
        rule.pop("fraud_share")
        out[rule["rule"]] = rule
    return out


def score_around(api: Api, latest: datetime, prefix: str) -> list[str]:
    """Payments that fire the geo-mismatch rule (and others) at every age of ``AGES``, and a few with none."""
    ids = []
    for i, age in enumerate(AGES):
        pid = f"{prefix}{i}"
        api.score(
            payment(
                payment_id=pid,
                occurred_at=(latest - timedelta(seconds=age)).isoformat().replace("+00:00", "Z"),
                billing_country="US" if i % 3 else "CN",
                **{"payment_method.card_fingerprint": f"fp_{pid}", "device.id": f"d_{pid}", "buyer.id": f"b_{i % 4}"},
            )
        )
        ids.append(pid)
    return ids


@pytest.mark.parametrize("past_the_hour_s", [0, 1234])
def test_hourly_counts_give_what_a_scan_of_every_event_gives(
    tmp_path: Path, database_url: str, past_the_hour_s: int
) -> None:
    latest = datetime(2026, 11, 22, 12, tzinfo=UTC) + timedelta(seconds=past_the_hour_s)
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)
    with two_workers(settings) as (a, b):
        ids = score_around(a, latest, "a") + score_around(b, latest - timedelta(seconds=1), "b")
        # labels that change outcomes every way: none -> legitimate, none -> fraud, legitimate -> fraud, and a
        # second fraud label that changes nothing; in one call, in a batch, through either worker
        a.engine.record_labels([(ids[1], "legitimate", None), (ids[4], "chargeback", None)], source="t1")
        assert a.engine.record_label("l1", ids[1], "chargeback", None, None)[1]
        assert b.engine.record_label("l2", ids[4], "confirmed_fraud", None, None)[1]
        batch = a.client.post(
            "/v1/labels/batch",
            json={
                "labels": [
                    {"label_id": "l3", "payment_id": ids[5], "label": "legitimate"},
                    {"label_id": "l4", "payment_id": ids[5], "label": "chargeback"},
                    {"label_id": "l5", "payment_id": ids[20], "label": "legitimate"},
                    {"label_id": "l6", "payment_id": ids[12], "label": "chargeback"},
                ]
            },
            headers=a.headers(),
        )
        assert batch.status_code == 201, batch.text
        # a retried label counts nothing twice
        assert not a.engine.record_label("l1", ids[1], "chargeback", None, None)[1]
        for days in (2, 7, 30):
            expected = recount(a.engine, "payment", days)
            assert counted(a.engine, "payment", days) == expected
            assert counted(b.engine, "payment", days) == expected
        geo = recount(a.engine, "payment", 30)["billing_shipping_mismatch"]
        assert geo["hits_1h"] > 0 and geo["hits_1d"] > geo["hits_1h"] and geo["hits_window"] > geo["hits_1d"]
        assert geo["labelled"] > 0 and geo["labelled_fraud"] > 0
        with Session(a.engine.db) as s:
            origins = set(s.scalars(select(m.RuleHit.origin)))
            stored_hits = sum(
                len(rule_hits.rule_codes(r)) for r in s.scalars(select(m.Event.response)) if isinstance(r, dict)
            )
            assert s.scalar(select(func.sum(m.RuleHit.hits))) == stored_hits
        assert origins == {a.engine.origin, b.engine.origin}  # each worker counts in rows of its own

        # the migration's backfill, from the stored events and labels alone, counts the same
        with a.engine.db.begin() as conn:
            conn.execute(delete(m.RuleHit))
            rule_hits.backfill(conn)
        for days in (2, 30):
            assert counted(a.engine, "payment", days) == recount(a.engine, "payment", days)


def test_a_statistics_read_scans_only_the_hours_at_the_windows_edges(api: Api, monkeypatch: Any) -> None:
    latest = datetime(2026, 11, 22, 12, 30, tzinfo=UTC)
    score_around(api, latest, "p")
    ranges: list[tuple[float, float]] = []
    real = PolicyWorkflow._count_rule_hits

    def spy(s: Session, subject: str, at: float, window_s: float, codes: Any, stats: Any) -> None:
        original = s.execute

        def execute(stmt: Any, *args: Any, **kwargs: Any) -> Any:
            params = stmt.compile().params
            times = sorted(v.timestamp() for v in params.values() if isinstance(v, datetime))
            if len(times) == 2:
                ranges.append((times[0], times[1]))
            return original(stmt, *args, **kwargs)

        monkeypatch.setattr(s, "execute", execute)
        real(s, subject, at, window_s, codes, stats)

    monkeypatch.setattr(PolicyWorkflow, "_count_rule_hits", staticmethod(spy))
    PolicyWorkflow(api.engine).rule_statistics("payment", 30)
    assert ranges and all(until - since <= 3600 + 1 for since, until in ranges)
    assert sum(until - since for since, until in ranges) <= 4 * 3600 + 1


def test_a_reason_code_of_any_length_is_counted(api: Api) -> None:
    """The rules language sets no length on a code: a long one must not make the events' writes fail."""
    code = "LONG_" + "X" * 120
    text = (REPO / "rules" / "payment.rules").read_text() + (
        f"\nrule long_code {{\n  when amount.value > 0\n  then score +1, reason {code}\n}}\n"
    )
    api.engine.activate_policy("payment", text, 99)
    answer = api.score(payment(payment_id="long1"))
    assert code in [r["code"] for r in answer["reasons"]]
    listed = api.client.get("/v1/payments", params={"rule": code}, headers=api.headers("analyst")).json()
    assert [e["payment_id"] for e in listed] == ["long1"]
    stats = {r["rule"]: r for r in PolicyWorkflow(api.engine).rule_statistics("payment", 30)["rules"]}
    assert stats["long_code"]["hits_30d"] == 1


def test_two_transactions_labelling_one_event_at_once_count_its_change_once(tmp_path: Path, pg_schema_url: str) -> None:
    """On PostgreSQL the second transaction waits on the event's row, then must read the first one's label."""
    settings = make_settings(tmp_path / "var", pg_schema_url, policy_poll_s=3600)
    with two_workers(settings) as (a, _):
        answer = a.score(payment(payment_id="race", billing_country="US"))
        codes = [r["code"] for r in answer["reasons"] if r["source"] == "rule"]
        assert codes
        db = a.engine.db
        first = Session(db)
        first.add(LabelRequest("race_1", "race", "legitimate", None, "t").row(datetime.now(UTC)))
        rule_hits.tally_labels(first, list(first.new), "one")  # holds the event's row until it commits
        second_done = threading.Event()

        def second() -> None:
            with Session(db) as s:
                s.add(LabelRequest("race_2", "race", "chargeback", None, "t").row(datetime.now(UTC)))
                rule_hits.tally_labels(s, list(s.new), "two")
                s.commit()
            second_done.set()

        thread = threading.Thread(target=second)
        thread.start()
        with db.connect() as conn:  # the second transaction is waiting on the lock the first holds
            while not conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one():
                assert thread.is_alive() and not second_done.is_set()
                time.sleep(0.01)
        first.commit()
        first.close()
        thread.join(30)
        assert second_done.is_set()
        with Session(db) as s:
            totals = s.execute(
                select(m.RuleHit.code, func.sum(m.RuleHit.labelled), func.sum(m.RuleHit.fraud)).group_by(m.RuleHit.code)
            ).all()
        labelled = {code: n for code, n, _ in totals}
        fraud = {code: n for code, _, n in totals}
        # none -> legitimate (the first), legitimate -> fraud (the second): labelled once, fraud once
        for code in set(codes):
            assert labelled[code] == codes.count(code) and fraud[code] == codes.count(code)


def test_a_batchs_counts_and_a_labels_counts_lock_their_rows_in_one_order(tmp_path: Path, pg_schema_url: str) -> None:
    """A worker's group commit and a label it stores add to the same ``rule_hits`` and ``shadow_tallies`` rows
    (the worker's own). Taken in opposite orders, PostgreSQL found a deadlock and failed one: under load,
    a batch of payments or a label answered 503 every few seconds. Here the batch waits on its first rule row
    (held by another client) when the label comes; in one order the label goes through, and then the batch."""
    settings = make_settings(tmp_path / "var", pg_schema_url, policy_poll_s=3600)
    with two_workers(settings) as (a, _):
        engine = a.engine
        engine.set_shadow("payment", (REPO / "rules" / "payment.rules").read_text(), 99)
        answer = a.score(payment(payment_id="lock_order", billing_country="US"))
        codes = tuple(r["code"] for r in answer["reasons"] if r["source"] == "rule")
        assert codes and all(code > "AAA" for code in codes)
        db, origin = engine.db, "w"
        with Session(db) as s:
            event = s.scalars(select(m.Event).where(m.Event.event_id == "lock_order")).one()
            hour = rule_hits.hour_of(event.occurred_at.timestamp())
            outcome = ShadowOutcome.of(event.decision, event.shadow)
            assert outcome is not None
            s.add(m.RuleHit(subject="payment", hour=hour, code="AAA", origin=origin, hits=1, labelled=0, fraud=0))
            s.commit()
        blocker = db.connect()
        blocker.begin()
        blocker.execute(text("SELECT 1 FROM rule_hits WHERE code = 'AAA' FOR UPDATE"))
        failures: list[BaseException] = []

        def batch() -> None:  # what the writer adds with a batch holding one more payment that fired "AAA" too
            raw = db.raw_connection()
            try:
                cursor = raw.cursor()
                tally = rule_hits.Tally("payment", hour, ("AAA", *codes), outcome)
                rule_hits.HitTally(db, origin).execute(cursor, [tally])
                raw.commit()
            except BaseException as exc:  # reported below
                failures.append(exc)
            finally:
                raw.close()

        def label() -> None:
            try:
                with Session(db) as s:
                    s.add(LabelRequest("lock_order_1", "lock_order", "chargeback", None, "t").row(datetime.now(UTC)))
                    rule_hits.tally_labels(s, list(s.new), origin)
                    s.commit()
            except BaseException as exc:  # reported below
                failures.append(exc)

        def waiting() -> int:
            with db.connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                        )
                    ).scalar_one()
                )

        batch_thread, label_thread = threading.Thread(target=batch), threading.Thread(target=label)
        batch_thread.start()
        assert wait_until(lambda: waiting() == 1), "the batch never waited on the row held"
        label_thread.start()
        assert wait_until(lambda: not label_thread.is_alive() or waiting() == 2)
        blocker.rollback()
        blocker.close()
        batch_thread.join(30)
        label_thread.join(30)
        assert not failures, failures
        with Session(db) as s:
            rows = {
                r.code: (r.hits, r.labelled, r.fraud)
                for r in s.scalars(select(m.RuleHit).where(m.RuleHit.origin == origin))
            }
            tallies = s.scalars(select(m.ShadowTally).where(m.ShadowTally.origin == origin)).all()
        for code in set(codes):
            assert rows[code] == (codes.count(code),) * 3  # the batch's hits; the label's labelled and fraud
        assert [(t.events, t.labelled, t.fraud) for t in tallies] == [(1, 1, 1)]
