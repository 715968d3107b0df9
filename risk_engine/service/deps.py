"""FastAPI dependencies: the engine and the caller's role."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from weakref import WeakKeyDictionary

from anyio.to_thread import run_sync
from fastapi import Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from risk_engine.api_keys import KeyCache, Principal
from risk_engine.engine import RiskEngine
from risk_engine.storage.event_listing import EventListing

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer rk_...`")


# the reads of keys under way, per key cache (one per engine): requests with a key not read lately wait for one
# read of it, and go on in the order they came, as they would have with the key cached
_key_reads: WeakKeyDictionary[KeyCache, dict[str, asyncio.Future[Principal | None]]] = WeakKeyDictionary()


async def authenticate(engine: RiskEngine, token: str) -> Principal | None:
    """The principal behind a bearer token, from the key cache, or read in a worker thread when the cache has
    not read it lately: a database that stalls (a lock, a network) must not hold up the event loop and every
    request on it. Raises ``DatabaseUnavailable`` as ``RiskEngine.authenticate`` does."""
    known, principal = engine.keys.cached(token)
    if known:
        return principal
    reads = _key_reads.setdefault(engine.keys, {})
    read = reads.get(token)
    if read is None:
        read = reads[token] = asyncio.ensure_future(_read_key(engine, token, reads))
    return await asyncio.shield(read)  # a caller that goes away leaves the read to the others


async def _read_key(engine: RiskEngine, token: str, reads: dict[str, Any]) -> Principal | None:
    try:
        return await run_sync(engine.authenticate, token)
    finally:
        reads.pop(token, None)


async def get_engine(request: Request) -> RiskEngine:
    """The engine this app serves."""
    engine: RiskEngine = request.app.state.engine
    return engine


EngineDep = Annotated[RiskEngine, Depends(get_engine)]


def require(role: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that admits keys of ``role`` or a higher one (scorer < analyst < admin). Every route but the
    probes' takes it, so it also refuses the query parameters a route does not declare, once the key passed."""

    async def check(
        request: Request,
        engine: EngineDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                401, "missing API key: send Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}
            )
        principal = await authenticate(engine, credentials.credentials)
        if principal is None:
            raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        if not principal.can(role):
            raise HTTPException(403, f"this endpoint needs the {role} role; the key has {principal.role}")
        reject_unknown_query_parameters(request)
        return principal

    return check


def query_parameters(request: Request, route: APIRoute) -> frozenset[str]:
    """The query parameters a route declares, as its OpenAPI document lists them (dependencies' included)."""
    declared: dict[tuple[str, str], frozenset[str]] | None = getattr(request.app.state, "query_parameters", None)
    if declared is None:
        declared = {
            (method.upper(), path): frozenset(p["name"] for p in operation.get("parameters", ()) if p["in"] == "query")
            for path, operations in request.app.openapi()["paths"].items()
            for method, operation in operations.items()
        }
        request.app.state.query_parameters = declared
    return declared.get((request.method, route.path_format), frozenset())


def reject_unknown_query_parameters(request: Request) -> None:
    """A 422 for a query parameter the route does not declare, as for an unknown field in a body: a misspelt
    ``?limt=10`` or ``?before=...`` would otherwise be ignored, and a caller paging with it would get the first
    page for ever. Checked after the key, so a caller without one learns nothing but that it needs one."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.scope.get("query_string"):
        return
    known = query_parameters(request, route)
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in known]
    if not unknown:
        return
    takes = f"this endpoint takes {', '.join(sorted(known))}" if known else "this endpoint takes none"
    raise RequestValidationError(
        [
            {"type": "unknown_query_parameter", "loc": ("query", name), "msg": f"unknown query parameter; {takes}"}
            for name in unknown
        ]
    )


Scorer = Annotated[Principal, Depends(require("scorer"))]
Analyst = Annotated[Principal, Depends(require("analyst"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def event_listing(
    decision: Annotated[
        str | None, Query(pattern=r"^[a-z_]+$", max_length=32, description="In the subject's words: review, hold")
    ] = None,
    unlabelled: Annotated[bool, Query(description="Only events no label has resolved yet")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="The last id of the page before")] = None,
    rule: Annotated[
        str | None,
        Query(
            pattern=r"^[A-Z][A-Z0-9_]*$",
            max_length=256,
            description="Only events where a rule with this reason code fired",
        ),
    ] = None,
) -> EventListing:
    """The query of a listing of stored events."""
    return EventListing(decision, unlabelled, limit, before_id, rule)


Listing = Annotated[EventListing, Depends(event_listing)]
