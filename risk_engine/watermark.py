"""How far a worker has read a table that other workers append to, by id, without skipping a late commit.

On PostgreSQL ids come from a sequence and are taken at insert: a row inserted first can commit after one
inserted later by another worker. A reader that moved past the higher id must still read the lower one when it
appears, so the ids it skipped are kept as gaps and asked for again until they turn up or ``GAP_WAIT_S`` has
passed (a rolled-back insert leaves its id unused for ever). At most ``MAX_GAPS`` are kept. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

GAP_WAIT_S = 120.0
MAX_GAPS = 1_000


class IdWatermark:
    """The highest id read, and the ids below it not read (yet), each with when it was noticed."""

    __slots__ = ("gaps", "last")

    def __init__(self, last: int = 0, gaps: Iterable[int] = ()) -> None:
        self.last = last
        now = time.time()
        self.gaps: dict[int, float] = {int(i): now for i in gaps}

    def wants(self, row_id: int) -> bool:
        """True if the row with this id has not been read: above the watermark, or a gap below it."""
        return row_id > self.last or row_id in self.gaps

    def note(self, row_id: int) -> None:
        """Record that the row with this id was read, remembering the ids it skipped as gaps."""
        if row_id <= self.last:
            self.gaps.pop(row_id, None)
            return
        now = time.time()
        for missing in range(max(self.last + 1, row_id - MAX_GAPS), row_id):
            self.gaps[missing] = now
        self.last = row_id
        if len(self.gaps) > MAX_GAPS:
            for old in sorted(self.gaps)[: len(self.gaps) - MAX_GAPS]:
                del self.gaps[old]

    def expire(self, now: float | None = None) -> None:
        """Stop asking for the gaps noticed more than ``GAP_WAIT_S`` ago."""
        limit = (time.time() if now is None else now) - GAP_WAIT_S
        for missing in [i for i, at in self.gaps.items() if at < limit]:
            del self.gaps[missing]
