"""A small HTTP/1.1 load generator for loopback: keep-alive connections, pre-serialized requests, bounded time.

Closed loop (``max_throughput``): each connection sends its next request as soon as the last answer arrives.
Open loop (``fixed_rate``): requests are due at a fixed rate and latency counts from when each was due, so a
slow server is not hidden by the client waiting for it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Result:
    """What a run measured."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def record(self, status: int, latency_s: float) -> None:
        """Count one answer."""
        self.latencies_s.append(latency_s)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.ok += 1
        else:
            self.errors += 1

    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def build_request(path: str, body: bytes, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def max_throughput(port: int, requests: Iterator[bytes], connections: int, seconds: float) -> Result:
    """As many requests as the server answers, from ``connections`` keep-alive connections."""
    result = Result()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                try:
                    request = next(requests)
                except StopIteration:
                    return
                started = time.perf_counter()
                result.sent += 1
                status = await _exchange(reader, writer, request)
                result.record(status, time.perf_counter() - started)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    result.elapsed_s = time.perf_counter() - started
    return result


async def fixed_rate(port: int, requests: Iterator[bytes], rate: float, seconds: float, connections: int) -> Result:
    """``rate`` requests a second for ``seconds``; latency measured from each request's due time."""
    result = Result()
    total = int(rate * seconds)
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (item := await queue.get()) is not None:
                due, request = item
                status = await _exchange(reader, writer, request)
                result.record(status, time.perf_counter() - due)
        finally:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    started = time.perf_counter()
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            request = next(requests)
        except StopIteration:
            break
        result.sent += 1
        queue.put_nowait((due, request))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    result.elapsed_s = time.perf_counter() - started
    return result
