"""JSON responses rendered with orjson (handlers return plain dicts that are already JSON-ready), and the
answer of any scoring endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import Request, Response
from starlette.datastructures import State
from starlette.responses import JSONResponse
from starlette.types import Send

from risk_engine.engine import RiskEngine, ScoreOutcome
from risk_engine.storage.writer import WriteUnconfirmed


class JsonResponse(JSONResponse):
    """A JSONResponse rendered by orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def settled(outcome: ScoreOutcome, state: State) -> ScoreOutcome:
    """What a scoring answers once its row is committed: itself, or another worker's answer, as a replay, if it
    stored the same request first; else the engine's error for a failed write (503 or 409 through the error
    handlers), or :class:`WriteUnconfirmed` (503) if the write is still pending when the wait ends."""
    if not outcome.committed.done():
        await state.commits.wait(outcome.committed)
        if not outcome.committed.done():
            raise WriteUnconfirmed(f"not committed within {state.commits.timeout_s:g} s")
    engine: RiskEngine = state.engine
    return engine.settle(outcome)


async def answer(outcome: ScoreOutcome, request: Request) -> Response:
    """A scoring's answer, once settled (``settled``)."""
    outcome = await settled(outcome, request.app.state)
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return Response(outcome.body, media_type="application/json", headers=headers)


async def send_raw(send: Send, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> None:
    """An answer sent straight through ASGI, by the layers in front of FastAPI."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A JSON answer (an error's shape is ``errors.error_body``) sent straight through ASGI."""
    await send_raw(send, status, [(b"content-type", b"application/json"), *headers], orjson.dumps(body))
