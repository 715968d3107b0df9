"""Any sequence of payments, reviews, labels, replays, clean stops and crashes: every answer is the one a service
that never stopped gives, and the detectors have learned each stored event and each label exactly once.

A crash is a stop that writes nothing (no detector or state snapshot) with every scored payment committed, as a
process killed after its answers went out leaves it. Hypothesis draws the sequences; the control is a second
service on its own database that scores the same payments and never stops.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from risk_engine.config import Settings
from tests.conftest import BASE_REVIEW, Api, fresh_schema, make_settings, open_api, postgres_url_or_skip
from tests.test_durability import comparable, traffic


def service_url(database_url: str | None, tmp: Path, schemas: ExitStack) -> str:
    """The service's database: a SQLite file in ``tmp``, or a fresh PostgreSQL schema that ``schemas`` drops."""
    if database_url is None:
        return f"sqlite:///{tmp / 'risk.db'}"
    return schemas.enter_context(fresh_schema())


class RestartsAndCrashes(RuleBasedStateMachine):
    database_url: str | None = None  # the service's database (the control's is always a SQLite file): None, one

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="risk-engine-restarts-"))
        self.schemas = ExitStack()
        url = service_url(self.database_url, self.tmp, self.schemas)
        self.settings: Settings = make_settings(self.tmp / "var", url, snapshot_every=7)
        self.client, self.api = open_api(self.settings)
        self.control_client, self.control = open_api(
            make_settings(self.tmp / "control", f"sqlite:///{self.tmp / 'control.db'}")
        )
        self.answers: list[dict[str, Any]] = []  # each scored payment's first answer, in order
        self.sent: list[dict[str, Any]] = []
        self.reviews = 0
        self.labels = 0

    def _open(self) -> None:
        self.client, self.api = open_api(self.settings)

    @rule(n=st.integers(1, 9))
    def score(self, n: int) -> None:
        for body in traffic(n, start=len(self.sent)):
            got = comparable(self.api.score(body))
            assert got == comparable(self.control.score(body)), body["payment_id"]
            self.sent.append(body)
            self.answers.append(got)

    @rule(n=st.integers(1, 6), reviewers=st.integers(1, 3))
    def score_reviews(self, n: int, reviewers: int) -> None:
        for _ in range(n):
            i = self.reviews
            body = {
                **BASE_REVIEW,
                "review_id": f"r{i}",
                "order_id": f"o{i}",
                "reviewer": {**BASE_REVIEW["reviewer"], "id": f"rv{i % reviewers}"},
                "rating": 1 + i % 5,
                "text": ["Great, as described.", "Broken on arrival!!", "ok"][i % 3] + f" #{i}",
                "occurred_at": f"2026-11-23T{i // 60 % 24:02d}:{i % 60:02d}:00Z",
            }
            got, want = (self._post(api, "/v1/reviews/score", body) for api in (self.api, self.control))
            assert got == want, body["review_id"]
            self.reviews += 1

    @rule(data=st.data(), fraud=st.booleans())
    def label(self, data: st.DataObject, fraud: bool) -> None:
        if not self.sent:
            return
        i = data.draw(st.integers(0, len(self.sent) - 1))
        body = {
            "label_id": f"l{self.labels}",
            "payment_id": self.sent[i]["payment_id"],
            "label": "chargeback" if fraud else "legitimate",
            "occurred_at": "2026-11-24T00:00:00Z",
        }
        got, want = (self._post(api, "/v1/labels", body) for api in (self.api, self.control))
        assert {k: v for k, v in got.items() if k != "received_at"} == {
            k: v for k, v in want.items() if k != "received_at"
        }
        self.labels += 1

    @staticmethod
    def _post(api: Api, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = api.client.post(path, json=body, headers=api.headers())
        assert response.status_code in (200, 201), response.text
        return comparable(response.json())

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        if not self.sent:
            return
        i = data.draw(st.integers(0, len(self.sent) - 1))
        assert comparable(self.api.score(self.sent[i])) == self.answers[i]

    @rule()
    def stop_cleanly(self) -> None:
        self.client.__exit__(None, None, None)
        self._open()

    @rule()
    def crash(self) -> None:
        engine = self.api.engine
        engine.flush_snapshots()  # what it wrote while serving is on disk; what a stop would write, never
        engine.snapshot_detectors = lambda background=False: None  # type: ignore[method-assign]
        engine._write_state_snapshot = lambda: None  # type: ignore[method-assign]
        self.client.__exit__(None, None, None)
        self._open()

    @invariant()
    def every_event_and_label_learned_once(self) -> None:
        models = {m["name"]: m for m in self.api.client.get("/v1/models", headers=self.api.headers()).json()}
        control = {m["name"]: m for m in self.control.client.get("/v1/models", headers=self.control.headers()).json()}
        assert models["payment_anomaly"]["events_seen"] == len(self.sent)
        assert models["review_anomaly"]["events_seen"] == self.reviews
        for name, model in models.items():  # the supervised ones' labels too
            assert (model["events_seen"], model.get("labels_seen")) == (
                control[name]["events_seen"],
                control[name].get("labels_seen"),
            ), name

    def teardown(self) -> None:
        for client in (self.client, self.control_client):
            client.__exit__(None, None, None)
        self.schemas.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


SEQUENCES = settings(max_examples=15, stateful_step_count=8, deadline=None, suppress_health_check=list(HealthCheck))


BACKENDS = pytest.mark.parametrize("postgres", [False, True], ids=["sqlite", "postgres"])


def run_sequences(machine: type[RuleBasedStateMachine], postgres: bool) -> None:
    """Run ``machine``'s sequences with the service on a SQLite file or, on PostgreSQL (whose ids commit out of
    order: the watermarks a crash's replay reads by), in a fresh schema."""
    if postgres:
        machine = type(f"{machine.__name__}OnPostgres", (machine,), {"database_url": postgres_url_or_skip()})
    run_state_machine_as_test(machine, settings=SEQUENCES)


@BACKENDS
def test_any_sequence_of_stops_and_crashes_answers_as_a_service_that_never_stopped(postgres: bool) -> None:
    run_sequences(RestartsAndCrashes, postgres)


class ErrorsLogged(logging.Handler):
    """The ERROR records the engine logs while a sequence runs (a snapshot that could not be written, one
    refused at a start): none is expected of any sequence."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class TwoWorkersAndCrashes(RuleBasedStateMachine):
    """Two workers on one database and one home, each stopping or crashing and starting again while the other
    serves, the payments spread over both: once the scoring worker has taken the other's events in, each
    payment's stored aggregates are those of a control that scored every payment alone and never stopped."""

    database_url: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="risk-engine-two-workers-"))
        self.schemas = ExitStack()
        url = service_url(self.database_url, self.tmp, self.schemas)
        self.errors = ErrorsLogged()
        logging.getLogger("risk_engine").addHandler(self.errors)
        # followed by hand, before each payment; snapshots every few events, so that the workers write them often
        self.settings = make_settings(self.tmp / "var", url, snapshot_every=5, policy_poll_s=3600, follow_poll_s=0)
        self.workers = [open_api(self.settings), open_api(self.settings)]
        self.control_client, self.control = open_api(
            make_settings(self.tmp / "control", f"sqlite:///{self.tmp / 'control.db'}")
        )
        self.sent = 0

    @rule(worker=st.integers(0, 1), n=st.integers(1, 6))
    def score(self, worker: int, n: int) -> None:
        _, api = self.workers[worker]
        for body in traffic(n, start=self.sent):
            api.engine.refresh_events()
            api.score(body)
            self.control.score(body)
            path = f"/v1/payments/{body['payment_id']}"
            got = api.client.get(path, headers=api.headers()).json()["aggregates"]
            want = self.control.client.get(path, headers=self.control.headers()).json()["aggregates"]
            assert got == want, (body["payment_id"], worker)
            self.sent += 1

    @rule(worker=st.integers(0, 1), crash=st.booleans())
    def restart(self, worker: int, crash: bool) -> None:
        client, api = self.workers[worker]
        if crash:
            api.engine.flush_snapshots()
            api.engine.snapshot_detectors = lambda background=False: None  # type: ignore[method-assign]
            api.engine._write_state_snapshot = lambda: None  # type: ignore[method-assign]
        client.__exit__(None, None, None)
        self.workers[worker] = open_api(self.settings)

    @invariant()
    def nothing_went_wrong_in_the_logs(self) -> None:
        assert self.errors.records == []

    def teardown(self) -> None:
        for client, _ in self.workers:
            client.__exit__(None, None, None)
        self.control_client.__exit__(None, None, None)
        logging.getLogger("risk_engine").removeHandler(self.errors)
        self.schemas.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@BACKENDS
def test_two_workers_stopping_and_crashing_in_turn_count_every_payment_once(postgres: bool) -> None:
    run_sequences(TwoWorkersAndCrashes, postgres)
