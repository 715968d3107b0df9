"""FastAPI dependencies: the engine and the caller's role."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from risk_engine.engine import Principal, RiskEngine

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer rk_...`")


async def get_engine(request: Request) -> RiskEngine:
    """The engine this app serves."""
    engine: RiskEngine = request.app.state.engine
    return engine


EngineDep = Annotated[RiskEngine, Depends(get_engine)]


def require(role: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that admits keys of ``role`` or a higher one (scorer < analyst < admin)."""

    async def check(
        engine: EngineDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                401, "missing API key: send Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}
            )
        principal = engine.authenticate(credentials.credentials)
        if principal is None:
            raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        if not principal.can(role):
            raise HTTPException(403, f"this endpoint needs the {role} role; the key has {principal.role}")
        return principal

    return check


Scorer = Annotated[Principal, Depends(require("scorer"))]
Analyst = Annotated[Principal, Depends(require("analyst"))]
Admin = Annotated[Principal, Depends(require("admin"))]
