"""Seller credit: each component moves the score the documented way; order, replays and restarts change
nothing; brushing buys nothing; merchant events become flags."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from risk_engine.credit import DAY, CreditEvent, credit_score
from tests.conftest import Api, make_settings, open_api, payment

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def history(orders: int = 200, days: int = 400, **extra: list[CreditEvent]) -> list[CreditEvent]:
    """An established seller: ``orders`` on-time shipments over ``days`` and good genuine ratings."""
    events = [CreditEvent(T0 + i * days * DAY / orders, "order_shipped") for i in range(orders)]
    events += [CreditEvent(T0 + days * DAY - i * DAY, "rating", value=4.6, weight=0.9) for i in range(60)]
    for more in extra.values():
        events += more
    return events


def component(events: list[CreditEvent], name: str) -> float:
    return next(c.points for c in credit_score(events).components if c.name == name)


END = T0 + 400 * DAY


@pytest.mark.parametrize(
    ("name", "worse"),
    [
        ("fulfilment", [CreditEvent(END - i * DAY, "order_shipped", late=True) for i in range(15)]),
        ("fulfilment", [CreditEvent(END - i * DAY, "order_cancelled_by_seller") for i in range(10)]),
        ("genuine_ratings", [CreditEvent(END - i * DAY, "rating", value=1.0, weight=1.0) for i in range(30)]),
        ("disputes", [CreditEvent(END - i * DAY, "dispute_lost") for i in range(3)]),
        ("disputes", [CreditEvent(END - i * DAY, "chargeback") for i in range(3)]),
        ("advances", [CreditEvent(END - i * DAY, "advance_recovered") for i in range(2)]),
        ("violations", [CreditEvent(END - DAY, "violation", points=6, expires_at=END + 90 * DAY)]),
    ],
)
def test_each_bad_fact_lowers_its_component_and_the_score(name: str, worse: list[CreditEvent]) -> None:
    base = history()
    after = base + worse
    assert component(after, name) < component(base, name)
    assert credit_score(after).score < credit_score(base).score


def test_good_ratings_tenure_and_volume_raise_it_with_diminishing_returns() -> None:
    base = history()
    better = base + [CreditEvent(END - i * DAY, "rating", value=5.0, weight=1.0) for i in range(40)]
    assert component(better, "genuine_ratings") > component(base, "genuine_ratings")
    small, medium, large = (history(orders=n) for n in (100, 1000, 10_000))
    v = [component(h, "tenure_and_volume") for h in (small, medium, large)]
    assert v[0] < v[1] < v[2] <= 150
    assert v[2] - v[1] < v[1] - v[0]  # ten times the orders again buys less


def test_held_or_rejected_reviews_count_for_nothing() -> None:
    base = history()
    brushed = base + [CreditEvent(END - 60 * i, "rating", value=5.0, weight=0.0) for i in range(500)]
    assert credit_score(brushed).score == credit_score(base).score


def test_violations_expire_and_old_facts_leave_the_window() -> None:
    violation = CreditEvent(END - DAY, "violation", points=6, expires_at=END + 10 * DAY)
    later = CreditEvent(END + 11 * DAY, "order_shipped")
    assert component([*history(), violation], "violations") == -120
    assert component([*history(), violation, later], "violations") == 0
    late = [CreditEvent(END - i * DAY, "order_shipped", late=True) for i in range(15)]
    much_later = [CreditEvent(END + 200 * DAY + i * DAY, "order_shipped") for i in range(50)]
    assert component(history(**{"l": late, "m": much_later}), "fulfilment") == component(
        history(**{"m": much_later}), "fulfilment"
    )


def test_tiers_follow_the_documented_thresholds() -> None:
    established = credit_score(history(orders=3000, days=800))
    assert established.tier in ("gold", "top") and established.score >= 750
    young = credit_score([CreditEvent(T0 + i * 3600, "order_shipped") for i in range(100)])
    assert young.tier == "new"  # under 30 days, whatever the score
    poor = credit_score(history(x=[CreditEvent(END - i * DAY, "dispute_lost") for i in range(20)]))
    assert poor.tier in ("bronze", "silver") and poor.score < 750


kinds = st.sampled_from(["order_shipped", "order_cancelled_by_seller", "dispute_lost", "chargeback", "rating"])


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 400), kinds, st.booleans()), min_size=1, max_size=60), st.randoms())
def test_the_score_depends_on_the_facts_not_their_order(facts: list[tuple[int, str, bool]], rnd: random.Random) -> None:
    events = [CreditEvent(T0 + d * DAY, k, late=flag, value=4.0, weight=0.5) for d, k, flag in facts]
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a, b = credit_score(events), credit_score(shuffled)
    assert (a.score, a.tier) == (b.score, b.tier)
    assert 0 <= a.score <= 1000


# -- through the API ----------------------------------------------------------------------------------------------


def merchant_event(api: Api, seller: str, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
    r = api.client.post(f"/v1/merchants/{seller}/events", json=body, headers=api.headers())
    assert r.status_code == expect, r.text
    out: dict[str, Any] = r.json()
    return out


def shipped(i: int, day: int, late: bool = False) -> dict[str, Any]:
    at = datetime(2026, 6, 1, tzinfo=UTC) + timedelta(days=day, minutes=i)
    return {
        "event_id": f"ship_{i}",
        "occurred_at": at.isoformat(),
        "type": "order_shipped",
        "order_id": f"o{i}",
        "late": late,
    }


@pytest.mark.parametrize("restart", ["from_state_snapshot", "rebuilding"])
def test_credit_over_the_api_replays_and_recomputes_exactly(tmp_path: Any, database_url: str, restart: str) -> None:
    settings_ = make_settings(tmp_path / "var", database_url)
    client, api = open_api(settings_)
    try:
        changes: list[tuple[str, int, str]] = []  # (event, score, tier) of each event that moved score or tier
        for i in range(40):
            merchant_event(api, "s_9", shipped(i, day=i, late=i % 8 == 0))
            now = api.client.get("/v1/sellers/s_9/credit", headers=api.headers()).json()
            if not changes or (now["score"], now["tier"]) != changes[-1][1:]:
                changes.append((f"merchant:ship_{i}", now["score"], now["tier"]))
        credit = api.client.get("/v1/sellers/s_9/credit", headers=api.headers()).json()
        assert {c["name"] for c in credit["components"]} == {
            "fulfilment",
            "genuine_ratings",
            "disputes",
            "advances",
            "violations",
            "tenure_and_volume",
        }
        assert credit["score"] == round(sum(c["points"] for c in credit["components"]))
        # the history holds the events that changed the score or tier, newest first, and no others
        assert [(h["event"], h["score"], h["tier"]) for h in credit["history"]] == changes[::-1]
        assert 1 < len(changes) < 40  # some shipments moved the score, and some left it where it was
        again = merchant_event(api, "s_9", shipped(39, day=39, late=39 % 8 == 0))  # a replay
        assert again["event_id"] == "ship_39"
        replayed = api.client.get("/v1/sellers/s_9/credit", headers=api.headers()).json()
        assert replayed["score"] == credit["score"] and replayed["history"] == credit["history"]
        lost = {
            "event_id": "d1",
            "occurred_at": "2026-07-12T00:00:00Z",
            "type": "dispute_resolved",
            "outcome": "buyer_won",
        }
        merchant_event(api, "s_9", lost)
        after = api.client.get("/v1/sellers/s_9/credit", headers=api.headers()).json()
        assert after["score"] < credit["score"]
        assert after["history"][0]["event"] == "merchant:d1" and after["history"][0]["score"] == after["score"]
        api.engine.writer.barrier().wait(10)
        recomputed = api.engine.recompute_credit("s_9")
        assert recomputed is not None and recomputed.score == after["score"]
    finally:
        client.__exit__(None, None, None)
    if restart == "rebuilding":
        (settings_.snapshot_dir / "state.snapshot").unlink()
    client, api = open_api(settings_)  # a restart restores or rebuilds the same state
    try:
        restarted = api.client.get("/v1/sellers/s_9/credit", headers=api.headers()).json()
        assert (restarted["score"], restarted["tier"]) == (after["score"], after["tier"])
        assert restarted["components"] == after["components"]
        assert api.client.get("/v1/sellers/nobody/credit", headers=api.headers()).status_code == 404
    finally:
        client.__exit__(None, None, None)


def test_published_reviews_move_the_rating_component_and_a_brushing_ring_does_not(sqlite_api: Api) -> None:
    api = sqlite_api
    for i in range(30):
        merchant_event(api, "s_42", shipped(i, day=i))
    before = api.client.get("/v1/sellers/s_42/credit", headers=api.headers()).json()
    t0 = datetime(2026, 7, 5, tzinfo=UTC)
    for i in range(20):  # the ring: one device, accounts a day old, five stars within minutes
        body = {
            "review_id": f"ring_{i}",
            "occurred_at": (t0 + timedelta(minutes=i)).isoformat(),
            "item_id": "item_1",
            "seller_id": "s_42",
            "reviewer": {"id": f"new_{i}", "created_at": (t0 - timedelta(days=1)).isoformat(), "device_id": "ring"},
            "rating": 5,
            "detailed_ratings": {"description": 5, "service": 5, "logistics": 5},
            "text": "Great seller!!! Five stars!!!",
        }
        r = api.client.post("/v1/reviews/score", json=body, headers=api.headers()).json()
    ring = api.client.get("/v1/sellers/s_42/credit", headers=api.headers()).json()
    ratings = {c["name"]: c for c in ring["components"]}["genuine_ratings"]
    assert ratings == {c["name"]: c for c in before["components"]}["genuine_ratings"]  # bought nothing
    assert ring["score"] <= before["score"] + 2  # (a few days' tenure at most)
    assert r["decision"] in ("hold", "reject")
    for i in range(10):  # genuine reviews from long-standing buyers, each for an order they paid
        paid = payment(
            payment_id=f"pay_real_{i}",
            order_id=f"order_real_{i}",
            seller_id="s_42",
            occurred_at=(t0 - timedelta(days=3, hours=i)).isoformat(),
            **{
                "buyer.id": f"old_{i}",
                "payment_method.card_fingerprint": f"fp_old_{i}",
                "device.id": f"d_{i}",
                "shipping_address.line1": f"{i} Old Street",  # each buyer at home
            },
        )
        assert api.score(paid)["decision"] != "block"
        body = {
            "order_id": f"order_real_{i}",
            "review_id": f"real_{i}",
            "occurred_at": (t0 + timedelta(days=1, hours=i)).isoformat(),
            "item_id": "item_1",
            "seller_id": "s_42",
            "reviewer": {"id": f"old_{i}", "created_at": "2022-01-01T00:00:00Z", "device_id": f"d_{i}"},
            "rating": 5,
            "detailed_ratings": {"description": 5, "service": 5, "logistics": 5},
            "text": "Fits well, arrived on time.",
        }
        assert api.client.post("/v1/reviews/score", json=body, headers=api.headers()).json()["decision"] == "publish"
    genuine = api.client.get("/v1/sellers/s_42/credit", headers=api.headers()).json()
    assert {c["name"]: c for c in genuine["components"]}["genuine_ratings"]["points"] > ratings["points"]


def test_merchant_events_become_flags_and_reach_the_payment_rules(sqlite_api: Api) -> None:
    api = sqlite_api
    steady = [merchant_event(api, "calm", {**shipped(i, day=0), "event_id": f"c{i}"}) for i in range(5)]
    assert all(e["decision"] == "ok" for e in steady)
    assert api.client.get("/v1/merchants/calm/risk", headers=api.headers()).json()["flag"] == "ok"
    t = datetime(2026, 6, 2, tzinfo=UTC)
    for i in range(20):
        refund = {"event_id": f"rf{i}", "occurred_at": (t + timedelta(minutes=i)).isoformat(), "type": "refund_issued"}
        last = merchant_event(api, "shady", refund)
    assert last["decision"] == "investigate" and any(r["code"] == "REFUND_BURST" for r in last["reasons"])
    risk = api.client.get("/v1/merchants/shady/risk", headers=api.headers()).json()
    assert risk["flag"] == "investigate" and risk["reasons"] == ["REFUND_BURST"]
    mismatch = {**shipped(99, day=1), "seller_id": "someone_else"}
    r = api.client.post("/v1/merchants/shady/events", json=mismatch, headers=api.headers())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "seller_id"
    bad = {"event_id": "v", "occurred_at": "2026-06-03T00:00:00Z", "type": "violation"}
    assert api.client.post("/v1/merchants/shady/events", json=bad, headers=api.headers()).status_code == 422
    api.score(payment(payment_id="to_shady", seller_id="shady"))
    api.engine.writer.barrier().wait(10)
    with api.engine.db.connect() as conn:
        (record,) = conn.exec_driver_sql("SELECT record FROM events WHERE event_id = 'to_shady'").one()
    import json

    stored = json.loads(record) if isinstance(record, str | bytes) else record
    assert stored["seller.flag"] == "investigate" and stored["seller.tier"] == "new"


event_kinds = st.sampled_from(
    [
        "order_shipped",
        "order_cancelled_by_seller",
        "dispute_lost",
        "chargeback",
        "advance_recovered",
        "rating",
        "violation",
        "seen",
    ]
)


@settings(max_examples=80)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 900), event_kinds, st.booleans(), st.integers(1, 5), st.integers(0, 100), st.integers(1, 200)
        ),
        min_size=1,
        max_size=80,
    )
)
def test_the_running_tally_equals_a_recount_after_every_event(
    facts: list[tuple[int, str, bool, int, int, int]],
) -> None:
    from risk_engine.credit import SellerFacts, tally

    events = [
        CreditEvent(
            T0 + d * DAY,
            kind,
            late=late,
            value=(rating + 1) / 2 if kind == "rating" else 0.0,  # halves, as a mean of two ratings can be
            weight=authenticity / 100,
            points=float(rating),
            expires_at=T0 + (d + days) * DAY,
        )
        for d, kind, late, rating, authenticity, days in facts
    ]
    running = SellerFacts()
    for i, event in enumerate(events):  # out of time order, as late events arrive
        running.add(event)
        assert running.t == tally(events[: i + 1])
        assert running.score() == credit_score(events[: i + 1])


def test_the_running_tally_of_a_big_seller_equals_a_recount_once_the_window_is_cut() -> None:
    """Thousands of facts over years, mostly in time order, some late: the events that left the window are cut
    off in bulk (``WINDOW_CUT_AT``), and what remains must still count as a recount does."""
    from risk_engine.credit import WINDOW_CUT_AT, SellerFacts, tally

    rnd = random.Random(7)
    kinds = ["order_shipped", "rating", "order_cancelled_by_seller", "dispute_lost", "violation"]
    events = []
    for i in range(4 * WINDOW_CUT_AT):
        at = T0 + i * 0.25 * DAY - (rnd.random() * 20 * DAY if rnd.random() < 0.1 else 0.0)  # 1 in 10 late
        kind = rnd.choice(kinds)
        events.append(
            CreditEvent(
                at,
                kind,
                late=rnd.random() < 0.2,
                value=rnd.randint(1, 5),
                weight=1.0,
                points=2.0,
                expires_at=at + 30 * DAY,
            )
        )
    running = SellerFacts()
    cut, start = False, 0
    for i, event in enumerate(events):
        running.add(event)
        cut, start = cut or running._start < start, running._start
        if i % 97 == 0 or i == len(events) - 1:
            assert running.t == tally(events[: i + 1]), i
    assert cut  # the bulk cut happened
