"""Labels: late outcomes (chargebacks, confirmed fraud, legitimate) for scored payments."""

from __future__ import annotations

from fastapi import APIRouter

from risk_engine.service.deps import EngineDep, Scorer
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS, LabelIn, LabelOut

router = APIRouter(prefix="/v1/labels", tags=["labels"])


@router.post("", response_model=LabelOut, status_code=201, responses={**ERRORS, 200: {"model": LabelOut}})
def record_label(label: LabelIn, engine: EngineDep, _: Scorer) -> JsonResponse:
    """Record an outcome. Idempotent on ``label_id``: a replay answers 200 with the stored label."""
    view, created = engine.record_label(
        label.label_id, label.payment_id, label.label, label.occurred_at, label.source, label.subject
    )
    return JsonResponse(view, status_code=201 if created else 200)
