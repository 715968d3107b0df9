"""The FastAPI application: routers per resource, dependency-injected engine, one error shape."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from risk_engine import __version__
from risk_engine.config import Settings, configure_logging
from risk_engine.engine import RiskEngine
from risk_engine.jobs import Jobs
from risk_engine.payments import ATTRIBUTE_NUMBER_LIMIT
from risk_engine.schema import ConfigError, FieldType, load_attribute_declarations
from risk_engine.service.bursts import Bursts
from risk_engine.service.commits import CommitWaiter
from risk_engine.service.errors import install_error_handlers
from risk_engine.service.fastpath import SCORING_PATHS, ScoringFastPath
from risk_engine.service.idempotency import IdempotencyKeys, takes_a_key
from risk_engine.service.metrics import BurstCollector, Metrics, RequestGuard
from risk_engine.service.responses import JsonResponse
from risk_engine.service.routers import (
    accounts,
    health,
    keys,
    labels,
    lists,
    merchants,
    models,
    payments,
    pii,
    policies,
    reviews,
)
from risk_engine.service.schemas import IDEMPOTENCY_CONFLICT, as_json_errors
from risk_engine.subjects import SUBJECT_KINDS

log = logging.getLogger(__name__)

DESCRIPTION = """Trust, risk and fraud control for online marketplaces.

Every endpoint but `/healthz` and `/metrics` needs an API key: `Authorization: Bearer rk_...`.
Roles: `scorer` (score, labels), `analyst` (+ lists, policies), `admin` (+ keys).
Errors share one shape: `{"error", "message", "errors": [{"field", "reason"}]}`.
Retries: scoring, labels, merchant events and key creation are idempotent on an id in the body; every other
state-changing request takes an `Idempotency-Key` header (up to 255 printable ASCII characters, per API key,
kept 24 h): the same request again gets the first answer (`Idempotent-Replayed: true`) without doing the work
twice; the key with another request is a 409.
"""


def bootstrap_admin_key(engine: RiskEngine) -> None:
    """On a database with no keys, create an admin key and write it to ``$RISK_ENGINE_HOME/admin.key`` (0600);
    of workers starting together on a new database, one does."""
    key = engine.create_first_admin_key()
    if key is None:  # keys exist, or a worker starting at the same moment created the first
        return
    path = engine.settings.home / "admin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    log.warning("no API keys existed: an admin key was written to %s (mode 0600)", path)


ATTRIBUTE_SCHEMAS: dict[FieldType, dict[str, Any]] = {
    FieldType.NUMBER: {"type": "number", "minimum": -ATTRIBUTE_NUMBER_LIMIT, "maximum": ATTRIBUTE_NUMBER_LIMIT},
    FieldType.STRING: {"type": "string", "description": "Never a full card number"},
    FieldType.BOOL: {"type": "boolean"},
}


def document_attributes(schema: dict[str, Any], settings: Settings) -> None:
    """Make each subject's ``attributes`` in the document the ones its ``subjects.toml`` declares, each with its
    type: what the engine takes (any other is a 422). A file that does not load leaves the generic mapping (the
    engine refuses to start on it anyway)."""
    try:
        declared = load_attribute_declarations(settings.resolved_subjects_file)
    except ConfigError:
        return
    components = schema.get("components", {}).get("schemas", {})
    for subject, kind in SUBJECT_KINDS.items():
        attributes = declared.get(subject, {})  # none declared: none taken
        model = components.get(kind.model.__name__)
        if model is None or "attributes" not in model.get("properties", {}):
            continue
        generic = model["properties"]["attributes"]
        model["properties"]["attributes"] = {
            "type": "object",
            "title": generic.get("title", "Attributes"),
            "description": f"The attributes {settings.resolved_subjects_file.name} declares for {subject} "
            "(this server's document lists its own); an undeclared one is a 422",
            "properties": {name: dict(ATTRIBUTE_SCHEMAS[ftype]) for name, ftype in attributes.items()},
            "additionalProperties": False,
            "maxProperties": generic.get("maxProperties", 256),
        }


def document_the_app(app: FastAPI, settings: Settings) -> None:
    """Complete the generated document with what the routes' signatures do not say: the ``Idempotency-Key``
    409 of every operation that takes the header (the rule is the middleware's, not each route's), and each
    subject's declared attributes."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                if not takes_a_key(method.upper(), path):
                    continue
                own = operation["responses"].get("409")
                description = (
                    IDEMPOTENCY_CONFLICT if own is None else f"{own['description']}; or {IDEMPOTENCY_CONFLICT}"
                )
                answer = as_json_errors({409: {"description": description[0].upper() + description[1:]}})[409]
                operation["responses"]["409"] = answer
        document_attributes(schema, settings)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class RiskEngineApp(FastAPI):
    """The FastAPI app, with the scoring fast path (``scoring_front``) in front of its middleware stack: a
    scoring request it answers never enters Starlette's middleware, which cost a tenth of the CPU of a scored
    payment; what it hands over goes through the whole stack (``full_stack``)."""

    scoring_front: ScoringFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.scoring_front
        if front is not None and scope["type"] == "http" and scope["path"] in SCORING_PATHS:
            scope["app"] = self  # as Starlette sets it: the request metrics and ``Request.app`` read it
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def full_stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app without its fast path: every middleware, then the routes."""
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None, engine: RiskEngine | None = None, close_engine: bool = False
) -> FastAPI:
    """Build the app. Without ``engine`` it opens one from ``settings`` at startup and closes it at shutdown;
    ``close_engine``: close the one given at shutdown too (a server stopped by SIGTERM ends its process right
    after shutdown, before the caller's own clean-up runs)."""
    settings = settings or (engine.settings if engine else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None or close_engine
        live = engine or RiskEngine.open(settings)
        bootstrap_admin_key(live)
        app.state.engine = live
        app.state.metrics = Metrics(live)
        app.state.commits = CommitWaiter(asyncio.get_running_loop(), live.settings.commit_wait_s)
        app.state.scoring_bursts = Bursts(asyncio.get_running_loop())
        app.state.metrics.registry.register(BurstCollector(app.state.scoring_bursts))
        app.state.jobs = Jobs(live.db)
        try:
            yield
        finally:
            app.state.jobs.shutdown()  # before the engine closes under them
            if owned:
                live.close()

    app = RiskEngineApp(
        title="risk-engine",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=JsonResponse,
    )
    install_error_handlers(app)
    for module in (payments, accounts, reviews, labels, lists, policies, models, keys, pii, health):
        app.include_router(module.router)
    app.include_router(merchants.merchants)
    app.include_router(merchants.sellers)
    document_the_app(app, settings)
    app.add_middleware(IdempotencyKeys, fastapi_app=app)  # never sees a scoring request
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)  # sees every request handed to FastAPI
    if settings.scoring_fast_path:
        app.scoring_front = ScoringFastPath(app.full_stack, fastapi_app=app, max_body_bytes=settings.max_body_bytes)
    return app


def worker_app() -> FastAPI:
    """The app of each worker process ``risk-engine serve --workers N`` starts (uvicorn's factory): settings from
    the environment, the engine opened by the worker's start-up and closed by its shutdown."""
    configure_logging()
    return create_app(Settings())
