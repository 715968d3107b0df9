"""Response models: they document the contract in OpenAPI; handlers return ready JSON for speed."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from risk_engine.payments import ID_PATTERN, Day, Instant, Text
from risk_engine.subjects import SUBJECT_KINDS

# path parameters: an id as the scoring contracts take it; a policy version (a 32-bit column); a stored row's id
IdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
MAX_VERSION = 2**31 - 1
MAX_ROW_ID = 2**63 - 1
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION)]
JobIdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=ID_PATTERN)]  # the jobs table's key


class ReasonOut(BaseModel):
    code: str = Field(description="Stable reason code, e.g. CARD_TESTING")
    text: str
    source: Literal["rule", "model"]
    score_delta: float = Field(description="Points this reason added to (or took from) the score")


class FeatureEffectOut(BaseModel):
    feature: str
    effect: float = Field(description="How much this feature pushed the detector's score up")


class ModelScoreOut(BaseModel):
    name: str
    score: float = Field(description="Calibrated 0-1: anomaly rank among recent events, or probability of fraud")
    points: float = Field(description="This detector's share of the model part of the risk score")
    warming_up: bool = Field(description="Too few events, labels or no fit yet: counted as 0")
    top_features: list[FeatureEffectOut] = Field(description="Named when the detector adds points")


class ScoreFields(BaseModel):
    """What every subject's answer carries besides its id."""

    decision: Literal["allow", "challenge", "review", "block"]
    score: int = Field(ge=0, le=100)
    reasons: list[ReasonOut]
    tags: list[str]
    model_score: float = Field(description="The detectors combined, 0-1 (weighted quadratic mean; see README)")
    models: list[ModelScoreOut]
    policy_version: str = Field(description="subject:vN of the policy that decided")
    model_versions: dict[str, str]
    elapsed_ms: float = Field(description="Time to decide, before the durable write")


class ScoreOut(ScoreFields):
    payment_id: str


class AccountScoreOut(ScoreFields):
    account_id: str


class ReviewScoreOut(ScoreFields):
    review_id: str
    decision: Literal["publish", "hold", "reject"]  # type: ignore[assignment]
    authenticity: int = Field(ge=0, le=100, description="100 minus the risk score")


class MerchantEventOut(ScoreFields):
    event_id: str
    decision: Literal["ok", "watch", "investigate", "restrict_payouts"]  # type: ignore[assignment]


class FlagOut(BaseModel):
    at: datetime
    flag: Literal["ok", "watch", "investigate", "restrict_payouts"]
    event_id: str
    reasons: list[str]


class MerchantRiskOut(BaseModel):
    seller_id: str
    flag: Literal["ok", "watch", "investigate", "restrict_payouts"] = Field(
        description="The strictest flag of the merchant's last 7 days"
    )
    reasons: list[str]
    history: list[FlagOut]


class RollupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    day: Day | None = Field(default=None, description="UTC day; default: the day before the latest event")


class RolledUpOut(BaseModel):
    seller_id: str
    flag: Literal["ok", "watch", "investigate", "restrict_payouts"]
    score: int
    reasons: list[str]
    replayed: bool


class RollupOut(BaseModel):
    day: date
    merchants: int
    flagged: list[RolledUpOut]
    changed_since_rolled_up: list[str] = Field(description="Merchants whose day changed after it was rolled up")


class CreditComponentOut(BaseModel):
    name: Literal["fulfilment", "genuine_ratings", "disputes", "advances", "violations", "tenure_and_volume"]
    points: float
    min: float
    max: float
    detail: dict[str, float]


class CreditHistoryOut(BaseModel):
    at: datetime
    score: int
    tier: str
    event: str = Field(description="subject:event id of the event that moved the score")


class CreditOut(BaseModel):
    seller_id: str
    score: int = Field(ge=0, le=1000)
    tier: Literal["new", "bronze", "silver", "gold", "top"]
    as_of: datetime
    components: list[CreditComponentOut]
    history: list[CreditHistoryOut] = Field(description="Newest first, up to 100")


class PaymentOut(BaseModel):
    payment_id: str
    occurred_at: datetime
    decision: ScoreOut
    pii_masked: dict[str, str]
    pii_erased: bool = Field(description="The person's PII was erased on request (POST /v1/pii/erase)")
    pii_expired: bool = Field(description="The PII outlived the retention period (pii_retention_days) and was dropped")
    aggregates: dict[str, Any]
    features: dict[str, Any]
    labels: list[LabelOut] = Field(description="Outcomes received for this payment, oldest first")


class LabelIn(BaseModel):
    """A late outcome for a scored event (a payment unless ``subject`` says otherwise: then ``payment_id``
    holds that subject's id, e.g. an ``account_id``). ``label_id`` is the caller's idempotency key."""

    model_config = ConfigDict(extra="forbid")
    label_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    subject: Literal["payment", "account", "review", "merchant"] = "payment"
    payment_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN, description="The scored event's id")
    label: Literal["chargeback", "confirmed_fraud", "legitimate", "dispute_lost", "dispute_won", "fake", "genuine"] = (
        Field(
            description="Payments: chargeback, confirmed_fraud, legitimate, dispute_lost, dispute_won. Reviews: fake, "
            "genuine, confirmed_fraud, legitimate. Accounts and merchant events: confirmed_fraud, legitimate."
        )
    )
    occurred_at: Instant | None = None
    source: Text | None = Field(default=None, max_length=64)

    @field_validator("label")
    @classmethod
    def _label_of_the_subject(cls, label: str, info: ValidationInfo) -> str:
        subject = info.data.get("subject")  # absent when the subject itself failed: that error is reported
        if subject is not None and label not in SUBJECT_KINDS[subject].labels:
            raise ValueError(f"a {subject} takes {', '.join(SUBJECT_KINDS[subject].labels)}, not {label}")
        return label


class LabelOut(BaseModel):
    label_id: str
    payment_id: str
    label: str
    is_fraud: bool
    occurred_at: datetime
    received_at: datetime
    source: str | None


MAX_LABEL_BATCH = 500  # about 60 KB of labels: what the 64 KiB body limit holds


class LabelBatchIn(BaseModel):
    """Many outcomes at once (a day's chargeback file): stored together, or, if any is wrong, none of them."""

    model_config = ConfigDict(extra="forbid")
    labels: list[LabelIn] = Field(min_length=1, max_length=MAX_LABEL_BATCH)


class LabelBatchOut(BaseModel):
    created: int = Field(description="Labels new to the engine")
    replayed: int = Field(description="Labels it already held (the same label_id with the same label)")
    labels: list[LabelOut] = Field(description="Every label as stored, in the order sent")


def _expiry_in_the_future(expires_at: datetime | None) -> datetime | None:
    # an entry that has expired already would be stored, answered 201 and never match
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise ValueError("expires_at is not in the future: the entry would never match")
    return expires_at


class ListEntryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Text = Field(min_length=1, max_length=256)
    expires_at: Instant | None = Field(default=None, description="When the entry stops matching: in the future")
    note: Text | None = Field(default=None, max_length=512)

    _in_the_future = field_validator("expires_at")(_expiry_in_the_future)


class ListEntriesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    values: list[Annotated[Text, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=1000)
    expires_at: Instant | None = Field(default=None, description="When the entries stop matching: in the future")
    note: Text | None = Field(default=None, max_length=512)

    _in_the_future = field_validator("expires_at")(_expiry_in_the_future)


class ListImportOut(BaseModel):
    list: str
    added: int = Field(description="Values that were not on the list")
    updated: int = Field(description="Values on it whose expiry or note this restated")
    unchanged: int = Field(description="Values on it as stated already")


class ListValueIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Text = Field(min_length=1, max_length=256)


class ListEntryOut(BaseModel):
    list: str
    entry: str = Field(description="The value, masked for PII lists")
    added_by: str
    expires_at: datetime | None


class ModelOut(BaseModel):
    name: str
    subject: str
    version: str
    kind: Literal["anomaly", "supervised", "population"]
    estimator: str
    weight: float = Field(description="Its weight in the subject's model score")
    events_seen: int
    labels_seen: int
    features: list[str]
    score_quantiles: dict[str, float] = Field(
        description="Raw-score quantiles: recent events, or the fitted population"
    )
    calibrated: bool = Field(description="False while warming up (a population detector: until fitted)")


class ModelFitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: int | None = Field(default=None, ge=10, le=10_000_000, description="Recent stored events to fit on")


class ModelFitOut(BaseModel):
    name: str
    subject: str
    version: str
    estimator: str
    events: int
    fitted_at: datetime
    score_quantiles: dict[str, float]


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
    415: {
        "model": ErrorOut,
        "description": "A body that is not JSON (Content-Type) or is compressed (Content-Encoding)",
    },
    422: {"model": ErrorOut, "description": "Invalid input: each error names the field and the reason"},
    503: {"model": ErrorOut, "description": "Storage unavailable: nothing was decided or stored"},
}
IDEMPOTENCY_CONFLICT = "the Idempotency-Key was used with another request, or its first request is still being answered"


def errors(*, not_found: str | None = None, conflict: str | None = None) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route: ``ERRORS``, with a 404 and a 409 described when the route can answer them
    (``create_app`` adds the ``Idempotency-Key`` 409 to every route that takes one)."""
    out = dict(ERRORS)
    if not_found is not None:
        out[404] = {"model": ErrorOut, "description": not_found}
    if conflict is not None:
        out[409] = {"model": ErrorOut, "description": conflict}
    return out


def as_json_errors(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """``responses`` for a route whose own answer is not JSON: its errors still are (FastAPI would document
    them in the route's media type)."""
    schema = {"$ref": "#/components/schemas/ErrorOut"}
    return {
        code: {"description": r["description"], "content": {"application/json": {"schema": schema}}}
        for code, r in responses.items()
    }


class ApiKeyIn(BaseModel):
    """A key to create. ``request_id`` is the caller's idempotency key: a replay creates nothing more."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["scorer", "analyst", "admin"]
    name: Text = Field(min_length=1, max_length=128, description="What or who the key is for")
    request_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)


class ApiKeyOut(BaseModel):
    """A key as it may be shown: never its secret or the secret's hash."""

    key_id: str = Field(description="The part after rk_ in the key, before the second underscore")
    role: Literal["scorer", "analyst", "admin"]
    name: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="The key itself (rk_...): shown in this answer only, store it now")
