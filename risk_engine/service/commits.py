"""Await the writer's commits from the event loop with one wake-up per batch, not one per request, and for a
bounded time.

``asyncio.wrap_future`` wakes the loop once per finished future; each wake-up is a syscall that hands the
GIL over, so a batch of fifty commits became fifty convoys between the writer thread and the loop. Here the
writer's callbacks only append to a list, and the first of a burst schedules a single drain on the loop.

A database that stalls without failing (a table lock held, a server that stopped answering) would hold every
scoring answer as long as it lasts: each wait ends after ``timeout_s`` at most, with the write still pending.
The deadlines are kept in arrival order, so one timer, re-armed for the oldest, serves them all.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from risk_engine.storage.writer import Ticket

SWEEP_EVERY_S = 0.25  # at most this long between looks at the deadlines, so each look has little to drop


class CommitWaiter:
    """Turns the writer's futures into asyncio futures of one loop, resolving them in bursts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float = 10.0) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._done: list[asyncio.Future[None]] = []
        self._scheduled = False
        # waits in arrival order, so in deadline order; two deques, not one of tuples: no object per wait
        self._deadlines: deque[float] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeping = False
        self.timed_out = 0  # waits that ended with their write still pending

    def wait(self, committed: Ticket) -> asyncio.Future[None]:
        """An asyncio future that completes (always with None) once ``committed`` is done, or after
        ``timeout_s`` with it still pending."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        committed.add_done_callback(lambda _: self._finished(waiter))  # resolves it later, on the loop
        self._deadlines.append(self.loop.time() + self.timeout_s)
        self._waiters.append(waiter)
        if not self._sweeping:
            self._sweeping = True
            self.loop.call_later(min(self.timeout_s, SWEEP_EVERY_S), self._sweep)
        return waiter

    def _sweep(self) -> None:
        """Drop the finished waits from the front; end the overdue ones; look again while any is left."""
        now = self.loop.time()
        deadlines, waiters = self._deadlines, self._waiters
        while waiters and (waiters[0].done() or deadlines[0] <= now):
            deadlines.popleft()
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.timed_out += 1
        if waiters:
            self.loop.call_later(min(max(deadlines[0] - now, 0.0), SWEEP_EVERY_S), self._sweep)
        else:
            self._sweeping = False

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
