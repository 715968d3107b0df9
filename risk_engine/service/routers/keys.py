"""API keys: create, list and revoke (admin only). Secrets are shown once, at creation, and never stored."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from risk_engine.service.deps import Admin, EngineDep
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS, ApiKeyCreatedOut, ApiKeyIn, ApiKeyOut, IdPath, errors

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get("", response_model=list[ApiKeyOut], responses=ERRORS)
def list_keys(
    engine: EngineDep,
    _: Admin,
    active: Annotated[bool, Query(description="Only keys that are not revoked")] = False,
) -> JsonResponse:
    """Every key, oldest first: id, role, name, when created and revoked."""
    return JsonResponse(engine.api_keys(include_revoked=not active))


@router.post(
    "",
    response_model=ApiKeyCreatedOut,
    status_code=201,
    responses=errors(conflict="The request_id was already used to create a different key"),
)
def create_key(body: ApiKeyIn, engine: EngineDep, who: Admin) -> JsonResponse:
    """Create a key (audited). A replayed ``request_id`` answers 409 naming the key it created: its secret
    is not shown again, so if the first answer was lost, revoke that key and create another."""
    key, view = engine.create_api_key(body.role, body.name, f"key:{who.key_id}", body.request_id)
    return JsonResponse({**view, "key": key}, status_code=201)


@router.post(
    "/{key_id}/revoke",
    response_model=ApiKeyOut,
    responses=errors(not_found="No key with that id", conflict="It is the last live admin key"),
)
def revoke_key(key_id: IdPath, engine: EngineDep, who: Admin) -> JsonResponse:
    """Revoke a key (audited; idempotent: a revoked key answers as it is). This process refuses it at once,
    other workers within 5 s. The last live admin key cannot be revoked here (409): create another first."""
    return JsonResponse(engine.revoke_api_key(key_id, f"key:{who.key_id}"))
