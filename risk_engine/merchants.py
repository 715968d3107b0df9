"""The merchant subject: what a seller does (listings, prices, shipments, cancellations, refunds, disputes,
chargebacks, logins), each event scored through the pipeline into a flag, and the facts the seller's credit
score is computed from.

The answer's decision is the merchant flag: the policy's ``allow`` is ``ok``, ``challenge`` is ``watch``,
``review`` is ``investigate`` and ``block`` is ``restrict_payouts``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field, model_validator

from risk_engine.money import currency_exponent
from risk_engine.payments import Amount, Attributes, Id, IpAddress, Strict
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
    occurred_at: AwareDatetime
    seller_id: Id | None = Field(default=None, description="Set from the path; if sent, it must match")
    type: MerchantEventType
    order_id: Id | None = None
    item_id: Id | None = None
    amount: Amount | None = Field(default=None, description="Price, refund, chargeback or advance amount")
    previous_amount: Amount | None = Field(default=None, description="price_changed: the price before")
    late: bool = Field(default=False, description="order_shipped: after the promised time")
    outcome: Literal["buyer_won", "seller_won"] | None = Field(default=None, description="dispute_resolved")
    points: int | None = Field(default=None, ge=1, le=100, description="violation: penalty points")
    expires_at: AwareDatetime | None = Field(default=None, description="violation: when its points expire")
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
