"""Restart keeps decisions, velocity and model state; outages answer 503 and leave nothing half-written."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import create_engine, func, select, text

import risk_engine.engine as engine_module
from risk_engine.engine import RiskEngine
from risk_engine.payments import PaymentIn
from risk_engine.service.errors import UNAVAILABLE, UNCONFIRMED
from risk_engine.storage import models as m
from tests.conftest import BASE_REVIEW, REPO, make_settings, open_api, payment
from tests.helpers import TcpProxy, wait_until, writes_blocked

CARD_AGG = "count(by payment_method.card_fingerprint within 1h)"


def traffic(n: int, start: int = 0) -> list[dict[str, Any]]:
    """Varied payments, one a minute, over a handful of cards, buyers and devices."""
    out = []
    for i in range(start, start + n):
        out.append(
            payment(
                **{
                    "payment_id": f"t{i}",
                    "occurred_at": f"2026-11-22T{8 + i // 60:02d}:{i % 60:02d}:00Z",
                    "amount.value": 1_000 + (i * 7919) % 300_000,
                    "buyer.id": f"b{i % 23}",
                    "payment_method.card_fingerprint": f"fp{i % 17}",
                    "device.id": f"d{i % 11}",
                    "item_count": 1 + i % 4,
                    "attributes": {"V1": ((i * 37) % 100) / 10.0, "V2": ((i * 53) % 100) / 25.0},
                }
            )
        )
    return out


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k != "elapsed_ms"}


def run_control(tmp_path: Path, payments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same traffic through a service that never restarts."""
    client, api = open_api(make_settings(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}"))
    try:
        return [comparable(api.score(p)) for p in payments]
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("snapshot_state", ["clean", "crashed", "tampered", "missing"])
def test_restart_keeps_decisions_velocity_and_model_state(
    tmp_path: Path, database_url: str, snapshot_state: str, caplog: pytest.LogCaptureFixture
) -> None:
    before, after = traffic(240), traffic(30, start=240)
    expected = run_control(tmp_path, before + after)[len(before) :]

    settings = make_settings(tmp_path / "var", database_url, snapshot_every=100)
    client, api = open_api(settings)
    snapshot = settings.snapshot_dir / "payment_anomaly.snapshot"
    first = [api.score(p) for p in before]
    api.engine.flush_snapshots()
    shutil.copy(snapshot, tmp_path / "at-200.snapshot")  # written after the 200th payment
    client.__exit__(None, None, None)

    if snapshot_state == "crashed":  # as if the process died after the snapshot at 200
        shutil.copy(tmp_path / "at-200.snapshot", snapshot)
    elif snapshot_state == "tampered":
        blob = bytearray(snapshot.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        snapshot.write_bytes(bytes(blob))
    elif snapshot_state == "missing":
        snapshot.unlink()

    caplog.set_level(logging.INFO)
    client, api = open_api(settings)
    try:
        if snapshot_state == "tampered":
            assert "REFUSED detector snapshot" in caplog.text
        stored = api.client.get("/v1/payments/t5", headers=api.headers()).json()
        assert stored["decision"] == first[5]
        replay = api.score(before[7])
        assert replay == first[7]  # idempotent across the restart
        got = [comparable(api.score(p)) for p in after]
        assert got == expected  # velocity and detector state exactly as if never restarted
        probe = api.client.get(f"/v1/payments/{after[0]['payment_id']}", headers=api.headers()).json()
        assert probe["aggregates"][CARD_AGG] > 0
        models = api.client.get("/v1/models", headers=api.headers()).json()
        assert models[0]["events_seen"] == len(before) + len(after)
    finally:
        client.__exit__(None, None, None)


def test_a_worker_that_died_before_its_first_snapshot_has_its_events_learned_by_the_next(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first worker stops cleanly; the second scores and dies before the detectors' snapshot that comes every
    # thousand events; the third must learn the second one's events as if nobody had died, as velocity does
    before, during, after = traffic(100), traffic(60, start=100), traffic(30, start=160)
    expected = run_control(tmp_path, before + during + after)[len(before) + len(during) :]

    settings = make_settings(tmp_path / "var", database_url, snapshot_every=1_000)
    client, api = open_api(settings)
    for p in before:
        api.score(p)
    client.__exit__(None, None, None)

    client, api = open_api(settings)
    for p in during:
        api.score(p)
    api.engine.flush_snapshots()  # whatever this worker wrote by now is on disk
    # it dies: its stop writes nothing (its events are committed, as a crash leaves them)
    monkeypatch.setattr(api.engine, "snapshot_detectors", lambda background=False: None)
    monkeypatch.setattr(api.engine, "_write_state_snapshot", lambda: None)
    client.__exit__(None, None, None)

    client, api = open_api(settings)
    try:
        models = {m["name"]: m for m in api.client.get("/v1/models", headers=api.headers()).json()}
        assert models["payment_anomaly"]["events_seen"] == len(before) + len(during)
        got = [comparable(api.score(p)) for p in after]
        assert got == expected  # velocity and detector state exactly as if nobody had died
    finally:
        client.__exit__(None, None, None)

    client, api = open_api(settings)  # and a clean restart after that learns nothing twice
    try:
        models = {m["name"]: m for m in api.client.get("/v1/models", headers=api.headers()).json()}
        assert models["payment_anomaly"]["events_seen"] == len(before) + len(during) + len(after)
    finally:
        client.__exit__(None, None, None)


def test_database_outage_on_sqlite_is_503_and_nothing_is_half_written(tmp_path: Path) -> None:
    db_path = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_path}", db_busy_timeout_s=0.2)
    client, api = open_api(settings)
    try:
        api.score(payment(payment_id="ok1", occurred_at="2026-11-22T10:00:00Z"))
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")
        down = api.client.post(
            "/v1/payments/score",
            json=payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"),
            headers=api.headers(),
        )
        assert down.status_code == 503
        assert down.json()["error"] == "unavailable"
        assert "decision" not in down.json()
        locker.rollback()
        locker.close()
        again = api.score(payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"))
        assert again["payment_id"] == "p2"
        api.score(payment(payment_id="p3", occurred_at="2026-11-22T10:02:00Z"))
        stored = api.client.get("/v1/payments/p3", headers=api.headers()).json()
        assert stored["aggregates"][CARD_AGG] == 2  # ok1 and p2 once, the failed attempt not at all
        with api.engine.db.connect() as conn:
            assert conn.execute(select(func.count()).select_from(m.Event)).scalar_one() == 3
    finally:
        client.__exit__(None, None, None)


def test_a_replay_waits_on_its_payments_write_and_a_committed_answer_keeps_nothing_tracked(tmp_path: Path) -> None:
    """A replay of a payment whose write is in flight shares that write's outcome (here a failure, never a
    made-up success); once committed, the remembered answer and the order keep no ticket and nothing the garbage
    collector must walk (tens of thousands of them made its pauses tens of milliseconds)."""
    import gc

    from risk_engine.payments import PaymentIn

    db_path = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_path}", db_busy_timeout_s=0.5, follow_poll_s=0)
    client, api = open_api(settings)
    engine = api.engine
    try:
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")  # the write waits, then fails
        body = PaymentIn.model_validate(payment(payment_id="held", order_id="o_held"))
        first = engine.score_payment(body)
        twin = engine.score_payment(body)
        assert twin.replayed and twin.committed is first.committed  # the same write, still in flight
        assert first.committed.exception(10) is not None
        with pytest.raises(Exception):  # noqa: B017 - the write's own error, as the first caller gets it
            twin.raise_if_not_stored()
        locker.rollback()
        locker.close()
        again = engine.score_payment(body)  # the failed answer was forgotten: scored anew, and stored
        assert not again.replayed and again.committed.exception(10) is None
        replay = engine.score_payment(body)
        assert replay.replayed and replay.committed.done() and replay.committed.exception() is None
        assert engine._in_flight == {}
        gc.collect()
        assert not gc.is_tracked(engine._recent["payment\x1fheld"])
        assert not gc.is_tracked(engine.marketplace.orders["o_held"])
    finally:
        client.__exit__(None, None, None)


def test_a_failed_write_never_waits_for_the_state_lock_and_its_event_is_taken_back_out(tmp_path: Path) -> None:
    """A policy swap or a rebuild of the cross-subject state waits for the writer with the state lock held. A write
    that fails meanwhile must not need that lock to be undone (the barrier would wait for good); its event still
    leaves velocity before the next payment is scored, and a retry is scored anew."""
    from risk_engine.payments import PaymentIn

    db_path = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_path}", db_busy_timeout_s=0.3, follow_poll_s=0)
    client, api = open_api(settings)
    engine = api.engine
    try:
        api.score(payment(payment_id="first", occurred_at="2026-11-22T10:00:00Z"))
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")
        lost = PaymentIn.model_validate(payment(payment_id="lost", occurred_at="2026-11-22T10:01:00Z"))
        outcome = engine.score_payment(lost)
        with engine._lock:
            assert engine.writer.barrier().wait(10)  # the failed batch's callbacks ran without the lock
            assert outcome.committed.exception() is not None
        locker.rollback()
        locker.close()
        api.score(payment(payment_id="next", occurred_at="2026-11-22T10:02:00Z"))
        stored = api.client.get("/v1/payments/next", headers=api.headers()).json()
        assert stored["aggregates"][CARD_AGG] == 1  # "first" only: the lost one was taken back out
        retry = engine.score_payment(lost)
        assert not retry.replayed and retry.committed.exception(10) is None
        assert engine._retractions == deque() and engine._in_flight == {}
    finally:
        client.__exit__(None, None, None)


def test_a_failed_payment_write_takes_its_order_back_out_without_rebuilding_the_cross_subject_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payment's only cross-subject effect is the order it places. When its write fails, that order is taken
    back out (the one before restored) rather than the whole state rebuilt from storage, which reads every
    review and merchant event and 180 days of payments with scoring stopped: a database hiccup, or a retry that
    collided with another worker's row, must not stall a large deployment. If the order changed since, the
    state is rebuilt as before, beside scoring."""
    db_path = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_path}", db_busy_timeout_s=0.3, follow_poll_s=0)
    client, api = open_api(settings)
    engine = api.engine
    rebuilds: list[int] = []
    rebuild = engine._rebuilt_marketplace
    monkeypatch.setattr(engine, "_rebuilt_marketplace", lambda *a, **k: rebuilds.append(1) or rebuild(*a, **k))

    def fail_to_store(body: dict[str, Any]) -> None:
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            outcome = engine.score_payment(PaymentIn.model_validate(body))
            assert outcome.committed.exception(10) is not None
        finally:
            locker.rollback()
            locker.close()

    def order(order_id: str) -> tuple[Any, ...] | None:
        return engine.marketplace.orders.get(order_id)

    try:
        api.score(payment(payment_id="p_1", order_id="o_1", occurred_at="2026-11-22T10:00:00Z"))
        first = order("o_1")
        fail_to_store(payment(payment_id="p_lost", order_id="o_lost", occurred_at="2026-11-22T10:01:00Z"))
        fail_to_store(
            payment(payment_id="p_again", order_id="o_1", seller_id="s_9", occurred_at="2026-11-22T10:02:00Z")
        )
        # p_lost's failure was applied as p_again was scored; p_again's order stands until the next scoring
        assert order("o_lost") is None and order("o_1") != first
        api.score(payment(payment_id="p_2", order_id="o_2", occurred_at="2026-11-22T10:03:00Z"))
        assert order("o_lost") is None and order("o_1") == first and order("o_2") is not None
        assert rebuilds == []
        assert engine._rebuilt_marketplace() is not None and rebuilds == [1]  # (the wrapper counts)
        assert engine.marketplace.orders == rebuild().orders  # what a rebuild from storage holds
        # the order changed after the payment that failed placed it: rebuilt, as before (beside scoring)
        rebuilds.clear()
        fail_to_store(payment(payment_id="p_3", order_id="o_3", occurred_at="2026-11-22T10:04:00Z"))
        engine.marketplace.orders["o_3"] = (*engine.marketplace.orders["o_3"],)  # as a shipping update does
        api.score(payment(payment_id="p_4", order_id="o_4", occurred_at="2026-11-22T10:05:00Z"))
        assert engine._marketplace_rebuilt.wait(10)
        assert rebuilds == [1] and order("o_3") is None and order("o_4") is not None
    finally:
        client.__exit__(None, None, None)


def test_a_failed_review_write_has_the_cross_subject_state_rebuilt_beside_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's write that fails leaves its effects in the cross-subject state (a text in the seller's ring,
    here): the state is rebuilt from storage, which reads every review and merchant event and 180 days of
    payments. It used to be rebuilt under the state lock at the next scoring, every scoring waiting minutes at
    a large deployment's volume; it is rebuilt beside scoring now, and what was scored meanwhile is in it."""
    from risk_engine.merchants import MerchantEventIn
    from risk_engine.reviews import ReviewIn

    db_path = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_path}", db_busy_timeout_s=0.3, follow_poll_s=0)
    client, api = open_api(settings)
    engine = api.engine
    release, started = threading.Event(), threading.Event()
    rebuild = engine._rebuilt_marketplace

    def paused(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(30)
        return rebuild(*args, **kwargs)

    try:
        api.score(payment(payment_id="p_1", order_id="o_1", occurred_at="2026-11-22T10:00:00Z"))
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            lost = engine.score_event("review", ReviewIn.model_validate(BASE_REVIEW))
            assert lost.committed.exception(10) is not None
        finally:
            locker.rollback()
            locker.close()
        assert engine.marketplace.texts["s_42"].count == 1  # it learned from the review that was not stored
        monkeypatch.setattr(engine, "_rebuilt_marketplace", paused)
        api.score(payment(payment_id="p_2", order_id="o_2", occurred_at="2026-11-22T11:01:00Z"))  # starts it
        assert started.wait(10) and not engine._marketplace_rebuilt.is_set()
        api.score(payment(payment_id="p_3", order_id="o_3", occurred_at="2026-11-22T11:02:00Z"))  # meanwhile
        shipped = MerchantEventIn(
            event_id="m_1", occurred_at="2026-11-22T11:03:00Z", seller_id="s_42", type="order_shipped", order_id="o_3"
        )
        assert engine.score_event("merchant", shipped).committed.exception(10) is None  # a credit fact, meanwhile
        assert engine.marketplace.orders.get("o_3") is not None
        release.set()
        assert engine._marketplace_rebuilt.wait(10)
        fresh = rebuild()  # from every stored event
        assert engine.marketplace.orders == fresh.orders and {"o_1", "o_2", "o_3"} <= set(fresh.orders)
        assert engine.marketplace.facts["s_42"].t == fresh.facts["s_42"].t  # each event counted once
        assert engine.marketplace.facts["s_42"].t.completed == 1
        assert "s_42" not in engine.marketplace.texts  # the lost review's text is gone
        assert engine.score_event("review", ReviewIn.model_validate(BASE_REVIEW)).committed.exception(10) is None
    finally:
        release.set()
        client.__exit__(None, None, None)


def test_a_payment_whose_write_could_not_be_queued_fails_its_replays_too_and_counts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is remembered before the row is sealed and queued. If that fails, the remembered answer's
    ticket fails with it, as a failed write's does: the answer is forgotten, so a replay is scored anew instead of
    waiting for a write that never comes, and the event leaves velocity."""
    from risk_engine.payments import PaymentIn

    client, api = open_api(make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", follow_poll_s=0))
    engine = api.engine
    try:
        api.score(payment(payment_id="first", occurred_at="2026-11-22T10:00:00Z"))
        body = PaymentIn.model_validate(payment(payment_id="unsealed", occurred_at="2026-11-22T10:01:00Z"))
        seal = engine.vault.seal

        def broken_seal(fields: Any, associated: str) -> Any:
            raise OSError("no entropy")

        monkeypatch.setattr(engine.vault, "seal", broken_seal)
        with pytest.raises(OSError):
            engine.score_payment(body)
        monkeypatch.setattr(engine.vault, "seal", seal)
        again = engine.score_payment(body)  # forgotten with its failure: scored anew, and stored
        assert not again.replayed and again.committed.exception(10) is None
        stored = api.client.get("/v1/payments/unsealed", headers=api.headers()).json()
        assert stored["aggregates"][CARD_AGG] == 1  # "first" only: the failed attempt was taken back out
    finally:
        client.__exit__(None, None, None)


def test_every_write_refused_by_the_database_is_a_503_and_leaves_nothing(tmp_path: Path) -> None:
    db_path = tmp_path / "risk.db"
    client, api = open_api(make_settings(tmp_path / "var", f"sqlite:///{db_path}", db_busy_timeout_s=0.2))
    policy = (REPO / "rules" / "payment.rules").read_text()
    analyst, admin = api.headers("analyst"), api.headers("admin")
    try:
        api.score(payment(payment_id="ok1"))
        assert (
            api.client.post("/v1/policies/payment/drafts", json={"text": policy + "\n"}, headers=analyst).status_code
            == 201
        )
        with api.engine.db.connect() as conn:
            audited = conn.execute(select(func.count()).select_from(m.AuditEntry)).scalar_one()
            versions = conn.execute(select(func.count()).select_from(m.PolicyVersion)).scalar_one()
        writes = [
            ("POST", "/v1/lists/blocked_devices/entries", {"value": "dev_z"}, analyst),
            ("POST", "/v1/policies/payment/drafts", {"text": policy + "\n\n"}, analyst),
            ("POST", "/v1/policies/payment/versions/2/publish", None, analyst),
            ("POST", "/v1/policies/payment/drafts/2/backtest", {"since": "1d"}, analyst),
            ("POST", "/v1/labels", {"label_id": "l1", "payment_id": "ok1", "label": "chargeback"}, api.headers()),
            ("POST", "/v1/keys", {"role": "scorer", "name": "checkout", "request_id": "req_1"}, admin),
        ]
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")  # every write now fails as on a full disk or a lost server
        for method, path, body, headers in writes:
            refused = api.client.request(method, path, json=body, headers=headers)
            assert refused.status_code == 503, (path, refused.status_code, refused.text)
            assert refused.json()["error"] == "unavailable" and refused.headers["Retry-After"] == "1"
        locker.rollback()
        locker.close()
        with api.engine.db.connect() as conn:  # nothing of the refused writes was kept
            assert conn.execute(select(func.count()).select_from(m.AuditEntry)).scalar_one() == audited
            assert conn.execute(select(func.count()).select_from(m.JobRecord)).scalar_one() == 0
            assert conn.execute(select(func.count()).select_from(m.Label)).scalar_one() == 0
            assert conn.execute(select(func.count()).select_from(m.PolicyVersion)).scalar_one() == versions
        for method, path, body, headers in writes:  # and each goes through once the database is back
            assert api.client.request(method, path, json=body, headers=headers).status_code in (200, 201, 202), path
    finally:
        client.__exit__(None, None, None)


def test_database_outage_on_postgres_is_503_and_nothing_is_half_written(tmp_path: Path, pg_schema_url: str) -> None:
    parts = urlsplit(pg_schema_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    proxied = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    client, api = open_api(make_settings(tmp_path / "var", proxied, db_busy_timeout_s=1))
    try:
        api.score(payment(payment_id="ok1", occurred_at="2026-11-22T10:00:00Z"))
        proxy.cut()
        down = api.client.post(
            "/v1/payments/score",
            json=payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"),
            headers=api.headers(),
        )
        assert down.status_code == 503
        assert api.client.get("/healthz").status_code == 503
        for path in ("/v1/audit", "/v1/jobs", "/v1/payments/ok1"):  # reads, too, say so rather than fail
            assert api.client.get(path, headers=api.headers("analyst")).status_code == 503, path
        proxy.start()
        api.score(payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"))
        api.score(payment(payment_id="p3", occurred_at="2026-11-22T10:02:00Z"))
        stored = api.client.get("/v1/payments/p3", headers=api.headers()).json()
        assert stored["aggregates"][CARD_AGG] == 2
    finally:
        client.__exit__(None, None, None)
        proxy.cut()
    direct = create_engine(pg_schema_url)
    with direct.connect() as conn:
        assert conn.execute(text("select count(*) from events")).scalar_one() == 3
    direct.dispose()


HANG = 60  # s: how long a request may go unanswered before the test calls it hung (never reached when it passes)


def lock_awaited(db: Any, table: str) -> bool:
    """Whether a PostgreSQL session waits for a lock on ``table``."""
    with db.connect() as conn:
        waiting = "select count(*) from pg_locks where not granted and relation = to_regclass(:table)"
        return bool(conn.execute(text(waiting), {"table": table}).scalar_one())


def answer_within_hang(
    api: Any, body: dict[str, Any], path: str = "/v1/payments/score", headers: dict[str, str] | None = None
) -> Any:
    """Post ``body`` (a payment unless ``path`` says otherwise) from a thread of its own, and its answer, which
    must come before ``HANG`` seconds (so that a request left waiting fails the test rather than hanging it with
    the database still blocked)."""
    out: dict[str, Any] = {}

    def post() -> None:
        out["response"] = api.client.post(path, json=body, headers=headers or api.headers())

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    thread.join(HANG)
    assert "response" in out, f"the request to {path} waited for as long as the database was blocked"
    return out["response"]


def test_a_write_waiting_for_a_lock_fails_after_the_busy_timeout_and_counts_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """A write that waits for another client's lock gives up after the busy timeout: a 503 saying nothing was
    stored, and the payment scored anew once the lock is gone. On PostgreSQL it used to wait as long as the
    lock was held, and the request with it."""
    client, api = open_api(make_settings(tmp_path / "var", database_url, db_busy_timeout_s=1, commit_wait_s=HANG))
    try:
        api.score(payment(payment_id="ok1", occurred_at="2026-11-22T10:00:00Z"))
        body = payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z")
        with writes_blocked(database_url):
            refused = answer_within_hang(api, body)
            assert refused.status_code == 503 and refused.json()["message"] == UNAVAILABLE, refused.text
        again = api.client.post("/v1/payments/score", json=body, headers=api.headers())
        assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers  # scored anew, once
        stored = api.client.get("/v1/payments/p2", headers=api.headers()).json()
        assert stored["aggregates"][CARD_AGG] == 1  # ok1 only: the refused attempt was taken back out
    finally:
        client.__exit__(None, None, None)


def test_a_payment_decided_while_a_failing_write_was_counted_is_not_stored_with_that_count(
    tmp_path: Path, database_url: str
) -> None:
    """A payment is decided with the payments before it counted, their writes still queued. When one of those
    fails, a payment decided before it was taken back out counted a payment never stored: its write fails too
    (503), and its retry is decided without it. It used to be stored, its windows counting the lost payment."""
    settings = make_settings(tmp_path / "var", database_url, db_busy_timeout_s=1, commit_wait_s=HANG, follow_poll_s=0)
    client, api = open_api(settings)
    engine = api.engine
    try:
        api.score(payment(payment_id="first", occurred_at="2026-11-22T10:00:00Z"))
        lost_body = payment(payment_id="lost", occurred_at="2026-11-22T10:01:00Z")
        counted_body = payment(payment_id="counted", occurred_at="2026-11-22T10:02:00Z")
        with writes_blocked(database_url):
            lost = engine.score_payment(PaymentIn.model_validate(lost_body))
            assert wait_until(lambda: engine.writer.writing_since is not None, timeout=10)
            counted = engine.score_payment(PaymentIn.model_validate(counted_body))  # queued behind the stall
            assert counted.response["payment_id"] == "counted"
            assert lost.committed.exception(30) is not None
        # the lock is gone before the writer's next batch gives up on it: that write could commit now
        assert counted.committed.exception(30) is not None, "stored with the lost payment counted"
        for body, before in ((lost_body, 1), (counted_body, 2)):  # each retry decided anew, on what is stored
            again = api.client.post("/v1/payments/score", json=body, headers=api.headers())
            assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers, again.text
            stored = api.client.get(f"/v1/payments/{body['payment_id']}", headers=api.headers()).json()
            assert stored["aggregates"][CARD_AGG] == before  # "first", then "first" and "lost"
        assert engine._retractions == deque() and engine._in_flight == {}
    finally:
        client.__exit__(None, None, None)


def test_an_analysts_write_waiting_for_a_lock_fails_after_the_busy_timeout_and_stores_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """A list edit or a label that waits for another client's lock gives up after the busy timeout, as a scoring
    write does: a 503, nothing stored, and the same request done once the lock is gone. On PostgreSQL only the
    group commits had a lock timeout, and these waited as long as the lock was held."""
    client, api = open_api(make_settings(tmp_path / "var", database_url, db_busy_timeout_s=1, commit_wait_s=HANG))
    try:
        api.score(payment(payment_id="p1"))
        writes = (
            ("/v1/lists/blocked_devices/entries", {"value": "dev_locked_out"}),
            ("/v1/labels", {"label_id": "lbl_1", "payment_id": "p1", "label": "chargeback", "source": "issuer"}),
        )

        def stored() -> tuple[int, int]:
            with api.engine.db.connect() as conn:
                entries = conn.execute(select(func.count()).select_from(m.ListEntry)).scalar_one()
                return entries, conn.execute(select(func.count()).select_from(m.Label)).scalar_one()

        before = stored()
        with writes_blocked(database_url, "list_entries", "labels"):
            for path, body in writes:
                refused = answer_within_hang(api, body, path, api.headers("analyst"))
                assert refused.status_code == 503 and refused.json()["message"] == UNAVAILABLE, refused.text
        assert stored() == before
        for path, body in writes:
            done = api.client.post(path, json=body, headers=api.headers("analyst"))
            assert done.status_code == 201, done.text
        assert stored() == (before[0] + 1, before[1] + 1)
    finally:
        client.__exit__(None, None, None)


def test_a_request_whose_idempotency_key_waits_for_the_database_holds_up_no_other_request(
    tmp_path: Path, pg_schema_url: str
) -> None:
    """The ``Idempotency-Key`` layer claims and stores its keys off the event loop: while one keyed list edit
    waits for a lock on the keys' table, payments are scored. The claim used to run on the loop, and every
    request of the worker waited with it."""
    client, api = open_api(make_settings(tmp_path / "var", pg_schema_url, db_busy_timeout_s=HANG))
    watcher = create_engine(pg_schema_url)
    try:
        api.score(payment(payment_id="p1"))
        keyed: dict[str, Any] = {}
        headers = {**api.headers("analyst"), "Idempotency-Key": "edit-1"}

        def edit() -> None:
            keyed["response"] = api.client.post(
                "/v1/lists/blocked_devices/entries", json={"value": "dev_9"}, headers=headers
            )

        editor = threading.Thread(target=edit, daemon=True)
        with writes_blocked(pg_schema_url, "idempotency_keys"):
            editor.start()
            assert wait_until(lambda: lock_awaited(watcher, "idempotency_keys"), timeout=HANG)
            scored = answer_within_hang(api, payment(payment_id="p2", occurred_at="2026-11-22T10:20:00Z"))
            assert scored.status_code == 200, scored.text
            assert editor.is_alive() and "response" not in keyed  # still waiting for its claim
        editor.join(HANG)
        assert keyed["response"].status_code == 201, keyed["response"].text
        again = api.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_9"}, headers=headers)
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    finally:
        client.__exit__(None, None, None)
        watcher.dispose()


def test_a_request_whose_key_is_read_while_the_database_stalls_holds_up_no_other_request(
    tmp_path: Path, pg_schema_url: str
) -> None:
    """A key not read in the last few seconds is read off the event loop: while a request with a new key waits
    for the keys' table, a payment with a key read lately is scored. The read used to run on the loop, and
    every request of the worker waited with it."""
    from risk_engine.api_keys import create_api_key

    client, api = open_api(make_settings(tmp_path / "var", pg_schema_url, db_busy_timeout_s=HANG))
    watcher = create_engine(pg_schema_url)
    try:
        api.score(payment(payment_id="p1"))  # the admin key is read, and cached
        new_key, _ = create_api_key(api.engine.db, "scorer", "new")
        waited: dict[str, Any] = {}

        def score_with_new_key() -> None:
            body = payment(payment_id="p_new", occurred_at="2026-11-22T10:10:00Z")
            headers = {"Authorization": f"Bearer {new_key}"}
            waited["response"] = api.client.post("/v1/payments/score", json=body, headers=headers)

        newcomer = threading.Thread(target=score_with_new_key, daemon=True)
        with watcher.connect() as locker:
            locker.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            newcomer.start()
            assert wait_until(lambda: lock_awaited(watcher, "api_keys"), timeout=HANG)
            scored = answer_within_hang(api, payment(payment_id="p2", occurred_at="2026-11-22T10:20:00Z"))
            assert scored.status_code == 200, scored.text
            assert newcomer.is_alive() and "response" not in waited  # its key still being read
            locker.rollback()
        newcomer.join(HANG)
        assert waited["response"].status_code == 200, waited["response"].text
    finally:
        client.__exit__(None, None, None)
        watcher.dispose()


def test_an_answer_waits_for_its_commit_at_most_commit_wait_s_and_a_retry_gets_the_write_once_it_lands(
    tmp_path: Path, database_url: str
) -> None:
    """A database that stalls without failing: the scoring answer stops waiting after ``commit_wait_s`` (a 503
    saying the write may still land), ``/healthz`` turns 503 while the commit waits, a retry meanwhile is not
    scored again, a new payment is refused outright (counted nowhere), and once the stall ends the retry gets
    the stored answer."""
    settings = make_settings(tmp_path / "var", database_url, db_busy_timeout_s=HANG, commit_wait_s=1.0)
    client, api = open_api(settings)
    try:
        api.score(payment(payment_id="ok1", occurred_at="2026-11-22T10:00:00Z"))
        body = payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z")
        with writes_blocked(database_url):
            pending = answer_within_hang(api, body)
            assert pending.status_code == 503 and pending.json()["message"] == UNCONFIRMED, pending.text
            assert pending.headers["Retry-After"] == "1"

            def unhealthy() -> bool:
                health = api.client.get("/healthz")
                return health.status_code == 503 and health.json()["writes"] is False

            assert wait_until(unhealthy, timeout=HANG)
            assert api.client.get("/healthz").json()["database"] is True  # it answers reads all along
            retry = answer_within_hang(api, body)  # it meets the same pending write
            assert retry.status_code == 503 and retry.json()["message"] == UNCONFIRMED
            later = payment(payment_id="p3", occurred_at="2026-11-22T10:02:00Z")
            refused = answer_within_hang(api, later)  # a new payment, while the writes stall: refused outright
            assert refused.status_code == 503 and refused.json()["message"] == UNAVAILABLE, refused.text
        assert wait_until(lambda: api.client.get("/healthz").status_code == 200, timeout=HANG)
        landed = api.client.post("/v1/payments/score", json=body, headers=api.headers())
        assert landed.status_code == 200 and landed.headers["Idempotent-Replayed"] == "true", landed.text
        stored = api.client.get("/v1/payments/p2", headers=api.headers()).json()
        assert stored["decision"] == landed.json() and stored["aggregates"][CARD_AGG] == 1
        after = api.client.post("/v1/payments/score", json=later, headers=api.headers())
        assert after.status_code == 200 and "Idempotent-Replayed" not in after.headers  # scored now, once
        stored = api.client.get("/v1/payments/p3", headers=api.headers()).json()
        assert stored["aggregates"][CARD_AGG] == 2  # ok1 and p2: the refused attempt counted nothing
        with api.engine.db.connect() as conn:
            assert conn.execute(select(func.count()).select_from(m.Event)).scalar_one() == 3
    finally:
        client.__exit__(None, None, None)


PII = {
    "buyer.email": "zhang.sanfeng@wudang.example",
    "buyer.phone": "+8613912345678",
    "buyer.name": "Zhang Sanfeng",
    "device.ip": "198.51.100.77",
    "shipping_address.line1": "77 Secret Garden Road",
    "payment_method.card_fingerprint": "tok_secret_fingerprint_777",
}


def test_pii_is_never_stored_or_logged_in_clear(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path / "var", database_url)
    client, api = open_api(settings)
    try:
        api.score(payment(payment_id="pii1", **PII))
        api.client.post(
            "/v1/lists/blocked_emails/entries",
            json={"value": "blocked.person@evil.example"},
            headers=api.headers("analyst"),
        )
        api.score(payment(payment_id="pii2", **{**PII, "buyer.email": "blocked.person@evil.example"}))
        # the other subjects' PII: a reviewer's IP, a merchant login's IP
        review = {
            "review_id": "pii_review",
            "occurred_at": "2026-11-22T12:00:00Z",
            "item_id": "i1",
            "seller_id": "s_42",
            "reviewer": {"id": "b_7", "ip": "203.0.113.199"},
            "rating": 4,
        }
        assert api.client.post("/v1/reviews/score", json=review, headers=api.headers()).status_code == 200
        login = {"event_id": "pii_login", "occurred_at": "2026-11-22T12:00:00Z", "type": "login", "ip": "192.0.2.201"}
        assert api.client.post("/v1/merchants/s_42/events", json=login, headers=api.headers()).status_code == 200
        shown = api.client.get("/v1/payments/pii1", headers=api.headers()).text
        shown += api.client.get("/v1/reviews/pii_review", headers=api.headers()).text
    finally:
        client.__exit__(None, None, None)
    secrets = [
        *PII.values(),
        "blocked.person@evil.example",
        "13912345678",
        "Secret Garden",
        "203.0.113.199",
        "192.0.2.201",
    ]
    if database_url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("risk.db*"))
    else:
        engine = create_engine(database_url)
        with engine.connect() as conn:
            tables = [
                r[0] for r in conn.execute(text("select tablename from pg_tables where schemaname = current_schema()"))
            ]
            raw = "\n".join(str(row) for t in tables for row in conn.execute(text(f'select * from "{t}"'))).encode()
        engine.dispose()
        assert b"bi:email:" in raw  # the rows were read
    snapshots = b"".join(p.read_bytes() for p in settings.snapshot_dir.glob("*.snapshot"))
    assert b"RESNAP1" in snapshots and (settings.snapshot_dir / "state.snapshot").exists()
    for secret in secrets:
        assert secret.encode() not in raw, f"{secret} found in the database"
        assert secret.lower().encode() not in snapshots.lower(), f"{secret} found in a state or detector snapshot"
        assert secret.lower().encode() not in raw.lower()
        assert secret not in caplog.text, f"{secret} found in the logs"
        assert secret not in shown, f"{secret} shown unmasked"


def test_delayed_labels_teach_the_supervised_detector_from_stored_vectors_and_survive_restart(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(tmp_path / "var", database_url, snapshot_every=100)
    client, api = open_api(settings)
    payments = traffic(160)
    scored = [api.score(p) for p in payments]
    fraud_ids = {p["payment_id"] for p in payments if p["attributes"]["V1"] > 8}
    probe = payment(
        **{"payment_id": "probe", "occurred_at": "2026-11-22T11:00:30Z", "attributes": {"V1": 9.5, "V2": 3.0}}
    )
    det = api.engine.subjects["payment"].detectors[1]
    assert det.name == "payment_fraud" and det.labels_seen == 0
    score_before = det.score_one(
        api.engine.subjects["payment"]
        .detectors[1]
        .features.compute({"attributes.V1": 9.5, "attributes.V2": 3.0}, {}, {}, {})
    )
    labels = [
        (p["payment_id"], "confirmed_fraud" if p["payment_id"] in fraud_ids else "legitimate", None) for p in payments
    ]
    api.engine.record_labels(labels[:100], source="bank")
    client.__exit__(None, None, None)  # snapshot holds the first 100 labels
    client, api = open_api(settings)
    api.engine.record_labels(labels[100:], source="bank")
    try:
        det = api.engine.subjects["payment"].detectors[1]
        assert det.labels_seen == 160
        x = det.features.compute({"attributes.V1": 9.5, "attributes.V2": 3.0}, {}, {}, {})
        assert det.score_one(x)[1] > score_before[1]  # it learned that high V1 means fraud
        # the stored answers were made before any label arrived: unchanged
        assert api.client.get("/v1/payments/t0", headers=api.headers()).json()["decision"] == scored[0]
        result = api.score(probe)
        assert "MODEL_PAYMENT_FRAUD" in [r["code"] for r in result["reasons"]]
    finally:
        client.__exit__(None, None, None)
    # a third start replays nothing new and lands on the same state
    client, api = open_api(settings)
    try:
        again = api.engine.subjects["payment"].detectors[1]
        assert again.labels_seen == 160
        assert again.score_one(x) == det.score_one(x)
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("state", ["clean", "crashed", "saved_while_serving", "tampered", "other_worker"])
def test_the_state_snapshot_restores_exactly_what_a_full_rebuild_would(
    tmp_path: Path, database_url: str, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Velocity and cross-subject state come back from the last clean stop's snapshot plus the events stored
    after it, by this worker or another; a snapshot that is tampered with is not used."""
    first, second, after = traffic(100), traffic(60, start=100), traffic(30, start=160)
    for p in first + second + after:
        p["order_id"] = "o" + p["payment_id"]  # one order each: the cross-subject state remembers them
    client, control = open_api(make_settings(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}"))
    try:
        expected = [comparable(control.score(p)) for p in first + second + after][len(first) + len(second) :]
        expected_aggregates = [control.engine.get_payment(p["payment_id"])["aggregates"] for p in after]
    finally:
        client.__exit__(None, None, None)
    settings = make_settings(tmp_path / "var", database_url)
    state_file = settings.snapshot_dir / "state.snapshot"

    client, api = open_api(settings)
    [api.score(p) for p in first]
    client.__exit__(None, None, None)  # a clean stop: the state snapshot of 100 events
    at_100 = state_file.read_bytes()

    if state == "other_worker":
        # two workers on one database: a stops cleanly after following b's events, b goes on and then dies
        client_a, api_a = open_api(settings)
        client_b, api_b = open_api(settings)
        for i, p in enumerate(second[:40]):
            (api_a if i % 2 else api_b).score(p)
        client_a.__exit__(None, None, None)
        at_140 = state_file.read_bytes()
        [api_b.score(p) for p in second[40:]]
        client_b.__exit__(None, None, None)
        state_file.write_bytes(at_140)  # b's stop wrote no snapshot: a's remains, b's last 20 are after it
    elif state == "saved_while_serving":
        # saved by the running worker after 30 more events (a forked copy pickles them); then it goes on and dies
        client, api = open_api(settings)
        [api.score(p) for p in second[:30]]
        assert api.engine.save_state_snapshot(wait=True)
        at_130 = state_file.read_bytes()
        [api.score(p) for p in second[30:]]
        client.__exit__(None, None, None)
        state_file.write_bytes(at_130)  # its stop wrote no snapshot: the one saved while serving remains
    else:
        client, api = open_api(settings)
        [api.score(p) for p in second]
        client.__exit__(None, None, None)
        if state == "crashed":  # as if this process died: its stop wrote no snapshot, the one at 100 remains
            state_file.write_bytes(at_100)
        elif state == "tampered":
            blob = bytearray(state_file.read_bytes())
            blob[len(blob) // 2] ^= 0x01
            state_file.write_bytes(bytes(blob))

    caplog.set_level(logging.INFO)
    client, api = open_api(settings)
    try:
        used = "from the state snapshot of" in caplog.text
        assert used == (state != "tampered"), caplog.text
        if state == "crashed":
            assert "state snapshot of 100 events" in caplog.text  # and the 60 stored after it replayed
        if state == "saved_while_serving":
            assert "state snapshot of 130 events" in caplog.text  # and the 30 stored after it replayed
        if state == "other_worker":
            assert "state snapshot of 140 events" in caplog.text  # a's 20 and b's 20 it followed, then b's 20
        if state == "tampered":
            assert "REFUSED state snapshot" in caplog.text
        rebuilt = api.engine._rebuilt_marketplace()  # from every stored event, as with no snapshot
        assert len(rebuilt.orders) > 10  # the orders of the allowed payments
        restored = api.engine.marketplace
        assert (restored.orders, restored.facts, restored.seller_devices, restored.latest, restored.worst_at) == (
            rebuilt.orders,
            rebuilt.facts,
            rebuilt.seller_devices,
            rebuilt.latest,
            rebuilt.worst_at,
        )
        got = [comparable(api.score(p)) for p in after]
        assert [api.engine.get_payment(p["payment_id"])["aggregates"] for p in after] == expected_aggregates
        if state != "other_worker":  # (two workers' detectors each learned only their own events)
            assert got == expected  # decisions, scores and reasons as if the service had never stopped
    finally:
        client.__exit__(None, None, None)


def test_a_state_snapshot_saved_while_serving_is_the_one_a_clean_stop_would_write(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "var", database_url)
    state_file = settings.snapshot_dir / "state.snapshot"
    client, api = open_api(settings)
    try:
        for p in traffic(80):
            p["order_id"] = "o" + p["payment_id"]  # the cross-subject state remembers each order
            api.score(p)
        caplog.set_level(logging.INFO)
        assert api.engine.save_state_snapshot(wait=True)
        assert "saved while serving" in caplog.text
        saved = state_file.read_bytes()
        assert not list(settings.snapshot_dir.glob("*.tmp"))  # the forked copy's scratch file is gone
        scraped = api.client.get("/metrics").text
        assert 'risk_engine_state_saves_total{outcome="saved"} 1.0' in scraped
        assert "risk_engine_state_saved_timestamp_seconds 0.0" not in scraped
    finally:
        client.__exit__(None, None, None)  # a clean stop, with nothing scored since
    assert state_file.read_bytes() == saved  # what the forked copy pickled is what the stop pickled


def test_a_save_while_the_database_takes_no_writes_gives_up_instead_of_holding_up_scoring(tmp_path: Path) -> None:
    # the save waits for the writer under the state lock, where every payment waits with it: only briefly
    db_file = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_file}")
    client, api = open_api(settings)
    try:
        api.score(payment())
        blocker = sqlite3.connect(db_file)
        blocker.execute("BEGIN IMMEDIATE")  # another process's write transaction: the writer waits on it
        try:
            held = api.engine.score_payment(PaymentIn.model_validate(payment(payment_id="held")))
            assert api.engine.save_state_snapshot(wait=True) is False
            assert not (settings.snapshot_dir / "state.snapshot").exists()
            assert 'risk_engine_state_saves_total{outcome="writer_busy"} 1.0' in api.client.get("/metrics").text
        finally:
            blocker.rollback()
            blocker.close()
        held.committed.result(timeout=30)  # the write went through once the database was free
        assert api.engine.save_state_snapshot(wait=True)  # and the next save does
    finally:
        client.__exit__(None, None, None)


def test_the_worker_saves_its_state_while_serving_only_when_it_changed(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=0.1, state_snapshot_every_s=0.2)
    state_file = settings.snapshot_dir / "state.snapshot"
    client, api = open_api(settings)
    try:
        assert not state_file.exists()
        [api.score(p) for p in traffic(20)]
        assert wait_until(state_file.exists, timeout=20), "no state snapshot while serving"

        def saved_all_scored() -> bool:  # a save may come in the middle of the scoring, and one more after it
            engine = api.engine
            scored = (engine._seq, engine._events_read.last)
            return not engine._state_saving.locked() and engine._state_saved_of == scored

        assert wait_until(saved_all_scored, timeout=20)
        saved_at = state_file.stat().st_mtime_ns
        time.sleep(1.0)  # five periods with nothing scored: nothing saved
        assert state_file.stat().st_mtime_ns == saved_at
        api.score(payment(payment_id="one_more", occurred_at="2026-11-22T10:00:30Z"))
        assert wait_until(lambda: state_file.stat().st_mtime_ns != saved_at, timeout=20)
    finally:
        client.__exit__(None, None, None)


def test_workers_started_together_save_their_state_at_different_moments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each save while serving forks a copy of its process, so workers started together (``serve --workers``)
    must not all fork at once, period after period: each one's first save comes at a point of the first period
    of its own drawing, and the next ones a period apart."""
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", state_snapshot_every_s=600)
    engines = [RiskEngine.open(settings) for _ in range(3)]
    try:
        offsets = [engine.state_save_offset_s for engine in engines]
        assert len(set(offsets)) == 3 and all(0.0 <= o <= 600 for o in offsets), offsets
    finally:
        for engine in engines:
            engine.close()
    # the drawn point is where the first save comes: drawn near the period's end, a 30 s period saves at once
    monkeypatch.setattr(engine_module.random, "uniform", lambda low, high: high - 0.2)
    settings = make_settings(
        tmp_path / "var2", f"sqlite:///{tmp_path / 'risk2.db'}", policy_poll_s=0.1, state_snapshot_every_s=30
    )
    client, api = open_api(settings)
    try:
        api.score(payment(payment_id="saved_early"))
        assert wait_until(lambda: api.engine.counters.state_saves.get("saved", 0) >= 1, timeout=20)
    finally:
        client.__exit__(None, None, None)


def test_a_policy_that_needs_new_aggregates_at_start_rebuilds_velocity_not_the_rest(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The rules files changed while the service was stopped: the published policy now names an aggregate the
    snapshot's velocity does not keep, so velocity is rebuilt from storage, exactly, and the rest restored."""
    from tests.conftest import REPO

    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    new_rule = """
rule buyer_week_spend {
  description "Buyer spent over 5,000 in a week"
  when sum(amount.major by buyer.id within 7d) > 5000
  then score +5, reason BUYER_WEEK_SPEND
}
"""
    before, after = traffic(80), traffic(20, start=80)
    control_rules = tmp_path / "control-rules"
    shutil.copytree(REPO / "rules", control_rules)
    (control_rules / "payment.rules").write_text((REPO / "rules" / "payment.rules").read_text() + new_rule)
    client, control = open_api(
        make_settings(tmp_path / "control", f"sqlite:///{tmp_path / 'control.db'}", rules_dir=control_rules)
    )
    try:
        [control.score(p) for p in before]
        expected = [comparable(control.score(p)) for p in after]
        expected_aggregates = [control.engine.get_payment(p["payment_id"])["aggregates"] for p in after]
    finally:
        client.__exit__(None, None, None)

    settings = make_settings(tmp_path / "var", database_url, rules_dir=rules)
    client, api = open_api(settings)
    [api.score(p) for p in before]
    client.__exit__(None, None, None)
    (rules / "payment.rules").write_text((rules / "payment.rules").read_text() + new_rule)
    caplog.set_level(logging.INFO)
    client, api = open_api(settings)
    try:
        assert "from the state snapshot of 80 events" in caplog.text  # used, for what it still fits
        assert "sum(amount.major by buyer.id within 1w)" in expected_aggregates[0]
        got = [comparable(api.score(p)) for p in after]
        assert [api.engine.get_payment(p["payment_id"])["aggregates"] for p in after] == expected_aggregates
        assert got == [{**e, "policy_version": g["policy_version"]} for e, g in zip(expected, got, strict=True)]
        assert any("BUYER_WEEK_SPEND" in [r["code"] for r in g["reasons"]] for g in got)
    finally:
        client.__exit__(None, None, None)


def test_a_restart_that_replays_labels_lands_on_the_fraud_model_the_live_run_had(tmp_path: Path) -> None:
    """Without a snapshot, every stored label is learned again (its refits deferred to one at the end): the fit
    in use must be the one the live run ended with, not one on all the rows or none."""
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}", snapshot_every=100_000)
    client, api = open_api(settings)
    payments = traffic(230)
    for p in payments:
        api.score(p)
    labels = [
        (p["payment_id"], "confirmed_fraud" if p["attributes"]["V1"] > 8 else "legitimate", None) for p in payments
    ]
    for start in range(0, len(labels), 20):  # as label requests arrive: refits due at 50, 100, 150 and 200
        api.engine.record_labels(labels[start : start + 20], source="bank")
    live = api.engine.detector("payment_fraud")[1]
    probe = live.features.compute({"attributes.V1": 9.0, "attributes.V2": 1.0}, {}, {}, {})
    live_fit, live_score = live._steps[1].fit, live.score_one(probe)
    assert live_fit is not None and live_fit.labels == 200  # the 30 labels after the last refit wait
    client.__exit__(None, None, None)
    for snapshot in settings.snapshot_dir.glob("*.snapshot"):
        snapshot.unlink()
    client, api = open_api(settings)
    try:
        rebuilt = api.engine.detector("payment_fraud")[1]
        assert rebuilt.labels_seen == 230 and rebuilt._steps[1].fit.labels == 200
        assert rebuilt.score_one(probe) == live_score
    finally:
        client.__exit__(None, None, None)


def test_times_sent_with_an_offset_compare_in_sql_as_the_instants_they_are(api: Any) -> None:
    """A payment at 18:15+08:00 happened at 10:15 UTC: SQL range queries and the backtest's replay must see it
    there, before one at 11:00 UTC (the writer once stored the caller's local text, eight hours late in SQL)."""
    from datetime import UTC, datetime

    api.score(payment(payment_id="east", occurred_at="2026-11-22T18:15:00.250000+08:00"))
    api.score(payment(payment_id="utc", occurred_at="2026-11-22T11:00:00Z"))
    api.score(payment(payment_id="west", occurred_at="2026-11-22T05:30:00-05:00"))  # 10:30 UTC
    with api.engine._session() as s:
        after_1045 = s.scalars(
            select(m.Event.event_id).where(m.Event.occurred_at >= datetime(2026, 11, 22, 10, 45, tzinfo=UTC))
        ).all()
        latest = s.scalar(select(func.max(m.Event.occurred_at)))
        in_order = s.scalars(select(m.Event.event_id).order_by(m.Event.occurred_at)).all()
    assert after_1045 == ["utc"]
    assert latest == datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
    assert in_order == ["east", "west", "utc"]
    since = datetime(2026, 11, 22, 10, 20, tzinfo=UTC).timestamp()
    replayed = {e.event_id: e.ts for e in api.engine.backtest_events("payment", since, 0.0)}
    assert replayed == {"west": datetime(2026, 11, 22, 10, 30, tzinfo=UTC).timestamp(), "utc": since + 40 * 60}


def test_migration_rewrites_times_stored_as_local_isoformat_text(tmp_path: Path) -> None:
    """Databases written before revision 0006 hold ``isoformat`` text with the caller's offset: the migration
    rewrites it as UTC in SQLAlchemy's format, and leaves text already in that format alone."""
    from alembic import command

    from risk_engine.storage.db import alembic_config, make_engine, migrate

    db = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config(db)
    with db.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0005")
    old = {
        "a": "2026-11-22 18:15:00+08:00",
        "b": "2026-11-22 18:15:00.123456+08:00",
        "c": "2026-11-22 05:30:00-05:00",
        "d": "2026-11-22 11:00:00.000000",
    }
    with db.begin() as conn:
        for seq, (event_id, at) in enumerate(old.items()):
            conn.execute(
                text(
                    "INSERT INTO events (subject, event_id, occurred_at, ingest_seq, record, features, aggregates, "
                    "decision, score, policy_version, model_versions, response, request_hash, elapsed_ms, created_at) "
                    "VALUES "
                    "('payment', :id, :at, :seq, '{}', '{}', '{}', 'allow', 0, 'payment:v1', '{}', '{}', 'h', 0, :at)"
                ),
                {"id": event_id, "at": at, "seq": seq},
            )
    migrate(db)
    with db.connect() as conn:
        stored = dict(conn.execute(text("SELECT event_id, occurred_at FROM events")).all())
        created = set(conn.execute(text("SELECT created_at FROM events")).scalars())
    db.dispose()
    assert stored == {
        "a": "2026-11-22 10:15:00.000000",
        "b": "2026-11-22 10:15:00.123456",
        "c": "2026-11-22 10:30:00.000000",
        "d": "2026-11-22 11:00:00.000000",
    }
    assert created == set(stored.values())


def test_a_detector_that_raises_on_a_stored_event_does_not_keep_the_service_from_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from risk_engine.detectors.streaming import StreamingDetector
    from risk_engine.engine import RiskEngine

    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}")
    engine = RiskEngine.open(settings)
    try:
        for body in traffic(5):
            engine.score_payment(PaymentIn.model_validate(body)).committed.result(10)
    finally:
        engine.close()
    shutil.rmtree(settings.snapshot_dir)  # no snapshot: every detector is rebuilt from the stored events
    learn = StreamingDetector.learn_one

    def learn_but_the_third(self: StreamingDetector, x: Any, raw: float, seq: int, weight: float = 1.0) -> None:
        if self.name == "payment_anomaly" and seq == 3:
            raise ZeroDivisionError
        learn(self, x, raw, seq, weight)

    monkeypatch.setattr(StreamingDetector, "learn_one", learn_but_the_third)
    engine = RiskEngine.open(settings)
    try:
        anomaly = next(d for d in engine.subjects["payment"].detectors if d.name == "payment_anomaly")
        assert anomaly.events_seen == 4  # the other four events were learned
        assert engine.counters.detector_failures == {("payment_anomaly", "rebuild"): 1}
        later = traffic(1, start=5)[0]
        assert engine.score_payment(PaymentIn.model_validate(later)).committed.result(10) is None
    finally:
        engine.close()


def test_a_per_key_detector_comes_back_model_for_model_from_its_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its models are pickled one key at a time and stored beside the rest of its state (pickled off the lock):
    a restart restores every reviewer's model exactly, from the snapshot, not from the stored events."""
    import pickle

    from risk_engine.detectors import read_snapshot
    from risk_engine.engine import RiskEngine
    from risk_engine.reviews import ReviewIn

    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'r.db'}", policy_poll_s=0)
    engine = RiskEngine.open(settings)
    try:
        for i in range(60):
            body = {
                **BASE_REVIEW,
                "review_id": f"r{i}",
                "rating": 1 + i % 5,
                "text": f"Review number {i}: " + "good " * (i % 7 + 4),
                "reviewer": {**BASE_REVIEW["reviewer"], "id": f"reviewer{i % 6}"},
                "occurred_at": f"2026-11-22T{10 + i // 60:02d}:{i % 60:02d}:30Z",
            }
            assert engine.score_event("review", ReviewIn.model_validate(body)).committed.exception(10) is None
        (det,) = [d for d in engine.subjects["review"].detectors if d.spec.per]
        before = {key: pickle.dumps(model) for key, model in det.models.items()}
        assert len(before) == 6
    finally:
        engine.close()
    written = read_snapshot(engine.snapshot_path(det), engine.signing_key)
    assert isinstance(written["state"], bytes) and written["per_key"]["order"] == list(before)
    caplog.set_level(logging.INFO, logger="risk_engine.engine")
    engine = RiskEngine.open(settings)
    try:
        assert not [r for r in caplog.records if det.name in r.getMessage()]  # not rebuilt, nor refused
        (again,) = [d for d in engine.subjects["review"].detectors if d.spec.per]
        assert {key: pickle.dumps(model) for key, model in again.models.items()} == before
        assert again.last_seq == det.last_seq  # restored from the snapshot, nothing replayed after it
    finally:
        engine.close()
