"""Scoring requests that arrive together are decided together: one after another, in one turn of the event loop.

Under load the loop reads many requests in one turn, and each request's task would validate and score its event
between the other tasks' steps (parsing, sending, awaiting commits), so every payment met the engine's code and
state cold in the processor's caches again. Here each task queues its work and awaits it; the first of a turn
schedules one callback that runs everything queued by then, in a row. A request alone waits for no one: its
work runs as soon as the loop comes to that callback, with no timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Bursts:
    """Runs the work queued during one turn of ``loop`` in a single callback, in the order it was queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.bursts = 0  # callbacks run
        self.items = 0  # pieces of work run
        self.largest = 0  # the most pieces of work one callback ran

    def run(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """A future of ``work()``'s result (or its exception), run with the rest of this turn's work."""
        future: asyncio.Future[T] = self.loop.create_future()
        if not self._pending:
            self.loop.call_soon(self._drain)
        self._pending.append((work, future))
        return future

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        self.bursts += 1
        self.items += len(pending)
        self.largest = max(self.largest, len(pending))
        for work, future in pending:
            if future.cancelled():  # its request is gone: nothing is decided or stored for it
                continue
            try:
                result = work()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
