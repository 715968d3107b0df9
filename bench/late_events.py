"""Benchmark velocity queries for events that come a little late on a busy key.

One key (an IP behind a carrier's NAT, a large seller) holds a day's entries in a ``distinct`` and a ``sum``
window of one day. Events come in time order, but every other one is late by ``lag`` entries, as when a worker
takes another worker's events in or clients' clocks differ by a little. Printed for each window size: the
microseconds a late query takes (adjusting the running value by the entries between its time and the newest,
or scanning the window where that is shorter) beside a scan of the window, which every late query took before,
an in-order query's cost, and that cost on a key at its cap (each add dropping the oldest entry). The keys and
values are synthetic: this measures the window structure alone.

Prints the figures, then one JSON object on the last line.  Usage: python bench/late_events.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import print_footer  # noqa: E402
from risk_engine.dsl import AggSpec  # noqa: E402
from risk_engine.features.velocity import VelocityState  # noqa: E402

DAY = 86_400.0
SPECS = (AggSpec("distinct", "buyer", "ip", DAY), AggSpec("sum", "amount", "ip", DAY))
QUERIES = 2_000


def filled(entries: int) -> VelocityState:
    """A state whose one key holds ``entries`` entries, one a second, all inside the window."""
    state = VelocityState(SPECS, max_events_per_key=10 * entries)
    for i in range(entries):
        state.add({"ip": "busy", "buyer": f"b{i % 5_000}", "amount": i % 997}, float(i))
    return state


def late_query_us(entries: int, lag: int) -> float:
    """Microseconds a query ``lag`` entries late takes, averaged over ``QUERIES`` late events, each followed by
    an on-time one (added as well, so the key keeps moving forward)."""
    state = filled(entries)
    now = float(entries)
    spent = 0.0
    for i in range(QUERIES):
        record = {"ip": "busy", "buyer": f"b{i % 5_000}", "amount": i % 997}
        state.query(record, now)  # on time: the running value moves to cover the window
        state.add(record, now)
        started = time.perf_counter()
        state.query(record, now - lag)
        spent += time.perf_counter() - started
        state.add(record, now - lag)
        now += 1.0
    return spent / QUERIES * 1e6


def in_order_us(entries: int) -> float:
    """Microseconds an on-time query and add take."""
    state = filled(entries)
    now = float(entries)
    started = time.perf_counter()
    for i in range(QUERIES):
        record = {"ip": "busy", "buyer": f"b{i % 5_000}", "amount": i % 997}
        state.query(record, now)
        state.add(record, now)
        now += 1.0
    return (time.perf_counter() - started) / QUERIES * 1e6


def at_cap_us(entries: int) -> float:
    """Microseconds an on-time query and add take on a key at its cap of ``entries`` (each add drops the
    oldest entry)."""
    state = VelocityState(SPECS, max_events_per_key=entries)
    for i in range(entries):
        state.add({"ip": "busy", "buyer": f"b{i % 5_000}", "amount": i % 997}, float(i))
    now = float(entries)
    started = time.perf_counter()
    for i in range(QUERIES * 5):
        record = {"ip": "busy", "buyer": f"b{i % 5_000}", "amount": i % 997}
        state.query(record, now)
        state.add(record, now)
        now += 1.0
    return (time.perf_counter() - started) / (QUERIES * 5) * 1e6


def scan_us(entries: int) -> float:
    """Microseconds a scan of the whole window takes for both aggregates: what each late query cost before."""
    state = filled(entries)
    distinct, total = (state._windows[spec.id]["busy"] for spec in SPECS)
    started = time.perf_counter()
    for _ in range(max(1, QUERIES // 20)):
        len(set(distinct.values[: entries - 1]))  # type: ignore[attr-defined]
        sum(total.values[: entries - 1])  # type: ignore[attr-defined]
    return (time.perf_counter() - started) / max(1, QUERIES // 20) * 1e6


def main() -> None:
    figures: dict[str, dict[str, float]] = {}
    for entries in (1_000, 10_000, 100_000):
        row = {
            "in_order_us": round(in_order_us(entries), 2),
            "late_by_10_us": round(late_query_us(entries, 10), 2),
            "late_by_100_us": round(late_query_us(entries, 100), 2),
            "window_scan_us": round(scan_us(entries), 1),
            "at_cap_us": round(at_cap_us(entries), 2),
        }
        figures[str(entries)] = row
        print(
            f"{entries:>7,} entries on the key: in order {row['in_order_us']} us a query and add; late by 10 "
            f"entries {row['late_by_10_us']} us, by 100 {row['late_by_100_us']} us a query; a scan of the window "
            f"{row['window_scan_us']} us; at its cap of {entries:,}, {row['at_cap_us']} us a query and add",
            flush=True,
        )
    print_footer({"late_events": figures})


if __name__ == "__main__":
    main()
