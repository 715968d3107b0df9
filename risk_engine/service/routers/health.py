"""Health and metrics: no API key, no PII."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from risk_engine.service.deps import EngineDep
from risk_engine.service.responses import JsonResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(engine: EngineDep) -> JsonResponse:
    """200 when the database answers and takes writes. 503 when it does not answer ("database": false), or when a
    write has waited for it longer than a scoring answer waits, RISK_ENGINE_COMMIT_WAIT_S ("writes": false: a
    database that stalls without failing, whose reads may still be answered)."""
    answers = engine.ping()
    writes = engine.writer.stalled_s() <= engine.settings.commit_wait_s
    ok = answers and writes
    policies = {s: rt.policy.label for s, rt in engine.subjects.items()}
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", "database": answers, "writes": writes, "policies": policies},
        status_code=200 if ok else 503,
    )


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition: request latency, decisions by outcome, rule hits, detector state."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
