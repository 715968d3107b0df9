"""Calibration: a raw detector output becomes its rank among recent outputs, a 0-1 score with one meaning.

``0.99`` means "more unusual than 99% of the last ``window`` events", whatever the estimator or its scale,
so a rule's threshold keeps its alert rate when a detector's raw scores drift or the estimator changes.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque


class RunningQuantile:
    """Empirical CDF over a sliding window of raw scores."""

    def __init__(self, window: int = 2000, warmup: int = 50) -> None:
        self.window = window
        self.warmup = warmup
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    @property
    def seen(self) -> int:
        """How many raw scores are in the window."""
        return len(self._sorted)

    @property
    def warm(self) -> bool:
        """True once enough scores are held for ranks to mean something."""
        return len(self._sorted) >= self.warmup

    def transform(self, raw: float) -> float:
        """Share of recent raw scores strictly below ``raw`` (ties count half); 0 while warming up."""
        n = len(self._sorted)
        if n < self.warmup:
            return 0.0
        below = bisect_left(self._sorted, raw)
        ties = bisect_right(self._sorted, raw) - below
        return (below + 0.5 * ties) / n

    def update(self, raw: float) -> None:
        """Add a raw score to the window."""
        insort(self._sorted, raw)
        self._recent.append(raw)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect_left(self._sorted, old)]

    def quantiles(self, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float]:
        """Raw-score quantiles of the window, for monitoring drift."""
        if not self._sorted:
            return {}
        n = len(self._sorted)
        return {f"p{round(q * 100)}": self._sorted[min(int(q * n), n - 1)] for q in qs}
