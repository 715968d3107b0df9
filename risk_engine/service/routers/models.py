"""Detectors: versions, events seen and score distributions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from risk_engine.service.deps import Analyst, EngineDep, Scorer
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS, ModelFitIn, ModelFitOut, ModelOut, errors

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut], responses=ERRORS)
def list_models(engine: EngineDep, _: Scorer) -> JsonResponse:
    """Every detector with its version, events seen and current raw-score quantiles."""
    return JsonResponse(engine.models_info())


@router.post("/{name}/fit", response_model=ModelFitOut, responses=errors(not_found="No detector by that name"))
async def fit_model(name: str, body: ModelFitIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Fit a population detector on its subject's recent stored events (audited); every worker picks it up."""
    summary = await asyncio.to_thread(engine.fit_detector, name, f"key:{who.key_id}", body.events)
    return JsonResponse(summary)
