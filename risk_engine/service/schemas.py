"""Response models: they document the contract in OpenAPI; handlers return ready JSON for speed."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class ReasonOut(BaseModel):
    code: str = Field(description="Stable reason code, e.g. CARD_TESTING")
    text: str
    source: Literal["rule", "model"]
    score_delta: float = Field(description="Points this reason added to (or took from) the score")


class ScoreOut(BaseModel):
    payment_id: str
    decision: Literal["allow", "challenge", "review", "block"]
    score: int = Field(ge=0, le=100)
    reasons: list[ReasonOut]
    tags: list[str]
    policy_version: str = Field(description="subject:vN of the policy that decided")
    model_versions: dict[str, str]
    elapsed_ms: float = Field(description="Time to decide, before the durable write")


class PaymentOut(BaseModel):
    payment_id: str
    occurred_at: datetime
    decision: ScoreOut
    pii_masked: dict[str, str]
    aggregates: dict[str, Any]
    features: dict[str, Any]


class LabelIn(BaseModel):
    """A late outcome for a payment. ``label_id`` is the caller's idempotency key."""

    model_config = ConfigDict(extra="forbid")
    label_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    payment_id: str = Field(min_length=1, max_length=128)
    label: Literal["chargeback", "confirmed_fraud", "legitimate", "dispute_lost", "dispute_won"]
    occurred_at: AwareDatetime | None = None
    source: str | None = Field(default=None, max_length=64)


class LabelOut(BaseModel):
    label_id: str
    payment_id: str
    label: str
    is_fraud: bool
    occurred_at: datetime
    received_at: datetime
    source: str | None


class ListEntryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(min_length=1, max_length=256)
    expires_at: AwareDatetime | None = None
    note: str | None = Field(default=None, max_length=512)


class ListEntryRemove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(min_length=1, max_length=256)


class ListEntryOut(BaseModel):
    list: str
    entry: str = Field(description="The value, masked for PII lists")
    added_by: str
    expires_at: datetime | None


class ModelOut(BaseModel):
    name: str
    subject: str
    version: str
    estimator: str
    events_seen: int
    labels_seen: int
    features: list[str]
    score_quantiles: dict[str, float]
    calibrated: bool


class ErrorItem(BaseModel):
    field: str
    reason: str


class ErrorOut(BaseModel):
    error: str
    message: str
    errors: list[ErrorItem] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or unknown API key"},
    403: {"model": ErrorOut, "description": "The key's role may not do this"},
    413: {"model": ErrorOut, "description": "Body too large"},
    422: {"model": ErrorOut, "description": "Invalid input: each error names the field and the reason"},
    503: {"model": ErrorOut, "description": "Storage unavailable: nothing was decided or stored"},
}
