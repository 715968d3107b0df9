"""One error shape for every failure: ``{"error": KIND, "message": ..., "errors": [{"field", "reason"}]}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from risk_engine.dsl import DslErrors
from risk_engine.errors import Conflict, InvalidInput, NotFound
from risk_engine.service.responses import JsonResponse
from risk_engine.storage.db import DatabaseUnavailable
from risk_engine.storage.writer import WriteUnconfirmed
from risk_engine.vault import BlindIndexesRetired

log = logging.getLogger(__name__)
UNAVAILABLE = "storage is unavailable; nothing was decided or stored, retry later"
UNCONFIRMED = (
    "storage did not confirm the write in time; it may still be stored: retry with the same id (a stored answer "
    "is replayed, one that was not stored is scored anew)"
)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def error_body(kind: str, message: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON every error response carries."""
    body: dict[str, Any] = {"error": kind, "message": message}
    if errors is not None:
        body["errors"] = errors
    return body


def install_error_handlers(app: FastAPI) -> None:
    """Map the engine's exceptions to HTTP answers."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JsonResponse:
        errors = []
        for e in exc.errors():
            reason = str(e.get("msg", "invalid"))
            loc = e.get("loc", ())
            if e.get("type") == "json_invalid":
                # FastAPI puts the character's offset where a field would be: say it in the reason instead
                at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
                reason = f"malformed JSON{at}: " + str(e.get("ctx", {}).get("error", reason))
                loc = ("body",)
            elif e.get("type") == "extra_forbidden":
                reason = "unknown field (never send CVV or a full card number)"
            elif "attribute" in e.get("ctx", {}):  # one check of the whole mapping: the key is in the context
                loc = (*loc, e["ctx"]["attribute"])
            errors.append({"field": _field(loc), "reason": reason, "type": e.get("type")})
        return JsonResponse(error_body("invalid_request", "the request failed validation", errors), 422)

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JsonResponse:
        return JsonResponse(error_body("invalid_request", "the request failed validation", exc.errors), 422)

    @app.exception_handler(DslErrors)
    async def _dsl(_: Request, exc: DslErrors) -> JsonResponse:
        errors = [{"field": "text", "reason": str(e), **e.as_dict()} for e in exc.errors]
        return JsonResponse(error_body("invalid_policy", "the policy does not type-check", errors), 422)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JsonResponse:
        return JsonResponse(error_body("conflict", str(exc)), 409)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JsonResponse:
        return JsonResponse(error_body("not_found", str(exc)), 404)

    @app.exception_handler(DatabaseUnavailable)
    async def _unavailable(_: Request, exc: DatabaseUnavailable) -> JsonResponse:
        log.error("database unavailable: %s", exc)
        return JsonResponse(
            error_body("unavailable", UNAVAILABLE),
            503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(WriteUnconfirmed)
    async def _unconfirmed(_: Request, exc: WriteUnconfirmed) -> JsonResponse:
        log.error("a scoring answer's write was %s", exc)
        return JsonResponse(error_body("unavailable", UNCONFIRMED), 503, headers={"Retry-After": "1"})

    @app.exception_handler(BlindIndexesRetired)
    async def _retired(_: Request, exc: BlindIndexesRetired) -> JsonResponse:
        return JsonResponse(
            error_body("unavailable", f"this worker cannot index PII: {exc}; nothing was decided or stored"),
            503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _driver_unavailable(_: Request, exc: DBAPIError) -> JsonResponse:
        # a write refused (locked, disk full) or a connection lost on any endpoint: the same 503 as scoring's;
        # the driver's text is not logged, as it may quote the parameters, PII included
        log.error("database unavailable: %s", type(exc.orig).__name__ if exc.orig else type(exc).__name__)
        return JsonResponse(error_body("unavailable", UNAVAILABLE), 503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JsonResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):  # the body, read as JSON
            cause = exc.__cause__
            reason = (
                f"malformed JSON: the body is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at {cause.start})"
            )
            errors = [{"field": "body", "reason": reason, "type": "json_invalid"}]
            return JsonResponse(error_body("invalid_request", "the request failed validation", errors), 422)
        kind = {
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
            415: "unsupported_media_type",
        }.get(exc.status_code, "bad_request" if exc.status_code == 400 else "error")
        return JsonResponse(error_body(kind, str(exc.detail)), exc.status_code, headers=exc.headers)
