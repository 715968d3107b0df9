"""Request bodies read ahead by the ASGI layers in front of the routes, and handed on as if unread."""

from __future__ import annotations

from starlette.types import Message, Receive


async def read_body(receive: Receive, max_bytes: int | None = None) -> tuple[bytes, Message | None]:
    """The whole body, or what came of it and the message that ended the reading early: a disconnect, or the
    chunk that took it past ``max_bytes`` (included in neither)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            return b"".join(chunks), message
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def replay_receive(body: bytes, receive: Receive, last: Message | None = None) -> Receive:
    """A ``receive`` that gives the body already read, then ``last`` (the message that ended the reading), then
    whatever the client sends next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": last is not None}]
    if last is not None:
        pending.append(last)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
