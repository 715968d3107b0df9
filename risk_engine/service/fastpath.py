"""The scoring endpoints' fast path: a pure ASGI layer in front of FastAPI for ``POST /v1/{subject}/score``.

FastAPI's request cycle (matching the path against every route, solving the dependencies, ``json.loads`` then
validation of the dicts, building the response) cost as much CPU per request as scoring the payment did. The
scoring endpoints are the hot path, so a request to one of them that is well formed, authorised and scorable is
answered here: its body is validated by pydantic straight from the JSON bytes, the key is checked through the
engine's cache, the event is scored and its answer sent once its row is committed.

Anything else, a malformed or invalid body, a missing or weak key, an id already scored with another request,
an unreachable database, is handed to FastAPI as it came (the body replayed), before anything was decided or
stored, so every error answer and the OpenAPI document come from the one route definition. The tests send the
same requests both ways and compare the answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from risk_engine.engine import Conflict, InvalidInput, RiskEngine
from risk_engine.service.responses import answer
from risk_engine.storage.db import DatabaseUnavailable
from risk_engine.subjects import SUBJECT_KINDS
from risk_engine.vault import BlindIndexesRetired

# the scoring endpoints: path -> subject
SCORING_PATHS: Mapping[str, str] = {
    "/v1/payments/score": "payment",
    "/v1/accounts/score": "account",
    "/v1/reviews/score": "review",
}

# raised by the engine before it decides or stores anything: the request can go to FastAPI to be answered
_HANDED_OVER = (Conflict, InvalidInput, DatabaseUnavailable, BlindIndexesRetired)


class ScoringFastPath:
    """Answers well-formed, authorised scoring requests itself; hands every other request to ``app``."""

    def __init__(self, app: ASGIApp, fastapi_app: Any) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self._routes = {path: _ScoringRoute(path) for path in SCORING_PATHS}
        self.answered = 0  # requests this layer answered itself
        self.handed_over = 0  # scoring requests it passed to FastAPI
        fastapi_app.state.scoring_fast_path = self
        self._models: dict[str, type[BaseModel]] = {
            path: SUBJECT_KINDS[subject].model for path, subject in SCORING_PATHS.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self._models.get(scope["path"]) if scope["type"] == "http" else None
        if model is None or scope["method"] != "POST" or scope.get("query_string"):  # a query: FastAPI's 422
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)
        if more is not None:  # the client went away mid-body: let FastAPI see what it would have seen
            await self.app(scope, replay_receive(body, receive, more), send)
            return
        if await self._answer(scope, model, body, send):
            self.answered += 1
        else:
            self.handed_over += 1
            await self.app(scope, replay_receive(body, receive), send)

    async def _answer(self, scope: Scope, model: type[BaseModel], body: bytes, send: Send) -> bool:
        """Score and answer; False (nothing sent, nothing stored) to hand the request to FastAPI."""
        state = self.fastapi_app.state
        engine: RiskEngine | None = getattr(state, "engine", None)
        if engine is None:
            return False
        token, json_body = _headers(scope)
        if token is None or not json_body:
            return False
        try:
            principal = engine.authenticate(token)
        except DatabaseUnavailable:
            return False
        if principal is None or not principal.can("scorer"):
            return False
        try:
            event = model.model_validate_json(body)
        except ValidationError:
            return False
        try:
            outcome = engine.score_event(SCORING_PATHS[scope["path"]], event)
        except _HANDED_OVER:
            return False
        scope["route"] = self._routes[scope["path"]]  # for the request metrics' path label
        request = Request(scope)
        try:
            response = await answer(outcome, request)  # the route's own answer, once committed
        except Exception as exc:  # decided but not stored: answered as the route would (503 or 409)
            handler = self.fastapi_app.exception_handlers.get(type(exc))
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, _no_body, send)
        return True


@dataclass(frozen=True)
class _ScoringRoute:
    """What the request metrics read of a route: its path template."""

    path: str


def _headers(scope: Scope) -> tuple[str | None, bool]:
    """(bearer token, whether the body is declared JSON)."""
    token: str | None = None
    json_body = False
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = bearer_token(value)
        elif name == b"content-type":
            json_body = value.split(b";", 1)[0].strip().lower() == b"application/json"
    return token, json_body


def bearer_token(authorization: bytes) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header's value, or None."""
    scheme, _, credentials = authorization.decode("latin-1").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials else None


async def read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body, or what came of it and the message that ended it early (a disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def replay_receive(body: bytes, receive: Receive, last: Message | None = None) -> Receive:
    """A ``receive`` that gives the body already read, then whatever the client sends next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": last is not None}]
    if last is not None:
        pending.append(last)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
