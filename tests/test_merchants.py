"""Merchant behaviour: daily roll-ups scored against the merchant's own history and its peers."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from risk_engine.marketplace import MarketplaceState
from risk_engine.merchants import MerchantEventIn, rollup
from risk_engine.payments import PaymentIn
from tests.conftest import Api, make_settings, open_api, payment, run_cli

START = datetime(2026, 9, 1, tzinfo=UTC)


def trade(api: Api, seller: str, day: int, orders: int, refunds: int) -> None:
    """A merchant's day: ``orders`` paid orders spread over the day and ``refunds`` refunds."""
    base = START + timedelta(days=day)
    for i in range(orders):
        body = payment(
            payment_id=f"{seller}_d{day}_p{i}",
            order_id=f"{seller}_d{day}_o{i}",
            seller_id=seller,
            occurred_at=(base + timedelta(minutes=15 * i)).isoformat(),
            **{
                "buyer.id": f"b_{seller}_{day}_{i}",
                "buyer.email": f"b{day}x{i}@example.com",
                "payment_method.card_fingerprint": f"fp_{seller}_{day}_{i}",
                "device.id": f"dev_{seller}_{day}_{i}",
                "amount.value": 10000 + 37 * i,
            },
        )
        api.engine.score_payment(PaymentIn.model_validate(body))
    for i in range(refunds):
        event = MerchantEventIn(
            event_id=f"{seller}_d{day}_r{i}",
            occurred_at=base + timedelta(hours=20, minutes=i),
            seller_id=seller,
            type="refund_issued",
            order_id=f"{seller}_d{day}_o{i}",
        )
        api.engine.score_event("merchant", event)


def test_rollup_counts_the_days_facts() -> None:
    end = START + timedelta(days=1)
    events = [
        ("payment", {"seller_id": "s", "amount.major": 100.0}, "allow"),
        ("payment", {"seller_id": "s", "amount.major": 50.0}, "review"),
        ("payment", {"seller_id": "s", "amount.major": 999.0}, "block"),  # not an order
        ("merchant", {"seller_id": "s", "type": "refund_issued"}, "allow"),
        ("merchant", {"seller_id": "s", "type": "order_shipped", "late": True}, "allow"),
        ("merchant", {"seller_id": "s", "type": "order_shipped", "late": False}, "allow"),
        ("merchant", {"seller_id": "t", "type": "listing_created"}, "allow"),
    ]
    s, t = rollup("2026-09-01", end, events)
    assert (s.seller_id, s.orders, s.gmv, s.avg_price, s.refunds, s.refund_rate) == ("s", 2, 150.0, 75.0, 1, 0.5)
    assert (s.shipped, s.late_rate) == (2, 0.5) and s.event_id == "s:2026-09-01"
    assert (t.orders, t.new_listings, t.refund_rate) == (0, 1, 0.0)


def test_a_refund_rate_jump_is_flagged_and_steady_behaviour_is_not(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path / "var", database_url)
    client, api = open_api(settings)
    try:
        for day in range(21):
            for seller in ("jumpy", "steady"):
                trade(api, seller, day, orders=50, refunds=1)  # 2% refunds
            summary = api.engine.rollup_merchants(date(2026, 9, 1) + timedelta(days=day))
            assert summary["merchants"] == 2 and summary["flagged"] == [], (day, summary)
        trade(api, "jumpy", 21, orders=50, refunds=15)  # 30% refunds
        trade(api, "steady", 21, orders=50, refunds=1)
        summary = api.engine.rollup_merchants(date(2026, 9, 22))
        flagged = {f["seller_id"]: f for f in summary["flagged"]}
        assert set(flagged) == {"jumpy"}
        assert flagged["jumpy"]["flag"] in ("investigate", "restrict_payouts")
        assert {"REFUND_RATE_HIGH", "REFUND_RATE_JUMP", "MODEL_MERCHANT_DAY_CHANGE"} <= set(flagged["jumpy"]["reasons"])
        again = api.engine.rollup_merchants(date(2026, 9, 22))  # idempotent
        assert again["flagged"][0]["replayed"] and again["flagged"][0]["score"] == flagged["jumpy"]["score"]
        risk = api.client.get("/v1/merchants/jumpy/risk", headers=api.headers()).json()
        assert risk["flag"] == flagged["jumpy"]["flag"] and "REFUND_RATE_HIGH" in risk["reasons"]
        calm = api.client.get("/v1/merchants/steady/risk", headers=api.headers()).json()
        assert calm["flag"] == "ok"
        # peers: the population detector, fitted on the stored roll-ups
        fit = api.engine.fit_detector("merchant_day_population", actor="test")
        assert fit["events"] == 44
    finally:
        client.__exit__(None, None, None)
    # the flags and their history come back after a restart: from the state snapshot, and rebuilt without it
    for restart in ("from_state_snapshot", "rebuilding"):
        if restart == "rebuilding":
            (settings.snapshot_dir / "state.snapshot").unlink()
        client, api = open_api(settings)
        try:
            for seller, before in (("jumpy", risk), ("steady", calm)):
                after = api.client.get(f"/v1/merchants/{seller}/risk", headers=api.headers()).json()
                assert after == before, (restart, seller)
        finally:
            client.__exit__(None, None, None)


def test_rollup_and_fit_from_the_command_line(tmp_path: Path) -> None:
    result = run_cli("merchants", "rollup", "--day", "2026-09-01", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["merchants"] == 0
    bad = run_cli("merchants", "rollup", "--day", "yesterday", home=tmp_path)
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr
    fit = run_cli("merchants", "fit", home=tmp_path)
    assert fit.returncode == 1 and "at least 10 stored merchant_day events" in fit.stderr


def test_a_busy_sellers_flag_is_the_strictest_decision_of_its_last_week_however_many_events_it_had() -> None:
    """Every shipment is a merchant event: a busy seller has thousands a week, and its flag is read on every
    payment to it. The flag is the strictest decision of the 7 days up to its latest event, kept as each
    decision's latest time (the history keeps the events that were not ok)."""
    state = MarketplaceState()
    day = 86_400.0

    def event(i: int, at: float, decision: str) -> None:
        record = {"seller_id": "s_busy", "type": "order_shipped", "event_id": f"m{i}"}
        state.observe("merchant", record, at, decision, 0, ("PRICE_JUMP",) if decision != "allow" else ())

    assert state.flag("s_busy") == "ok" and state.merchant_view("s_busy") is None
    event(0, 0.0, "review")
    event(1, 1 * day, "challenge")
    for i in range(2, 3000):  # then thousands of shipments that were fine, over six days
        event(i, 1 * day + i * 150.0, "allow")
    assert state.flag("s_busy") == "investigate"  # the review of day 0 is within the week
    view = state.merchant_view("s_busy")
    assert view is not None and [h["event_id"] for h in view["history"]] == ["m1", "m0"]
    event(3000, 7 * day + 1, "allow")  # day 0 leaves the week: the challenge of day 1 is the strictest left
    assert state.flag("s_busy") == "watch"
    event(3001, 8 * day + 1, "allow")
    assert state.flag("s_busy") == "ok"
    record: dict[str, object] = {"seller_id": "s_busy"}
    state.enrich("payment", record, 8 * day + 2)
    assert record["seller.flag"] == "ok"
    event(3002, 5 * day, "block")  # late, but within the week before the latest event
    assert state.flag("s_busy") == "restrict_payouts"


def test_a_roll_up_folds_the_days_events_as_they_stream(sqlite_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A day of a marketplace is millions of payments and merchant events: the roll-up read them all, decoded,
    into one list before folding them. With batches of 50, a day of 2,000 stays far under what 2,000 decoded
    rows take (about 14 MB)."""
    import tracemalloc

    from risk_engine import engine as engine_module

    engine = sqlite_api.engine
    last = None
    for i in range(2_000):
        body = payment(
            payment_id=f"d{i}",
            occurred_at=f"2026-09-01T{i // 120:02d}:{i % 120 // 2:02d}:{i % 2 * 30:02d}Z",
            seller_id=f"s_{i % 5}",
            **{"buyer.id": f"b{i % 300}"},
        )
        last = engine.score_payment(PaymentIn.model_validate(body)).committed
    assert last is not None and last.exception(30) is None
    monkeypatch.setattr(engine_module, "STREAMED_ROWS", 50)
    tracemalloc.start()
    try:
        summary = engine.rollup_merchants(date(2026, 9, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["merchants"] == 5 and summary["changed_since_rolled_up"] == []
    assert peak < 4_000_000, peak
    again = engine.rollup_merchants(date(2026, 9, 1))  # the same figures, folded again: replayed, not changed
    assert again["merchants"] == 5 and again["changed_since_rolled_up"] == []
