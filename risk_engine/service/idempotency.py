"""``Idempotency-Key``: a client that may retry a state-changing request (a publish, a rollback, a backtest, a
fit, a roll-up, a list edit) sends a key of its choosing; the first request with it is answered and its answer
stored, the same request again gets that answer (``Idempotent-Replayed: true``) without doing the work twice.

A pure ASGI layer, inside the request guard (body limits, media types) and outside FastAPI. The key belongs to
the API key that sent it, so the request is authenticated before anything is replayed. The same key with
another request (method, path, query or body) is a 409, as is a retry while the first is still being
answered. An answer is stored before its last byte is sent, so a retry made as soon as the client has it finds
it, in any worker. An answer of 5xx is not kept: the work did not happen, so a retry does it. Keys are claimed
and stored from a worker thread, never on the event loop: a claim waiting for the database (a lock held
elsewhere) holds up its own request, not every request of the worker. The scoring endpoints are idempotent on
the event's own id and are not looked at here; nor is key creation, whose answer holds a secret that must never
be stored (it is idempotent on its ``request_id``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.to_thread import run_sync
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from risk_engine.engine import RiskEngine
from risk_engine.service.bodies import read_body, replay_receive
from risk_engine.service.deps import authenticate
from risk_engine.service.errors import UNAVAILABLE, error_body
from risk_engine.service.fastpath import SCORING_PATHS, bearer_token
from risk_engine.service.responses import send_json, send_raw
from risk_engine.storage import idempotency
from risk_engine.storage.db import DatabaseUnavailable

log = logging.getLogger(__name__)
HEADER = b"idempotency-key"
# a created key's answer holds its secret, which is never stored: that request is idempotent on its request_id
NEVER_KEPT = frozenset({"/v1/keys"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_KEY_LENGTH = 255


def takes_a_key(method: str, path: str) -> bool:
    """Whether a request to ``path`` (a route's template or a request's path) is looked at here."""
    return path not in SCORING_PATHS and method in STATE_CHANGING and path not in NEVER_KEPT


class IdempotencyKeys:
    """Claims, replays and refuses requests that carry an ``Idempotency-Key`` (see the module)."""

    def __init__(self, app: ASGIApp, fastapi_app: Any) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the scoring hot path passes at takes_a_key's first test, before any header is read
        if scope["type"] != "http" or not takes_a_key(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        key, token = _headers(scope)
        if key is None:
            await self.app(scope, receive, send)
            return
        if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            reason = f"1 to {MAX_KEY_LENGTH} printable ASCII characters"
            errors = [{"field": "Idempotency-Key", "reason": reason}]
            await send_json(send, 422, error_body("invalid_request", "the request failed validation", errors))
            return
        engine: RiskEngine | None = getattr(self.fastapi_app.state, "engine", None)
        try:
            principal = await authenticate(engine, token) if engine is not None and token else None
        except DatabaseUnavailable:
            principal = None
        if engine is None or principal is None:  # FastAPI answers: 401, or 503
            await self.app(scope, receive, send)
            return
        body, more = await read_body(receive)
        if more is not None:  # the client went away mid-body
            await self.app(scope, replay_receive(body, receive, more), send)
            return
        path = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
        # keyed: a body may carry PII (a list value, an IP), and no unkeyed digest of PII is stored
        signed = b"\0".join((scope["method"].encode(), path.encode(), body))
        digest = hmac.new(engine.signing_key, signed, hashlib.sha256).hexdigest()
        try:
            claim = await run_sync(
                idempotency.claim, engine.db, principal.key_id, key, scope["method"], path, digest, datetime.now(UTC)
            )
        except DBAPIError:
            await send_json(send, 503, error_body("unavailable", UNAVAILABLE), [(b"retry-after", b"1")])
            return
        if claim.outcome == "replay":
            headers = [
                (b"content-type", (claim.content_type or "application/json").encode("latin-1")),
                (b"idempotent-replayed", b"true"),
            ]
            await send_raw(send, claim.status or 200, headers, claim.body or b"")
            return
        if claim.outcome == "conflict":
            message = f"Idempotency-Key {key} was sent with another request ({claim.first_request}); use a new key"
            await send_json(send, 409, error_body("conflict", message))
            return
        if claim.outcome == "in_progress":
            message = f"the request with Idempotency-Key {key} is still being answered; retry shortly"
            await send_json(send, 409, error_body("conflict", message), [(b"retry-after", b"1")])
            return
        assert claim.row_id is not None
        await self._answer_and_keep(scope, replay_receive(body, receive), send, engine, claim.row_id)

    async def _answer_and_keep(self, scope: Scope, receive: Receive, send: Send, engine: RiskEngine, row: int) -> None:
        status = 500
        content_type: str | None = None
        chunks: list[bytes] = []
        settled = False  # the claim kept with its answer, or given up

        async def settle() -> None:
            nonlocal settled
            settled = True
            with anyio.CancelScope(shield=True):  # a request cancelled (its client gone) still settles its claim
                try:
                    if status >= 500:
                        await run_sync(idempotency.release, engine.db, row)
                    else:
                        body = b"".join(chunks)
                        await run_sync(idempotency.complete, engine.db, row, status, content_type, body)
                except DBAPIError as exc:  # the answer stands; a retry after ABANDONED_S does the work again
                    log.warning("idempotency key not settled: %s", type(exc.orig or exc).__name__)

        async def keeping_send(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        content_type = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    # kept before the answer's end is sent: a client that retries as soon as it has the answer
                    # (in this worker or another) finds it stored, not still "being answered"
                    await settle()
            await send(message)

        try:
            await self.app(scope, receive, keeping_send)
        finally:
            if not settled:  # no whole answer was sent: the work did not happen, or not all of it
                status = 500
                await settle()


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """(Idempotency-Key, bearer token)."""
    key = token = None
    for name, value in scope["headers"]:
        if name == HEADER:
            key = value.decode("latin-1").strip()
        elif name == b"authorization":
            token = bearer_token(value)
    return key, token
