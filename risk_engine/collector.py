"""The cyclic garbage collector, kept to short pauses however much state the engine holds.

A worker holds its velocity windows, detectors and cross-subject state for as long as it runs: millions of
container objects at a marketplace's size (2 million windows are 5 million of them), almost none of which
ever become garbage. CPython's collector left as it is walks all of them in a full collection, about once
every 100 middle collections: 0.5 s a pause for those 2 million windows, longer as the state grows, with every
request stopped. So, once installed:

- what start-up built (policies, detectors, windows rebuilt from storage) is frozen: never walked again;
- the young generation is small (``YOUNG_OBJECTS``), so a young collection, which walks what survived since
  the last one (velocity windows of new keys, mostly), pauses a few milliseconds;
- after every middle collection, what survived it is frozen too. The middle generation then never holds more
  than ``MIDDLE_EVERY`` young collections' survivors, and the old one stays empty, so no collection walks
  the long-lived state.

The price: an object frozen and later dropped while in a reference cycle is not freed until the next full
collection. Scoring makes next to no such garbage (none in 50,000 payments measured); an API call that builds
SQL outside the prepared statements makes about ten objects of it. So ``collect_fully`` runs a full
collection at an interval of the operator's choosing (``gc_full_every_hours``, a day by default): one long
pause a day instead of one every hour or so at 1,000 payments a second.

The pauses are measured (``pauses``), so ``/metrics`` shows what the collector costs.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

YOUNG_OBJECTS = 2_500  # net new container objects between young collections
MIDDLE_EVERY = 10  # young collections between middle ones
OLD_EVERY = 100  # middle collections between old ones (CPython's default; the old generation stays empty)

# pause buckets, in seconds, for the Prometheus histogram
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class PauseHistogram:
    """Pauses of one generation's collections: a cumulative-bucket histogram as Prometheus reads it."""

    buckets: tuple[float, ...] = PAUSE_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BUCKETS) + 1))  # the last: +Inf
    total_s: float = 0.0
    longest_s: float = 0.0

    def observe(self, seconds: float) -> None:
        """Count one pause."""
        i = 0
        for bound in self.buckets:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total_s += seconds
        if seconds > self.longest_s:
            self.longest_s = seconds

    @property
    def count(self) -> int:
        """How many pauses were counted."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, pauses at or under it)`` for each bucket and ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class FullCollection:
    """What one full collection (``collect_fully``) did."""

    freed: int  # unreachable objects found
    pause_s: float
    frozen_after: int  # objects frozen after it: what the worker holds


class CollectorTuning:
    """The process's collector settings and pause record. One per process (the collector is): ``TUNING``."""

    def __init__(self) -> None:
        self.installed = False
        # generation -> pauses, full collections (``collect_fully``) under "full"
        self.pauses: dict[str, PauseHistogram] = {}
        self._started_at: float | None = None
        self._collecting_fully = False  # the callback leaves a full collection to ``collect_fully``
        self._lock = threading.Lock()  # one full collection at a time (the poller; ``risk-engine`` commands)

    def install(self) -> None:
        """Freeze what exists now, set the thresholds and start freezing what survives middle collections.
        Installing again freezes what exists then and changes nothing else."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_OBJECTS, MIDDLE_EVERY, OLD_EVERY)
        if not self.installed:
            gc.callbacks.append(self._on_collection)
            self.installed = True

    def uninstall(self) -> None:
        """Stop freezing survivors and measuring pauses, and thaw what was frozen (CPython's defaults again)."""
        if self.installed:
            gc.callbacks.remove(self._on_collection)
            self.installed = False
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)

    def _on_collection(self, phase: str, info: Mapping[str, Any]) -> None:
        if self._collecting_fully:
            return
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        started, self._started_at = self._started_at, None
        generation = int(info["generation"])
        if started is not None:
            self._histogram(str(generation)).observe(time.perf_counter() - started)
        if generation >= 1:
            # the young and middle generations are empty now; what survived is in the old one
            gc.freeze()

    def _histogram(self, generation: str) -> PauseHistogram:
        histogram = self.pauses.get(generation)
        if histogram is None:
            histogram = self.pauses[generation] = PauseHistogram()
        return histogram

    def collect_fully(self) -> FullCollection:
        """Walk everything once, frozen objects included, free the unreachable, and freeze what is left: the
        one long pause, proportional to all the state held. Safe to call with tuning not installed (then a
        plain full collection, nothing frozen)."""
        with self._lock:
            started = time.perf_counter()
            self._collecting_fully = True
            try:
                if self.installed:
                    gc.unfreeze()
                freed = gc.collect()
                if self.installed:
                    gc.freeze()
            finally:
                self._collecting_fully = False
            pause = time.perf_counter() - started
            self._histogram("full").observe(pause)
            return FullCollection(freed, pause, gc.get_freeze_count())


TUNING = CollectorTuning()
