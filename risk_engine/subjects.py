"""The subjects the engine scores, each through the same pipeline: its contract, its id field and its
flattening into the record that rules and detectors read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from risk_engine.accounts import ACCOUNT_SCHEMA, AccountIn, flatten_account
from risk_engine.merchants import (
    MERCHANT_DAY_SCHEMA,
    MERCHANT_FLAGS,
    MERCHANT_SCHEMA,
    MerchantDayIn,
    MerchantEventIn,
    flatten_merchant_day,
    flatten_merchant_event,
)
from risk_engine.payments import PAYMENT_SCHEMA, PII_FIELD_KINDS, PaymentIn, flatten_payment
from risk_engine.reviews import REVIEW_DECISIONS, REVIEW_SCHEMA, ReviewIn, flatten_review
from risk_engine.schema import SubjectSchema
from risk_engine.vault import PiiKind, Vault

# the outcomes a late label may report, and whether each means fraud
OUTCOMES: Mapping[str, bool] = {"confirmed_fraud": True, "legitimate": False}
PAYMENT_OUTCOMES: Mapping[str, bool] = {
    "chargeback": True,
    "confirmed_fraud": True,
    "legitimate": False,
    "dispute_lost": True,
    "dispute_won": False,
}
REVIEW_OUTCOMES: Mapping[str, bool] = {"fake": True, "genuine": False, **OUTCOMES}  # moderation's words, or ours


@dataclass(frozen=True)
class SubjectKind:
    """How one subject enters the pipeline."""

    name: str
    id_field: str  # the request's idempotency key: payment_id, account_id
    model: type[BaseModel]
    schema: SubjectSchema
    flatten: Callable[[Any, Vault], tuple[dict[str, Any], dict[str, str]]]
    pii_kinds: Mapping[str, PiiKind]
    decision_names: Mapping[str, str] | None = None  # the subject's words for allow/challenge/review/block
    # what the request says that its record does not (hashed with the record for idempotency)
    beyond_record: Callable[[Any], Any] = lambda event: getattr(event, "created_at", None)
    # fields the subject's answer adds, from the 0-100 score
    answer_fields: Callable[[int], dict[str, Any]] = lambda score: {}
    labels: Mapping[str, bool] = field(default_factory=lambda: OUTCOMES)  # what POST /v1/labels takes for it
    # the record fields naming the person the event's PII is of, by the kind of id an erasure names them by
    # (buyer_id: buyers, reviewers and account holders share one namespace; seller_id: the sellers')
    person_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def event_id(self, event: BaseModel) -> str:
        """The event's idempotency key."""
        value: str = getattr(event, self.id_field)
        return value


SUBJECT_KINDS: dict[str, SubjectKind] = {
    "payment": SubjectKind(
        "payment",
        "payment_id",
        PaymentIn,
        PAYMENT_SCHEMA,
        flatten_payment,
        PII_FIELD_KINDS,
        beyond_record=lambda p: p.buyer.created_at,  # the record has the account's age, not its creation
        labels=PAYMENT_OUTCOMES,
        person_ids={"buyer_id": ("buyer.id",)},  # the PII is the buyer's, never the seller's
    ),
    "account": SubjectKind(
        "account",
        "account_id",
        AccountIn,
        ACCOUNT_SCHEMA,
        flatten_account,
        {},
        person_ids={"buyer_id": ("account.id",)},
    ),
    "review": SubjectKind(
        "review",
        "review_id",
        ReviewIn,
        REVIEW_SCHEMA,
        flatten_review,
        {"reviewer.ip": PiiKind.IP},
        REVIEW_DECISIONS,
        beyond_record=lambda r: r.reviewer.created_at,
        answer_fields=lambda score: {"authenticity": 100 - score},
        labels=REVIEW_OUTCOMES,
        person_ids={"buyer_id": ("reviewer.id",)},
    ),
    "merchant": SubjectKind(
        "merchant",
        "event_id",
        MerchantEventIn,
        MERCHANT_SCHEMA,
        flatten_merchant_event,
        {"device.ip": PiiKind.IP},
        MERCHANT_FLAGS,
        person_ids={"seller_id": ("seller_id",)},  # a seller's login IPs
    ),
    "merchant_day": SubjectKind(
        "merchant_day", "event_id", MerchantDayIn, MERCHANT_DAY_SCHEMA, flatten_merchant_day, {}, MERCHANT_FLAGS
    ),
}

# the kinds of person id an erasure can name, and the subjects whose events carry each
PERSON_ID_KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for kind in SUBJECT_KINDS.values() for k in kind.person_ids))
