"""Detectors: versions, events seen and score distributions."""

from __future__ import annotations

from fastapi import APIRouter

from risk_engine.service.deps import EngineDep, Scorer
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS, ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut], responses=ERRORS)
async def list_models(engine: EngineDep, _: Scorer) -> JsonResponse:
    """Every detector with its version, events seen and current raw-score quantiles."""
    return JsonResponse(engine.models_info())
