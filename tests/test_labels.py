"""Storing labels (``risk_engine.labels``) when another worker stores the same label at the same moment: the
label that lost the race is answered as the replay it is, not with an error, and is stored once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from risk_engine import labels
from risk_engine.storage import models as m
from tests.conftest import Api, payment


@contextmanager
def raced_sessions(api: Api, competitor: Callable[[labels.Sessions], Any]) -> Iterator[labels.Sessions]:
    """Sessions on the engine's database whose first flush lets ``competitor`` (another worker, with sessions
    of its own) store and commit first: after the reads that found nothing stored, before the insert."""
    raced = False

    def open_session() -> Session:
        session = Session(api.engine.db, expire_on_commit=False)

        def before_flush(*_: Any) -> None:
            nonlocal raced
            if not raced:
                raced = True
                competitor(lambda: Session(api.engine.db, expire_on_commit=False))

        event.listen(session, "before_flush", before_flush)
        return session

    yield open_session
    assert raced, "the competitor never ran: the test did not race anything"


def stored_labels(api: Api) -> int:
    with Session(api.engine.db) as s:
        return int(s.scalar(select(func.count()).select_from(m.Label)) or 0)


@pytest.fixture
def scored(api: Api) -> Api:
    api.score(payment(payment_id="pay_raced"))
    return api


def test_one_label_stored_meanwhile_by_another_worker_is_a_replay(scored: Api) -> None:
    request = labels.LabelRequest("lbl_raced", "pay_raced", "chargeback", None, "bank")
    with raced_sessions(scored, lambda sessions: labels.store_label(sessions, request, "other")) as sessions:
        view, new = labels.store_label(sessions, request, "this")
    assert new is None  # the other worker's label: nothing new to learn here
    assert (view["label_id"], view["label"], view["is_fraud"]) == ("lbl_raced", "chargeback", True)
    assert stored_labels(scored) == 1


def test_a_batch_stored_meanwhile_by_another_worker_is_a_replay(scored: Api) -> None:
    requests = [labels.LabelRequest("lbl_raced", "pay_raced", "chargeback", None, "bank")]
    with raced_sessions(scored, lambda sessions: labels.store_label_batch(sessions, requests, "other")) as sessions:
        views, new = labels.store_label_batch(sessions, requests, "this")
    assert new == []
    assert [v["label_id"] for v in views] == ["lbl_raced"]
    assert stored_labels(scored) == 1


def test_a_source_file_imported_meanwhile_by_another_worker_stores_nothing_twice(scored: Api) -> None:
    scored.score(payment(payment_id="pay_other"))
    outcomes: list[tuple[str, str, Any]] = [("pay_raced", "chargeback", None), ("pay_other", "legitimate", None)]

    def competitor(sessions: labels.Sessions) -> None:  # the same file, its first line only
        labels.store_source_labels(sessions, outcomes[:1], "bank", "payment", "other")

    with raced_sessions(scored, competitor) as sessions:
        new = labels.store_source_labels(sessions, outcomes, "bank", "payment", "this")
    assert [(subject, event_id) for _, subject, event_id, _ in new] == [("payment", "pay_other")]
    assert stored_labels(scored) == 2
