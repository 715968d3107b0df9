"""Erasure of a person's PII on request (the right to erasure of GDPR art. 17 and PIPL art. 47), admin only."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from risk_engine.payments import Text
from risk_engine.service.deps import Admin, EngineDep
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS

router = APIRouter(prefix="/v1/pii", tags=["pii"])


class ErasureIn(BaseModel):
    """Whose PII to erase: a person's id, or one of their PII values (compared by its blind index)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["buyer_id", "seller_id", "email", "phone", "name", "address", "ip", "card", "id_number"] = Field(
        description="buyer_id: a payment's buyer, a review's reviewer or an account, by id; seller_id: a merchant "
        "event's seller (its login IPs), by id; otherwise the kind of PII value (address: line1 line2 city "
        "postal_code country, as the payment sent them)"
    )
    value: Text = Field(min_length=1, max_length=512)


class ErasureOut(BaseModel):
    kind: str
    events: int = Field(description="Stored events whose sealed PII was erased by this request")
    by_subject: dict[str, int]


@router.post("/erase", response_model=ErasureOut, responses=ERRORS)
def erase(body: ErasureIn, engine: EngineDep, who: Admin) -> JsonResponse:
    """Erase the sealed PII of every stored event that carries this person's id or PII value; audited as
    ``pii.erase`` with the counts (never the value). Records keep their blind indexes (keyed pseudonyms the
    velocity windows, backtests and lists need), so decisions and backtests are unchanged; the event's
    ``pii_masked`` is empty from then on and ``pii_erased`` true. Erasing again erases nothing more."""
    return JsonResponse(engine.erase_pii(body.kind, body.value, f"key:{who.key_id}"))
