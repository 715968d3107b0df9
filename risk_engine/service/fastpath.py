"""The scoring endpoints' fast path: a pure ASGI layer in front of FastAPI for ``POST /v1/{subject}/score``.

FastAPI's request cycle (its middleware stack, matching the path against every route, solving the dependencies,
``json.loads`` then validation of the dicts, building the response) cost as much CPU per request as scoring the
payment did. The scoring endpoints are the hot path, so a request to one of them that is well formed,
authorised and scorable is answered here, before the app's middleware stack: its body is validated by pydantic
straight from the JSON bytes, the key is checked through the engine's cache, the event is scored and its answer
sent once its row is committed. This layer does for those requests what the request guard does for every other
one: it reads no body over the size limit and times the answer in the request metrics.

Anything else, an oversized, compressed, malformed or invalid body, a missing or weak key, an id already scored
with another request, an unreachable database, is handed to the app's full stack as it came (the body
replayed), before anything was decided or stored, so every error answer and the OpenAPI document come from the
one route definition. The tests send the same requests both ways and compare the answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from risk_engine.engine import RiskEngine, ScoreOutcome
from risk_engine.errors import Conflict, InvalidInput
from risk_engine.service.bodies import read_body, replay_receive
from risk_engine.service.bursts import Bursts
from risk_engine.service.deps import authenticate
from risk_engine.service.metrics import observe_request
from risk_engine.service.responses import send_raw, settled
from risk_engine.storage.db import DatabaseUnavailable
from risk_engine.subjects import SUBJECT_KINDS
from risk_engine.vault import BlindIndexesRetired

# the scoring endpoints: path -> subject
SCORING_PATHS: Mapping[str, str] = {
    "/v1/payments/score": "payment",
    "/v1/accounts/score": "account",
    "/v1/reviews/score": "review",
}

# the headers of a scoring's answer (``send_raw`` adds its length), as the route's response has them
_FRESH = ((b"content-type", b"application/json"),)
_REPLAYED = (*_FRESH, (b"idempotent-replayed", b"true"))

# set in a request's scope once its answer begins to go out: an error after that cannot become a 500
_SENDING = "risk_engine.sending"

# raised by the engine before it decides or stores anything: the request can go to FastAPI to be answered
_HANDED_OVER = (Conflict, InvalidInput, DatabaseUnavailable, BlindIndexesRetired)


class ScoringFastPath:
    """Answers well-formed, authorised scoring requests itself; hands every other request to ``app`` (the app's
    full stack). ``max_body_bytes``: a longer body is handed over unread, for the request guard's 413."""

    def __init__(self, app: ASGIApp, fastapi_app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.max_body_bytes = max_body_bytes
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
        started = time.perf_counter()
        token, readable = _headers(scope, self.max_body_bytes)
        if not readable:  # not JSON, compressed or too long: the request guard's 413 or 415
            self.handed_over += 1
            await self.app(scope, receive, send)
            return
        body, last = await read_body(receive, self.max_body_bytes)
        if last is not None:  # the client went away mid-body, or sent too much: as the full stack would see it
            self.handed_over += 1
            await self.app(scope, replay_receive(body, receive, last), send)
            return
        try:
            status = await self._answer(scope, model, token, body, send)
        except Exception:
            # what Starlette's outermost middleware does with an error no handler takes: a plain 500 unless the
            # answer had begun, the error raised on for the server to log
            scope["route"] = self._routes[scope["path"]]
            if not scope.get(_SENDING):
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, _no_body, send)
            observe_request(scope, 500, started)
            raise
        if status is None:
            self.handed_over += 1
            await self.app(scope, replay_receive(body, receive), send)
            return
        self.answered += 1
        observe_request(scope, status, started)

    async def _answer(
        self, scope: Scope, model: type[BaseModel], token: str | None, body: bytes, send: Send
    ) -> int | None:
        """Score and answer; the answer's status, or None (nothing sent, nothing stored) to hand the request to
        FastAPI."""
        state = self.fastapi_app.state
        engine: RiskEngine | None = getattr(state, "engine", None)
        bursts: Bursts | None = getattr(state, "scoring_bursts", None)
        if engine is None or bursts is None or token is None:
            return None
        subject = SCORING_PATHS[scope["path"]]
        try:
            principal = await authenticate(engine, token)
        except DatabaseUnavailable:
            return None
        if principal is None or not principal.can("scorer"):
            return None

        def decide() -> ScoreOutcome | None:
            try:
                event = model.model_validate_json(body)
            except ValidationError:
                return None
            try:
                return engine.score_event(subject, event)
            except _HANDED_OVER:
                return None

        outcome = await bursts.run(decide)  # with the other requests that came in this turn of the loop
        if outcome is None:
            return None
        scope["route"] = self._routes[scope["path"]]  # for the request metrics' path label
        try:
            outcome = await settled(outcome, state)  # the route's own answer, once committed
        except Exception as exc:  # decided but not stored: answered as the route would (503 or 409)
            handler = self.fastapi_app.exception_handlers.get(type(exc))
            if handler is None:
                raise
            response = await handler(Request(scope), exc)
            scope[_SENDING] = True
            await response(scope, _no_body, send)
            return int(response.status_code)
        scope[_SENDING] = True
        await send_raw(send, 200, _REPLAYED if outcome.replayed else _FRESH, outcome.body)
        return 200


@dataclass(frozen=True)
class _ScoringRoute:
    """What the request metrics read of a route: its path template."""

    path: str


def _headers(scope: Scope, max_body_bytes: int) -> tuple[str | None, bool]:
    """(bearer token, whether the body can be read here: declared JSON, uncompressed, not declared too long)."""
    token: str | None = None
    readable = False
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = bearer_token(value)
        elif name == b"content-type":
            readable = value.split(b";", 1)[0].strip().lower() == b"application/json"
        elif name in _UNREADABLE and not _UNREADABLE[name](value, max_body_bytes):
            return token, False
    return token, readable


# headers whose value can make a body one for the request guard to refuse: name -> whether the value is fine
_UNREADABLE: Mapping[bytes, Callable[[bytes, int], bool]] = {
    b"content-encoding": lambda value, _: value.strip().lower() in (b"", b"identity"),
    b"content-length": lambda value, limit: value.isdigit() and int(value) <= limit,
}


def bearer_token(authorization: bytes) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header's value, or None."""
    scheme, _, credentials = authorization.decode("latin-1").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials else None


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
