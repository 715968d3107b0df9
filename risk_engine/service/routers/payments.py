"""Payments: score one, read one back (PII masked)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from risk_engine.payments import PaymentIn
from risk_engine.service.deps import Analyst, EngineDep, Listing, Scorer
from risk_engine.service.responses import JsonResponse, answer
from risk_engine.service.schemas import ERRORS, IdPath, PaymentOut, ScoreOut, errors

router = APIRouter(prefix="/v1/payments", tags=["payments"])
ALREADY_SCORED = "The payment_id was already scored with a different request"


@router.post("/score", response_model=ScoreOut, responses=errors(conflict=ALREADY_SCORED))
async def score_payment(payment: PaymentIn, engine: EngineDep, _: Scorer, request: Request) -> Response:
    """Score a payment: decision, 0-100 score and reasons. Idempotent on ``payment_id``."""
    return await answer(engine.score_payment(payment), request)


@router.get("", responses=ERRORS)
def list_payments(listing: Listing, engine: EngineDep, _: Analyst) -> JsonResponse:
    """Stored payments, newest first, with their decision, score and the rules that fired: filter by ``decision``
    and ``unlabelled`` for a review queue; page with ``before_id``."""
    return JsonResponse(engine.list_events("payment", listing))


@router.get("/{payment_id}", response_model=PaymentOut, responses=errors(not_found="No payment with that id"))
def get_payment(payment_id: IdPath, engine: EngineDep, _: Scorer) -> JsonResponse:
    """A stored payment's decision, aggregates and features, with its PII masked."""
    return JsonResponse(engine.get_payment(payment_id))
