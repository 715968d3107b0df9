"""The account subject: a buyer's, seller's or wallet's behaviour, scored as a whole (at sign-up, on a
periodic review, before a payout). Its signals are mostly caller attributes (aggregates the platform keeps),
declared in ``rules/subjects.toml`` like a payment's; the Ethereum accounts data in ``../shared/data`` goes
through it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from risk_engine.payments import Attributes, Id, Instant, Strict
from risk_engine.schema import FieldSpec, FieldType, SubjectSchema
from risk_engine.vault import Vault


class AccountIn(Strict):
    """An account to score."""

    account_id: Id = Field(description="Idempotency key of this scoring: one id per account review.")
    occurred_at: Instant
    subject_id: Id | None = Field(default=None, description="The account reviewed (default: account_id).")
    role: Literal["buyer", "seller", "wallet", "other"] = "other"
    created_at: Instant | None = None
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    attributes: Attributes = Field(default_factory=dict, max_length=256)


ACCOUNT_SCHEMA = SubjectSchema(
    "account",
    {
        s.path: s
        for s in [
            FieldSpec("account_id", FieldType.STRING, "id of this scoring"),
            FieldSpec("account.id", FieldType.STRING, "the account reviewed"),
            FieldSpec("account.role", FieldType.STRING, "buyer, seller, wallet, other"),
            FieldSpec("account.age", FieldType.DURATION, "time since the account was created"),
            FieldSpec("account.country", FieldType.STRING, "the account's country"),
            FieldSpec("hour", FieldType.NUMBER, "hour of day of occurred_at, UTC, 0-23"),
        ]
    },
)


def flatten_account(a: AccountIn, vault: Vault) -> tuple[dict[str, Any], dict[str, str]]:
    """The account's flat record; it carries no PII."""
    record: dict[str, Any] = {
        "account_id": a.account_id,
        "account.id": a.subject_id or a.account_id,
        "account.role": a.role,
        "account.country": a.country,
        "hour": a.occurred_at.hour,
    }
    if a.created_at is not None:
        record["account.age"] = max((a.occurred_at - a.created_at).total_seconds(), 0.0)
    for name, value in a.attributes.items():
        record["attributes." + name] = value
    return record, {}
