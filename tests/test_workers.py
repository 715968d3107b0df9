"""Hot reload across two worker processes sharing one database: a publish reaches both without a restart."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import httpx2 as httpx
from sqlalchemy import func, select

from risk_engine.storage import models as m
from risk_engine.storage.db import make_engine
from tests.conftest import REPO, Api, make_settings, open_api, payment, run_cli, two_workers
from tests.helpers import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(
    home: Path, database_url: str, port: int, log: Path | None = None, workers: int = 1, **settings: str
) -> subprocess.Popen[bytes]:
    """``risk-engine serve`` in a process of its own; ``settings``: more ``RISK_ENGINE_*`` variables, by setting
    name; ``log``: where its output goes (else nowhere); ``workers``: its ``--workers``."""
    env = {
        **os.environ,
        "RISK_ENGINE_HOME": str(home),
        "RISK_ENGINE_DATABASE_URL": database_url,
        "RISK_ENGINE_POLICY_POLL_S": "0.2",
        **{f"RISK_ENGINE_{name.upper()}": value for name, value in settings.items()},
    }
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "risk_engine.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            str(workers),
        ],
        cwd=REPO,
        env=env,
        stdout=output,
        stderr=output,
    )


def test_a_publish_reaches_a_second_worker_process(tmp_path: Path, database_url: str) -> None:
    home = tmp_path / "var"
    home.mkdir()
    ports = [free_port(), free_port()]
    first = start_worker(home, database_url, ports[0])
    try:
        assert wait_until(lambda: httpx.get(f"http://127.0.0.1:{ports[0]}/healthz", timeout=2).status_code == 200)
        second = start_worker(home, database_url, ports[1])  # after the first: keys and schema exist
        try:
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            assert wait_until(lambda: httpx.get(f"{urls[1]}/healthz", timeout=2).status_code == 200)
            key = (home / "admin.key").read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}
            text = (REPO / "rules" / "payment.rules").read_text().replace("block at 85", "block at 80")
            draft = httpx.post(f"{urls[0]}/v1/policies/payment/drafts", json={"text": text}, headers=auth, timeout=10)
            assert draft.status_code == 201, draft.text
            published = httpx.post(f"{urls[0]}/v1/policies/payment/versions/2/publish", headers=auth, timeout=30)
            assert published.status_code == 200, published.text

            def second_serves_v2() -> bool:
                return httpx.get(f"{urls[1]}/healthz", timeout=2).json()["policies"]["payment"] == "payment:v2"

            assert wait_until(second_serves_v2, timeout=30), "the second worker never picked up payment:v2"
            scored = httpx.post(f"{urls[1]}/v1/payments/score", json=payment(payment_id="w2"), headers=auth, timeout=10)
            assert scored.status_code == 200 and scored.json()["policy_version"] == "payment:v2"

            # one buyer's burst over both processes: each one's follower takes in the other's payments
            def pay(url: str, i: int) -> set[str]:
                body = payment(payment_id=f"wb{i}", occurred_at=f"2026-11-22T10:0{i}:00Z", **{"buyer.id": "b_wb"})
                answer = httpx.post(f"{url}/v1/payments/score", json=body, headers=auth, timeout=10).json()
                return {r["code"] for r in answer["reasons"] if r["source"] == "rule"}

            for i in range(4):
                pay(urls[i % 2], i)

            def first_followed_two() -> bool:
                scraped = httpx.get(f"{urls[0]}/metrics", timeout=2).text
                return 'risk_engine_events_followed_total{subject="payment"} 3.0' in scraped  # w2, wb1, wb3

            assert wait_until(first_followed_two, timeout=30), "the first worker never took in the second's events"
            assert "BUYER_VELOCITY" in pay(urls[0], 4)
        finally:
            second.terminate()
            second.wait(20)
    finally:
        first.terminate()
        first.wait(20)


def worker_processes(parent: int) -> list[int]:
    """The worker processes ``serve --workers`` started (uvicorn spawns them; a resource tracker is not one)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_serve_with_two_workers_answers_on_one_port_and_replaces_a_worker_that_dies(
    tmp_path: Path, database_url: str
) -> None:
    """``serve --workers 2``: two engines behind one port. A payment is answered the same by either, one killed
    outright is replaced while the other serves, and a SIGTERM stops both cleanly with every answer stored."""
    home = tmp_path / "var"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_worker(home, database_url, port, log=tmp_path / "serve.log", workers=2)
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        assert wait_until(lambda: len(worker_processes(server.pid)) == 2)
        auth = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}

        def score(i: int) -> httpx.Response:  # a connection each: the kernel hands each to either worker
            body = payment(payment_id=f"mw{i}", order_id=f"ord_mw{i}")
            return httpx.post(f"{url}/v1/payments/score", json=body, headers=auth, timeout=10)

        answers = {i: score(i).json() for i in range(30)}
        killed = worker_processes(server.pid)[0]
        os.kill(killed, signal.SIGKILL)
        answers |= {i: score(i).json() for i in range(30, 40)}  # the other worker serves meanwhile
        assert wait_until(lambda: len(worker_processes(server.pid)) == 2 and killed not in worker_processes(server.pid))
        for i, first in answers.items():  # replays, on whichever worker, answer as the first time
            again = score(i)
            assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
            assert again.json() == first
        workers = worker_processes(server.pid)
    finally:
        server.terminate()
        exit_code = server.wait(60)
    assert exit_code == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(func.count()).where(m.Event.subject == "payment")).scalar_one()
    finally:
        engine.dispose()
    assert stored == 40  # the killed worker's answers too: each was given once its row was committed


def test_a_keyed_request_retried_the_moment_its_answer_arrives_is_replayed_by_either_worker(tmp_path: Path) -> None:
    """The answer to a request sent with an ``Idempotency-Key`` is stored before it reaches the client: a client
    that retries at once, on a new connection (either worker), gets it replayed, never "still being answered".
    The answer used to be stored after it was sent, and about a third of such retries were refused (a 409)."""
    home = tmp_path / "var"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_worker(home, f"sqlite:///{tmp_path / 'risk.db'}", port, log=tmp_path / "serve.log", workers=2)
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        assert wait_until(lambda: len(worker_processes(server.pid)) == 2)
        auth = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}
        retries = []
        path = "/v1/lists/blocked_devices/entries"
        with httpx.Client(base_url=url, headers=auth, timeout=10) as kept:
            for i in range(40):
                headers = {"Idempotency-Key": f"edit-{i}"}
                entry = {"value": f"dev_retried_{i}"}
                first = kept.post(path, json=entry, headers=headers)
                assert first.status_code == 201, first.text
                if i % 2:  # on the same connection: the same worker
                    again = kept.post(path, json=entry, headers=headers)
                else:  # on a new one: either worker
                    again = httpx.post(f"{url}{path}", json=entry, headers={**auth, **headers}, timeout=10)
                retries.append((again.status_code, again.headers.get("idempotent-replayed")))
        assert retries == [(201, "true")] * 40
    finally:
        server.terminate()
        server.wait(60)


def test_workers_starting_together_on_a_new_database_all_start(database_url: str, tmp_path: Path) -> None:
    # each worker of a fresh deployment migrates, creates the key files it shares with the others and seeds the
    # policies and lists: all of it raced (colliding CREATE TABLEs, version numbers and list entries, a key file
    # read before it was written) and all but one worker could fail their first boot
    from sqlalchemy import func, select

    from risk_engine.storage import models as m
    from risk_engine.storage.db import make_engine

    script = (
        "import sys; from pathlib import Path; from risk_engine.config import Settings; "
        "from risk_engine.engine import RiskEngine; "
        "RiskEngine.open(Settings(home=Path(sys.argv[1]), database_url=sys.argv[2])).close()"
    )
    home = str(tmp_path / "shared")
    workers = [
        subprocess.Popen([sys.executable, "-c", script, home, database_url], cwd=REPO, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    failures = [w.stderr.read().decode()[-600:] for w in workers if w.wait(300) != 0 and w.stderr is not None]
    assert not failures, failures
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            versions = dict(
                conn.execute(select(m.PolicyVersion.subject, func.count()).group_by(m.PolicyVersion.subject)).all()
            )
            seeded = conn.execute(
                select(func.count()).where(m.ListEntry.list_name == "disposable_email_domains")
            ).scalar_one()
    finally:
        engine.dispose()
    assert set(versions.values()) == {1}  # each rules/ file stored once
    assert seeded == 10


def test_a_list_entry_added_from_the_command_line_is_enforced_by_a_running_worker(tmp_path: Path) -> None:
    home = tmp_path / "var"
    home.mkdir()
    database_url = f"sqlite:///{home / 'risk.db'}"
    port = free_port()
    worker = start_worker(home, database_url, port)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        auth = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}
        added = run_cli(
            "lists", "add", "blocked_devices", "dev_cli", home=home, env={"RISK_ENGINE_DATABASE_URL": database_url}
        )
        assert added.returncode == 0, added.stderr
        attempts = iter(range(1_000))

        def blocked() -> bool:
            body = payment(payment_id=f"cli_{next(attempts)}", **{"device.id": "dev_cli"})
            answer = httpx.post(f"{url}/v1/payments/score", json=body, headers=auth, timeout=10).json()
            return answer["decision"] == "block" and "BLOCKED_DEVICE" in [r["code"] for r in answer["reasons"]]

        assert wait_until(blocked, timeout=30), "the running worker never enforced the entry the CLI added"
    finally:
        worker.terminate()
        worker.wait(20)


def test_every_worker_learns_the_labels_another_received(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # polled by hand below
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)

    def fraud_labels_seen(api: Api) -> int:
        return next(d.labels_seen for d in api.engine.subjects["payment"].detectors if d.name == "payment_fraud")

    try:
        a.score(payment(payment_id="p1", occurred_at="2026-11-22T10:00:00Z"))
        b.score(payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"))
        assert b.engine.refresh_labels() == 0
        label = {"label_id": "l1", "payment_id": "p1", "label": "chargeback"}
        assert a.client.post("/v1/labels", json=label, headers=a.headers()).status_code == 201
        assert (fraud_labels_seen(a), fraud_labels_seen(b)) == (1, 0)  # a learned it at once; b not yet
        assert b.engine.refresh_labels() == 1 and fraud_labels_seen(b) == 1  # b's poll teaches it
        assert a.engine.refresh_labels() == 0 and fraud_labels_seen(a) == 1  # a does not learn its own twice
        label = {"label_id": "l2", "payment_id": "p2", "label": "legitimate"}
        assert b.client.post("/v1/labels", json=label, headers=b.headers()).status_code == 201
        assert a.engine.refresh_labels() == 1 and b.engine.refresh_labels() == 0
        assert fraud_labels_seen(a) == fraud_labels_seen(b) == 2
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_a_label_that_commits_after_a_higher_id_is_still_learned(tmp_path: Path, database_url: str) -> None:
    """On PostgreSQL, label ids come from a sequence: a label inserted first can commit after one inserted later
    by another worker. A worker that has learned the higher id must still learn the lower one when it appears
    (rows with chosen ids stand in for the two commits, so the same test runs on SQLite)."""
    from risk_engine.engine import now_utc
    from risk_engine.labels import LabelRequest

    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # polled by hand below
    client, api = open_api(settings)

    def labels_seen() -> int:
        return next(d.labels_seen for d in api.engine.subjects["payment"].detectors if d.name == "payment_fraud")

    def commit_label(row_id: int, label_id: str, payment_id: str, label: str) -> None:
        row = LabelRequest(label_id, payment_id, label, None, "test", "payment").row(now_utc())
        row.id = row_id
        with api.engine._session() as s:
            s.add(row)
            s.commit()

    try:
        api.score(payment(payment_id="p1", occurred_at="2026-11-22T10:00:00Z"))
        api.score(payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"))
        commit_label(9_002, "later", "p2", "legitimate")  # inserted second, committed first
        assert api.engine.refresh_labels() == 1 and labels_seen() == 1
        commit_label(9_001, "earlier", "p1", "chargeback")  # its transaction commits now
        assert api.engine.refresh_labels() == 1 and labels_seen() == 2
        assert api.engine.refresh_labels() == 0 and labels_seen() == 2  # learned once
        fraud = next(d for d in api.engine.subjects["payment"].detectors if d.name == "payment_fraud")
        assert fraud.frauds_seen == 1 and 9_001 not in fraud.label_gaps and 9_000 in fraud.label_gaps
        fraud.expire_label_gaps(time.time() + 121)  # ids never used (a rolled-back insert) are given up on
        assert not fraud.label_gaps
    finally:
        client.__exit__(None, None, None)


def test_an_event_another_worker_stores_while_one_starts_is_counted_once(
    tmp_path: Path, database_url: str, monkeypatch: Any
) -> None:
    """A worker's start rebuilds its state from the events stored up to then; one another worker commits
    during the rebuild is left to the follower, so it is counted once, not by the rebuild and the follow."""
    from risk_engine.engine import RiskEngine

    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)  # by hand
    client_a, a = open_api(settings)
    opened = [client_a]

    def burst(api: Api, i: int) -> dict[str, Any]:
        minute = f"2026-11-22T10:0{i}:00Z"
        return api.score(payment(payment_id=f"start_{i}", occurred_at=minute, **{"buyer.id": "b_start"}))

    def buyer_count(api: Api, payment_id: str) -> Any:
        return api.engine.get_payment(payment_id)["aggregates"]["count(by buyer.id within 10m)"]

    try:
        for i in range(2):
            burst(a, i)
        rebuild = RiskEngine._read_state_snapshot

        def while_starting(engine: RiskEngine) -> Any:
            burst(a, 2)  # a commits one more while b reads the stored events
            return rebuild(engine)

        monkeypatch.setattr(RiskEngine, "_read_state_snapshot", while_starting)
        client_b, b = open_api(settings)
        opened.append(client_b)
        monkeypatch.undo()
        assert b.engine.refresh_events() == 1 and b.engine.refresh_events() == 0
        burst(b, 3)
        assert buyer_count(b, "start_3") == 3  # the three before it, each once
    finally:
        for client in reversed(opened):
            client.__exit__(None, None, None)


def test_labels_are_read_once_for_every_subject(tmp_path: Path, database_url: str) -> None:
    """Label ids are shared by every subject. A payment detector that reads a review's label notes its id, so it
    does not keep it as a gap to ask for again at each poll; a worker started later knows where the labels end
    even for a subject that has none."""
    from tests.test_reviews import review

    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # polled by hand below
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    opened = [client_a, client_b]

    def detector(api: Api, subject: str, name: str) -> Any:
        return next(d for d in api.engine.subjects[subject].detectors if d.name == name)

    def readers(api: Api) -> list[Any]:
        return [d for rt in api.engine.subjects.values() for d in rt.detectors if d.supervised]

    def label(api: Api, label_id: str, event_id: str, outcome: str, subject: str = "payment") -> None:
        body = {"label_id": label_id, "subject": subject, "payment_id": event_id, "label": outcome}
        assert api.client.post("/v1/labels", json=body, headers=api.headers()).status_code == 201

    try:
        a.score(payment(payment_id="p1", occurred_at="2026-11-22T10:00:00Z"))
        a.score(payment(payment_id="p2", occurred_at="2026-11-22T10:01:00Z"))
        assert a.client.post("/v1/reviews/score", json=review(1), headers=a.headers()).status_code == 200
        label(a, "l1", "p1", "chargeback")
        label(a, "l2", "r_1", "fake", subject="review")
        label(a, "l3", "p2", "legitimate")
        with a.engine._session() as s:
            top = s.scalar(select(func.max(m.Label.id)))
        assert a.engine.refresh_labels() == 0  # a learned all three as they came
        for api in (a, b):
            if api is b:
                assert b.engine.refresh_labels() == 3
            assert detector(api, "payment", "payment_fraud").labels_seen == 2
            assert detector(api, "review", "review_text").labels_seen == 1
            assert all(d.last_label_id == top and not d.label_gaps for d in readers(api)), api
        client_c, c = open_api(settings)  # a third worker starts: it replays each subject's labels
        opened.append(client_c)
        assert c.engine.refresh_labels() == 0  # and reads the others' ids once, learning nothing twice
        assert detector(c, "payment", "payment_fraud").labels_seen == 2
        assert detector(c, "review", "review_text").labels_seen == 1
        assert detector(c, "account", "account_fraud").labels_seen == 0
        assert all(d.last_label_id == top and not d.label_gaps for d in readers(c))
    finally:
        for client in reversed(opened):
            client.__exit__(None, None, None)


def test_each_worker_counts_the_events_other_workers_scored(tmp_path: Path, database_url: str) -> None:
    """Behind a load balancer one buyer's burst lands on several workers: each worker's poll takes the events
    the others stored into its velocity windows and order memory, so the burst is counted whole, and once."""
    from tests.test_reviews import review

    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)  # by hand
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)

    def burst(api: Api, i: int) -> dict[str, Any]:
        minute = f"2026-11-22T10:0{i}:00Z"
        return api.score(payment(payment_id=f"burst_{i}", occurred_at=minute, **{"buyer.id": "b_burst"}))

    def fired(answer: dict[str, Any]) -> set[str]:
        return {r["code"] for r in answer["reasons"] if r["source"] == "rule"}

    try:
        for i in range(2):
            burst(a, i)
        for i in range(2, 4):
            burst(b, i)
        assert "BUYER_VELOCITY" not in fired(burst(a, 4))  # a has seen 2 of the 4 before it, unfollowed
        assert a.engine.refresh_events() == 2 and b.engine.refresh_events() == 3
        assert a.engine.refresh_events() == 0 and b.engine.refresh_events() == 0  # each event taken in once
        scraped = b.client.get("/metrics").text
        assert 'risk_engine_events_followed_total{subject="payment"} 3.0' in scraped
        assert "BUYER_VELOCITY" in fired(burst(b, 5))  # 5 before it, 2 of them b's own
        # a paid order stored by one worker is known to a review another worker scores
        paid = {"buyer.id": "buyer_7", "occurred_at": "2026-11-20T10:00:00Z"}
        a.score(payment(payment_id="pay_o7", order_id="o_7", seller_id="s_42", **paid))
        assert b.engine.refresh_events() == 1
        answer = b.client.post("/v1/reviews/score", json=review(7), headers=b.headers())
        assert answer.status_code == 200 and "NO_PAID_ORDER" not in fired(answer.json())
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_a_worker_shows_the_pii_of_a_payment_a_worker_started_after_it_sealed(
    tmp_path: Path, database_url: str
) -> None:
    """Each worker seals under a data key of its own, made when it starts: one started earlier has not unwrapped
    it, and must fetch it to show a payment the later one scored (it answered 500 before)."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)
    with two_workers(settings) as (a, b):
        b.score(payment(payment_id="pay_from_b"))
        shown = a.client.get("/v1/payments/pay_from_b", headers=a.headers("analyst"))
        assert shown.status_code == 200, shown.text
        assert shown.json()["pii_masked"]["buyer.email"] == "l****@example.com"
        assert b.client.get("/v1/payments/pay_from_b", headers=b.headers("analyst")).json() == shown.json()


def test_a_retry_reaching_another_worker_before_it_follows_gets_the_stored_answer(
    tmp_path: Path, database_url: str
) -> None:
    """Behind a load balancer a retry may reach a worker that has not yet taken the first request in: its own
    write collides with the stored row, and it answers with that row's answer, as a replay (it was a 409)."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)  # by hand
    with two_workers(settings) as (a, b):
        body = payment(payment_id="pay_retried", **{"buyer.id": "b_retry"})
        first = a.client.post("/v1/payments/score", json=body, headers=a.headers())
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        retry = b.client.post("/v1/payments/score", json=body, headers=b.headers())
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.json() == first.json()
        other = payment(payment_id="pay_retried", amount={"value": 1, "currency": "CNY"})
        refused = b.client.post("/v1/payments/score", json=other, headers=b.headers())
        assert refused.status_code == 409
        assert refused.json()["message"] == "payment_id pay_retried was already scored with a different request"
        # b took its own scoring back out: once it follows a's event, the buyer has one payment, not two
        assert b.engine.refresh_events() == 1
        nxt = b.score(payment(payment_id="pay_next", occurred_at="2026-11-22T10:16:00Z", **{"buyer.id": "b_retry"}))
        stored = b.client.get(f"/v1/payments/{nxt['payment_id']}", headers=b.headers("analyst")).json()
        assert stored["aggregates"]["count(by buyer.id within 90d)"] == 1
        assert stored["aggregates"]["count(by buyer.id within 10m)"] == 1


def test_a_replay_sharing_a_write_that_collides_with_another_workers_row_gets_the_stored_answer_too(
    tmp_path: Path,
) -> None:
    """Two calls with one payment reach a worker that has not followed another's row for it: the second shares
    the first's write, which collides; both get the stored answer (the second got a 409)."""
    import sqlite3

    from risk_engine.payments import PaymentIn

    db_path = tmp_path / "risk.db"
    settings = make_settings(tmp_path / "var", f"sqlite:///{db_path}", policy_poll_s=3600, follow_poll_s=0)
    with two_workers(settings) as (a, b):
        body = payment(payment_id="pay_twice")
        stored = a.score(body)
        locker = sqlite3.connect(db_path, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")  # b's write waits for it, then collides with a's row
        try:
            first = b.engine.score_payment(PaymentIn.model_validate(body))
            twin = b.engine.score_payment(PaymentIn.model_validate(body))
            assert twin.replayed and twin.committed is first.committed
        finally:
            locker.rollback()
            locker.close()
        assert first.committed.exception(10) is not None
        for outcome in (first, twin):
            settled = b.engine.settle(outcome)
            assert settled.replayed and settled.response == stored


def test_a_lone_workers_follower_reads_none_of_its_own_events_back(tmp_path: Path, database_url: str) -> None:
    """A commit of a worker's own events moves its follow watermark when nothing another worker stored lies
    before them, so a lone worker's follower reads no rows; an event of another worker in between is still read,
    and its own events after it with it."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)  # by hand
    client_a, a = open_api(settings)
    try:
        for i in range(5):
            a.score(payment(payment_id=f"lone_{i}"))
        with a.engine.db.connect() as conn:
            newest = conn.execute(select(func.max(m.Event.id))).scalar_one()
        assert a.engine._follow() == (0, 0)  # rows read, rows taken in
        assert a.engine._events_read.last == newest
        client_b, b = open_api(settings)
        try:
            b.score(payment(payment_id="other", **{"buyer.id": "b_other"}))
            a.score(payment(payment_id="lone_5"))  # after b's: a cannot know it is a's next
            assert a.engine._follow() == (2, 1)  # b's event taken in; a's own read, not taken in again
            assert a.engine.subjects["payment"].velocity.query({"buyer.id": "b_other"}, time.time())
            a.score(payment(payment_id="lone_6"))
            assert a.engine._follow() == (0, 0)
            assert b.engine.refresh_events() == 2  # lone_5 and lone_6 (lone_0-4 were stored before b began)
        finally:
            client_b.__exit__(None, None, None)
    finally:
        client_a.__exit__(None, None, None)


def test_the_writer_commits_while_a_caller_holding_the_state_lock_waits_for_it(
    tmp_path: Path, database_url: str
) -> None:
    """A policy swap that needs new aggregates and a rebuild of the cross-subject state wait for the writer with
    the state lock held: nothing the writer does after a commit may need that lock."""
    from risk_engine.payments import PaymentIn

    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)
    client, api = open_api(settings)
    try:
        engine = api.engine
        outcomes = [engine.score_payment(PaymentIn.model_validate(payment(payment_id=f"held_{i}"))) for i in range(50)]
        with engine._lock:
            assert engine.writer.barrier().wait(20)
        assert all(o.committed.done() and o.committed.exception() is None for o in outcomes)
        assert engine._follow() == (0, 0)  # and they were still noted read
    finally:
        client.__exit__(None, None, None)


def plain(obj: Any) -> Any:
    """An object's state as plain values, to compare two models by what they hold (their pickles may differ
    in how equal strings are shared)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, array):
        return obj.tolist()
    if isinstance(obj, random.Random):
        return obj.getstate()
    if hasattr(obj, "__dict__"):
        return type(obj).__name__, plain(vars(obj))
    slots = [name for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())]
    if slots:
        return type(obj).__name__, {name: plain(getattr(obj, name, None)) for name in slots}
    return obj


def test_a_detector_restored_from_its_snapshot_learns_only_what_its_worker_learned_after_it(
    tmp_path: Path, database_url: str, monkeypatch: Any
) -> None:
    """Each worker's streaming detectors learn the events that worker scores, and each numbers its events from
    its own start, so two workers' sequences overlap. A worker that dies after its last snapshot is restored
    exactly: the snapshot plus the events that worker scored after it, not another worker's that happen to
    carry a higher sequence."""
    from risk_engine.detectors import StreamingDetector

    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=0)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)  # both start on an empty database: both number from 1
    opened = [client_b]

    def score(api: Api, i: int) -> None:
        amount = {"value": 1_000 + 137 * i, "currency": "CNY"}
        api.score(payment(payment_id=f"snap_{i}", occurred_at=f"2026-11-22T10:{i:02d}:00Z", amount=amount))

    def detectors(api: Api) -> list[StreamingDetector]:
        return [d for d in api.engine.subjects["payment"].detectors if isinstance(d, StreamingDetector)]

    try:
        for i in range(3):
            score(a, i)
            score(b, 20 + i)
        with a.engine._lock:
            a.engine.snapshot_detectors()
        for i in range(3, 6):
            score(a, i)
            score(b, 20 + i)
        want = {d.name: (d.events_seen, d.last_seq, plain(d.model)) for d in detectors(a)}
        assert want and all(seen == 6 for seen, _, _ in want.values())
        monkeypatch.setattr(a.engine, "snapshot_detectors", lambda background=False: None)  # a dies
        client_a.__exit__(None, None, None)
        client_c, c = open_api(settings)  # a's replacement, while b runs on
        opened.append(client_c)
        got = {d.name: (d.events_seen, d.last_seq, plain(d.model)) for d in detectors(c)}
        assert {n: v[:2] for n, v in got.items()} == {n: v[:2] for n, v in want.items()}
        assert got == want
    finally:
        for client in reversed(opened):
            client.__exit__(None, None, None)


def test_a_worker_takes_another_workers_events_in_when_they_commit(tmp_path: Path, database_url: str) -> None:
    """Another worker's follower hears of a commit (PostgreSQL: NOTIFY; an SQLite file: data_version, read
    every 10 ms once another worker's events were taken in) and follows then, not at its next poll, so a burst
    spread over workers is counted whole within milliseconds. The poll here is a minute away."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600, follow_poll_s=60)
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    try:
        listener = b.engine._listener
        assert listener is not None
        a.score(payment(payment_id="told_0", occurred_at="2026-11-22T09:59:00Z", **{"buyer.id": "b_told"}))
        b.engine.refresh_events()  # by hand, as its poll would (on PostgreSQL b may have heard of it already)
        assert wait_until(lambda: b.engine.counters.followed.get("payment") == 1, timeout=10)  # SQLite: b watches
        assert wait_until(lambda: listener._conn is not None, timeout=10)  # b is listening or watching
        a.score(payment(payment_id="told_1", occurred_at="2026-11-22T10:00:00Z", **{"buyer.id": "b_told"}))
        assert wait_until(lambda: b.engine.counters.followed.get("payment") == 2, timeout=20)
        assert listener.woken >= 1
        answer = b.score(payment(payment_id="told_2", occurred_at="2026-11-22T10:01:00Z", **{"buyer.id": "b_told"}))
        assert answer["payment_id"] == "told_2"
        stored = b.engine.get_payment("told_2")["aggregates"]["count(by buyer.id within 10m)"]
        assert stored == 2  # a's payments, taken in before b scored its own
        b.score(payment(payment_id="told_3", occurred_at="2026-11-22T10:02:00Z", **{"buyer.id": "b_told"}))
        assert b.engine.counters.followed.get("payment") == 2  # b's own commits do not wake b
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_a_worker_killed_under_load_loses_no_answered_payment(tmp_path: Path, database_url: str) -> None:
    # SIGKILL while six clients score: every payment answered 200 was committed first, so the restarted worker
    # has it, replays the same answer, and rebuilds the velocity windows (no snapshot: no clean stop) exactly
    import signal
    import threading

    home = tmp_path / "var"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = start_worker(home, database_url, port)
    answered: dict[int, dict[str, Any]] = {}
    lock, stop = threading.Lock(), threading.Event()
    clients: list[threading.Thread] = []

    def body(i: int) -> dict[str, Any]:
        at = f"2026-11-22T10:{i // 60:02d}:{i % 60:02d}Z"
        return payment(payment_id=f"k{i}", occurred_at=at, **{"buyer.id": "b_kill", "amount.value": 1000 + i})

    def client(seed: int, auth: dict[str, str]) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                i = rng.randrange(3000)
                try:
                    r = c.post(f"{url}/v1/payments/score", json=body(i), headers=auth)
                except httpx.HTTPError:
                    continue  # the kill cuts requests off
                if r.status_code == 200:
                    with lock:
                        answered.setdefault(i, r.json())

    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        auth = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}
        clients += [threading.Thread(target=client, args=(s, auth)) for s in range(6)]
        for t in clients:
            t.start()
        assert wait_until(lambda: len(answered) >= 300), "the worker answered too little before the kill"
        worker.send_signal(signal.SIGKILL)
        worker.wait(20)
    finally:
        stop.set()
        worker.kill()
        worker.wait(20)
    for t in clients:
        t.join(10)
    worker = start_worker(home, database_url, port)
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        with httpx.Client(timeout=30, headers=auth) as c:
            for i in answered:  # stored before the kill, not scored again below
                assert c.get(f"{url}/v1/payments/k{i}").status_code == 200, f"k{i} was answered, then lost"
            for i, first in answered.items():
                again = c.post(f"{url}/v1/payments/score", json=body(i))
                assert again.status_code == 200, (i, again.text)
                assert {**again.json(), "elapsed_ms": 0} == {**first, "elapsed_ms": 0}, i
            final = payment(payment_id="k_final", occurred_at="2026-11-22T12:00:00Z", **{"buyer.id": "b_kill"})
            assert c.post(f"{url}/v1/payments/score", json=final).status_code == 200
            seen = c.get(f"{url}/v1/payments/k_final").json()["aggregates"]["count(by buyer.id within 90d)"]
    finally:
        worker.terminate()
        worker.wait(20)
    from risk_engine.storage.db import make_engine

    db = make_engine(database_url)
    with db.connect() as conn:
        stored = conn.scalar(
            select(func.count()).select_from(m.Event).where(m.Event.subject == "payment", m.Event.event_id != "k_final")
        )
    db.dispose()
    assert stored is not None and stored >= len(answered)  # committed and cut off before its answer: stored too
    assert seen == stored  # the windows after the restart count every stored payment of the buyer once


def test_a_worker_killed_after_saving_its_state_while_serving_restarts_from_that_save(
    tmp_path: Path, database_url: str
) -> None:
    # the poller saves the state every half second while it changes (a forked copy pickles it); after a SIGKILL
    # the next start reads that save and replays only the payments stored after it, and counts every one
    import signal

    home = tmp_path / "var"
    home.mkdir()
    port, log = free_port(), tmp_path / "worker.log"
    url = f"http://127.0.0.1:{port}"
    state_file = home / "snapshots" / "state.snapshot"

    def body(i: int) -> dict[str, Any]:
        at = f"2026-11-22T10:{i // 60:02d}:{i % 60:02d}Z"
        return payment(payment_id=f"s{i}", occurred_at=at, **{"buyer.id": "b_saved"})

    worker = start_worker(home, database_url, port, log=log, state_snapshot_every_s="0.5")
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        auth = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}
        with httpx.Client(timeout=10, headers=auth) as c:
            for i in range(30):
                assert c.post(f"{url}/v1/payments/score", json=body(i)).status_code == 200
            assert wait_until(state_file.exists, timeout=30), "the worker saved no state while serving"
            for i in range(30, 45):
                assert c.post(f"{url}/v1/payments/score", json=body(i)).status_code == 200
        worker.send_signal(signal.SIGKILL)
        worker.wait(20)
    finally:
        worker.kill()
        worker.wait(20)
    assert "saved while serving" in log.read_text()
    restarted = start_worker(home, database_url, port, log=log)
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        with httpx.Client(timeout=10, headers=auth) as c:
            assert c.post(f"{url}/v1/payments/score", json=body(45)).status_code == 200
            seen = c.get(f"{url}/v1/payments/s45").json()["aggregates"]["count(by buyer.id within 90d)"]
    finally:
        restarted.terminate()
        restarted.wait(20)
    text = log.read_text()
    assert "velocity and cross-subject state from the state snapshot of" in text, text[-2000:]
    assert seen == 45  # the 45 stored before the kill, each counted once: from the save or replayed after it


def test_a_worker_stopped_with_sigterm_saves_its_state_and_restarts_from_it(tmp_path: Path, database_url: str) -> None:
    # uvicorn raises SIGTERM again once it has shut down, which ends the process: the engine must be closed (its
    # detectors and state saved) in the app's shutdown, not after the server returns
    home = tmp_path / "var"
    home.mkdir()
    port, log = free_port(), tmp_path / "worker.log"
    url = f"http://127.0.0.1:{port}"
    worker = start_worker(home, database_url, port, log=log, state_snapshot_every_s="0")  # saved at the stop only
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
        auth = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}
        body = payment(payment_id="term_1", **{"buyer.id": "b_term"})
        assert httpx.post(f"{url}/v1/payments/score", json=body, headers=auth, timeout=10).status_code == 200
    finally:
        worker.terminate()  # SIGTERM
        worker.wait(30)
    assert (home / "snapshots" / "state.snapshot").exists(), log.read_text()[-2000:]
    restarted = start_worker(home, database_url, port, log=log)
    try:
        assert wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200)
    finally:
        restarted.terminate()
        restarted.wait(30)
    assert "velocity and cross-subject state from the state snapshot of 1 events" in log.read_text()
