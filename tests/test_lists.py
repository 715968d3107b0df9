"""Lists shared by every process on one database: an entry added, changed or removed by one worker (or by
``risk-engine lists``) is enforced by the others without a restart; a value added again restates its expiry."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from risk_engine.features.lists import ListDecl, ListEntry, ListMatcher, expand_range
from risk_engine.storage import list_entries
from risk_engine.storage import models as m
from risk_engine.storage.db import make_engine
from tests.conftest import Api, make_settings, open_api, payment, two_workers
from tests.helpers import at_the_same_moment


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


def test_a_poll_that_read_an_entry_before_an_edit_here_does_not_undo_it(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # refreshed by hand below
    with two_workers(settings) as (a, b):
        h = a.headers("analyst")
        assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_x"}, headers=h).status_code == 201
        assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_y"}, headers=h).status_code == 201
        read_states = list_entries.entry_states

        def states_then_an_edit_here(db: Engine, keys: Iterable[tuple[str, str]]) -> dict[Any, Any]:
            states = read_states(db, keys)  # the poller has read dev_x as stored: then an analyst removes it here
            assert b.engine.remove_list_entry("blocked_devices", "dev_x", "analyst:test")
            return states

        monkeypatch.setattr(list_entries, "entry_states", states_then_an_edit_here)
        assert b.engine.refresh_lists() is True
        monkeypatch.setattr(list_entries, "entry_states", read_states)
        assert decides(b, "p1", 1)[0] != "block"  # the removal here stands
        y = payment(payment_id="p2", occurred_at="2026-11-22T10:02:00Z", **{"device.id": "dev_y"})
        assert "BLOCKED_DEVICE" in [r["code"] for r in b.score(y)["reasons"]]  # the rest of the poll applied
        assert b.engine.refresh_lists() is True  # the removal's own change, read back: still removed
        assert decides(b, "p3", 3)[0] != "block"
        assert a.engine.refresh_lists() is True
        assert decides(a, "p4", 4)[0] != "block"


# -- the matcher: incremental changes give what a rebuild from the entries gives ---------------------------------

T0 = datetime(2026, 12, 1, tzinfo=UTC)
RANGES = ["10.0.0.0/23", "10.0.1.0/24", "10.0.0.0/22", "192.0.2.7/32"]
DECLS = {
    "devices": ListDecl("devices", "string"),
    "ranges": ListDecl("ranges", "ip_range"),
}


def rebuilt(entries: dict[tuple[str, str], datetime | None], now: datetime) -> dict[str, set[str]]:
    """What the lists hold, computed afresh from the stored entries: the matcher must agree after any edits."""
    sets: dict[str, set[str]] = {name: set() for name in DECLS}
    for (name, token), expires_at in entries.items():
        if expires_at is None or expires_at > now:
            sets[name].update(expand_range(token) if name == "ranges" else [token])
    return sets


edits = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "tick"]),
        st.sampled_from([("devices", "d1"), ("devices", "d2"), *[("ranges", r) for r in RANGES]]),
        st.one_of(st.none(), st.integers(1, 20)),  # expiry, in minutes from the start
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(edits)
def test_incremental_list_changes_match_a_rebuild(ops: list[tuple[str, tuple[str, str], int | None]]) -> None:
    matcher = ListMatcher(DECLS)
    stored: dict[tuple[str, str], datetime | None] = {}
    now = T0
    for op, key, minutes in ops:
        expiry = None if minutes is None else T0 + timedelta(minutes=minutes)
        if op == "add":
            stored[key] = expiry
            matcher.add(ListEntry(*key, expiry), now)
        elif op == "remove":
            stored.pop(key, None)
            matcher.remove(*key)
        else:
            now += timedelta(minutes=3)
        live = {k: v for k, v in stored.items() if v is None or v > now}
        assert {n: set(s) for n, s in matcher.current(now).items()} == rebuilt(live, now)
        assert matcher.counts() == {name: sum(1 for k in live if k[0] == name) for name in DECLS}
        fresh = ListMatcher(DECLS)
        fresh.load((ListEntry(*k, v) for k, v in stored.items()), now)
        assert fresh.snapshot() == matcher.snapshot()


def test_removing_one_of_two_overlapping_ranges_keeps_the_network_the_other_covers() -> None:
    matcher = ListMatcher(DECLS)
    matcher.add(ListEntry("ranges", "10.0.0.0/23", None), T0)
    matcher.add(ListEntry("ranges", "10.0.1.0/24", None), T0)
    matcher.remove("ranges", "10.0.0.0/23")
    assert matcher.current(T0)["ranges"] == {"10.0.1.0/24"}
    assert matcher.counts()["ranges"] == 1


# -- at a list's real size: paged, imported in bulk, followed by the changes alone --------------------------------


def test_entries_are_listed_newest_first_a_page_at_a_time(api: Api) -> None:
    h = api.headers("analyst")
    values = [f"dev_{i}" for i in range(7)]
    imported = api.client.post("/v1/lists/blocked_devices/entries/import", json={"values": values}, headers=h)
    assert imported.status_code == 200, imported.text
    seen: list[str] = []
    page = api.client.get("/v1/lists/blocked_devices/entries?limit=3", headers=h).json()
    while page:
        seen += [e["entry"] for e in page]
        page = api.client.get(f"/v1/lists/blocked_devices/entries?limit=3&before_id={page[-1]['id']}", headers=h).json()
    assert seen == values[::-1]
    listed = {d["name"]: d["entries"] for d in api.client.get("/v1/lists", headers=h).json()}
    assert listed["blocked_devices"] == 7


def test_an_import_refuses_every_value_if_one_is_bad_and_otherwise_acts_as_adding_each(api: Api) -> None:
    h = api.headers("analyst")
    url = "/v1/lists/blocked_ips/entries/import"
    bad = api.client.post(url, json={"values": ["203.0.113.7", "203.0.113.300"]}, headers=h)
    assert bad.status_code == 422, bad.text
    assert bad.json()["errors"] == [{"field": "values.1", "reason": "not an IPv4 or IPv6 address"}]
    assert api.client.get("/v1/lists/blocked_ips/entries", headers=h).json() == []
    too_many = api.client.post(url, json={"values": ["203.0.113.7"] * 1001}, headers=h)
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "values"

    first = api.client.post(url, json={"values": ["203.0.113.7", "::ffff:203.0.113.8"]}, headers=h)
    assert first.json() == {"list": "blocked_ips", "added": 2, "updated": 0, "unchanged": 0}
    until = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    second = api.client.post(
        url, json={"values": ["203.0.113.8", "203.0.113.9"], "expires_at": until.isoformat()}, headers=h
    )
    assert second.json() == {"list": "blocked_ips", "added": 1, "updated": 1, "unchanged": 0}
    assert api.client.post(url, json={"values": ["203.0.113.7"]}, headers=h).json()["unchanged"] == 1
    shown = api.client.get("/v1/lists/blocked_ips/entries", headers=h).json()
    assert [e["expires_at"] for e in shown] == [until.isoformat(), until.isoformat(), None]
    for ip in ("203.0.113.7", "203.0.113.8", "203.0.113.9"):  # enforced here at once
        answer = api.score(payment(payment_id=f"p{ip}", **{"device.ip": ip}))
        assert "BLOCKED_IP" in [r["code"] for r in answer["reasons"]], ip
    assert [e["after"]["added"] for e in list_audit_entries(api) if e["action"] == "list.import"] == [1, 2]


def list_audit_entries(api: Api) -> list[dict[str, Any]]:
    return api.client.get("/v1/audit?action=list.", headers=api.headers("analyst")).json()  # type: ignore[no-any-return]


def test_a_worker_follows_list_changes_reading_only_the_entries_they_name(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # refreshed by hand below
    with two_workers(settings) as (a, b):
        h = a.headers("analyst")
        url = "/v1/lists/blocked_devices/entries/import"
        for start in range(0, 2500, 1000):
            values = [f"dev_{i}" for i in range(start, min(start + 1000, 2500))]
            assert a.client.post(url, json={"values": values}, headers=h).status_code == 200
        read_states = list_entries.entry_states
        asked: list[int] = []

        def counted(db: Engine, keys: Iterable[tuple[str, str]]) -> dict[Any, Any]:
            wanted = list(keys)
            asked.append(len(wanted))
            return read_states(db, wanted)

        def whole_lists(db: Engine) -> Any:
            raise AssertionError("a worker following changes read every entry")

        monkeypatch.setattr(list_entries, "entry_states", counted)
        monkeypatch.setattr(list_entries, "live_entries", whole_lists)
        assert b.engine.refresh_lists(limit=1000) is True  # 2,500 changes: read in three rounds, in one call
        assert asked == [1000, 1000, 500]
        assert b.engine.lists.counts()["blocked_devices"] == 2500
        asked.clear()
        h = a.headers("analyst")
        assert a.client.request("DELETE", "/v1/lists/blocked_devices/entries", json={"value": "dev_7"}, headers=h)
        assert b.engine.refresh_lists() is True
        assert asked == [1]  # the one entry that changed, of 2,500
        assert "dev_7" not in b.engine.lists.sets["blocked_devices"]
        assert b.engine.lists.counts()["blocked_devices"] == 2499
        assert b.engine.refresh_lists() is False


def test_a_list_change_that_commits_after_a_later_one_was_there_at_start_is_still_followed(
    tmp_path: Path, database_url: str
) -> None:
    """On PostgreSQL a change's id is taken at insert: one taken before a worker starts may commit after it has
    read the lists and the newest change. Its entry is missing from what the worker read; the id is kept as a
    gap and read when it commits."""
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)
    client, api = open_api(settings)
    client.__exit__(None, None, None)  # migrated, keys made
    db = make_engine(settings.resolved_database_url)
    now = datetime.now(UTC)
    with Session(db) as s:
        top = s.scalar(select(func.max(m.ListChange.id))) or 0  # the seeded lists' changes
        for change_id, device in ((top + 1, "dev_a"), (top + 2, "dev_b"), (top + 4, "dev_d")):  # +3: not committed
            s.add(m.ListEntry(list_name="blocked_devices", token=device, display=device, added_by="t", created_at=now))
            s.add(m.ListChange(id=change_id, list_name="blocked_devices", token=device))
        s.commit()
    client, api = open_api(settings)
    try:
        assert api.engine.lists.counts()["blocked_devices"] == 3
        with Session(db) as s:
            s.add(
                m.ListEntry(list_name="blocked_devices", token="dev_c", display="dev_c", added_by="t", created_at=now)
            )
            s.add(m.ListChange(id=top + 3, list_name="blocked_devices", token="dev_c"))
            s.commit()
        assert api.engine.refresh_lists() is True
        assert "dev_c" in api.engine.lists.sets["blocked_devices"]
    finally:
        client.__exit__(None, None, None)
        db.dispose()


def test_a_value_is_looked_up_on_a_list_whose_entries_are_shown_masked(api: Api) -> None:
    h = api.headers("analyst")
    url = "/v1/lists/blocked_emails/entries/lookup"
    added = api.client.post(
        "/v1/lists/blocked_emails/entries", json={"value": "Li.Wei@example.com", "note": "case 17"}, headers=h
    )
    assert added.status_code == 201, added.text
    found = api.client.post(url, json={"value": " li.wei@EXAMPLE.com"}, headers=h).json()  # as the index folds it
    assert found["on_list"] is True and found["live"] is True
    assert (found["entry"]["entry"], found["entry"]["note"]) == ("L****@example.com", "case 17")  # as added
    other = api.client.post(url, json={"value": "zhang.san@example.com"}, headers=h).json()
    assert other == {"list": "blocked_emails", "on_list": False, "live": False, "entry": None}
    assert api.client.post(url, json={"value": "x"}, headers=api.headers("scorer")).status_code == 403
    missing = api.client.post("/v1/lists/no_such/entries/lookup", json={"value": "x"}, headers=h)
    assert missing.status_code == 404
    bad = api.client.post("/v1/lists/blocked_ips/entries/lookup", json={"value": "300.1.1.1"}, headers=h)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "value"


def test_list_changes_past_a_week_are_pruned_and_a_worker_behind_them_reloads_every_list(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(tmp_path / "var", database_url, policy_poll_s=3600)  # refreshed by hand below
    with two_workers(settings) as (a, b):
        h = a.headers("analyst")
        for device in ("dev_1", "dev_2", "dev_3"):
            assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": device}, headers=h).status_code
        assert b.engine.refresh_lists() is True  # b has followed every change
        db = a.engine.db
        with Session(db) as s:
            ids = list(s.scalars(select(m.ListChange.id).order_by(m.ListChange.id)))
            times = list(s.scalars(select(m.ListChange.changed_at).order_by(m.ListChange.id)))
        assert all(t is not None for t in times)
        now = datetime.now(UTC)
        assert list_entries.prune_changes(db, now) == 0  # all recent
        # a week on, every change is old: all go but the newest, whose id the next change must not reuse
        assert list_entries.prune_changes(db, now + timedelta(days=8)) == len(ids) - 1
        with Session(db) as s:
            assert list(s.scalars(select(m.ListChange.id))) == [ids[-1]]
        assert b.engine.refresh_lists() is False  # b had read them all: nothing lost, no reload

        # b falls behind (as if suspended): changes are made and pruned before it reads them
        a.client.request("DELETE", "/v1/lists/blocked_devices/entries", json={"value": "dev_1"}, headers=h)
        assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_4"}, headers=h).status_code
        assert a.client.post("/v1/lists/blocked_devices/entries", json={"value": "dev_5"}, headers=h).status_code
        with Session(db) as s:
            newest = s.scalar(select(func.max(m.ListChange.id)))
        assert newest is not None and newest > ids[-1]  # ids go on past the kept one
        assert list_entries.prune_changes(db, datetime.now(UTC) + timedelta(days=8)) == 3
        assert b.engine.refresh_lists() is True  # every list read again
        assert b.engine.lists.sets["blocked_devices"] >= {"dev_2", "dev_3", "dev_4", "dev_5"}
        assert "dev_1" not in b.engine.lists.sets["blocked_devices"]
        assert b.engine.lists.counts() == a.engine.lists.counts()


def test_an_entry_updated_on_one_worker_as_another_removes_it_ends_as_one_then_the_other(
    tmp_path: Path, database_url: str
) -> None:
    """A new expiry for an entry and its removal, through two workers at the same moment: one comes wholly after
    the other (the entry gone, or added again with the new expiry), each audited, never a failed write (the
    update used to find its row deleted under it: a 500)."""
    from functools import partial

    from risk_engine.storage.db import migrate

    databases = [make_engine(database_url), make_engine(database_url)]
    migrate(databases[0])
    try:
        for i in range(15):
            token = f"dev_{i}"
            list_entries.add_entry(databases[0], "blocked_devices", token, token, "ops")
            later = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=i)
            outcomes = at_the_same_moment(
                partial(list_entries.add_entry, databases[0], "blocked_devices", token, token, "ops", expires_at=later),
                partial(list_entries.remove_entry, databases[1], "blocked_devices", token, "ops"),
            )
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            assert failures == [], (i, failures)
            left = list_entries.find_entry(databases[0], "blocked_devices", token)
            assert left is None or left["expires_at"] == later.isoformat(), left
            # and two removals at once: one removes it, the other finds it gone
            list_entries.add_entry(databases[0], "blocked_devices", token, token, "ops")
            removed = at_the_same_moment(
                *(partial(list_entries.remove_entry, db, "blocked_devices", token, "ops") for db in databases)
            )
            failures = [o for o in removed if isinstance(o, BaseException)]
            assert failures == [] and sorted(removed) == [False, True], (i, failures, removed)
        with Session(databases[0]) as s:
            actions = s.scalars(select(m.AuditEntry.action).where(m.AuditEntry.action.like("list.%"))).all()
        # each round: its add; its update and removal, or removal and add again; an add or update, and one removal
        assert len(actions) == 15 * 5 and actions.count("list.remove") == 15 * 2
    finally:
        for db in databases:
            db.dispose()
