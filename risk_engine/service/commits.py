"""Await the writer's commits from the event loop with one wake-up per batch, not one per request.

``asyncio.wrap_future`` wakes the loop once per finished future; each wake-up is a syscall that hands the
GIL over, so a batch of fifty commits became fifty convoys between the writer thread and the loop. Here the
writer's callbacks only append to a list, and the first of a burst schedules a single drain on the loop.
"""

from __future__ import annotations

import asyncio
import threading

from risk_engine.storage.writer import Ticket


class CommitWaiter:
    """Turns the writer's futures into asyncio futures of one loop, resolving them in bursts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._done: list[asyncio.Future[None]] = []
        self._scheduled = False

    def wait(self, committed: Ticket) -> asyncio.Future[None]:
        """An asyncio future that completes (always with None) once ``committed`` is done."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        committed.add_done_callback(lambda _: self._finished(waiter))
        return waiter

    def _finished(self, waiter: asyncio.Future[None]) -> None:
        with self._lock:
            self._done.append(waiter)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._scheduled = False
        for waiter in done:
            if not waiter.done():
                waiter.set_result(None)
