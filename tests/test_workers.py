"""Hot reload across two worker processes sharing one database: a publish reaches both without a restart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO, payment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(home: Path, database_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RISK_ENGINE_HOME": str(home),
        "RISK_ENGINE_DATABASE_URL": database_url,
        "RISK_ENGINE_POLICY_POLL_S": "0.2",
    }
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
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until(check, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


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
        finally:
            second.terminate()
            second.wait(20)
    finally:
        first.terminate()
        first.wait(20)


def test_workers_migrating_a_new_database_together_all_start(database_url: str) -> None:
    # every worker of a deployment migrates on start; on PostgreSQL concurrent upgrades collided creating the
    # same tables, and all but one worker failed on its first boot
    from sqlalchemy import inspect

    from risk_engine.storage.db import make_engine

    script = "import sys; from risk_engine.storage.db import make_engine, migrate; migrate(make_engine(sys.argv[1]))"
    workers = [
        subprocess.Popen([sys.executable, "-c", script, database_url], cwd=REPO, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    failures = [w.stderr.read().decode()[-400:] for w in workers if w.wait(120) != 0 and w.stderr is not None]
    assert not failures, failures
    engine = make_engine(database_url)
    try:
        assert {"events", "labels", "policy_versions", "alembic_version"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
