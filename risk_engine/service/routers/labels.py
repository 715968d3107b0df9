"""Labels: late outcomes (chargebacks, confirmed fraud, legitimate) for scored payments."""

from __future__ import annotations

from fastapi import APIRouter

from risk_engine.labels import LabelRequest
from risk_engine.service.deps import EngineDep, Scorer
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS, LabelBatchIn, LabelBatchOut, LabelIn, LabelOut, errors

router = APIRouter(prefix="/v1/labels", tags=["labels"])


@router.post(
    "",
    response_model=LabelOut,
    status_code=201,
    responses={
        **errors(
            not_found="No stored event with that id", conflict="The label_id was already used for a different label"
        ),
        200: {"model": LabelOut},
    },
)
def record_label(label: LabelIn, engine: EngineDep, _: Scorer) -> JsonResponse:
    """Record an outcome. Idempotent on ``label_id``: a replay answers 200 with the stored label."""
    view, created = engine.record_label(
        label.label_id, label.payment_id, label.label, label.occurred_at, label.source, label.subject
    )
    return JsonResponse(view, status_code=201 if created else 200)


@router.post(
    "/batch", response_model=LabelBatchOut, status_code=201, responses={**ERRORS, 200: {"model": LabelBatchOut}}
)
def record_labels(batch: LabelBatchIn, engine: EngineDep, _: Scorer) -> JsonResponse:
    """Record up to 500 outcomes in one transaction, each idempotent on its ``label_id``: all of them, or, when
    any is wrong (an unknown event, a ``label_id`` used for another label), none, with a 422 naming each wrong
    one by its place (``labels.3.payment_id``). 201 if any was new, 200 if every one was a replay."""
    requests = [
        LabelRequest(label.label_id, label.payment_id, label.label, label.occurred_at, label.source, label.subject)
        for label in batch.labels
    ]
    views, created = engine.record_label_batch(requests)
    body = {"created": created, "replayed": len(views) - created, "labels": views}
    return JsonResponse(body, status_code=201 if created else 200)
