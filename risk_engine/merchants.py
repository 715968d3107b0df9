"""The merchant subject: what a seller does (listings, prices, shipments, cancellations, refunds, disputes,
chargebacks, logins), each event scored through the pipeline into a flag, and the facts the seller's credit
score is computed from.

The answer's decision is the merchant flag: the policy's ``allow`` is ``ok``, ``challenge`` is ``watch``,
``review`` is ``investigate`` and ``block`` is ``restrict_payouts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from risk_engine.money import currency_exponent
from risk_engine.payments import Amount, Attributes, Id, Instant, IpAddress, Strict
from risk_engine.schema import SELLER_FIELDS, FieldSpec, FieldType, SubjectSchema
from risk_engine.vault import PiiKind, Vault

MerchantEventType = Literal[
    "listing_created",
    "price_changed",
    "order_shipped",
    "order_delivered",
    "order_cancelled_by_seller",
    "refund_issued",
    "dispute_opened",
    "dispute_resolved",
    "chargeback",
    "advance_recovered",
    "violation",
    "login",
]


class MerchantEventIn(Strict):
    """One thing a seller did or that happened to its orders. ``event_id`` is the idempotency key."""

    event_id: Id
    occurred_at: Instant
    seller_id: Id | None = Field(default=None, description="Set from the path; if sent, it must match")
    type: MerchantEventType
    order_id: Id | None = None
    item_id: Id | None = None
    amount: Amount | None = Field(default=None, description="Price, refund, chargeback or advance amount")
    previous_amount: Amount | None = Field(default=None, description="price_changed: the price before")
    late: bool = Field(default=False, description="order_shipped: after the promised time")
    outcome: Literal["buyer_won", "seller_won"] | None = Field(default=None, description="dispute_resolved")
    points: int | None = Field(default=None, ge=1, le=100, description="violation: penalty points")
    expires_at: Instant | None = Field(default=None, description="violation: when its points expire")
    device_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    ip: IpAddress | None = None
    attributes: Attributes = Field(default_factory=dict, max_length=256)

    @model_validator(mode="after")
    def _type_fields(self) -> MerchantEventIn:
        if self.type == "dispute_resolved" and self.outcome is None:
            raise ValueError("outcome is required for dispute_resolved")
        if self.type == "violation" and (self.points is None or self.expires_at is None):
            raise ValueError("points and expires_at are required for a violation")
        if self.expires_at is not None and self.expires_at <= self.occurred_at:
            raise ValueError("expires_at must be after occurred_at")
        return self


N, S, B, P = FieldType.NUMBER, FieldType.STRING, FieldType.BOOL, FieldType.PII

MERCHANT_SCHEMA = SubjectSchema(
    "merchant",
    {
        s.path: s
        for s in [
            FieldSpec("event_id", S, "event id"),
            FieldSpec("seller_id", S, "the seller"),
            FieldSpec("type", S, "listing_created, price_changed, order_shipped, ... (see the API)"),
            FieldSpec("seller_event", S, "seller id and event type ('s_42:refund_issued'): key of per-type counts"),
            FieldSpec("order_id", S, "the order concerned"),
            FieldSpec("item_id", S, "the listing concerned"),
            FieldSpec("amount.major", N, "amount in major units"),
            FieldSpec("amount.base", N, "amount in the base currency's major units (rules/currencies.toml)"),
            FieldSpec("amount.currency", S, "ISO 4217 code"),
            FieldSpec("price_change", N, "price_changed: new price / old price (1.0 = unchanged)"),
            FieldSpec("late", B, "order_shipped after the promised time"),
            FieldSpec("outcome", S, "dispute_resolved: buyer_won or seller_won"),
            FieldSpec("points", N, "violation penalty points"),
            FieldSpec("device.id", S, "device id of a login"),
            FieldSpec("device.ip", P, "IP of a login (blind index)", PiiKind.IP),
            FieldSpec("hour", N, "hour of day, UTC"),
            *SELLER_FIELDS,
        ]
    },
)


def _major(a: Amount) -> float:
    scale: int = 10 ** currency_exponent(a.currency)
    return a.value / scale


def flatten_merchant_event(e: MerchantEventIn, vault: Vault) -> tuple[dict[str, Any], dict[str, str]]:
    """The event's flat record (a login's IP as a blind index) and its PII bundle."""
    record: dict[str, Any] = {
        "event_id": e.event_id,
        "seller_id": e.seller_id,
        "type": e.type,
        "seller_event": f"{e.seller_id}:{e.type}",
        "order_id": e.order_id,
        "item_id": e.item_id,
        "late": e.late,
        "outcome": e.outcome,
        "points": e.points,
        "expires_at": e.expires_at.timestamp() if e.expires_at else None,
        "device.id": e.device_id,
        "hour": e.occurred_at.hour,
    }
    if e.amount is not None:
        record["amount.major"] = _major(e.amount)
        record["amount.currency"] = e.amount.currency
        if e.previous_amount is not None and e.previous_amount.value > 0:
            record["price_change"] = e.amount.value / e.previous_amount.value
    pii: dict[str, str] = {}
    if e.ip is not None:
        pii["device.ip"] = e.ip
        record["device.ip"] = vault.blind_index(PiiKind.IP, e.ip)
    for name, value in e.attributes.items():
        record["attributes." + name] = value
    return record, pii


MERCHANT_FLAGS = {"allow": "ok", "challenge": "watch", "review": "investigate", "block": "restrict_payouts"}


class MerchantDayIn(Strict):
    """A merchant's daily roll-up (computed by the engine from the day's stored events; see ``rollup``)."""

    event_id: Id = Field(description="seller:day, the roll-up's idempotency key")
    occurred_at: Instant = Field(description="End of the day rolled up")
    seller_id: Id
    day: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    orders: int = Field(ge=0)
    gmv: float = Field(ge=0, description="Sum of the day's paid orders, major units")
    avg_price: float = Field(ge=0)
    refunds: int = Field(ge=0)
    refund_rate: float = Field(ge=0)
    cancellations: int = Field(ge=0)
    cancel_rate: float = Field(ge=0)
    shipped: int = Field(ge=0)
    late_rate: float = Field(ge=0, le=1)
    new_listings: int = Field(ge=0)
    price_changes: int = Field(ge=0)
    disputes: int = Field(ge=0)
    chargebacks: int = Field(ge=0)
    attributes: Attributes = Field(default_factory=dict, max_length=256)


_DAY_NUMBERS = (
    ("orders", "paid orders (payments not blocked)"),
    ("gmv", "sum of paid orders, major units"),
    ("avg_price", "gmv / orders"),
    ("refunds", "refunds issued"),
    ("refund_rate", "refunds / orders"),
    ("cancellations", "seller cancellations"),
    ("cancel_rate", "seller cancellations / orders"),
    ("shipped", "orders shipped"),
    ("late_rate", "late shipments / shipped"),
    ("new_listings", "listings created"),
    ("price_changes", "price changes"),
    ("disputes", "disputes opened"),
    ("chargebacks", "chargebacks"),
)

MERCHANT_DAY_SCHEMA = SubjectSchema(
    "merchant_day",
    {
        s.path: s
        for s in [
            FieldSpec("event_id", S, "seller:day"),
            FieldSpec("seller_id", S, "the seller"),
            FieldSpec("day", S, "the day rolled up, YYYY-MM-DD (UTC)"),
            *(FieldSpec(name, N, text) for name, text in _DAY_NUMBERS),
            *SELLER_FIELDS,
        ]
    },
)


def flatten_merchant_day(d: MerchantDayIn, vault: Vault) -> tuple[dict[str, Any], dict[str, str]]:
    """A roll-up's flat record (no PII)."""
    record: dict[str, Any] = {"event_id": d.event_id, "seller_id": d.seller_id, "day": d.day}
    for name, _ in _DAY_NUMBERS:
        record[name] = getattr(d, name)
    for name, value in d.attributes.items():
        record["attributes." + name] = value
    return record, {}


def rollup(day: str, end: Any, events: Iterable[tuple[str, dict[str, Any], str]]) -> list[MerchantDayIn]:
    """Daily roll-ups per seller from the day's scored events ``(subject, record, decision)``: payments give
    orders and GMV (blocked ones do not count), merchant events the rest. Pure."""
    tallies: dict[str, dict[str, float]] = {}
    for subject, record, decision in events:
        seller = record.get("seller_id")
        if not isinstance(seller, str):
            continue
        t = tallies.setdefault(seller, {name: 0.0 for name, _ in _DAY_NUMBERS} | {"late": 0.0})
        if subject == "payment":
            if decision != "block":
                t["orders"] += 1
                # in the base currency when the payment had a rate (a record stored before rates: as paid)
                t["gmv"] += float(record.get("amount.base", record.get("amount.major")) or 0.0)
            continue
        kind = record.get("type")
        if kind == "refund_issued":
            t["refunds"] += 1
        elif kind == "order_cancelled_by_seller":
            t["cancellations"] += 1
        elif kind == "order_shipped":
            t["shipped"] += 1
            t["late"] += 1 if record.get("late") else 0
        elif kind == "listing_created":
            t["new_listings"] += 1
        elif kind == "price_changed":
            t["price_changes"] += 1
        elif kind == "dispute_opened":
            t["disputes"] += 1
        elif kind == "chargeback":
            t["chargebacks"] += 1
    out = []
    for seller, t in sorted(tallies.items()):
        orders = t["orders"]
        out.append(
            MerchantDayIn(
                event_id=f"{seller}:{day}",
                occurred_at=end,
                seller_id=seller,
                day=day,
                orders=int(orders),
                gmv=round(t["gmv"], 2),
                avg_price=round(t["gmv"] / orders, 2) if orders else 0.0,
                refunds=int(t["refunds"]),
                refund_rate=t["refunds"] / max(orders, 1.0),
                cancellations=int(t["cancellations"]),
                cancel_rate=t["cancellations"] / max(orders, 1.0),
                shipped=int(t["shipped"]),
                late_rate=t["late"] / max(t["shipped"], 1.0),
                new_listings=int(t["new_listings"]),
                price_changes=int(t["price_changes"]),
                disputes=int(t["disputes"]),
                chargebacks=int(t["chargebacks"]),
            )
        )
    return out
