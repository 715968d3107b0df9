"""How fast this machine runs plain Python, so figures from different machines can be set side by side.

The figures of ``bench/*.py`` are absolute (payments/s on one core), and the machines sessions run on differ by
a factor of three or more. Each benchmark prints this reference next to its figures: the best of five timings
of a fixed pure-Python loop (``sum(i * i for i in range(1000))``), in microseconds; scale by it.
"""

from __future__ import annotations

import timeit


def reference_us() -> float:
    """Best of five: microseconds for ``sum(i * i for i in range(1000))``."""
    timer = timeit.Timer("sum(i * i for i in range(1000))")
    loops, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=loops)) / loops * 1e6
