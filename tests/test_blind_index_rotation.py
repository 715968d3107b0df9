"""Rotating the blind-index key: every stored token taken under the new key, so velocity, lists, erasures and
retries carry on across it; a worker on the old chain refused at start and stopped while running; an
interrupted rotation finished by running it again, no token taken twice."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from risk_engine.storage import blind_index_rotation
from risk_engine.storage import models as m
from risk_engine.storage.blind_index_rotation import BlindIndexKeyMismatch
from risk_engine.storage.db import make_engine
from risk_engine.vault import (
    BlindIndexesRetired,
    BlindIndexLayer,
    PiiKind,
    Vault,
    VaultKeyError,
    decode_key_chain,
)
from tests.conftest import BASE_REVIEW, make_settings, open_api, payment, run_cli

EMAIL = "li.wei@example.com"
PII_LISTS = ("blocked_emails",)
CARD = "fp_shared_card"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def records(database_url: str) -> dict[str, dict[str, Any]]:
    db = make_engine(database_url)
    try:
        with db.connect() as conn:
            return {e: r for e, r in conn.execute(select(m.Event.event_id, m.Event.record))}
    finally:
        db.dispose()


def list_tokens(database_url: str, list_name: str = "blocked_emails") -> list[str]:
    db = make_engine(database_url)
    try:
        with db.connect() as conn:
            return list(conn.scalars(select(m.ListEntry.token).where(m.ListEntry.list_name == list_name)))
    finally:
        db.dispose()


def card_payment(payment_id: str, buyer: str, minute: int, email: str = "someone@example.com") -> dict[str, Any]:
    return payment(
        payment_id=payment_id,
        occurred_at=f"2026-11-22T10:{minute:02d}:00Z",
        **{"buyer.id": buyer, "buyer.email": email, "payment_method.card_fingerprint": CARD},
    )


def codes(answer: dict[str, Any]) -> list[str]:
    return [r["code"] for r in answer["reasons"]]


def test_a_token_of_the_chain_is_each_later_keys_hmac_of_the_token_before() -> None:
    k1, k2, k3 = (secrets.token_bytes(32) for _ in range(3))
    one, two, three = Vault(b"m" * 32, [k1]), Vault(b"m" * 32, [k1, k2]), Vault(b"m" * 32, [k1, k2, k3])
    first = one.blind_index(PiiKind.EMAIL, EMAIL)
    raw = base64.urlsafe_b64decode(first.rpartition(":")[2])
    by_hand = hmac.new(k2, b"email\x1f" + raw, hashlib.sha256).digest()[:18]
    assert two.blind_index(PiiKind.EMAIL, EMAIL) == "bi:email:" + base64.urlsafe_b64encode(by_hand).decode()
    assert BlindIndexLayer(k2)(first) == two.blind_index(PiiKind.EMAIL, EMAIL)
    assert BlindIndexLayer(k3)(BlindIndexLayer(k2)(first)) == three.blind_index(PiiKind.EMAIL, " Li.Wei@Example.com")
    assert three.blind_indexes_of_generation(1).blind_index(PiiKind.EMAIL, EMAIL) == first
    assert len({v.blind_index_fingerprint for v in (one, two, three, Vault(b"m" * 32, [k2]))}) == 4
    assert [v.blind_index_generation for v in (one, two, three)] == [1, 2, 3]
    assert decode_key_chain(f" {b64(k1)},{b64(k2)}\n{b64(k3)}\n", "k") == [k1, k2, k3]
    with pytest.raises(VaultKeyError):
        decode_key_chain(" , \n", "k")
    with pytest.raises(VaultKeyError):
        BlindIndexLayer(k2)("seller:42")  # not a token
    two.retire_blind_indexes("rotated")
    with pytest.raises(BlindIndexesRetired):
        two.blind_index(PiiKind.EMAIL, EMAIL)


def test_after_a_rotation_velocity_lists_erasures_and_retries_carry_on(tmp_path: Path, database_url: str) -> None:
    home = tmp_path / "var"
    settings = make_settings(home, database_url)
    client, api = open_api(settings)
    try:
        first = card_payment("p1", "b1", 1, email=EMAIL)
        api.score(first)
        api.score(card_payment("p2", "b2", 2))
        added = api.client.post(
            "/v1/lists/blocked_emails/entries", json={"value": EMAIL}, headers=api.headers("analyst")
        )
        assert added.status_code == 201, added.text
        old_token = api.engine.vault.blind_index(PiiKind.EMAIL, EMAIL)
    finally:
        client.__exit__(None, None, None)  # a clean stop: the state snapshot is written under the old chain
    old_key = base64.b64decode((home / "blind_index.key").read_text())
    before = records(database_url)
    assert before["p1"]["buyer.email"] == old_token and list_tokens(database_url) == [old_token]

    rotated = run_cli(
        "vault",
        "rotate-blind-index-key",
        "--settle-s",
        "0",
        home=home,
        env={"RISK_ENGINE_DATABASE_URL": database_url},
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "blind indexes now under key generation 2: rewrote 2 event records, 1 list entries" in rotated.stdout
    chain = decode_key_chain((home / "blind_index.key").read_text(), "k")
    assert len(chain) == 2 and chain[0] == old_key
    assert stat.S_IMODE((home / "blind_index.key").stat().st_mode) == 0o600
    assert not (home / "blind_index.key.next").exists()
    new_token = Vault(b"m" * 32, chain).blind_index(PiiKind.EMAIL, EMAIL)
    after = records(database_url)
    assert after["p1"]["buyer.email"] == new_token != old_token
    assert list_tokens(database_url) == [new_token]
    for event_id, record in after.items():  # every token moved, nothing else changed
        moved = {k for k, v in before[event_id].items() if v != record[k]}
        assert moved and all(str(before[event_id][k]).startswith("bi:") for k in moved), moved
        assert not any(old_token in str(v) for v in record.values())

    # a worker still on the old key is refused at start
    with pytest.raises(BlindIndexKeyMismatch, match="generation 2"):
        open_api(make_settings(home, database_url, blind_index_key=b64(old_key)))

    client, api = open_api(settings)  # the key file holds the new chain
    try:
        # velocity keyed by a token: the card's two earlier buyers are still counted (the state snapshot of the
        # old chain is not loaded: its windows are keyed by the old tokens)
        third = api.score(card_payment("p3", "b3", 3))
        assert "CARD_SHARED_BY_BUYERS" in codes(third)
        blocked = api.score(card_payment("p4", "b4", 4, email=EMAIL))  # the list entry, under the new key
        assert "BLOCKED_EMAIL" in codes(blocked) and blocked["decision"] == "block"
        # a retry of a payment stored before the rotation is its replay; another request with its id, a 409
        replay = api.client.post("/v1/payments/score", json=first, headers=api.headers())
        assert replay.status_code == 200 and replay.headers.get("Idempotent-Replayed") == "true", replay.text
        changed = api.client.post("/v1/payments/score", json={**first, "item_count": 7}, headers=api.headers())
        assert changed.status_code == 409
        erased = api.client.post("/v1/pii/erase", json={"kind": "email", "value": EMAIL}, headers=api.headers("admin"))
        assert erased.status_code == 200, erased.text
        assert erased.json()["events"] == 2  # p1, from before the rotation, and p4
    finally:
        client.__exit__(None, None, None)


def test_a_running_worker_stops_and_an_interrupted_rotation_finishes(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)
    client, api = open_api(settings)
    try:
        for i in range(5):
            api.score(card_payment(f"p{i}", f"b{i}", i, email=f"e{i}@example.com"))
        for value in ("x@example.com", "y@example.com"):
            added = api.client.post(
                "/v1/lists/blocked_emails/entries", json={"value": value}, headers=api.headers("analyst")
            )
            assert added.status_code == 201, added.text
        # a string list keeps its values as given, even one shaped like a token
        lookalike = "bi:email:" + "A" * 24
        device = api.client.post(
            "/v1/lists/blocked_devices/entries", json={"value": lookalike}, headers=api.headers("analyst")
        )
        assert device.status_code == 201, device.text
        vault, db = api.engine.vault, api.engine.db
        new_key = secrets.token_bytes(32)
        target = Vault(b"m" * 32, [*vault.blind_index_keys, new_key])
        expected = {f"p{i}": target.blind_index(PiiKind.EMAIL, f"e{i}@example.com") for i in range(5)}

        monkeypatch.setattr(blind_index_rotation, "ROWS_PER_TRANSACTION", 2)
        real = blind_index_rotation._rewrite_list_entries

        def interrupted(*args: Any) -> int:
            raise RuntimeError("the process was killed")

        monkeypatch.setattr(blind_index_rotation, "_rewrite_list_entries", interrupted)
        with pytest.raises(RuntimeError):
            blind_index_rotation.rotate(db, vault, new_key, actor="test", pii_lists=PII_LISTS, settle_s=0)

        # meanwhile the running worker notices, and refuses to index PII: scoring is a 503, nothing stored
        api.engine.check_blind_index_key()
        refused = api.client.post("/v1/payments/score", json=card_payment("late", "b9", 9), headers=api.headers())
        assert refused.status_code == 503 and "cannot index PII" in refused.json()["message"]
        listed = api.client.post(
            "/v1/lists/blocked_emails/entries", json={"value": "z@example.com"}, headers=api.headers("analyst")
        )
        assert listed.status_code == 503
        # a worker starting now is refused too: the rotation is under way
        with pytest.raises(BlindIndexKeyMismatch, match="under way"):
            open_api(make_settings(tmp_path / "other", database_url))

        monkeypatch.setattr(blind_index_rotation, "_rewrite_list_entries", real)
        with pytest.raises(VaultKeyError, match="another key"):  # it must be finished with the same key
            blind_index_rotation.rotate(
                db, vault, secrets.token_bytes(32), actor="test", pii_lists=PII_LISTS, settle_s=0
            )
        report = blind_index_rotation.rotate(db, vault, new_key, actor="test", pii_lists=PII_LISTS, settle_s=0)
        assert (report.generation, report.list_entries) == (2, 2)
        stored = records(database_url)
        assert "late" not in stored
        assert {e: stored[e]["buyer.email"] for e in expected} == expected  # each token taken exactly once
        assert list_tokens(database_url, "blocked_devices") == [lookalike]
        assert sorted(list_tokens(database_url)) == sorted(
            target.blind_index(PiiKind.EMAIL, v) for v in ("x@example.com", "y@example.com")
        )
        with pytest.raises(VaultKeyError, match="already in the chain"):
            blind_index_rotation.rotate(db, target, new_key, actor="test", pii_lists=PII_LISTS, settle_s=0)
        assert blind_index_rotation.mismatch(db, target) is None
        with make_engine(database_url).connect() as conn:
            actions = [
                a.after["state"]
                for a in conn.execute(select(m.AuditEntry).where(m.AuditEntry.action == "vault.rotate_blind_index_key"))
            ]
        assert actions == ["rotating", "active"]
    finally:
        client.__exit__(None, None, None)


def test_a_worker_left_on_the_old_chain_is_stopped_by_its_poller(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=0.05)
    client, api = open_api(settings)
    try:
        api.score(card_payment("p1", "b1", 1))
        blind_index_rotation.rotate(api.engine.db, api.engine.vault, secrets.token_bytes(32), "test", PII_LISTS, 0.5)
        refused = api.client.post("/v1/payments/score", json=card_payment("p2", "b2", 2), headers=api.headers())
        assert refused.status_code == 503
    finally:
        client.__exit__(None, None, None)


def test_a_worker_that_missed_the_whole_rotation_stores_nothing_of_its_old_chain(
    tmp_path: Path, database_url: str
) -> None:
    """A worker suspended from before a rotation began until after it finished never had its poller see it:
    the group commit reads the chain in its transaction, so the first payment it scores is refused (503) and
    rolled back, and the worker stops indexing PII from then on."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # the poller never runs
    client, api = open_api(settings)
    try:
        api.score(card_payment("p1", "b1", 1))
        blind_index_rotation.rotate(api.engine.db, api.engine.vault, secrets.token_bytes(32), "test", PII_LISTS, 0)
        assert not api.engine.vault.blind_indexes_retired  # it slept through: nothing told it
        late = api.client.post("/v1/payments/score", json=card_payment("p2", "b2", 2), headers=api.headers())
        assert late.status_code == 503 and "cannot index PII" in late.json()["message"], late.text
        assert set(records(database_url)) == {"p1"}
        assert api.engine.vault.blind_indexes_retired
        again = api.client.post("/v1/payments/score", json=card_payment("p2", "b2", 2), headers=api.headers())
        assert again.status_code == 503  # refused before scoring now
        assert set(records(database_url)) == {"p1"}
    finally:
        client.__exit__(None, None, None)


def test_a_list_edit_by_a_worker_that_missed_the_whole_rotation_stores_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """List edits are transactions of their own, not group commits: each checks the chain before it commits."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # the poller never runs
    client, api = open_api(settings)
    try:
        h, path = api.headers("analyst"), "/v1/lists/blocked_emails/entries"
        assert api.client.post(path, json={"value": "x@example.com"}, headers=h).is_success
        before = list_tokens(database_url)
        blind_index_rotation.rotate(api.engine.db, api.engine.vault, secrets.token_bytes(32), "test", PII_LISTS, 0)
        rotated = list_tokens(database_url)
        added = api.client.post(path, json={"value": "y@example.com"}, headers=h)
        assert added.status_code == 503 and "cannot index PII" in added.json()["message"], added.text
        assert list_tokens(database_url) == rotated != before  # nothing of the old chain stored
        assert api.engine.vault.blind_indexes_retired
    finally:
        client.__exit__(None, None, None)


def test_with_the_key_in_the_environment_the_new_one_is_given_and_the_chain_named_there(
    tmp_path: Path, database_url: str
) -> None:
    home = tmp_path / "var"
    old_key, new_key = secrets.token_bytes(32), secrets.token_bytes(32)
    settings = make_settings(home, database_url, blind_index_key=b64(old_key))
    client, api = open_api(settings)
    try:
        api.score(payment(payment_id="p1"))
    finally:
        client.__exit__(None, None, None)
    env = {"RISK_ENGINE_DATABASE_URL": database_url, "RISK_ENGINE_BLIND_INDEX_KEY": b64(old_key)}
    refused = run_cli("vault", "rotate-blind-index-key", "--settle-s", "0", home=home, env=env)
    assert refused.returncode == 1 and "set RISK_ENGINE_NEW_BLIND_INDEX_KEY" in refused.stderr
    env["RISK_ENGINE_NEW_BLIND_INDEX_KEY"] = b64(new_key)
    rotated = run_cli("vault", "rotate-blind-index-key", "--settle-s", "0", home=home, env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert "append RISK_ENGINE_NEW_BLIND_INDEX_KEY to every worker's RISK_ENGINE_BLIND_INDEX_KEY" in rotated.stdout
    assert not (home / "blind_index.key").exists() and not (home / "blind_index.key.next").exists()
    with pytest.raises(BlindIndexKeyMismatch):  # the old chain alone
        open_api(settings)
    client, api = open_api(make_settings(home, database_url, blind_index_key=f"{b64(old_key)},{b64(new_key)}"))
    try:
        replay = api.client.post("/v1/payments/score", json=payment(payment_id="p1"), headers=api.headers())
        assert replay.status_code == 200 and replay.headers.get("Idempotent-Replayed") == "true"
        assert records(database_url)["p1"]["buyer.email"] == api.engine.vault.blind_index(
            PiiKind.EMAIL, payment()["buyer"]["email"]
        )
    finally:
        client.__exit__(None, None, None)


def test_a_reviews_tokens_and_the_keys_built_of_one_move_and_nothing_the_caller_gave(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)
    client, api = open_api(settings)
    try:
        lookalike = "bi:ip:" + "B" * 24  # an id the caller chose, shaped like a token
        order = {"order_id": BASE_REVIEW["order_id"], "seller_id": BASE_REVIEW["seller_id"], "buyer.id": lookalike}
        api.score(payment(payment_id="p1", **order))
        review = {**BASE_REVIEW, "reviewer": {**BASE_REVIEW["reviewer"], "id": lookalike}}
        answer = api.client.post("/v1/reviews/score", json=review, headers=api.headers())
        assert answer.status_code == 200, answer.text
        before = records(database_url)["r_1"]
        assert before["order.shipping_address"].startswith("bi:address:")
        assert before["seller_shipping_address"] == f"{BASE_REVIEW['seller_id']}:{before['order.shipping_address']}"
        new_key = secrets.token_bytes(32)
        layer = BlindIndexLayer(new_key)
        blind_index_rotation.rotate(
            api.engine.db, api.engine.vault, new_key, actor="test", pii_lists=PII_LISTS, settle_s=0
        )
        after = records(database_url)["r_1"]
        address = layer(before["order.shipping_address"])
        assert after["order.shipping_address"] == address
        assert after["seller_shipping_address"] == f"{BASE_REVIEW['seller_id']}:{address}"
        assert after["reviewer.ip"] == layer(before["reviewer.ip"])
        assert after["reviewer.id"] == lookalike  # as given
        assert {k for k, v in after.items() if v != before[k]} == {
            "order.shipping_address",
            "seller_shipping_address",
            "reviewer.ip",
        }
    finally:
        client.__exit__(None, None, None)
