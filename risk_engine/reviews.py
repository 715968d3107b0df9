"""The review subject: a buyer's rating and text, scored for authenticity before it is published.

The answer's decision is ``publish``, ``hold`` (for moderation) or ``reject``: the policy's ``allow`` publishes,
``challenge`` and ``review`` hold, ``block`` rejects. ``authenticity`` is ``100 - score``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator

from risk_engine.features.lists import ip_prefix
from risk_engine.payments import Attributes, Id, Instant, IpAddress, Strict, contains_card_number
from risk_engine.schema import SELLER_FIELDS, FieldSpec, FieldType, SubjectSchema
from risk_engine.vault import PiiKind, Vault

Rating = Annotated[int, Field(ge=1, le=5)]


class Reviewer(Strict):
    id: Id
    created_at: Instant | None = Field(default=None, description="When the reviewer's account was created")
    device_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    ip: IpAddress | None = None


class DetailedRatings(Strict):
    """Taobao's detailed seller ratings (DSR), 1-5 each."""

    description: Rating | None = Field(default=None, description="Item as described")
    service: Rating | None = None
    logistics: Rating | None = None


class ReviewIn(Strict):
    """A review to score."""

    review_id: Id
    occurred_at: Instant
    order_id: Id | None = None
    item_id: Id
    seller_id: Id
    reviewer: Reviewer
    rating: Rating
    detailed_ratings: DetailedRatings = Field(default_factory=DetailedRatings)
    text: Annotated[str, Field(max_length=20_000)] = ""
    attributes: Attributes = Field(default_factory=dict, max_length=256)

    @field_validator("text")
    @classmethod
    def _no_pan_in_text(cls, v: str) -> str:
        if contains_card_number(v):
            raise ValueError("the text holds what looks like a full card number; it is never stored")
        return v


N, S, B, D, P = FieldType.NUMBER, FieldType.STRING, FieldType.BOOL, FieldType.DURATION, FieldType.PII

REVIEW_SCHEMA = SubjectSchema(
    "review",
    {
        s.path: s
        for s in [
            FieldSpec("review_id", S, "review id"),
            FieldSpec("order_id", S, "the order reviewed"),
            FieldSpec("item_id", S, "item id"),
            FieldSpec("seller_id", S, "seller id"),
            FieldSpec("reviewer.id", S, "reviewer's account id"),
            FieldSpec("reviewer.account_age", D, "time since the reviewer's account was created"),
            FieldSpec("reviewer.device", S, "reviewer's device id"),
            FieldSpec("reviewer.ip", P, "reviewer's IP (blind index)", PiiKind.IP),
            FieldSpec("reviewer.ip_prefix", S, "the IP's /24 (IPv4) or /48 (IPv6) network"),
            FieldSpec("rating", N, "overall rating, 1-5"),
            FieldSpec("rating.five", N, "1 for a five-star rating, else 0 (sum it for a share of five stars)"),
            FieldSpec("ratings.description", N, "detailed rating: item as described, 1-5"),
            FieldSpec("ratings.service", N, "detailed rating: service, 1-5"),
            FieldSpec("ratings.logistics", N, "detailed rating: logistics, 1-5"),
            FieldSpec("text", S, "the review's text"),
            FieldSpec("text.length", N, "characters in the text"),
            FieldSpec("hour", N, "hour of day of occurred_at, UTC, 0-23"),
            FieldSpec("seller_device", S, "seller id and reviewer device: key of per-seller device counts"),
            FieldSpec("order.paid", B, "the order was paid (not blocked) by this reviewer to this seller"),
            FieldSpec("order.age", D, "time since the order was paid"),
            FieldSpec("order.amount", N, "the order's amount, major units"),
            FieldSpec("order.shipped", B, "the seller reported the order shipped"),
            FieldSpec("order.delivered", B, "the order was reported delivered"),
            FieldSpec("order.since_delivery", D, "time since delivery"),
            FieldSpec("order.shipping_address", P, "the paid order's shipping address (blind index)", PiiKind.ADDRESS),
            FieldSpec(
                "seller_shipping_address", S, "seller id and the order's address index: key of per-seller counts"
            ),
            FieldSpec("reviewer.seller_device", B, "the reviewer's device or IP was seen in the seller's logins"),
            FieldSpec("text.near_duplicates", N, "recent reviews of this seller with near-identical text (SimHash)"),
            *SELLER_FIELDS,
        ]
    },
)


def flatten_review(r: ReviewIn, vault: Vault) -> tuple[dict[str, Any], dict[str, str]]:
    """The review's flat record (the reviewer's IP as a blind index) and its PII bundle."""
    record: dict[str, Any] = {
        "review_id": r.review_id,
        "order_id": r.order_id,
        "item_id": r.item_id,
        "seller_id": r.seller_id,
        "reviewer.id": r.reviewer.id,
        "reviewer.device": r.reviewer.device_id,
        "seller_device": f"{r.seller_id}:{r.reviewer.device_id}" if r.reviewer.device_id else None,
        "rating": r.rating,
        "rating.five": 1 if r.rating == 5 else 0,
        "ratings.description": r.detailed_ratings.description,
        "ratings.service": r.detailed_ratings.service,
        "ratings.logistics": r.detailed_ratings.logistics,
        "text": r.text,
        "text.length": len(r.text),
        "hour": r.occurred_at.hour,
    }
    pii: dict[str, str] = {}
    if r.reviewer.created_at is not None:
        record["reviewer.account_age"] = max((r.occurred_at - r.reviewer.created_at).total_seconds(), 0.0)
    if r.reviewer.ip is not None:
        pii["reviewer.ip"] = r.reviewer.ip
        record["reviewer.ip"] = vault.blind_index(PiiKind.IP, r.reviewer.ip)
        record["reviewer.ip_prefix"] = ip_prefix(r.reviewer.ip)
    for name, value in r.attributes.items():
        record["attributes." + name] = value
    return record, pii


REVIEW_DECISIONS = {"allow": "publish", "challenge": "hold", "review": "hold", "block": "reject"}
