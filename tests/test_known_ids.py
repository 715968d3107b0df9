"""The stored-id filter: grows as ids are added without reading them back, never forgets one, and keeps its
false-positive rate under the bound; the engine reads the stored ids once, at start, however many it scores."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from risk_engine import engine as engine_module
from risk_engine.engine import RiskEngine
from risk_engine.known_ids import KnownIds
from risk_engine.payments import PaymentIn
from tests.conftest import make_settings, payment


def test_it_grows_by_layers_and_never_answers_no_for_an_id_it_took() -> None:
    known = KnownIds(1_000, error_rate=0.001)
    taken = [f"payment\x1fp{i}" for i in range(7_000)]
    for key in taken:
        known.add(key)
    assert known.layers == 3  # 1,000 + 2,000 + 4,000
    assert all(key in known for key in taken)
    strangers = [f"payment\x1fq{i}" for i in range(200_000)]
    false_positives = sum(key in known for key in strangers)
    assert false_positives < 200_000 * 0.002  # the layers' rates sum under 0.1%; twice that for chance


def test_it_refuses_a_size_or_rate_it_cannot_keep() -> None:
    for capacity, rate in ((0, 0.001), (10, 0.0), (10, 1.0)):
        with pytest.raises(ValueError, match="capacity must be at least 1"):
            KnownIds(capacity, rate)


def test_the_engine_reads_the_stored_ids_once_however_many_it_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to refill a larger filter from the database once the first was half full: past about 480,000
    stored events, on every event it scored (here, past 48 with the first layer sized for 100)."""
    monkeypatch.setattr(engine_module, "KNOWN_IDS_MIN_CAPACITY", 100)
    engine = RiskEngine.open(make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}"))
    reads, lookups = [], []
    load, lookup = engine._load_known_ids, engine._lookup_stored
    monkeypatch.setattr(engine, "_load_known_ids", lambda: reads.append(1) or load())
    monkeypatch.setattr(engine, "_lookup_stored", lambda *a: lookups.append(a) or lookup(*a))
    assert engine._known_ids_whole.wait(30)  # read in the background at start
    try:
        bodies = [
            payment(payment_id=f"pay_{i}", occurred_at=f"2026-11-22T{i // 60:02d}:{i % 60:02d}:00Z") for i in range(600)
        ]
        for body in bodies:
            outcome = engine.score_payment(PaymentIn.model_validate(body))
            assert not outcome.replayed
        engine.writer.barrier().result()
        assert reads == []  # read at start only
        assert engine._known_ids.layers >= 3
        assert len(lookups) <= 3  # a new id is known new without the database, all but rarely
        # the earliest ids, in the first layer, are still known: their replays are the stored answers
        engine._recent.clear()  # as after a restart: only the filter and the database know them
        for body in bodies[:50]:
            assert engine.score_payment(PaymentIn.model_validate(body)).replayed
    finally:
        engine.close()


def test_a_worker_serves_while_it_reads_the_stored_ids_and_looks_each_id_up_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a deployment's volume the stored ids take minutes to read: the worker scores meanwhile. Until the
    filter is whole a retry is found in the database (a replay, not a second scoring), and what it scored
    meanwhile is in the filter once it is."""
    settings = make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}")
    bodies = [payment(payment_id=f"pay_{i}", occurred_at=f"2026-11-22T10:{i:02d}:00Z") for i in range(20)]
    engine = RiskEngine.open(settings)
    try:
        for body in bodies:
            engine.score_payment(PaymentIn.model_validate(body))
        engine.writer.barrier().result()
    finally:
        engine.close()

    release = threading.Event()
    add = KnownIds.add

    def paused(self: KnownIds, key: str) -> None:  # the reader has its rows: it waits before taking them in
        if threading.current_thread().name == "risk-engine-known-ids":
            release.wait(30)
        add(self, key)

    monkeypatch.setattr(KnownIds, "add", paused)
    engine = RiskEngine.open(settings)
    try:
        assert not engine._known_ids_whole.is_set()
        for body in bodies[:5]:  # retries of stored payments, while the ids are read
            assert engine.score_payment(PaymentIn.model_validate(body)).replayed
        new = payment(payment_id="pay_new", occurred_at="2026-11-22T11:00:00Z")
        outcome = engine.score_payment(PaymentIn.model_validate(new))
        assert not outcome.replayed and outcome.committed.exception(30) is None
        engine._recent.clear()  # as once more were scored than it keeps: only the filter and the database know it
        release.set()
        assert engine._known_ids_whole.wait(30)
        assert all(f"payment\x1fpay_{i}" in engine._known_ids for i in range(20))
        assert engine.score_payment(PaymentIn.model_validate(new)).replayed  # marked while the ids were read
    finally:
        release.set()
        engine.close()


def test_a_failed_read_of_the_stored_ids_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that is away when the worker starts must not leave it looking every id up for good."""
    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr(engine_module, "KNOWN_IDS_RETRY_S", 0.05)
    read, failures = RiskEngine._stored_ids, []

    def once_away(self: RiskEngine) -> KnownIds | None:
        if not failures:
            failures.append(1)
            raise OperationalError("SELECT", {}, Exception("database away"))
        return read(self)

    monkeypatch.setattr(RiskEngine, "_stored_ids", once_away)
    engine = RiskEngine.open(make_settings(tmp_path / "var", f"sqlite:///{tmp_path / 'risk.db'}"))
    try:
        assert engine._known_ids_whole.wait(30) and failures == [1]
        assert not engine.score_payment(PaymentIn.model_validate(payment())).replayed
    finally:
        engine.close()
