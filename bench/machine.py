"""How fast this machine runs plain Python, so figures from different machines can be set side by side.

The figures of ``bench/*.py`` are absolute (payments/s on one core), and the machines sessions run on differ by
a factor of three or more. Each benchmark prints this reference next to its figures: the best of five timings
of a fixed pure-Python loop (``sum(i * i for i in range(1000))``), in microseconds; scale by it.

How the interpreter was built matters as much: on one machine (session 18) Debian's CPython 3.11, its core
linked into the executable and built with profile-guided optimization, scored payments 12% faster than
pyenv's default build of 3.11, whose core is a shared ``libpython`` built without it. ``interpreter()`` names
the one a figure was measured on.
"""

from __future__ import annotations

import json
import platform
import sys
import timeit
from pathlib import Path
from typing import Any


def reference_us() -> float:
    """Best of five: microseconds for ``sum(i * i for i in range(1000))``."""
    timer = timeit.Timer("sum(i * i for i in range(1000))")
    loops, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=loops)) / loops * 1e6


def interpreter() -> dict[str, str]:
    """The Python that runs this: version, executable, and where its core lives (a shared ``libpython``, as
    pyenv builds by default, or the executable itself, as Debian links it)."""
    maps = Path("/proc/self/maps")
    shared = None
    if maps.exists():
        shared = next((line.split()[-1] for line in maps.read_text().splitlines() if "libpython" in line), None)
    core = "unknown (no /proc)" if not maps.exists() else (f"shared {shared}" if shared else "in the executable")
    return {"version": platform.python_version(), "executable": sys.executable, "core": core}


def describe_interpreter() -> str:
    """One line for a benchmark's output."""
    info = interpreter()
    return f"python {info['version']} ({info['executable']}; core {info['core']})"


def print_footer(figures: dict[str, Any]) -> None:
    """End a benchmark's output: the machine reference and the interpreter on one line, then ``figures`` with
    both added, as the one JSON object on the last line."""
    figures["machine_reference_us"] = round(reference_us(), 1)
    figures["python"] = interpreter()
    print(f"machine reference (bench/machine.py): {figures['machine_reference_us']} us; {describe_interpreter()}")
    print(json.dumps(figures))
