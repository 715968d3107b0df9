"""Merchants and sellers: merchant events (scored into flags), a merchant's risk, a seller's credit score."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from risk_engine.errors import InvalidInput
from risk_engine.merchants import MerchantEventIn
from risk_engine.service.deps import Analyst, EngineDep, Scorer
from risk_engine.service.responses import JsonResponse, answer
from risk_engine.service.schemas import (
    CreditOut,
    IdPath,
    MerchantEventOut,
    MerchantRiskOut,
    RollupIn,
    RollupOut,
    errors,
)

merchants = APIRouter(prefix="/v1/merchants", tags=["merchants"])
sellers = APIRouter(prefix="/v1/sellers", tags=["sellers"])
ALREADY_SCORED = "The event_id was already scored with a different request"


@merchants.post("/{seller_id}/events", response_model=MerchantEventOut, responses=errors(conflict=ALREADY_SCORED))
async def merchant_event(
    seller_id: IdPath, event: MerchantEventIn, engine: EngineDep, _: Scorer, request: Request
) -> Response:
    """Record and score a merchant event: its flag (``ok``, ``watch``, ``investigate``, ``restrict_payouts``)
    and reasons; it also moves the seller's credit score. Idempotent on ``event_id``."""
    if event.seller_id is not None and event.seller_id != seller_id:
        raise InvalidInput([{"field": "seller_id", "reason": f"does not match the path's seller {seller_id}"}])
    event = event.model_copy(update={"seller_id": seller_id})
    return await answer(engine.score_event("merchant", event), request)


@merchants.post(
    "/rollup", response_model=RollupOut, responses=errors(not_found="No payments or merchant events to roll up")
)
async def merchants_rollup(body: RollupIn, engine: EngineDep, _: Analyst) -> JsonResponse:
    """Roll up every merchant's day and score the roll-ups (what a nightly scheduler calls)."""
    return JsonResponse(await asyncio.to_thread(engine.rollup_merchants, body.day))


@merchants.get(
    "/{seller_id}/risk",
    response_model=MerchantRiskOut,
    responses=errors(not_found="No merchant events for that seller"),
)
def merchant_risk(seller_id: IdPath, engine: EngineDep, _: Scorer) -> JsonResponse:
    """The merchant's current flag (the strictest of its last 7 days), why, and its flag history."""
    return JsonResponse(engine.merchant_risk(seller_id))


@sellers.get("/{seller_id}/credit", response_model=CreditOut, responses=errors(not_found="No events for that seller"))
def seller_credit(seller_id: IdPath, engine: EngineDep, _: Scorer) -> JsonResponse:
    """The seller's credit score (0-1000), tier, each component's contribution and the score's history."""
    return JsonResponse(engine.seller_credit(seller_id))
