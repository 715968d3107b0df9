"""Backtests: equal to live with the same policy, honest about what a draft changes, measured against labels."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from risk_engine import backtest
from risk_engine.jobs import LOST_AFTER_S, Cancelled, Job, Jobs
from risk_engine.policies import PolicyWorkflow
from risk_engine.storage import jobs as stored_jobs
from risk_engine.storage import models as m
from risk_engine.storage.db import make_engine, migrate
from tests.conftest import REPO, Api, make_settings, open_api, run_cli
from tests.test_durability import traffic

DEFAULT = (REPO / "rules" / "payment.rules").read_text()
STRICTER = DEFAULT.replace("challenge at 35", "challenge at 10").replace("review at 60", "review at 30")


def stored_decisions(api: Api) -> Counter[str]:
    with api.engine.db.connect() as conn:
        return Counter(r[0] for r in conn.execute(select(m.Event.decision)))


def test_backtest_of_the_live_policy_equals_live(api: Api) -> None:
    for p in traffic(400):
        api.score(p)
    report = PolicyWorkflow(api.engine).backtest("payment", DEFAULT, "same text", since_s=90 * 86400)
    assert report.events == 400
    assert report.live_mismatches == 0
    assert report.changed == 0
    assert report.published.decisions == report.draft.decisions == dict(stored_decisions(api))
    assert sum(report.published.rule_hits.values()) > 0


def test_a_look_back_past_1970_replays_everything(api: Api) -> None:
    for p in traffic(50):
        api.score(p)
    # 10^11 days back is before the year 1: it used to fail converting that time; it means every stored event
    report = PolicyWorkflow(api.engine).backtest("payment", DEFAULT, "same text", since_s=1e11 * 86400)
    assert report.events == 50 and report.live_mismatches == 0


def test_a_stricter_draft_only_moves_decisions_up(api: Api) -> None:
    for p in traffic(300):
        api.score(p)
    stricter = DEFAULT.replace("challenge at 35", "challenge at 10").replace("review at 60", "review at 30")
    report = PolicyWorkflow(api.engine).backtest("payment", stricter, "stricter", since_s=90 * 86400)
    assert report.changed > 0
    order = ["allow", "challenge", "review", "block"]
    for transition in report.transitions:
        before, after = transition.split("->")
        assert order.index(after) > order.index(before), transition


def test_the_report_names_the_latest_events_whose_decision_changed(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for p in traffic(300):
        api.score(p)
    stricter = DEFAULT.replace("challenge at 35", "challenge at 10").replace("review at 60", "review at 30")
    monkeypatch.setattr(backtest, "EXAMPLES_PER_TRANSITION", 100_000)
    every = PolicyWorkflow(api.engine).backtest("payment", stricter, "stricter", since_s=90 * 86400)
    changed = {t: [e["event_id"] for e in every.examples[t]] for t in every.transitions}
    assert {t: len(ids) for t, ids in changed.items()} == every.transitions
    fraud = [ids[0] for ids in changed.values()]  # one labelled fraud, one legitimate per transition
    legit = [ids[-1] for ids in changed.values() if len(ids) > 1]
    api.engine.record_labels([(e, "chargeback", None) for e in fraud], source="test")
    api.engine.record_labels([(e, "legitimate", None) for e in legit], source="test")
    monkeypatch.undo()

    report = PolicyWorkflow(api.engine).backtest("payment", stricter, "stricter", since_s=90 * 86400)
    assert report.transitions == every.transitions
    assert report.transition_fraud == {t: 1 for t in report.transitions}
    with api.engine.db.connect() as conn:
        live = dict(conn.execute(select(m.Event.event_id, m.Event.decision)).all())
    for transition, examples in report.examples.items():
        before, _ = transition.split("->")
        assert [e["event_id"] for e in examples] == changed[transition][-10:]  # the latest ten, oldest first
        for e in examples:
            assert live[e["event_id"]] == before
            assert e["draft_score"] >= e["published_score"]
            expected = "fraud" if e["event_id"] in fraud else "legitimate" if e["event_id"] in legit else None
            assert e["label"] == expected
    assert any(e["label"] == "fraud" for examples in report.examples.values() for e in examples) == any(
        len(ids) <= 10 for ids in changed.values()
    )
    printed = report.as_dict()
    assert printed["examples"] == report.examples and printed["transition_fraud"] == report.transition_fraud


def test_quality_against_labels(api: Api) -> None:
    for p in traffic(300):
        api.score(p)
    with api.engine.db.connect() as conn:
        rows = conn.execute(select(m.Event.event_id, m.Event.decision)).all()
    blocked = [event_id for event_id, decision in rows if decision == "block"]
    assert blocked, "the traffic should have some blocks"
    api.engine.record_labels([(e, "chargeback", None) for e in blocked], source="test")
    report = PolicyWorkflow(api.engine).backtest("payment", DEFAULT, "same", since_s=90 * 86400)
    assert (report.labelled, report.fraud) == (len(blocked), len(blocked))
    assert report.published.block.precision == 1.0
    assert report.published.block.recall == 1.0
    assert report.published.block.false_positive_rate == 0.0


def test_backtest_runs_as_a_job_with_progress(api: Api) -> None:
    for p in traffic(200):
        api.score(p)
    draft = api.client.post(
        "/v1/policies/payment/drafts",
        json={"text": DEFAULT.replace("block at 85", "block at 80")},
        headers=api.headers("analyst"),
    ).json()
    started = api.client.post(
        f"/v1/policies/payment/drafts/{draft['version']}/backtest",
        json={"since": "30d"},
        headers=api.headers("analyst"),
    )
    assert started.status_code == 202
    job_id = started.json()["id"]
    deadline = time.monotonic() + 60
    job: dict[str, Any] = started.json()
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers("analyst")).json()
    assert job["state"] == "done", job
    assert job["result"]["events"] == 200 and job["result"]["draft"]["label"] == "payment:v2"
    assert job["processed"] == 200 and job["target"] == "payment:v2 since 30d"
    listed = api.client.get("/v1/jobs", headers=api.headers("analyst")).json()
    assert [(j["id"], j["state"], j["result"]) for j in listed] == [(job_id, "done", None)]  # reports: by id
    assert (
        api.client.post("/v1/policies/payment/drafts/9/backtest", json={}, headers=api.headers("analyst")).status_code
        == 404
    )
    assert (
        api.client.post(
            f"/v1/policies/payment/drafts/{draft['version']}/backtest",
            json={"since": "soon"},
            headers=api.headers("analyst"),
        ).status_code
        == 422
    )
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 403


def test_jobs_can_be_cancelled(tmp_path: Path, database_url: str) -> None:
    db = make_engine(database_url)
    migrate(db)
    jobs = Jobs(db, heartbeat_s=0.05)
    entered = threading.Event()

    def work(job: Job) -> dict[str, Any]:
        entered.set()
        while not job.cancel.wait(0.01):
            job.processed += 1
        raise Cancelled()

    try:
        job = jobs.start("backtest", work, "payment:v2 since 1d", "key:k1")
        assert entered.wait(10)
        deadline = time.monotonic() + 10
        while (jobs.get(job["id"]) or {})["processed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # the heartbeat writes the progress as it goes
        running = jobs.get(job["id"])
        assert running is not None and running["state"] == "running" and running["processed"] > 0
        assert jobs.cancel(job["id"]) is not None
        ended = jobs.wait(job["id"], 10)
        assert ended is not None and ended["state"] == "cancelled" and ended["finished_at"] is not None
        assert ended["processed"] >= running["processed"] and ended["started_by"] == "key:k1"
        assert jobs.cancel("backtest_nope") is None and jobs.get("backtest_nope") is None
    finally:
        db.dispose()


def test_a_job_is_seen_and_cancelled_from_another_worker(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    h = a.headers("analyst")
    started = threading.Event()
    try:
        for p in traffic(50):
            a.score(p)
        draft = a.client.post("/v1/policies/payment/drafts", json={"text": STRICTER}, headers=h).json()
        backtest = a.client.app.state.jobs  # type: ignore[attr-defined]
        backtest.heartbeat_s = 0.05

        def slow(job: Job) -> dict[str, Any]:  # a backtest that runs until it is told to stop
            started.set()
            while not job.cancel.wait(0.01):
                job.processed += 1
            raise Cancelled()

        job = backtest.start("backtest", slow, "payment:v2 since 30d", "key:a")
        assert started.wait(10)
        seen = b.client.get(f"/v1/jobs/{job['id']}", headers=h)  # worker b never ran it
        assert seen.status_code == 200 and seen.json()["state"] == "running"
        assert [j["id"] for j in b.client.get("/v1/jobs", headers=h).json()] == [job["id"]]
        assert b.client.delete(f"/v1/jobs/{job['id']}", headers=h).status_code == 202  # b asks; a's job stops
        ended = b.client.app.state.jobs.wait(job["id"], 10)  # type: ignore[attr-defined]
        assert ended["state"] == "cancelled" and ended["processed"] > 0

        real = a.client.post(
            f"/v1/policies/payment/drafts/{draft['version']}/backtest", json={"since": "30d"}, headers=h
        ).json()
        done = b.client.app.state.jobs.wait(real["id"], 60)  # type: ignore[attr-defined]
        assert done["state"] == "done" and done["result"]["events"] == 50
        report = b.client.get(f"/v1/jobs/{real['id']}", headers=h).json()
        assert report["result"] == done["result"] and report["started_by"].startswith("key:")
        listed = b.client.get("/v1/jobs", headers=h).json()
        assert [(j["id"], j["result"]) for j in listed] == [(real["id"], None), (job["id"], None)]
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_a_job_whose_worker_died_is_shown_as_failed(tmp_path: Path, database_url: str) -> None:
    db = make_engine(database_url)
    migrate(db)
    try:
        silent = datetime.now(UTC) - timedelta(seconds=LOST_AFTER_S + 5)
        with Session(db) as s:  # what a worker killed mid-backtest leaves: running, its heartbeat stale
            dead = stored_jobs.new_record("backtest_dead", "backtest", "payment:v2 since 30d", "key:k1", silent)
            dead.processed = 4000
            s.add(dead)
            s.commit()
        view = Jobs(db).get("backtest_dead")
        assert view is not None and view["state"] == "failed" and "stopped before it finished" in view["error"]
        assert view["processed"] == 4000
        assert [j["state"] for j in Jobs(db).recent()] == ["failed"]
    finally:
        db.dispose()


def embedded_home_with_traffic(tmp_path: Path, n: int) -> Path:
    """An embedded home (SQLite under it, as the CLI opens it) holding ``n`` scored payments of ``traffic``."""
    home = tmp_path / "var"
    client, api = open_api(make_settings(home, f"sqlite:///{home / 'risk_engine.db'}"))
    try:
        for p in traffic(n):
            api.score(p)
    finally:
        client.__exit__(None, None, None)
    return home


def test_rules_backtest_command_ends_with_json(tmp_path: Path) -> None:
    embedded_home_with_traffic(tmp_path, 120)
    draft = tmp_path / "draft.rules"
    draft.write_text(DEFAULT.replace("challenge at 35", "challenge at 10").replace("review at 60", "review at 30"))
    result = run_cli("rules", "backtest", str(draft), "--since", "7d", home=tmp_path / "var")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["events"] == 120 and figures["live_mismatches"] == 0
    assert figures["changed"] > 0
    lines = result.stdout.splitlines()
    for transition, count in figures["transitions"].items():  # each change, with the events to open
        latest = ", ".join(e["event_id"] for e in figures["examples"][transition])
        printed = f"{count} ({figures['transition_fraud'][transition]} labelled fraud), latest: {latest}"
        assert any(line.split() == [transition, *printed.split()] for line in lines), (transition, lines)


def test_a_job_running_when_its_worker_shuts_down_is_recorded_as_failed(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    started = threading.Event()

    def endless(job: Job) -> dict[str, Any]:
        started.set()
        while not job.cancel.wait(0.01):
            job.processed += 1
        raise Cancelled()

    try:
        job = a.client.app.state.jobs.start("backtest", endless, "payment:v2 since 30d", "key:a")  # type: ignore[attr-defined]
        assert started.wait(10)
        client_a.__exit__(None, None, None)  # worker a stops: its job must not look like it runs on
        ended = b.client.get(f"/v1/jobs/{job['id']}", headers=b.headers("analyst")).json()
        assert ended["state"] == "failed" and ended["error"] == "its worker shut down before it finished"
    finally:
        client_b.__exit__(None, None, None)


def test_rules_evaluate_command_tries_a_file_on_one_stored_event(tmp_path: Path) -> None:
    home = embedded_home_with_traffic(tmp_path, 30)
    event_id = traffic(30)[-1]["payment_id"]
    client, api = open_api(make_settings(home, f"sqlite:///{home / 'risk_engine.db'}"))
    try:
        live = api.client.get(f"/v1/payments/{event_id}", headers=api.headers()).json()["decision"]
    finally:
        client.__exit__(None, None, None)
    draft = tmp_path / "draft.rules"
    draft.write_text(DEFAULT)
    result = run_cli("rules", "evaluate", str(draft), event_id, home=tmp_path / "var")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert (answer["decision"], answer["score"]) == (live["decision"], live["score"])  # same rules, same windows
    assert [r["code"] for r in answer["reasons"]] == answer["live"]["rule_codes"]
    draft.write_text(DEFAULT + "\nrule every_payment {\n  when amount.value >= 0\n  then block, reason EVERY\n}\n")
    stricter = run_cli("rules", "evaluate", str(draft), event_id, home=tmp_path / "var")
    answer = json.loads(stricter.stdout.strip().splitlines()[-1])
    assert answer["decision"] == "block" and answer["reasons"][0]["code"] == "EVERY"
    assert f"{draft.name}: block" in stricter.stdout
    missing = run_cli("rules", "evaluate", str(draft), "nope", home=tmp_path / "var")
    assert missing.returncode == 1 and "no payment nope" in missing.stderr


def test_a_failed_job_keeps_no_driver_text(tmp_path: Path, database_url: str) -> None:
    db = make_engine(database_url)
    migrate(db)

    def failing(job: Job) -> dict[str, Any]:  # a driver error quotes the statement's parameters
        raise OperationalError("SELECT ... WHERE email = ?", ("li.wei@example.com",), Exception("disk I/O error"))

    def broken(job: Job) -> dict[str, Any]:
        raise ValueError("no detector fits")

    try:
        jobs = Jobs(db)
        driver = jobs.wait(jobs.start("backtest", failing)["id"], 10)
        other = jobs.wait(jobs.start("backtest", broken)["id"], 10)
        assert driver is not None and (driver["state"], driver["error"]) == ("failed", "OperationalError")
        assert other is not None and other["error"] == "ValueError: no detector fits"
    finally:
        db.dispose()
