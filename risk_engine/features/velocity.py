"""Velocity: exact sliding-window aggregates (count, sum, avg, distinct) keyed by any field.

Each (aggregate, key value) pair keeps its entries sorted by time in a list, with running totals over the
live part ``entries[cursor:]``. Scoring queries at the event's own time before the event is added, so an
event never counts itself. In time order a query only moves the cursor forward (O(1) amortised); a late
event (older than what the key has already seen) is answered exactly by a binary search and a scan of its
window. Entries older than the window plus a grace period are dropped, keys that go quiet are swept, and
each key holds at most ``max_events_per_key`` entries (the oldest go first): memory is bounded by the
traffic inside the longest window.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from risk_engine.dsl import AggSpec

GRACE_S = 3600.0  # how late an event may arrive and still be counted exactly
SWEEP_EVERY = 20_000


class SlidingWindow:
    """The entries of one key for one aggregate, and running totals over its live part."""

    __slots__ = ("count", "cursor", "distinct", "entries", "max_ts", "total", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.entries: list[tuple[float, int, Any]] = []  # (ts, seq, value), sorted by (ts, seq)
        self.cursor = 0
        self.count = 0
        self.total: float = 0
        self.distinct: dict[Any, int] = {}
        self.max_ts = float("-inf")

    # running totals over entries[cursor:]
    def _include(self, value: Any) -> None:
        self.count += 1
        if value is not None:
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.total += value
            self.distinct[value] = self.distinct.get(value, 0) + 1

    def _exclude(self, value: Any) -> None:
        self.count -= 1
        if value is not None:
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.total -= value
            left = self.distinct[value] - 1
            if left:
                self.distinct[value] = left
            else:
                del self.distinct[value]

    def query(self, ts: float) -> tuple[int, float, int]:
        """(count, sum, distinct) over entries with time in (ts - window, ts]."""
        if ts >= self.max_ts:
            horizon = ts - self.window
            entries = self.entries
            cursor = self.cursor
            while cursor < len(entries) and entries[cursor][0] <= horizon:
                self._exclude(entries[cursor][2])
                cursor += 1
            self.cursor = cursor
            return self.count, self.total, len(self.distinct)
        lo = bisect_right(self.entries, ts - self.window, key=lambda e: e[0])
        hi = bisect_right(self.entries, ts, key=lambda e: e[0])
        chunk = self.entries[lo:hi]
        numeric = [v for _, _, v in chunk if isinstance(v, int | float) and not isinstance(v, bool)]
        return len(chunk), sum(numeric), len({v for _, _, v in chunk if v is not None})

    def add(self, ts: float, seq: int, value: Any, cap: int) -> None:
        """Add an entry; in time order this is an append."""
        entry = (ts, seq, value)
        if ts >= self.max_ts:
            self.entries.append(entry)
            self.max_ts = ts
            self._include(value)
        else:
            pos = bisect_right(self.entries, (ts, seq), key=lambda e: (e[0], e[1]))
            self.entries.insert(pos, entry)
            if pos < self.cursor:
                self.cursor += 1  # already behind the live part
            else:
                self._include(value)  # a later query evicts it if it is already too old
        if len(self.entries) > cap:
            self._drop_oldest(len(self.entries) - cap)
        elif self.cursor > 256 and self.cursor * 2 > len(self.entries):
            self._compact()

    def retract(self, ts: float, seq: int) -> bool:
        """Remove an entry added by mistake (its write failed). True if it was found."""
        pos = bisect_left(self.entries, (ts, seq), key=lambda e: (e[0], e[1]))
        if pos >= len(self.entries) or self.entries[pos][:2] != (ts, seq):
            return False
        _, _, value = self.entries.pop(pos)
        if pos < self.cursor:
            self.cursor -= 1
        else:
            self._exclude(value)
        self.max_ts = self.entries[-1][0] if self.entries else float("-inf")
        return True

    def _drop_oldest(self, n: int) -> None:
        for _, _, value in self.entries[self.cursor : n]:
            self._exclude(value)
        del self.entries[:n]
        self.cursor = max(self.cursor - n, 0)

    def _compact(self) -> None:
        horizon = self.max_ts - self.window - GRACE_S
        cut = bisect_right(self.entries, horizon, key=lambda e: e[0], hi=self.cursor)
        if cut:
            del self.entries[:cut]
            self.cursor -= cut
            if isinstance(self.total, float):  # recompute to shed floating-point drift
                self.total = sum(
                    v
                    for _, _, v in self.entries[self.cursor :]
                    if isinstance(v, int | float) and not isinstance(v, bool)
                )

    def expired(self, now: float) -> bool:
        """True when every entry is beyond the window and its grace period."""
        return self.max_ts < now - self.window - GRACE_S


class VelocityState:
    """All windowed aggregates a subject's policy and detectors need, keyed by record fields."""

    def __init__(self, specs: Sequence[AggSpec], max_events_per_key: int = 100_000) -> None:
        self.specs = tuple(specs)
        self.cap = max_events_per_key
        self._windows: dict[str, dict[Any, SlidingWindow]] = {s.id: {} for s in self.specs}
        self._adds = 0
        self._latest = float("-inf")

    @property
    def longest_window(self) -> float:
        """The longest window any aggregate names (0 if none)."""
        return max((s.window_s for s in self.specs), default=0.0)

    def query(self, record: Mapping[str, Any], ts: float) -> dict[str, float | None]:
        """Every aggregate's value for this record at time ``ts``, from state before the record."""
        out: dict[str, float | None] = {}
        for spec in self.specs:
            key = record.get(spec.key)
            window = self._windows[spec.id].get(key) if key is not None else None
            if window is None:
                out[spec.id] = None if spec.func == "avg" else 0
                continue
            count, total, distinct = window.query(ts)
            if spec.func == "count":
                out[spec.id] = count
            elif spec.func == "sum":
                out[spec.id] = total
            elif spec.func == "distinct":
                out[spec.id] = distinct
            else:
                out[spec.id] = total / count if count else None
        return out

    def add(self, record: Mapping[str, Any], ts: float, seq: int) -> None:
        """Count a record in every aggregate whose key it has."""
        for spec in self.specs:
            key = record.get(spec.key)
            if key is None:
                continue
            value = record.get(spec.value) if spec.value else None
            if spec.value is not None and value is None:
                continue
            windows = self._windows[spec.id]
            window = windows.get(key)
            if window is None:
                window = windows[key] = SlidingWindow(spec.window_s)
            window.add(ts, seq, value, self.cap)
        self._latest = max(self._latest, ts)
        self._adds += 1
        if self._adds % SWEEP_EVERY == 0:
            self.sweep(self._latest)

    def retract(self, record: Mapping[str, Any], ts: float, seq: int) -> None:
        """Undo :meth:`add` for a record whose write failed."""
        for spec in self.specs:
            key = record.get(spec.key)
            window = self._windows[spec.id].get(key) if key is not None else None
            if window is not None:
                window.retract(ts, seq)

    def sweep(self, now: float) -> int:
        """Forget keys whose entries have all expired. Returns how many were dropped."""
        dropped = 0
        for windows in self._windows.values():
            stale = [k for k, w in windows.items() if w.expired(now)]
            for k in stale:
                del windows[k]
            dropped += len(stale)
        return dropped

    def key_count(self) -> int:
        """How many (aggregate, key) windows are held."""
        return sum(len(w) for w in self._windows.values())

    def replay(self, rows: Iterable[tuple[Mapping[str, Any], float, int]]) -> int:
        """Rebuild from stored (record, ts, seq) rows. Returns the number replayed."""
        n = 0
        for record, ts, seq in rows:
            self.add(record, ts, seq)
            n += 1
        return n
