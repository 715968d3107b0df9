"""Lists shared by every process on one database: an entry added, changed or removed by one worker (or by
``risk-engine lists``) is enforced by the others without a restart; a value added again restates its expiry."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from risk_engine.storage import list_entries
from tests.conftest import Api, make_settings, open_api, payment


def decides(api: Api, payment_id: str, minute: int) -> tuple[str, list[str]]:
    answer = api.score(
        payment(payment_id=payment_id, occurred_at=f"2026-11-22T10:{minute:02d}:00Z", **{"device.id": "dev_x"})
    )
    return answer["decision"], [r["code"] for r in answer["reasons"]]


def list_audit(api: Api) -> list[str]:
    audit = api.client.get("/v1/audit", headers=api.headers("analyst")).json()
    return [e["action"] for e in audit if e["action"].startswith("list.")]


def test_a_list_edit_in_one_worker_reaches_another(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # refreshed by hand below
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    h = a.headers("analyst")
    try:
        assert "BLOCKED_DEVICE" not in decides(b, "p1", 1)[1]
        assert b.engine.refresh_lists() is False  # nothing changed

        added = a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_x"}, headers=h)
        assert added.status_code == 201
        assert b.engine.refresh_lists() is True
        decision, reasons = decides(b, "p2", 2)
        assert decision == "block" and "BLOCKED_DEVICE" in reasons
        assert b.engine.refresh_lists() is False

        # the same value again changes nothing; with an expiry it replaces the stored one (audited)
        assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_x"}, headers=h).status_code == 201
        assert list_audit(a) == ["list.add"]
        until = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
        restated = a.client.post(
            "/v1/lists/blocked_devices/entries",
            json={"value": "dev_x", "expires_at": until.isoformat(), "note": "one day"},
            headers=h,
        )
        assert restated.json()["expires_at"] == until.isoformat()
        assert list_audit(a) == ["list.update", "list.add"]
        entries = a.client.get("/v1/lists/blocked_devices/entries", headers=h).json()
        assert [(e["entry"], e["expires_at"], e["note"]) for e in entries] == [("dev_x", until.isoformat(), "one day")]
        assert b.engine.refresh_lists() is True  # a change in place is seen too
        assert decides(b, "p3", 3)[0] == "block"

        removed = a.client.request("DELETE", "/v1/lists/blocked_devices/entries", json={"value": "dev_x"}, headers=h)
        assert removed.status_code == 200
        assert b.engine.refresh_lists() is True
        assert "BLOCKED_DEVICE" not in decides(b, "p4", 4)[1]
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)


def test_an_entry_that_expired_is_made_permanent_by_adding_it_again(api: Api) -> None:
    h = api.headers("analyst")
    soon = datetime.now(UTC) + timedelta(seconds=30)
    first = api.client.post(
        "/v1/lists/blocked_devices/entries", json={"value": "dev_x", "expires_at": soon.isoformat()}, headers=h
    )
    assert first.status_code == 201, first.text
    again = api.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_x"}, headers=h)
    assert again.json()["expires_at"] is None
    api.engine.lists.current(soon + timedelta(seconds=5))  # past the first expiry: nothing drops out
    assert decides(api, "p1", 1)[0] == "block"


def test_an_expiry_in_the_past_is_refused(api: Api) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    response = api.client.post(
        "/v1/lists/blocked_devices/entries", json={"value": "dev_x", "expires_at": past}, headers=api.headers("analyst")
    )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "expires_at"
    assert api.client.get("/v1/lists/blocked_devices/entries", headers=api.headers("analyst")).json() == []


def test_a_reload_that_read_the_rows_before_an_edit_here_does_not_undo_it(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # refreshed by hand below
    client_a, a = open_api(settings)
    client_b, b = open_api(settings)
    h = a.headers("analyst")
    try:
        assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_y"}, headers=h).status_code == 201
        read_rows = list_entries.all_entries

        def rows_then_an_edit_here(db: Engine) -> Sequence[Any]:
            rows = read_rows(db)  # the poller has read the rows: then an analyst's add reaches this worker
            b.engine.add_list_entry("blocked_devices", "dev_x", "analyst:test")
            return rows

        monkeypatch.setattr(list_entries, "all_entries", rows_then_an_edit_here)
        assert b.engine.refresh_lists() is False  # the rows read may lack the edit: kept for the next poll
        monkeypatch.setattr(list_entries, "all_entries", read_rows)
        assert decides(b, "p1", 1)[0] == "block"  # dev_x, added here, is enforced at once
        assert b.engine.refresh_lists() is True  # and the next poll brings the other worker's dev_y too
        assert decides(b, "p2", 2)[0] == "block"
        y = payment(payment_id="p3", occurred_at="2026-11-22T10:03:00Z", **{"device.id": "dev_y"})
        assert "BLOCKED_DEVICE" in [r["code"] for r in b.score(y)["reasons"]]
    finally:
        client_b.__exit__(None, None, None)
        client_a.__exit__(None, None, None)
