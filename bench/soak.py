"""A soak: minutes of mixed traffic against ``risk-engine serve``, with restarts, then checks of what was stored.

Client threads score payments stamped with the wall clock as they are sent (some a little late, a few up to
55 minutes late), many sharing busy keys (one IP, e-mail, seller, card, device, buyer), replay one in ten and
label one in fifty (alone or in batches), and score reviews, merchant and account events beside them. An
admin thread creates, uses and revokes keys and erases buyers' PII. An analyst thread drafts and publishes
policy versions that add new windows, rolls back, puts versions in shadow, backtests, reads the rule statistics
and edits a list, each change with an ``Idempotency-Key`` and retried. Every ``--restart-every`` seconds the
server is killed (SIGKILL, or with several workers one worker) or stopped (SIGTERM) and started again, and every
``--outage-every`` seconds the events' write lock is held for longer than the busy timeout; a request cut off
or refused (503) is retried, as a payment flow would, until it is answered.

Then the server is stopped and the database read back:

* every payment answered is stored once, with the answer it was given; every replay got the first answer;
* every review, merchant and account event answered is stored once, with the answer it was given;
* a revoked key is refused by every worker once their caches read it again; an erased e-mail's payments show no
  PII;
* each seller's credit served at the end equals what a start without the state snapshot rebuilds from the
  stored events;
* every label answered is stored once; every analyst request and its retry got the same answer;
* the counts kept as events and labels are stored (rule hits, shadow decisions) equal a count of the stored
  events and their labels;
* with one worker, every stored payment's windowed aggregates equal brute force over the payments stored
  before it (in scoring order, as of its time): across restarts, late events and publishes that add windows.
  With several workers an aggregate cannot count the other workers' events still in their group commit, so
  each must lie between brute force over the events it must have counted (its worker's scored before it, the
  others' scored seconds before it) and over those it may have (its worker's, and the others' stored before it).

Prints what it did and found, then one JSON object on the last line; exits 1 when a check fails, keeping the
home (and the PostgreSQL schema) to look into, else removes them.
Usage: python bench/soak.py [--seconds 180] [--workers 1] [--database-url URL] [--restart-every 45]
       [--outage-every 0] [--publish-every 7] [--admin-every 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import print_footer  # noqa: E402
from risk_engine.subjects import SUBJECT_KINDS  # noqa: E402

BUSY_IP = "203.0.113.7"
RETRYABLE = {502, 503, 504}
FOLLOW_SLACK_S = 2.0  # another worker's event is taken in within 0.25 s of its commit: well within this
AGGREGATE_ID = re.compile(r"^(count|sum|avg|distinct)\((?:(\S+) )?by (\S+) within (\d+)(ms|w|d|h|m|s)\)$")
UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``risk-engine serve`` in a process of its own, stopped and started as the soak says."""

    def __init__(self, home: Path, database_url: str | None, workers: int) -> None:
        self.home, self.database_url, self.workers = home, database_url, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "RISK_ENGINE_HOME": str(self.home)}
        if self.database_url:
            env["RISK_ENGINE_DATABASE_URL"] = self.database_url
        command = [sys.executable, "-m", "risk_engine.cli", "serve", "--port", str(self.port)]
        command += ["--log-level", "warning", "--no-access-log", "--workers", str(self.workers)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited ({self.process.returncode}); see {self.log}")
            time.sleep(0.1)
        raise SystemExit(f"the server did not answer /healthz within 120 s; see {self.log}")

    def kill(self) -> str:
        """SIGKILL the server (one worker) or one of its workers (the server replaces it)."""
        assert self.process is not None
        if self.workers == 1:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
            self.start()
            return "SIGKILL"
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)
        return "SIGKILL of a worker"

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


class Journal:
    """What the clients sent and were answered, shared by the threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: dict[str, dict[str, Any]] = {}  # payment id -> its first answer
        self.other_answers: dict[tuple[str, str], dict[str, Any]] = {}  # (subject, id) of reviews, merchant events
        self.labels: dict[str, str] = {}  # label id -> payment id
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.policy_steps: Counter[str] = Counter()
        self.paid_by_email: dict[str, list[str]] = defaultdict(list)  # e-mail -> payments answered with it

    def fail(self, what: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(what)
            self.statuses["failures"] += 1


def send(
    client: httpx.Client, server: Server, stop_by: float, method: str, path: str, **kwargs: Any
) -> httpx.Response | None:
    """The request, retried while the server restarts or answers 5xx (what a payment flow does); None when it
    got no answer by ``stop_by``."""
    while time.monotonic() < stop_by:
        try:
            response = client.request(method, f"{server.url}{path}", **kwargs)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        if response.status_code not in RETRYABLE:
            return response
        time.sleep(0.05)
    return None


def payment_body(rng: random.Random, payment_id: str) -> dict[str, Any]:
    """A payment stamped now (8% up to two minutes late, 2% up to 55 minutes: the engine counts events up to an
    hour late exactly), on busy keys about as often as a marketplace's NAT gateways, large sellers and
    card-testing bursts put them."""
    at = datetime.now(UTC)
    late = rng.random()
    if late < 0.02:
        at -= timedelta(seconds=rng.uniform(0, 55 * 60))
    elif late < 0.10:
        at -= timedelta(seconds=rng.uniform(0, 120))
    buyer = "sb_busy" if rng.random() < 0.05 else f"sb_{rng.randrange(3000)}"
    return {
        "payment_id": payment_id,
        "occurred_at": at.isoformat(),
        "amount": {"value": rng.randrange(100, 500_000), "currency": rng.choice(["CNY", "CNY", "CNY", "USD"])},
        "order_id": f"o_{payment_id}",
        "seller_id": "s_busy" if rng.random() < 0.3 else f"s_{rng.randrange(50)}",
        "buyer": {
            "id": buyer,
            "created_at": "2025-03-01T00:00:00Z",
            "email": "busy@example.com" if rng.random() < 0.05 else f"{buyer}@example.com",
            "phone": f"+86138{rng.randrange(10**8):08d}",
            "name": "Soak Buyer",
            "verified": rng.random() < 0.7,
        },
        "payment_method": {
            "type": "card",
            "card_bin": "622202",
            "card_last4": "4321",
            "card_fingerprint": "fp_busy" if rng.random() < 0.05 else f"fp_{buyer}_{rng.randrange(2)}",
            "issuer_country": "CN",
        },
        "device": {
            "id": "dev_busy" if rng.random() < 0.03 else f"dev_{buyer}",
            "ip": BUSY_IP if rng.random() < 0.2 else f"10.{rng.randrange(256)}.{rng.randrange(256)}.1",
            "user_agent": "Mozilla/5.0",
        },
        "shipping_address": {
            "country": "CN",
            "city": "Hangzhou",
            "postal_code": "310000",
            "line1": "1 Busy Rd" if rng.random() < 0.1 else f"{rng.randrange(500)} Wenyi Rd",
        },
        "billing_country": "CN",
        "item_count": rng.randrange(1, 4),
        "channel": rng.choice(["app", "web"]),
        "attributes": {},
    }


REVIEW_TEXTS = (
    "Arrived on time, exactly as described.",
    "Great seller, fast shipping, would buy again!!! Best best best",
    "The colour is darker than in the photos, but it fits well.",
    "Good product. Good product. Good product. Five stars.",
)


def review_event(rng: random.Random, suffix: str, paid: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A review of a paid order, by its buyer: (subject, path, body)."""
    body = {
        "review_id": f"r_{suffix}",
        "occurred_at": datetime.now(UTC).isoformat(),
        "order_id": paid["order_id"],
        "item_id": f"item_{rng.randrange(100)}",
        "seller_id": paid["seller_id"],
        "reviewer": {
            "id": paid["buyer"]["id"],
            "created_at": "2025-03-01T00:00:00Z",
            "device_id": paid["device"]["id"],
            "ip": paid["device"]["ip"],
        },
        "rating": rng.randrange(1, 6),
        "text": rng.choice(REVIEW_TEXTS),
    }
    return "review", "/v1/reviews/score", body


def account_event(rng: random.Random, suffix: str, paid: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """An account's behaviour scored as a whole (the seller of a paid order, before a payout): (subject, path,
    body)."""
    body = {
        "account_id": f"acct_{suffix}",
        "occurred_at": datetime.now(UTC).isoformat(),
        "subject_id": paid["seller_id"],
        "role": "seller",
        "created_at": "2026-11-22T02:00:00Z",
        "country": "CN",
        "attributes": {"sent_tnx": rng.randrange(100), "received_tnx": rng.randrange(100), "total_ether_balance": 1.5},
    }
    return "account", "/v1/accounts/score", body


def merchant_event(rng: random.Random, suffix: str, paid: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Something the seller of a paid order did, or that happened to the order: (subject, path, body)."""
    kind = rng.choice(
        [
            "order_shipped",
            "order_shipped",
            "order_delivered",
            "order_cancelled_by_seller",
            "refund_issued",
            "dispute_opened",
            "dispute_resolved",
            "login",
        ]
    )
    body: dict[str, Any] = {"event_id": f"m_{suffix}", "occurred_at": datetime.now(UTC).isoformat(), "type": kind}
    if kind != "login":
        body["order_id"] = paid["order_id"]
    if kind == "order_shipped":
        body["late"] = rng.random() < 0.2
    elif kind == "refund_issued":
        body["amount"] = paid["amount"]
    elif kind == "dispute_resolved":
        body["outcome"] = rng.choice(["buyer_won", "seller_won"])
    elif kind == "login":
        body["ip"] = paid["device"]["ip"]
    return "merchant", f"/v1/merchants/{paid['seller_id']}/events", body


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {**a, "elapsed_ms": 0} == {**b, "elapsed_ms": 0}


def scored(
    client: httpx.Client, server: Server, journal: Journal, stop_by: float, subject: str, path: str, body: Any
) -> dict[str, Any] | None:
    """An event of ``subject`` scored: its answer, or None (no answer in time, or a failure noted)."""
    response = send(client, server, stop_by, "POST", path, json=body)
    if response is None:
        return None
    journal.statuses[f"{subject} {response.status_code}"] += 1
    if response.status_code != 200:
        event_id = body[SUBJECT_KINDS[subject].id_field]
        journal.fail(f"{subject} {event_id}: {response.status_code} {response.text[:300]}")
        return None
    answer: dict[str, Any] = response.json()
    return answer


def scorer(seed: int, server: Server, journal: Journal, token: str, stop: threading.Event, stop_by: float) -> None:
    """Score payments; replay one in ten and label one in fifty of those answered."""
    rng = random.Random(seed)
    sent: list[dict[str, Any]] = []
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        n = 0
        while not stop.is_set():
            roll = rng.random()
            if sent and roll < 0.10:
                body = rng.choice(sent)
                response = send(client, server, stop_by, "POST", "/v1/payments/score", json=body)
                if response is None:
                    continue
                journal.statuses[f"replay {response.status_code}"] += 1
                first = journal.answers[body["payment_id"]]
                if response.status_code != 200 or not same_answer(response.json(), first):
                    journal.fail(f"replay of {body['payment_id']}: {response.status_code} {response.text[:300]}")
            elif sent and 0.12 <= roll < 0.125:
                batch = []
                for _ in range(rng.randrange(2, 6)):
                    batch.append({"label_id": f"lb_{seed}_{n}", "payment_id": rng.choice(sent)["payment_id"]})
                    batch[-1] |= {
                        "label": rng.choice(["chargeback", "legitimate"]),
                        "occurred_at": "2026-12-08T00:00:00Z",
                    }
                    n += 1
                for attempt in range(2 if rng.random() < 0.2 else 1):  # a fifth retried: every label a replay
                    response = send(client, server, stop_by, "POST", "/v1/labels/batch", json={"labels": batch})
                    if response is None:
                        break
                    journal.statuses[f"label batch {response.status_code}"] += 1
                    counts = response.json() if response.status_code in (200, 201) else {}
                    if counts.get("created", 0) + counts.get("replayed", 0) != len(batch) or (
                        attempt and counts.get("replayed") != len(batch)
                    ):
                        journal.fail(f"label batch (attempt {attempt}): {response.status_code} {response.text[:300]}")
                    else:
                        with journal.lock:
                            journal.labels.update((lab["label_id"], lab["payment_id"]) for lab in batch)
            elif sent and roll < 0.12:
                target = rng.choice(sent)["payment_id"]
                label_id = f"l_{seed}_{n}"
                n += 1
                label = {"label_id": label_id, "payment_id": target, "source": "soak"}
                label |= {"label": rng.choice(["chargeback", "confirmed_fraud", "legitimate"])}
                label |= {"occurred_at": datetime.now(UTC).isoformat()}
                for attempt in range(2 if rng.random() < 0.2 else 1):  # a fifth retried: a replay
                    response = send(client, server, stop_by, "POST", "/v1/labels", json=label)
                    if response is None:
                        break
                    journal.statuses[f"label {response.status_code}"] += 1
                    if response.status_code not in (200, 201) or (attempt and response.status_code != 200):
                        journal.fail(f"label {label_id} (attempt {attempt}): {response.status_code} {response.text}")
                    else:
                        with journal.lock:
                            journal.labels[label_id] = target
            elif sent and roll < 0.19:
                paid = rng.choice(sent)
                make = account_event if roll < 0.135 else review_event if roll < 0.16 else merchant_event
                subject, path, body = make(rng, f"{seed}_{n}", paid)
                n += 1
                answer = scored(client, server, journal, stop_by, subject, path, body)
                if answer is not None:
                    with journal.lock:
                        journal.other_answers[subject, body[SUBJECT_KINDS[subject].id_field]] = answer
            else:
                body = payment_body(rng, f"soak_{seed}_{n}")
                n += 1
                answer = scored(client, server, journal, stop_by, "payment", "/v1/payments/score", body)
                if answer is not None:
                    with journal.lock:
                        journal.answers[body["payment_id"]] = answer
                        journal.paid_by_email[body["buyer"]["email"]].append(body["payment_id"])
                    sent.append(body)


def keyed(
    client: httpx.Client,
    server: Server,
    journal: Journal,
    stop_by: float,
    what: str,
    method: str,
    path: str,
    **kwargs: Any,
) -> httpx.Response | None:
    """An analyst's request with an ``Idempotency-Key``, sent again at once: the retry must be the replay."""
    key = f"soak-{what}-{random.random()}"
    headers = {"Idempotency-Key": key}
    first = send(client, server, stop_by, method, path, headers=headers, **kwargs)
    if first is None:
        return None
    journal.policy_steps[f"{what} {first.status_code}"] += 1
    if first.status_code >= 400:
        sent = kwargs.get("json", "")
        print(f"  {time.strftime('%H:%M:%S')} {what} {path} {sent}: {first.status_code} {first.text[:200]}")
    again = send(client, server, stop_by, method, path, headers=headers, **kwargs)
    if again is not None and (again.status_code != first.status_code or again.json() != first.json()):
        journal.fail(
            f"{what} retried: {first.status_code} {first.text[:200]} then {again.status_code} {again.text[:200]}"
        )
    return first


def analyst(
    server: Server, journal: Journal, token: str, stop: threading.Event, stop_by: float, every_s: float
) -> None:
    """Draft and publish versions that add windows, roll back, shadow, edit a list: one step every ``every_s``."""
    rng = random.Random(99)
    base = (ROOT / "rules" / "payment.rules").read_text()
    published: list[int] = []
    step = 0
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
        while not stop.wait(every_s):
            step += 1
            minutes, other = rng.randrange(1, 180), rng.randrange(1, 180)
            text = base + (
                f'\nrule soak_{step} {{\n  description "soak step {step}"\n'
                f"  when count(by buyer.id within {minutes}m) > 1000000"
                f" or distinct(device.id by buyer.email within {other}m) > 1000000\n"
                f"  then score +1, reason SOAK_{step}\n}}\n"
            )
            draft = send(client, server, stop_by, "POST", "/v1/policies/payment/drafts", json={"text": text})
            if draft is None:
                return
            if draft.status_code not in (200, 201):
                journal.fail(f"draft: {draft.status_code} {draft.text[:300]}")
                continue
            version = draft.json()["version"]
            if step % 4 == 0:
                keyed(
                    client,
                    server,
                    journal,
                    stop_by,
                    "shadow",
                    "POST",
                    f"/v1/policies/payment/versions/{version}/shadow",
                )
            elif step % 4 == 3 and len(published) >= 2:
                to = published[-2]
                done = keyed(
                    client,
                    server,
                    journal,
                    stop_by,
                    "rollback",
                    "POST",
                    "/v1/policies/payment/rollback",
                    json={"to_version": to},
                )
                if done is not None and done.status_code == 200:
                    published.append(to)
            else:
                done = keyed(
                    client,
                    server,
                    journal,
                    stop_by,
                    "publish",
                    "POST",
                    f"/v1/policies/payment/versions/{version}/publish",
                )
                if done is not None and done.status_code == 200:
                    published.append(version)
            if step % 5 == 0:
                keyed(
                    client,
                    server,
                    journal,
                    stop_by,
                    "backtest",
                    "POST",
                    f"/v1/policies/payment/drafts/{version}/backtest",
                    json={"since": "1d"},
                )
            stats = send(client, server, stop_by, "GET", "/v1/policies/payment/rules/stats?days=1")
            if stats is not None and stats.status_code != 200:
                journal.fail(f"rule statistics: {stats.status_code} {stats.text[:300]}")
            keyed(
                client,
                server,
                journal,
                stop_by,
                "list add",
                "POST",
                "/v1/lists/blocked_devices/entries",
                json={"value": f"dev_soak_{step}", "note": "soak"},
            )


def admin(server: Server, journal: Journal, token: str, stop: threading.Event, stop_by: float, every_s: float) -> None:
    """Every ``every_s``: create a scorer key, use it, revoke it (every worker must refuse it once its cache has
    read it again); erase the PII of a buyer's e-mail (every payment answered with it before shows none)."""
    from risk_engine.api_keys import KEY_CACHE_S

    rng = random.Random(7)
    step = 0
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
        while not stop.wait(every_s):
            step += 1
            asked = {"role": "scorer", "name": f"soak {step}", "request_id": f"soak_key_{step}"}
            created = send(client, server, stop_by, "POST", "/v1/keys", json=asked)
            if created is None:
                return
            journal.policy_steps[f"key create {created.status_code}"] += 1
            if created.status_code == 201:
                key, key_id = created.json()["key"], created.json()["key_id"]
                used = send(client, server, stop_by, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
                if used is None or used.status_code != 200:
                    journal.fail(f"a new key was refused: {used.status_code if used else None}")
                revoked = send(client, server, stop_by, "POST", f"/v1/keys/{key_id}/revoke")
                if revoked is None or revoked.status_code != 200:
                    journal.fail(f"revoking a key: {revoked.status_code if revoked else None}")
                time.sleep(KEY_CACHE_S + 1)
                for _ in range(6):  # new connections: whichever worker takes each
                    try:
                        late = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
                    except httpx.HTTPError:
                        continue  # a restart
                    journal.policy_steps[f"revoked key {late.status_code}"] += 1
                    if late.status_code not in (401, 503):
                        journal.fail(f"a key revoked {KEY_CACHE_S + 1} s before was answered {late.status_code}")
            with journal.lock:
                emails = [e for e, paid in journal.paid_by_email.items() if e != "busy@example.com" and paid]
                email = rng.choice(emails) if emails else None
                paid_before = list(journal.paid_by_email[email]) if email else []
            if email is None:
                continue
            erased = send(client, server, stop_by, "POST", "/v1/pii/erase", json={"kind": "email", "value": email})
            if erased is None:
                return
            journal.policy_steps[f"pii erase {erased.status_code}"] += 1
            if erased.status_code != 200 or erased.json()["events"] < 1:
                journal.fail(f"erasing {email}: {erased.status_code} {erased.text[:200]}")
            for payment_id in paid_before[:5]:
                shown = send(client, server, stop_by, "GET", f"/v1/payments/{payment_id}")
                if shown is None or shown.status_code != 200 or shown.json()["pii_erased"] is not True:
                    journal.fail(f"{payment_id}, paid with {email} before its erasure, still shows PII")


def restarter(server: Server, journal: Journal, stop: threading.Event, every_s: float) -> None:
    """Kill and stop the server in turn, every ``every_s``."""
    turn = 0
    while not stop.wait(every_s):
        turn += 1
        if turn % 2:
            how = server.kill()
        else:
            server.stop()
            server.start()
            how = "SIGTERM"
        journal.policy_steps[f"restart ({how})"] += 1
        print(f"  {time.strftime('%H:%M:%S')} restarted the server ({how})", flush=True)


def outages(database_url: str, journal: Journal, stop: threading.Event, every_s: float, hold_s: float) -> None:
    """Every ``every_s``, take the lock that the events' writes need for ``hold_s`` (SQLite's write lock, or an
    exclusive lock on PostgreSQL's ``events``): a database that answers but takes no writes, so batches fail
    after the busy timeout and the clients retry."""
    import sqlite3

    from sqlalchemy import text

    from risk_engine.storage.db import make_engine

    while not stop.wait(every_s):
        if database_url.startswith("sqlite"):
            locker = sqlite3.connect(database_url.split("///", 1)[1], timeout=30)
            locker.execute("BEGIN EXCLUSIVE")
            time.sleep(hold_s)
            locker.rollback()
            locker.close()
        else:
            engine = make_engine(database_url)
            with engine.connect() as conn:
                conn.execute(text("SET lock_timeout = 0"))
                conn.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
                time.sleep(hold_s)
                conn.rollback()
            engine.dispose()
        journal.policy_steps["outage"] += 1
        print(f"  {time.strftime('%H:%M:%S')} held the events' write lock for {hold_s:g} s", flush=True)


def seller_credit(server: Server, token: str, sellers: list[str]) -> dict[str, Any]:
    """Each seller's credit as the server gives it."""
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        return {s: client.get(f"{server.url}/v1/sellers/{s}/credit").json() for s in sellers}


def other_mismatches(database_url: str, answers: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Reviews, merchant and account events answered that are not stored, or stored with another answer."""
    from sqlalchemy import text

    from risk_engine.storage.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT subject, event_id, response FROM events WHERE subject IN ('review', 'merchant', 'account')"
                )
            ).all()
    finally:
        engine.dispose()
    stored = {(subject, event_id): decoded(r) for subject, event_id, r in rows}
    wrong = []
    if len(rows) != len(stored):
        wrong.append(f"{len(rows) - len(stored)} reviews or merchant events stored twice")
    for key, answer in answers.items():
        if key not in stored:
            wrong.append(f"{key} was answered and is not stored")
        elif not same_answer(stored[key], answer):
            wrong.append(f"{key} is stored with another answer than it was given")
    return wrong


def decoded(value: Any) -> Any:
    """A JSON column's value: SQLite's driver gives its text, PostgreSQL's the decoded value."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def fresh_schema(database_url: str) -> tuple[str, str]:
    """A new, empty schema: (the URL with its search_path set to it, its name)."""
    from urllib.parse import quote

    schema = f"soak_{int(time.time())}"
    run_sql(database_url, f'CREATE SCHEMA "{schema}"')
    return f"{database_url}{'&' if '?' in database_url else '?'}options={quote(f'-csearch_path={schema}')}", schema


def run_sql(database_url: str, sql: str) -> None:
    """One statement, in a transaction of its own."""
    from sqlalchemy import text

    from risk_engine.storage.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def stored_events(database_url: str) -> tuple[list[dict[str, Any]], int]:
    """Every stored payment in scoring order, and the number of stored labels."""
    from sqlalchemy import text

    from risk_engine.storage.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(
                    text(
                        "SELECT id, event_id, occurred_at, created_at, ingest_seq, origin, record, aggregates, "
                        "response FROM events WHERE subject = 'payment' ORDER BY ingest_seq, id"
                    )
                )
                .mappings()
                .all()
            )
            labels = conn.execute(text("SELECT count(*) FROM labels")).scalar_one()
    finally:
        engine.dispose()

    def timestamp(at: Any) -> float:
        at = datetime.fromisoformat(at) if isinstance(at, str) else at
        return float((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())

    events = []
    for row in rows:
        events.append(
            {
                "id": row["id"],
                "event_id": row["event_id"],
                "ts": timestamp(row["occurred_at"]),
                "scored_at": timestamp(row["created_at"]),
                "seq": row["ingest_seq"],
                "origin": row["origin"],
                "record": decoded(row["record"]),
                "aggregates": decoded(row["aggregates"]),
                "response": decoded(row["response"]),
            }
        )
    return events, int(labels)


def count_mismatches(database_url: str) -> list[str]:
    """The counts kept as events and labels are stored (``rule_hits``, ``shadow_tallies``, summed over the
    workers) against a count of the stored events and their labels: where they differ."""
    from sqlalchemy import text

    from risk_engine.storage.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT event_id, decision, response, shadow FROM events")).all()
            labels = conn.execute(text("SELECT event_id, is_fraud FROM labels")).all()
            kept_hits = conn.execute(
                text("SELECT code, SUM(hits), SUM(labelled), SUM(fraud) FROM rule_hits GROUP BY code")
            ).all()
            kept_shadow = conn.execute(
                text(
                    "SELECT version, live, shadow, SUM(events), SUM(labelled), SUM(fraud) FROM shadow_tallies "
                    "GROUP BY version, live, shadow"
                )
            ).all()
    finally:
        engine.dispose()
    fraud: dict[str, bool] = {}
    for event_id, is_fraud in labels:
        fraud[event_id] = fraud.get(event_id, False) or bool(is_fraud)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    shadowed: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for event_id, decision, response, shadow in rows:
        response, shadow = decoded(response), decoded(shadow)
        outcome = (1, 1 if event_id in fraud else 0, 1 if fraud.get(event_id) else 0)
        for reason in response["reasons"]:
            if reason["source"] == "rule":
                hits[reason["code"]] = [a + b for a, b in zip(hits[reason["code"]], outcome, strict=True)]
        if shadow and shadow.get("version"):
            key = (shadow["version"], decision, shadow["decision"])
            shadowed[key] = [a + b for a, b in zip(shadowed[key], outcome, strict=True)]
    wrong = []
    kept = {code: [int(h), int(lab), int(f)] for code, h, lab, f in kept_hits}
    for code in sorted(set(kept) | set(hits)):
        if kept.get(code, [0, 0, 0]) != hits.get(code, [0, 0, 0]):
            wrong.append(f"rule_hits {code}: kept {kept.get(code)}, stored events {hits.get(code)}")
    kept_s = {(v, live, sh): [int(e), int(lab), int(f)] for v, live, sh, e, lab, f in kept_shadow}
    for key in sorted(set(kept_s) | set(shadowed)):
        if kept_s.get(key, [0, 0, 0]) != shadowed.get(key, [0, 0, 0]):
            wrong.append(f"shadow_tallies {key}: kept {kept_s.get(key)}, stored events {shadowed.get(key)}")
    return wrong


def measure(func: str, values: list[Any], mask: Any) -> float:
    """``func`` over the events ``mask`` picks (``values``: each one's value field)."""
    if func == "count":
        return int(mask.sum())
    chosen = [values[j] for j in np.flatnonzero(mask) if values[j] is not None]
    return len(set(chosen)) if func == "distinct" else float(sum(chosen))


def brute_force_mismatches(events: list[dict[str, Any]], exact: bool) -> tuple[int, int, list[str]]:
    """Stored aggregates checked against brute force over the stored events, with times in ``(t - window, t]``:
    (aggregates checked, mismatches, a few examples).

    ``exact`` (one worker, whose sequence numbers go on across restarts): each must equal brute force over the
    events scored before it. Else each must lie between brute force over the events it must have counted (its
    own worker's scored before it, and other workers' scored over ``FOLLOW_SLACK_S`` before it: followed by
    then) and over those it may have counted (its worker's, and other workers' stored before it)."""
    names = sorted({name for e in events for name in e["aggregates"]})
    checked = wrong = 0
    examples: list[str] = []
    origins = {origin: n for n, origin in enumerate(sorted({str(e["origin"]) for e in events}))}
    for name in names:
        match = AGGREGATE_ID.match(name)
        if match is None:
            continue
        func, value_field, key_field = match.group(1), match.group(2), match.group(3)
        if func == "avg":
            continue  # neither bound holds for a mean
        window = int(match.group(4)) * UNIT_S[match.group(5)]
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, e in enumerate(events):
            key = e["record"].get(key_field)
            if key is not None:
                groups[key].append(i)
        for members in groups.values():
            ts = np.array([events[i]["ts"] for i in members])
            seq = np.array([events[i]["seq"] for i in members])
            row_id = np.array([events[i]["id"] for i in members])
            scored_at = np.array([events[i]["scored_at"] for i in members])
            origin = np.array([origins[str(events[i]["origin"])] for i in members])
            values = [events[i]["record"].get(value_field) for i in members] if value_field else []

            for position, i in enumerate(members):
                stored = events[i]["aggregates"].get(name)
                if stored is None:
                    continue
                t = ts[position]
                in_window = (ts > t - window) & (ts <= t)
                if exact:
                    low = high = measure(func, values, in_window & (seq < seq[position]))
                else:
                    own = (origin == origin[position]) & (seq < seq[position])
                    other = origin != origin[position]
                    must = other & (scored_at < scored_at[position] - FOLLOW_SLACK_S)
                    low = measure(func, values, in_window & (own | must))
                    high = measure(func, values, in_window & (own | (other & (row_id < row_id[position]))))
                checked += 1
                slack = 1e-6 * max(1.0, abs(high))
                if not low - slack <= float(stored) <= high + slack:
                    wrong += 1
                    if len(examples) < 10:
                        want = low if low == high else f"{low}..{high}"
                        examples.append(f"{events[i]['event_id']} {name}: stored {stored}, brute force {want}")
    return checked, wrong, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--database-url",
        default=None,
        help="default: an SQLite file in a new home; PostgreSQL: a new schema in it (dropped if every check passed)",
    )
    parser.add_argument("--restart-every", type=float, default=45, help="seconds; 0: never")
    parser.add_argument("--outage-every", type=float, default=0, help="seconds between write outages; 0: none")
    parser.add_argument("--outage-s", type=float, default=7, help="how long each outage holds the write lock")
    parser.add_argument("--publish-every", type=float, default=7)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--admin-every", type=float, default=10, help="seconds between key and erasure rounds")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="soak-"))
    database_url = args.database_url or f"sqlite:///{home / 'risk_engine.db'}"
    schema = None
    if database_url.startswith("postgresql"):
        database_url, schema = fresh_schema(database_url)
    server = Server(home, database_url, args.workers)
    print(f"soak: {args.seconds:.0f} s, {args.workers} worker(s), {args.clients} clients, home {home}", flush=True)
    server.start()
    token = (home / "admin.key").read_text().strip()
    journal = Journal()
    stop = threading.Event()
    started = time.monotonic()
    stop_by = started + args.seconds + 120  # a request in flight at the end still gets its answer
    threads = [
        threading.Thread(target=scorer, args=(seed, server, journal, token, stop, stop_by))
        for seed in range(args.clients)
    ]
    threads.append(threading.Thread(target=analyst, args=(server, journal, token, stop, stop_by, args.publish_every)))
    threads.append(threading.Thread(target=admin, args=(server, journal, token, stop, stop_by, args.admin_every)))
    background: list[threading.Thread] = []
    if args.restart_every:
        background.append(threading.Thread(target=restarter, args=(server, journal, stop, args.restart_every)))
    if args.outage_every:
        outage_args = (database_url, journal, stop, args.outage_every, args.outage_s)
        background.append(threading.Thread(target=outages, args=outage_args))
    for t in threads + background:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in background + threads:
        t.join()
    elapsed = time.monotonic() - started
    # the cross-subject state a worker built as events came (and went, on failed writes) against the same state
    # rebuilt from the stored events alone: a start without the state snapshot
    time.sleep(2)  # every worker has followed the others' last events
    sellers = [f"s_{i}" for i in range(50)] + ["s_busy"]
    live = seller_credit(server, token, sellers)
    server.stop()
    (home / "snapshots" / "state.snapshot").unlink(missing_ok=True)
    server.start()
    rebuilt = seller_credit(server, token, sellers)
    server.stop()
    for seller in sellers:
        if live[seller] != rebuilt[seller]:
            journal.fail(f"seller {seller}'s credit: served {live[seller]}, rebuilt from storage {rebuilt[seller]}")

    events, labels_stored = stored_events(database_url)
    by_id = {e["event_id"]: e for e in events}
    check: Callable[[bool, str], None] = lambda ok, what: None if ok else journal.fail(what)  # noqa: E731
    check(len(by_id) == len(events), f"{len(events) - len(by_id)} payments stored twice")
    for payment_id, answer in journal.answers.items():
        stored = by_id.get(payment_id)
        if stored is None:
            journal.fail(f"{payment_id} was answered and is not stored")
        elif not same_answer(stored["response"], answer):
            journal.fail(f"{payment_id} is stored with another answer than it was given")
    unanswered = len(set(by_id) - set(journal.answers))
    check(labels_stored == len(journal.labels), f"{labels_stored} labels stored, {len(journal.labels)} answered")
    for mismatch in count_mismatches(database_url) + other_mismatches(database_url, journal.other_answers):
        journal.fail(mismatch)
    checked, wrong, examples = brute_force_mismatches(events, exact=args.workers == 1)
    for example in examples:
        journal.fail(f"aggregate: {example}")
    print(f"answers: {dict(sorted(journal.statuses.items()))}")
    print(f"analyst and restarts: {dict(sorted(journal.policy_steps.items()))}")
    print(f"stored: {len(events)} payments ({unanswered} never answered), {labels_stored} labels")
    print(f"aggregates checked against brute force: {checked}, mismatched {wrong}")
    busy = live["s_busy"]
    facts = {c["name"]: c["detail"] for c in busy.get("components", [])}
    print(f"seller credit served and rebuilt: {len(sellers)} sellers; s_busy {busy.get('score')} ({facts})")
    for example in examples[:5]:
        print(f"  {example}")
    for failure in journal.failures[:20]:
        print(f"FAILED: {failure}")
    figures = {
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "database": database_url.split(":")[0],
        "payments_answered": len(journal.answers),
        "payments_per_s": round(len(journal.answers) / elapsed, 1),
        "payments_stored": len(events),
        "labels_stored": labels_stored,
        "aggregates_checked": checked,
        "aggregates_mismatched": wrong,
        "restarts": sum(v for k, v in journal.policy_steps.items() if k.startswith("restart")),
        "failures": journal.statuses["failures"],
    }
    if journal.statuses["failures"]:
        print(f"kept to be looked into: {home}" + (f" and the schema {schema}" if schema else ""))
    else:  # nothing to look into: a soak run again and again leaves nothing behind
        if schema is not None and args.database_url is not None:
            run_sql(args.database_url, f'DROP SCHEMA "{schema}" CASCADE')
        shutil.rmtree(home, ignore_errors=True)
    print_footer(figures)
    sys.exit(1 if journal.statuses["failures"] else 0)


if __name__ == "__main__":
    main()
